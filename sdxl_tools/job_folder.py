"""A batch job's output folder: the manifest of finished rows, the folder lock, and ``job.json`` (the
input, params and model a folder's results belong to; a resume with anything else is refused)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdxl_tools.files import sha256, write_atomic
from sdxl_tools.identity import ModelIdentity, model_difference

MANIFEST = "manifest.jsonl"
JOB_FILE = "job.json"
LOCK_FILE = ".lock"
IMAGES = "images"


class BatchError(ValueError):
    """The job cannot start; the message says what to fix."""


class Manifest:
    """``manifest.jsonl``: one line per finished row, appended only after the row's image is on disk."""

    def __init__(self, output: Path):
        self.output = output
        self.path = output / MANIFEST
        self.images = output / IMAGES

    def load(self, rows: int, retry_errors: bool = False) -> dict[int, dict[str, Any]]:
        """Finished rows by row number, after dropping what a crash or ``retry_errors`` leaves out."""
        self.images.mkdir(parents=True, exist_ok=True)
        for leftover in self.images.glob(".*.tmp"):  # a write cut off before its rename
            leftover.unlink()
        if not self.path.exists():
            return {}
        text = self.path.read_text(encoding="utf-8")
        entries: dict[int, dict[str, Any]] = {}
        for line in text.splitlines(keepends=True):
            entry = self._parse(line, rows)
            if entry is None or entry["row"] in entries:
                continue
            if retry_errors and entry.get("error") is not None:
                continue
            entries[entry["row"]] = entry
        kept = "".join(json.dumps(e) + "\n" for e in entries.values())
        if kept != text:
            write_atomic(self.path, kept.encode("utf-8"))
        return entries

    def _parse(self, line: str, rows: int) -> dict[str, Any] | None:
        if not line.endswith("\n"):
            return None  # torn by a crash mid-write
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("row"), int) or not 0 <= entry["row"] < rows:
            return None
        if entry.get("file") and not (self.output / entry["file"]).is_file():
            return None  # the line outlived its image (e.g. a power cut): score the row again
        return entry

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Append whole lines with one write each, then flush them to disk."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for entry in entries:
                os.write(fd, (json.dumps(entry) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` (``flock`` on ``output/.lock``) until the block ends.

    Non-blocking: a second job on the folder fails at once. The lock goes with the process (also
    on a kill), so a crashed job never leaves the folder locked. ``flock`` needs a local file
    system (on NFS it may not exclude jobs on other hosts).
    """
    output.mkdir(parents=True, exist_ok=True)
    fd = os.open(output / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BatchError(
                f"{output} is in use by another batch job (pid {owner}); wait for it to end or use another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_job(output: Path) -> dict[str, Any] | None:
    job_file = output / JOB_FILE
    return json.loads(job_file.read_text()) if job_file.exists() else None


def check_job(output: Path, input_path: Path, params: dict[str, Any], model: ModelIdentity, write: bool = True) -> None:
    """Refuse to resume into a folder that holds another input's, other params' or another model's results."""
    job = {"input_sha256": sha256(input_path), "params": params}
    previous = read_job(output)
    if previous is None:
        if write:
            record = {"input": str(input_path.resolve()), **job, "model": dataclasses.asdict(model)}
            write_atomic(output / JOB_FILE, json.dumps(record, indent=2).encode())
        return
    if {k: previous.get(k) for k in job} != job:
        raise BatchError(
            f"{output} holds results of another input file or other params ({output / JOB_FILE}); "
            "rerun with the same --input and --params to resume, or use a new --output"
        )
    difference = model_difference(previous.get("model"), model)
    if difference:
        raise BatchError(
            f"{output} was started with another model: {difference}. Resume with the model it was started "
            "with (a models:/NAME/VERSION URI pins a version), or use a new --output"
        )
