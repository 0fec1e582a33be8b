"""The artifact's files against what ``components.json`` records: sizes and safetensors headers
(cheap: at every load) or every byte's sha256 (``verify_weights: "full"``, the gate, ``verify``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from mlflow.exceptions import MlflowException


def file_sha256(path: Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def component_digest(digests: dict[str, str]) -> str:
    """A component's hash (a ``model_hash`` input) from its files' sha256, by relative path."""
    digest = hashlib.sha256()
    for name in sorted(digests, key=PurePosixPath):
        digest.update(name.encode())
        digest.update(bytes.fromhex(digests[name]))
    return digest.hexdigest()


def _header_problem(path: Path, size: int) -> str | None:
    """Why a safetensors file is cut short or malformed (its header's tensors must end at its end)."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > size - 8:
            return "header longer than the file"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "unreadable safetensors header"
    return None if 8 + length + end == size else f"tensors end at byte {8 + length + end}, the file has {size}"


def verify_weights(
    root: str | Path, files: dict[str, Any] | None, hashes: dict[str, str], full: bool, done: Callable = lambda n: 0
) -> None:
    """Raise naming the component and file when a file differs from ``files`` (component folder ->
    {file: {"sha256", "size"}}); ``full`` hashes every byte, else sizes and safetensors headers.
    ``done(size)`` is called after each file checked (a progress bar's ``update``).

    Every component hash must also follow from its files' recorded digests, so an edited hash fails
    too; with ``full`` the ``model_hash`` computed from those hashes is the content's, not a claim.
    """
    root = Path(root)
    if files is None:
        raise MlflowException(f"{root / 'components.json'} records no file digests: rebuild the artifact")
    unrecorded = sorted(set(hashes) - set(files))
    if unrecorded:
        raise MlflowException(f"component {unrecorded[0]}: no file digests recorded")
    for component, records in files.items():
        for name, record in records.items():
            path, problem = root / component / name, None
            size = path.stat().st_size if path.is_file() else None
            if size is None:
                problem = "missing"
            elif size != record["size"]:
                problem = f"{size} bytes, recorded {record['size']}"
            elif full and (actual := file_sha256(path)) != record["sha256"]:
                problem = f"sha256 {actual[:16]}…, recorded {record['sha256'][:16]}…"
            elif not full and name.endswith(".safetensors"):
                problem = _header_problem(path, size)
            if problem:
                raise MlflowException(f"component {component}, file {name}: {problem}")
            done(size)
        derived = component_digest({n: r["sha256"] for n, r in records.items()})
        if component in hashes and hashes[component] != derived:
            raise MlflowException(
                f"component {component}: recorded hash {hashes[component][:16]}… != its files' {derived[:16]}…"
            )
