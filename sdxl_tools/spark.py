"""Spark helpers: the exact ``result_type`` for ``spark_udf`` and the one-struct input column.

::

    from pyspark.sql.functions import col
    from sdxl_tools.spark import input_struct, result_type

    params = {"num_inference_steps": 30, "on_error": "null"}
    udf = mlflow.pyfunc.spark_udf(spark, uri, result_type=result_type(params), params=params,
                                  env_manager="local")
    scored = df.withColumn("out", udf(input_struct(df))).select("id", "out.*")

Per-row columns go in as ONE struct: ``spark_udf`` maps unnamed arguments by position to the
signature, a struct arrives in ``predict`` as a DataFrame with its field names. ``params`` are
fixed per UDF; vary a setting per row with a column of the same name (``seed``, ``height``, ...).
Each Arrow batch is its own ``predict`` call, so a request ``seed`` ``s`` gives row ``i`` *of its
batch* the seed ``s + i``: give each row its own seed in a ``seed`` column instead.

On a cluster use :func:`model_udf` (docs/batch-spark.md): the model is downloaded once per node into
a cache folder, loaded once per Python worker with its ``model_config``, and errors name a row key::

    udf = model_udf(spark, "models:/sdxl@production", params, model_config={"max_steps": 50}, key="id")
    scored = df.withColumn("out", udf(input_struct(df, key="id"))).select("id", "out.*")

Only imported where Spark is used: the model itself does not need pyspark.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from filelock import FileLock
from mlflow.exceptions import MlflowException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, DataType, LongType, StringType, StructField, StructType

from model_pkg.contract import ERROR_COLUMN, INPUT_COLUMNS, OUTPUT_COLUMNS
from sdxl_tools.signature import output_schema

# The struct type to pass as spark_udf(result_type=...): the signature's output columns, as DDL.
_DDL = {c.name: f"{c.name} {c.type.name}" for c in output_schema().inputs}
SPARK_RESULT_TYPE = ", ".join(_DDL[c] for c in OUTPUT_COLUMNS)
SPARK_RESULT_TYPE_WITH_ERRORS = f"{SPARK_RESULT_TYPE}, {_DDL[ERROR_COLUMN]}"  # for params={"on_error": "null"}
_TYPES: dict[str, DataType] = {"string": StringType(), "boolean": BooleanType(), "long": LongType()}


def _struct(ddl: str) -> StructType:
    """The contract's DDL (``name type, ...``) as a StructType; no JVM needed."""
    return StructType([StructField(name, _TYPES[kind]) for name, kind in (f.split() for f in ddl.split(","))])


def result_type(params: Mapping[str, Any] | None = None) -> StructType:
    """The struct to pass as ``spark_udf(result_type=...)`` for these UDF params.

    ``prompt string, generated_image string, nsfw_content_detected boolean, seed long``, plus
    ``error string`` when ``params["on_error"] == "null"`` (the model then returns that column).
    """
    with_errors = str((params or {}).get("on_error", "")).lower() == "null"  # the model takes any case
    return _struct(SPARK_RESULT_TYPE_WITH_ERRORS if with_errors else SPARK_RESULT_TYPE)


def input_struct(df: DataFrame, key: str | None = None) -> Column:
    """``struct(prompt, image?, mask?, seed?, ...)``: the model's input columns that ``df`` has, by name.

    With ``key``, that column goes first (for :func:`model_udf`, which strips it before the model and
    names it in errors)."""
    if "prompt" not in df.columns:
        raise ValueError(f"the DataFrame needs a 'prompt' column; it has {df.columns}")
    if key is not None and key not in df.columns:
        raise ValueError(f"key column {key!r} is not in the DataFrame; it has {df.columns}")
    return F.struct(*([key] if key else []), *(c for c in INPUT_COLUMNS if c in df.columns and c != key))


# ---- model_udf: our scoring route for clusters -------------------------------------------------

logger = logging.getLogger(__name__)
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "sdxl-model-cache"  # node-local unless told otherwise
KEEP_COPIES = 2  # cached models kept per node: the one in use and the previous one (a rollback)
# Per Python worker: (resolved URI, model_config) → the loaded model. Spark reuses Python workers
# across tasks and jobs (spark.python.worker.reuse), so a second UDF of the same model loads nothing.
_MODELS: dict[tuple[str, str], Any] = {}
LOADS: dict[tuple[str, str], int] = {}  # loads per key in this process (tests read it)


def pin_model_uri(model_uri: str) -> str:
    """``models:/NAME@alias`` → ``models:/NAME/VERSION``, resolved once on the driver, so that every
    executor loads the same version even if the alias moves during the job. Other URIs unchanged."""
    from sdxl_tools.identity import registry_version

    registered = registry_version(model_uri) if "@" in model_uri else None
    return f"models:/{registered[0]}/{registered[1]}" if registered else model_uri


