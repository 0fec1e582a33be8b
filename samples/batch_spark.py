#!/usr/bin/env python
"""Score a Parquet/CSV file of prompts with Spark into a table (and optionally image files).

    python samples/batch_spark.py --model models:/sdxl@production --input prompts.parquet \\
        --output scored/ [--images images/] [--params '{"num_inference_steps": 30}'] [--seed 42]

The input needs a ``prompt`` column; any of ``image``, ``mask``, ``seed``, ``negative_prompt``,
``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``strength``, ``aspect_ratio``
it has are per-row settings. The output table (Parquet) has one row per input row:
``row`` (0-based position in the input), ``prompt``, ``seed``, ``image`` (base64), ``nsfw``,
``error``. A bad row does not stop the job: it gets a null image and its ``error`` (the sample
sets ``on_error="null"``; pass ``--params '{"on_error": "raise"}'`` to fail on the first one).

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

import mlflow
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StructField, StructType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # model_pkg, when run from a checkout

from sdxl_tools.spark import input_struct, result_type

BATCH_DEFAULTS = {"on_error": "null"}


def read_prompts(spark: SparkSession, path: str) -> DataFrame:
    """Parquet as typed; CSV cells as text (the model parses and validates them per row)."""
    if path.lower().endswith(".csv"):
        return spark.read.csv(path, header=True, inferSchema=False)
    return spark.read.parquet(path)


def with_row_numbers(df: DataFrame) -> DataFrame:
    """Add ``row``: the 0-based position in the input (stable, unlike monotonically_increasing_id)."""
    schema = StructType([*df.schema.fields, StructField("row", LongType(), False)])
    return df.rdd.zipWithIndex().map(lambda pair: (*pair[0], pair[1])).toDF(schema)


def with_seeds(df: DataFrame, seed: int | None) -> DataFrame:
    """Rows without a seed get ``seed + row`` when a seed is given."""
    if seed is None:
        return df
    filled = F.lit(seed).cast("long") + F.col("row")
    return df.withColumn("seed", F.coalesce(F.col("seed"), filled) if "seed" in df.columns else filled)


def score(spark: SparkSession, model_uri: str, df: DataFrame, params: dict[str, Any] | None = None) -> DataFrame:
    """``df`` (with ``row`` and ``prompt``) → ``row, prompt, seed, image, nsfw, error``."""
    params = BATCH_DEFAULTS | (params or {})
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=result_type(params), params=params, env_manager="local")
    out = df.select("row", udf(input_struct(df)).alias("r"))
    error = F.col("r.error") if "error" in result_type(params).fieldNames() else F.lit(None).cast("string")
    return out.select(
        "row",
        "r.prompt",
        "r.seed",
        F.col("r.generated_image").alias("image"),
        F.col("r.nsfw_content_detected").alias("nsfw"),
        error.alias("error"),
    )


def write_images(table: DataFrame, folder: str, fmt: str = "png") -> None:
    """Each non-null image as ``<folder>/<row>.<fmt>``, written by the executors."""
    target = os.path.abspath(folder)
    os.makedirs(target, exist_ok=True)

    def write_partition(rows) -> None:  # runs on the executors; only stdlib inside
        for r in rows:
            path = os.path.join(target, f"{r['row']:06d}.{fmt}")
            with open(path + ".tmp", "wb") as f:
                f.write(base64.b64decode(r["image"].split(",", 1)[-1]))  # base64 or a data: URI
            os.replace(path + ".tmp", path)

    table.where(F.col("image").isNotNull()).select("row", "image").foreachPartition(write_partition)


def score_file(
    spark: SparkSession,
    model_uri: str,
    input_path: str,
    output: str,
    images: str | None = None,
    params: dict[str, Any] | None = None,
    seed: int | None = None,
) -> DataFrame:
    """Read, score, write the table to ``output`` (Parquet) and the images to ``images``; return the table."""
    df = with_seeds(with_row_numbers(read_prompts(spark, input_path)), seed)
    score(spark, model_uri, df, params).write.mode("overwrite").parquet(output)
    table = spark.read.parquet(output)  # written once: the images come from it, not from a second scoring
    if images:
        write_images(table, images, (params or {}).get("output_format", "png"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model URI (path, runs:/, models:/NAME@alias)")
    parser.add_argument("--input", required=True, help="prompts file: .parquet or .csv (with a header)")
    parser.add_argument("--output", required=True, help="folder for the result table (Parquet)")
    parser.add_argument("--images", help="also write each image to this folder as <row>.png")
    parser.add_argument("--params", type=json.loads, default={}, help="request params as JSON")
    parser.add_argument("--seed", type=int, help="rows without a seed get seed + row")
    parser.add_argument("--master", default="local[*]", help="Spark master when no session exists")
    args = parser.parse_args()

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this interpreter's packages
    spark = SparkSession.builder.master(args.master).appName("sdxl-batch").getOrCreate()
    table = score_file(spark, args.model, args.input, args.output, args.images, args.params, args.seed)
    counts = table.groupBy(F.col("error").isNull().alias("ok")).count().collect()
    done = {r["ok"]: r["count"] for r in counts}
    print(f"{done.get(True, 0)} images, {done.get(False, 0)} errors → {args.output}")
    spark.stop()


if __name__ == "__main__":
    main()
