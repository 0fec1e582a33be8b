"""File-to-images batch job: a prompts file in, image files and a JSON Lines manifest out, resumable.

::

    python -m sdxl_tools.batch --model URI --input prompts.{csv,jsonl,parquet} --output DIR \\
        [--params JSON] [--chunk-size N] [--model-config JSON] [--retry-errors]

One input row = one image. Rows are scored ``--chunk-size`` at a time (rows of a chunk that share
a configuration are one batched pipeline call). ``DIR/images/<row>.<format>`` holds each image
and ``DIR/manifest.jsonl`` one line per finished row: ``{"row", "prompt", "seed", "file", "nsfw",
"error"}`` (``row`` is the 0-based position in the input; ``file`` is relative to DIR, null for a
failed row). The per-row error mode is on by default (``on_error="null"``): a bad row gets its
error in the manifest and the job goes on.

Resume: rerun the same command. Rows already in the manifest are skipped. An image is written to
a temporary name, flushed and renamed, and its manifest line is appended only after that, so a kill
at any point leaves either a complete line for a row or none: a row without a line is scored again
and its file (named by row) replaced, never duplicated. A torn last line or a line whose image is
missing is dropped when the job starts. Seeds are fixed per row before scoring (a ``seed`` column,
else request ``seed`` + row number), so a resumed row gets the seed it would have had.

One job per folder, one model per folder: a job holds an exclusive lock on ``DIR/.lock`` while it
runs (a second job on the folder is refused at once), and ``DIR/job.json`` records the input's
sha256, the params and the model's identity (:class:`ModelIdentity`: registry version, model hash,
model config). Resuming with anything else is refused; the CLI checks before it loads the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from model_pkg.contract import parse_params
from sdxl_tools.client import output_bytes
from sdxl_tools.files import fsync_dir, write_atomic

MANIFEST = "manifest.jsonl"
JOB_FILE = "job.json"
LOCK_FILE = ".lock"
IMAGES = "images"
INPUT_FORMATS = (".csv", ".jsonl", ".parquet")
_REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class BatchError(ValueError):
    """The job cannot start; the message says what to fix."""


@dataclass(frozen=True)
class Summary:
    rows: int  # in the input
    skipped: int  # already in the manifest when the job started
    scored: int  # scored by this run
    images: int  # in the manifest at the end
    errors: int  # in the manifest at the end
    seconds: float  # scoring time of this run

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0


def read_prompts(path: str | Path) -> pd.DataFrame:
    """The input rows, in file order. CSV cells stay text (the model validates them per row)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in INPUT_FORMATS:
        raise BatchError(f"{path}: unsupported input format; use one of {', '.join(INPUT_FORMATS)}")
    if not path.is_file():
        raise BatchError(f"{path}: no such file")
    if suffix == ".csv":
        # keep "NA", "None", ... as text: only an empty cell is missing
        df = pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[""])
    elif suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.DataFrame(list(_jsonl_records(path)))
    if "prompt" not in df.columns:
        raise BatchError(f"{path}: no 'prompt' column (columns: {list(df.columns)})")
    return df.reset_index(drop=True)


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise BatchError(f"{path}:{number}: expected a JSON object per line")
            yield record


def fix_seeds(df: pd.DataFrame, request_seed: int) -> pd.DataFrame:
    """Give every row without a seed ``request_seed + row`` (over the whole file, not per chunk).

    The model's own rule (row ``i`` of a call gets ``s + i``) would restart at every chunk and
    change with the chunk size. Rows with a seed, valid or not, keep theirs (a bad one is that
    row's error). With no request seed (-1) rows stay without one and the model draws it.
    """
    if request_seed < 0:
        return df
    seeds = (df["seed"] if "seed" in df.columns else pd.Series(None, index=df.index)).astype(object)
    missing = seeds.isna()
    seeds[missing] = [request_seed + int(row) for row in df.index[missing]]
    return df.assign(seed=seeds)


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