def cache_entry(cache_dir: Path, model_uri: str) -> Path:
    """The folder of one model in a node's cache: named by a hash of its (pinned) URI."""
    return Path(cache_dir) / hashlib.sha256(model_uri.encode()).hexdigest()[:16]


def cached_model(model_uri: str, cache_dir: Path, keep: int = KEEP_COPIES) -> Path:
    """The local copy of ``model_uri`` in ``cache_dir``, downloaded by the first process of the node
    that needs it (the others wait on a file lock and reuse it). Written to a temporary folder and
    renamed, so a killed download never leaves a half model; older copies beyond ``keep`` are removed."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_entry(cache_dir, model_uri)
    with FileLock(str(target) + ".lock", timeout=3600):
        if not (target / "MLmodel").exists():
            partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir))
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(partial))
                os.replace(local, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            (target / ".uri").write_text(model_uri)
            logger.info("downloaded %s into %s", model_uri, target)
        os.utime(target)  # last use: what cleanup keeps
        cleanup_cache(cache_dir, keep=keep, skip=target)
    return target


def cleanup_cache(cache_dir: Path, keep: int = KEEP_COPIES, skip: Path | None = None) -> list[Path]:
    """Remove all but the ``keep`` most recently used models (and leftover partial downloads older
    than an hour); returns what was removed. A copy another process is downloading is never touched
    (its lock is held), and a loaded model does not need its files any more."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    entries = sorted(
        (p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime, reverse=True,
    )  # fmt: skip
    stale = [p for p in entries[keep:] if p != skip]
    stale += [p for p in cache_dir.glob(".partial-*") if time.time() - p.stat().st_mtime > 3600]
    removed = []
    for path in stale:
        lock = FileLock(str(path) + ".lock", timeout=0) if not path.name.startswith(".") else None
        try:
            if lock is not None:
                lock.acquire()
        except TimeoutError:
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            if lock is not None:
                lock.release()
    return removed


def _loaded(model_uri: str, model_config: dict[str, Any] | None, cache_dir: str, uris: tuple[str, str]) -> Any:
    """The model for this Python worker: loaded once per (URI, model_config), from the node's cache."""
    key = (model_uri, json.dumps(model_config or {}, sort_keys=True))
    if key not in _MODELS:
        tracking, registry = uris  # the driver's stores, for models:/ and runs:/ URIs
        if tracking and not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(tracking)
        if registry and not os.environ.get("MLFLOW_REGISTRY_URI"):
            mlflow.set_registry_uri(registry)
        local = cached_model(model_uri, Path(cache_dir))
        _MODELS[key] = mlflow.pyfunc.load_model(str(local), model_config=model_config)
        LOADS[key] = LOADS.get(key, 0) + 1
    return _MODELS[key]


def _score(model: Any, batch: pd.DataFrame, params: dict[str, Any], key: str | None, raise_errors: bool):
    """One Arrow batch through the model, errors named by the row key."""
    keys = batch.pop(key).tolist() if key else None
    out = model.predict(batch.reset_index(drop=True), params | {"on_error": "null"})
    errors = out.pop("error")
    failed = errors.notna()
    if key and failed.any():
        errors = errors.astype(object).where(~failed, [f"Row {k}: {e}" for k, e in zip(keys, errors, strict=True)])
    if raise_errors and failed.any():
        first = errors[failed].iloc[0]
        more = f" (and {int(failed.sum()) - 1} more rows of this batch)" if failed.sum() > 1 else ""
        raise MlflowException.invalid_parameter_value(first if key else f"{first} (no key column given){more}")
    if not raise_errors:
        out["error"] = errors
    return out


def model_udf(
    spark: SparkSession,
    model_uri: str,
    params: Mapping[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    key: str | None = None,
):
    """A pandas UDF scoring ``input_struct(df, key=key)`` on any master, for big models.

    * the model is downloaded once per node into ``cache_dir`` (node-local; default
      ``<tmp>/sdxl-model-cache``) under a file lock, and cleaned up to the newest copies;
    * it is loaded once per Python worker with ``model_config`` and reused by later tasks, jobs and
      other ``model_udf`` calls of the same model and config;
    * a registry alias is resolved to its version here, on the driver;
    * with ``key``, errors read ``Row <key>: ...`` (the same in every attempt); one bad row never
      fails its batch unless ``params["on_error"]`` is ``"raise"``, which fails the job naming it.

    The output struct is :func:`result_type` of ``params``; ``spark`` is the driver's session.
    """
    del spark  # the route needs nothing from the session; kept for spark_udf's call shape
    params = dict(params or {})
    raise_errors = str(params.pop("on_error", "raise")).lower() != "null"
    returns = result_type({} if raise_errors else {"on_error": "null"})
    pinned = pin_model_uri(model_uri)
    cache = str(Path(cache_dir or DEFAULT_CACHE).absolute())
    uris = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        model = _loaded(pinned, model_config, cache, uris)
        for batch in batches:
            yield _score(model, batch, params, key, raise_errors)

    return F.pandas_udf(score, returnType=returns)
