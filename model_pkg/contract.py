"""The artifact's contract as MLflow sees it: signature (inputs, outputs, params) and output frame.

Params come from :class:`~model_pkg.params.GenerationParams`, so defaults live in one place.
Per-row override columns are typed ``Any`` in the schema: MLflow's enforcement refuses a ``long``
column with one missing value and a ``double`` column holding ``7``; the model validates them
instead, naming the row and the column.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

from model_pkg.params import ROW_FIELDS, GenerationParams

OUTPUT_COLUMNS = ("prompt", "generated_image", "nsfw_content_detected", "seed")
ERROR_COLUMN = "error"  # added with on_error="null"
_PARAM_TYPES = {str: "string", int: "long", float: "double", bool: "boolean"}
# The struct type to pass as spark_udf(result_type=...): names and order of the output columns.
SPARK_RESULT_TYPE = "prompt string, generated_image string, nsfw_content_detected boolean, seed long"
SPARK_RESULT_TYPE_WITH_ERRORS = SPARK_RESULT_TYPE + ", error string"  # for params={"on_error": "null"}


@dataclass(frozen=True)
class RowResult:
    """One output row; ``generated_image`` is None and ``error`` says why when the row failed."""

    prompt: str | None
    generated_image: str | None
    nsfw_content_detected: bool | None
    seed: int | None
    error: str | None = None


def _param_type(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return _PARAM_TYPES[type(typing.get_args(annotation)[0])]
    return _PARAM_TYPES[annotation]


def param_schema() -> ParamSchema:
    return ParamSchema(
        [
            ParamSpec(name, _param_type(field.annotation), field.default)
            for name, field in GenerationParams.model_fields.items()
        ]
    )


def signature() -> ModelSignature:
    inputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("string", "image", required=False),
            *(ColSpec(AnyType(), name, required=False) for name in ROW_FIELDS),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("string", "generated_image"),
            ColSpec("boolean", "nsfw_content_detected", required=False),
            ColSpec("long", "seed"),
            ColSpec("string", ERROR_COLUMN, required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=param_schema())


def output_frame(results: list[RowResult], with_errors: bool) -> pd.DataFrame:
    """The SPEC §4 output: one row per input row, in input order (+ ``error`` in error mode)."""
    columns = [*OUTPUT_COLUMNS, ERROR_COLUMN] if with_errors else list(OUTPUT_COLUMNS)
    out = pd.DataFrame({c: pd.Series([getattr(r, c) for r in results], dtype=object) for c in columns})
    out["seed"] = out["seed"].astype("Int64" if with_errors else "int64")  # a failed row may have no seed
    return out