def _input_fingerprint(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a folder's images; ``job.json`` keeps it and a resume must match it."""

    uri: str | None  # as given (not compared: models:/sdxl@production and models:/sdxl/3 may agree)
    name: str | None  # registered model, for models:/NAME@alias and models:/NAME/VERSION
    version: str | None  # the version the alias pointed at when the job started
    model_hash: str  # sha256 over the components' hashes, as in the images' PNG metadata
    model_config: dict[str, Any]  # the model config the model loads with (artifact's + overrides)

    def describe(self) -> str:
        where = f"version {self.version} of {self.name}" if self.version else (self.uri or "a loaded model")
        return f"{where} (model hash {(self.model_hash or '?')[:12]})"


def registry_version(uri: str) -> tuple[str, str] | None:
    """``(name, version)`` for ``models:/NAME@alias`` (resolved now) and ``models:/NAME/VERSION``."""
    match = _REGISTRY_URI.match(uri)
    if match is None:
        return None
    name, version = match["name"], match["version"]
    if match["alias"]:
        from mlflow import MlflowClient

        version = MlflowClient().get_model_version_by_alias(name, match["alias"]).version
    return name, str(version)  # sqlite returns the version as an int


def artifact_identity(
    local: Path, uri: str | None, registered: tuple[str, str] | None, overrides: dict[str, Any] | None
) -> ModelIdentity:
    """The identity of a model folder, read from its files without loading the pipelines."""
    from mlflow.models import Model

    from model_pkg.catalog import model_hash
    from model_pkg.config import load_model_config
    from model_pkg.pipelines import MANIFEST as COMPONENTS
    from model_pkg.pipelines import ManifestKey

    flavor = Model.load(local).flavors["python_function"]
    components = json.loads((local / flavor["artifacts"]["sdxl"]["path"] / COMPONENTS).read_text())
    packaged = flavor.get("config") or {}
    # as mlflow.pyfunc.load_model(model_config=...): only keys the artifact declares are overridden
    config = packaged | {k: v for k, v in (overrides or {}).items() if k in packaged}
    name, version = registered or (None, None)
    return ModelIdentity(
        uri,
        name,
        version,
        model_hash(components[ManifestKey.HASHES]),
        load_model_config(config).model_dump(mode="json"),
    )


def loaded_identity(model: Any, source: ModelIdentity | None = None) -> ModelIdentity:
    """The identity of a loaded model: its own model hash and config, the registry version of ``source``."""
    python_model = model.unwrap_python_model()
    return ModelIdentity(
        source.uri if source else None,
        source.name if source else None,
        source.version if source else None,
        python_model.pipelines.catalog.model_hash,
        python_model.config.model_dump(mode="json"),
    )


def _model_difference(recorded: dict[str, Any] | None, current: ModelIdentity) -> str | None:
    """Why ``current`` is not the model that made the folder's images, or None when it is.

    Fields ``current`` does not know yet (empty) are not compared: the CLI first compares the
    registry version, before downloading, then the model hash and config, before loading.
    """
    if not recorded:
        return "its job.json records no model"
    previous = ModelIdentity(**{f.name: recorded.get(f.name) for f in dataclasses.fields(ModelIdentity)})
    made = f"it holds images of {previous.describe()}"
    if previous.version and current.version and (previous.name, previous.version) != (current.name, current.version):
        return f"{made}; {current.uri} is version {current.version}"
    if current.model_hash and current.model_hash != previous.model_hash:
        return f"{made}; {current.uri or 'this model'} has model hash {current.model_hash[:12]}"
    if current.model_config and current.model_config != previous.model_config:
        old, new = previous.model_config, current.model_config
        changed = ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old | new) if old.get(k) != new.get(k))
        return f"the model config differs: {changed}"
    return None


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


def _read_job(output: Path) -> dict[str, Any] | None:
    job_file = output / JOB_FILE
    return json.loads(job_file.read_text()) if job_file.exists() else None


def _check_job(
    output: Path, input_path: Path, params: dict[str, Any], model: ModelIdentity, write: bool = True
) -> None:
    """Refuse to resume into a folder that holds another input's, other params' or another model's results."""
    job = {"input_sha256": _input_fingerprint(input_path), "params": params}
    previous = _read_job(output)
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
    difference = _model_difference(previous.get("model"), model)
    if difference:
        raise BatchError(
            f"{output} was started with another model: {difference}. Resume with the model it was started "
            "with (a models:/NAME/VERSION URI pins a version), or use a new --output"
        )


def _entry(row: int, out: dict[str, Any], file: str | None) -> dict[str, Any]:
    seed, nsfw, error = out["seed"], out["nsfw_content_detected"], out.get("error")
    return {
        "row": row,
        "prompt": out["prompt"] if isinstance(out["prompt"], str) else None,
        "seed": None if pd.isna(seed) else int(seed),
        "file": file,
        "nsfw": None if nsfw is None or pd.isna(nsfw) else bool(nsfw),
        "error": error if isinstance(error, str) else None,
    }


def run(
    model: Any,
    input_path: str | Path,
    output: str | Path,
    params: dict[str, Any] | None = None,
    chunk_size: int = 8,
    retry_errors: bool = False,
    progress: bool = True,
    source: ModelIdentity | None = None,
) -> Summary:
    """Score ``input_path`` with a loaded pyfunc ``model`` into ``output`` (see the module docs).

    ``source``: where the model came from (its registry version), recorded in ``job.json``.
    """
    with output_lock(Path(output)):
        return _run(model, input_path, output, params, chunk_size, retry_errors, progress, source)


