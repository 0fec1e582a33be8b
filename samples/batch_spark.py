#!/usr/bin/env python
"""Score a Parquet/CSV file of prompts with Spark into a table (and optionally image files).

    python samples/batch_spark.py --model models:/sdxl@production --input prompts.parquet \\
        --output /shared/scored [--images /shared/images] [--params '{"num_inference_steps": 30}'] \\
        [--seed 42] [--key id] [--model-config '{"max_steps": 50}'] [--cache-dir /local/sdxl-cache]

The input needs a ``prompt`` column; any of ``image``, ``mask``, ``seed``, ``negative_prompt``,
``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``strength``, ``aspect_ratio``
it has are per-row settings. The output table (Parquet) has one row per input row:
``row`` (the ``--key`` column, else the 0-based position in the input), ``prompt``, ``seed``,
``image`` (base64), ``nsfw``, ``error``. A bad row does not stop the job: it gets a null image and
its ``error``, ``Row <row>: ...`` (the sample sets ``on_error="null"``; pass
``--params '{"on_error": "raise"}'`` to fail on the first one).

On a cluster: rows are spread over ``--partitions`` tasks (default: the cluster's cores,
``defaultParallelism``) by range of ``row``; the model is scored with ``sdxl_tools.spark.model_udf``
(downloaded once per node into ``--cache-dir``, loaded once per Python worker with
``--model-config``). ``--output`` and ``--images`` must be on a filesystem every executor and the
driver see (HDFS/S3 for the table; a shared mount for the images): the executors write the images.
Restartable: rows already in the output table are not scored again, images already written are
kept, so rerunning a failed or killed job finishes it.

Seeds: each Arrow batch is a separate ``predict`` call, so a request ``seed`` would restart at
every batch. Rows therefore get their seed from a ``seed`` column; ``--seed S`` fills the rows
without one with ``S + row``, so every row is reproducible alone. Without either, the model draws
a random seed per row and the table records it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StructField, StructType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # model_pkg, when run from a checkout

from sdxl_tools.spark import input_struct, model_udf

BATCH_DEFAULTS = {"on_error": "null"}


def read_prompts(spark: SparkSession, path: str) -> DataFrame:
    """Parquet as typed; CSV cells as text (the model parses and validates them per row)."""
    if path.lower().endswith(".csv"):
        return spark.read.csv(path, header=True, inferSchema=False)
    return spark.read.parquet(path)


def with_row_numbers(df: DataFrame, key: str | None = None) -> DataFrame:
    """Add ``row``: the ``key`` column, else the 0-based position in the input (stable across attempts:
    a file is read in the same order every time, unlike monotonically_increasing_id)."""
    if key:
        return df.withColumn("row", F.col(key).cast("long"))
    schema = StructType([*df.schema.fields, StructField("row", LongType(), False)])
    return df.rdd.zipWithIndex().map(lambda pair: (*pair[0], pair[1])).toDF(schema)


def spread(df: DataFrame, partitions: int) -> DataFrame:
    """``partitions`` tasks by range of ``row`` (a small file is one partition: one executor core)."""
    return df.repartitionByRange(max(1, partitions), "row")


def with_seeds(df: DataFrame, seed: int | None) -> DataFrame:
    """Rows without a seed get ``seed + row`` when a seed is given."""
    if seed is None:
        return df
    filled = F.lit(seed).cast("long") + F.col("row")
    return df.withColumn("seed", F.coalesce(F.col("seed"), filled) if "seed" in df.columns else filled)


def score(
    spark: SparkSession,
    model_uri: str,
    df: DataFrame,
    params: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    cache_dir: str | None = None,
) -> DataFrame:
    """``df`` (with ``row`` and ``prompt``) → ``row, prompt, seed, image, nsfw, error``."""
    params = BATCH_DEFAULTS | (params or {})
    udf = model_udf(spark, model_uri, params, model_config=model_config, cache_dir=cache_dir, key="row")
    inputs = df.select("row", *(c for c in df.columns if c != "row"))
    out = inputs.select("row", udf(input_struct(inputs, key="row")).alias("r"))
    with_errors = str(params["on_error"]).lower() == "null"
    error = F.col("r.error") if with_errors else F.lit(None).cast("string")
    return out.select(
        "row",
        "r.prompt",
        "r.seed",
        F.col("r.generated_image").alias("image"),
        F.col("r.nsfw_content_detected").alias("nsfw"),
        error.alias("error"),
    )


def write_images(table: DataFrame, folder: str, fmt: str = "png") -> None:
    """Each non-null image as ``<folder>/<row>.<fmt>``, written by the executors (atomically: a
    temporary name, then renamed); files already there are kept. ``folder`` is used as given, so it
    must be the same absolute path on every executor (a shared mount)."""
    if not os.path.isabs(folder):
        raise ValueError(f"--images must be an absolute path on a filesystem all executors share, not {folder!r}")
    os.makedirs(folder, exist_ok=True)

    def write_partition(rows) -> None:  # runs on the executors; only stdlib inside
        os.makedirs(folder, exist_ok=True)
        for r in rows:
            path = os.path.join(folder, f"{r['row']:06d}.{fmt}")
            if os.path.exists(path):
                continue
            partial = f"{path}.{os.getpid()}.tmp"
            with open(partial, "wb") as f:
                f.write(base64.b64decode(r["image"].split(",", 1)[-1]))  # base64 or a data: URI
            os.replace(partial, path)

    table.where(F.col("image").isNotNull()).select("row", "image").foreachPartition(write_partition)


def done_rows(spark: SparkSession, output: str) -> DataFrame | None:
    """The rows a previous run already wrote to the output table (Spark commits a write whole)."""
    jvm = spark.sparkContext._jvm  # Hadoop's FileSystem: the same check for a local folder, HDFS or S3
    path = jvm.org.apache.hadoop.fs.Path(output)
    if not path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).exists(path):
        return None
    return spark.read.parquet(output).select("row")


def score_file(
    spark: SparkSession,
    model_uri: str,
    input_path: str,
    output: str,
    images: str | None = None,
    params: dict[str, Any] | None = None,
    seed: int | None = None,
    key: str | None = None,
    partitions: int | None = None,
    model_config: dict[str, Any] | None = None,
    cache_dir: str | None = None,
) -> DataFrame:
    """Read, score the rows not yet in ``output`` (Parquet, appended), write the images to ``images``;
    return the whole table."""
    df = with_seeds(with_row_numbers(read_prompts(spark, input_path), key), seed)
    done = done_rows(spark, output)
    if done is not None:
        df = df.join(done, "row", "left_anti")
    df = spread(df, partitions or spark.sparkContext.defaultParallelism)
    score(spark, model_uri, df, params, model_config, cache_dir).write.mode("append").parquet(output)
    table = spark.read.parquet(output)  # written once: the images come from it, not from a second scoring
    if images:
        write_images(table, images, (params or {}).get("output_format", "png"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model URI (path, runs:/, models:/NAME@alias)")
    parser.add_argument("--input", required=True, help="prompts file: .parquet or .csv (with a header)")
    parser.add_argument("--output", required=True, help="folder for the result table (Parquet, appended)")
    parser.add_argument("--images", help="also write each image to this shared folder as <row>.png")
    parser.add_argument("--params", type=json.loads, default={}, help="request params as JSON")
    parser.add_argument("--seed", type=int, help="rows without a seed get seed + row")
    parser.add_argument("--key", help="an input column that identifies each row (default: its position)")
    parser.add_argument("--partitions", type=int, help="tasks to spread the rows over (default: cluster cores)")
    parser.add_argument("--model-config", type=json.loads, help="model_config overrides as JSON")
    parser.add_argument("--cache-dir", help="node-local folder for the model's copy (default: <tmp>/sdxl-model-cache)")
    parser.add_argument("--master", default="local[*]", help="Spark master when no session exists")
    args = parser.parse_args()

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this interpreter's packages
    spark = SparkSession.builder.master(args.master).appName("sdxl-batch").getOrCreate()
    images = os.path.abspath(args.images) if args.images else None  # relative: from here, for a one-machine run
    table = score_file(
        spark, args.model, args.input, args.output, images, args.params, args.seed, args.key, args.partitions,
        args.model_config, args.cache_dir,
    )  # fmt: skip
    counts = table.groupBy(F.col("error").isNull().alias("ok")).count().collect()
    done = {r["ok"]: r["count"] for r in counts}
    print(f"{done.get(True, 0)} images, {done.get(False, 0)} errors → {args.output}")
    spark.stop()


if __name__ == "__main__":
    main()
