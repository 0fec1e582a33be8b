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

Only imported where Spark is used: the model itself does not need pyspark.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyspark.sql import Column, DataFrame
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


def input_struct(df: DataFrame) -> Column:
    """``struct(prompt, image?, mask?, seed?, ...)``: the model's input columns that ``df`` has, by name."""
    if "prompt" not in df.columns:
        raise ValueError(f"the DataFrame needs a 'prompt' column; it has {df.columns}")
    return F.struct(*(c for c in INPUT_COLUMNS if c in df.columns))