def _run(
    model: Any,
    input_path: str | Path,
    output: str | Path,
    params: dict[str, Any] | None,
    chunk_size: int,
    retry_errors: bool,
    progress: bool,
    source: ModelIdentity | None,
) -> Summary:
    """:func:`run` with the output lock held."""
    from tqdm.auto import tqdm  # a dependency of diffusers and huggingface_hub

    if chunk_size < 1:
        raise BatchError("--chunk-size must be at least 1")
    input_path, output = Path(input_path), Path(output)
    params = {"on_error": "null", **(params or {})}
    request = parse_params(params)  # bad params fail here, before any output is written
    df = read_prompts(input_path)
    model.unwrap_python_model().check_request(df, params)  # request-level errors before anything is written
    _check_job(output, input_path, params, loaded_identity(model, source))
    df = fix_seeds(df, request.seed)
    fmt = request.output_format

    manifest = Manifest(output)
    done = manifest.load(len(df), retry_errors)
    pending = [row for row in range(len(df)) if row not in done]
    bar = tqdm(total=len(df), initial=len(done), unit="img", desc="scoring", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    try:
        for i in range(0, len(pending), chunk_size):
            rows = pending[i : i + chunk_size]
            result = model.predict(df.loc[rows].reset_index(drop=True), params=params)
            entries = []
            for row, out in zip(rows, result.to_dict("records"), strict=True):
                file = None
                if isinstance(out["generated_image"], str):
                    file = f"{IMAGES}/{row:06d}.{fmt}"
                    write_atomic(output / file, output_bytes(out["generated_image"]))
                entries.append(_entry(row, out, file))
            fsync_dir(manifest.images)  # the renames are durable before their lines exist
            manifest.append(entries)
            done.update((e["row"], e) for e in entries)
            bar.update(len(entries))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    errors = sum(e["error"] is not None for e in done.values())
    return Summary(len(df), len(df) - len(pending), len(pending), len(done) - errors, errors, seconds)


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_tools.batch",
        description="Score a prompts file into image files and a JSON Lines manifest; rerun to resume.",
    )
    parser.add_argument("--model", required=True, help="model URI: a path, runs:/..., models:/NAME@alias")
    parser.add_argument("--input", required=True, type=Path, help="prompts file: .csv, .jsonl or .parquet")
    parser.add_argument("--output", required=True, type=Path, help="folder for images/ and manifest.jsonl")
    parser.add_argument("--params", type=_json_arg, default={}, help="request params, e.g. '{\"seed\": 42}'")
    parser.add_argument("--chunk-size", type=int, default=8, help="rows per predict call (default 8)")
    parser.add_argument("--model-config", type=_json_arg, default=None, help="model config overrides (JSON)")
    parser.add_argument("--retry-errors", action="store_true", help="score rows that failed earlier again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        summary = _run_job(args)
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished rows are in the manifest; rerun the same command to resume", file=sys.stderr)
        return 130
    print(
        f"{summary.rows} rows: {summary.images} images, {summary.errors} errors "
        f"({args.output / MANIFEST}); {summary.skipped} done earlier, {summary.scored} scored now "
        f"in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s)"
    )
    return 0


def _run_job(args: argparse.Namespace) -> Summary:
    """The CLI job: lock the folder, check the model against ``job.json`` before loading it, score."""
    import mlflow

    from sdxl_tools.scratch import scratch_dir

    params = {"on_error": "null", **args.params}
    try:
        parse_params(params)
        read_prompts(args.input)  # fail on bad params or a bad input file before touching the model
        with output_lock(args.output), scratch_dir() as scratch:
            registered = registry_version(args.model)
            # a moved alias is refused before anything is downloaded
            early = ModelIdentity(args.model, *(registered or (None, None)), "", {})
            _check_job(args.output, args.input, params, early, write=False)
            local = Path(args.model)
            if not local.is_dir():  # download once; the identity and the model come from the same files
                pinned = f"models:/{registered[0]}/{registered[1]}" if registered else args.model
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(scratch)))
            source = artifact_identity(local, args.model, registered, args.model_config)
            _check_job(args.output, args.input, params, source, write=False)
            model = mlflow.pyfunc.load_model(str(local), model_config=args.model_config)
            return _run(
                model, args.input, args.output, params, args.chunk_size, args.retry_errors, not args.no_progress, source
            )
    except mlflow.exceptions.MlflowException as e:
        raise BatchError(str(e)) from e


def cli() -> None:
    """The ``sdxl-batch`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
