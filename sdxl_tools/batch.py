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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from model_pkg.contract import parse_params
from sdxl_tools.client import output_bytes

MANIFEST = "manifest.jsonl"
JOB_FILE = "job.json"
IMAGES = "images"
INPUT_FORMATS = (".csv", ".jsonl", ".parquet")


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
            _write_atomic(self.path, kept.encode("utf-8"))
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


def _write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name, flush to disk, rename: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _input_fingerprint(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_job(output: Path, input_path: Path, params: dict[str, Any]) -> None:
    """Refuse to resume into a folder that holds another input's or other params' results."""
    job = {"input_sha256": _input_fingerprint(input_path), "params": params}
    job_file = output / JOB_FILE
    if job_file.exists():
        previous = json.loads(job_file.read_text())
        if {k: previous.get(k) for k in job} != job:
            raise BatchError(
                f"{output} holds results of another input file or other params ({job_file}); "
                "rerun with the same --input and --params to resume, or use a new --output"
            )
        return
    output.mkdir(parents=True, exist_ok=True)
    _write_atomic(job_file, json.dumps({"input": str(input_path.resolve()), **job}, indent=2).encode())


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
) -> Summary:
    """Score ``input_path`` with a loaded pyfunc ``model`` into ``output`` (see the module docs)."""
    from tqdm.auto import tqdm  # a dependency of diffusers and huggingface_hub

    if chunk_size < 1:
        raise BatchError("--chunk-size must be at least 1")
    input_path, output = Path(input_path), Path(output)
    params = {"on_error": "null", **(params or {})}
    request = parse_params(params)  # bad params fail here, before any output is written
    df = read_prompts(input_path)
    _check_job(output, input_path, params)
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
                    _write_atomic(output / file, output_bytes(out["generated_image"]))
                entries.append(_entry(row, out, file))
            _fsync_dir(manifest.images)  # the renames are durable before their lines exist
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

    import mlflow

    try:
        read_prompts(args.input)  # fail on a bad input file before loading the model
        model = mlflow.pyfunc.load_model(args.model, model_config=args.model_config)
        summary = run(
            model, args.input, args.output, args.params, args.chunk_size, args.retry_errors, not args.no_progress
        )
    except (BatchError, mlflow.exceptions.MlflowException) as e:
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


def cli() -> None:
    """The ``sdxl-batch`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
