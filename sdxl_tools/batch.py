"""File-to-images batch job: a prompts file in, image files and a JSON Lines manifest out, resumable.

::

    sdxl-pyfunc batch --model URI --input prompts.{csv,jsonl,parquet} --output DIR \\
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

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from model_pkg.contract import parse_params
from sdxl_tools.client import output_bytes
from sdxl_tools.files import fsync_dir, write_atomic
from sdxl_tools.identity import ModelIdentity, loaded_identity
from sdxl_tools.job_folder import IMAGES, BatchError, Manifest, check_job, output_lock

INPUT_FORMATS = (".csv", ".jsonl", ".parquet")


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


def _planned_seed(value: Any) -> int | None:
    """A row's seed as the manifest records it, or None when the row's seed is not a plain int."""
    if isinstance(value, bool) or value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    try:
        return int(value) if float(value) == int(float(value)) else None
    except (TypeError, ValueError):
        return None


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
        return run_locked(model, input_path, output, params, chunk_size, retry_errors, progress, source)


def run_locked(
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
    if chunk_size < 1:
        raise BatchError("--chunk-size must be at least 1")
    input_path, output = Path(input_path), Path(output)
    params = {"on_error": "null", **(params or {})}
    request = parse_params(params)  # bad params fail here, before any output is written
    df = read_prompts(input_path)
    model.unwrap_python_model().check_request(df, params)  # request-level errors before anything is written
    try:
        return _score(model, df, input_path, output, params, request, chunk_size, retry_errors, progress, source)
    except OSError as e:  # disk full, read-only or vanished folder, a file size limit
        raise BatchError(
            f"cannot write the job's output: {e.strerror or e} ({e.filename or output}); the manifest holds "
            "the rows finished so far: make room or make the folder writable, then rerun to resume"
        ) from e


def _score(
    model: Any,
    df: pd.DataFrame,
    input_path: Path,
    output: Path,
    params: dict[str, Any],
    request: Any,
    chunk_size: int,
    retry_errors: bool,
    progress: bool,
    source: ModelIdentity | None,
) -> Summary:
    """Score the rows the manifest lacks (:func:`run_locked` after its checks)."""
    from tqdm.auto import tqdm  # a dependency of diffusers and huggingface_hub

    check_job(output, input_path, params, loaded_identity(model, source))
    df = fix_seeds(df, request.seed)
    fmt = request.output_format

    manifest = Manifest(output)
    seeds = [_planned_seed(v) for v in df["seed"]] if "seed" in df.columns else None
    done = manifest.load(len(df), retry_errors, fmt, seeds)
    for dropped in manifest.dropped:
        print(f"warning: {dropped}", file=sys.stderr)
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
