"""The artifact's contract as MLflow sees it: signature (inputs, outputs, params) and output frame.

Params come from :class:`~model_pkg.params.GenerationParams`, so defaults live in one place.
Per-row override columns are typed ``Any`` in the schema: MLflow's enforcement refuses a ``long``
column with one missing value and a ``double`` column holding ``7``; the model validates them
instead, naming the row and the column.
"""

from __future__ import annotations

import typing

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

from model_pkg.params import ROW_FIELDS, GenerationParams

OUTPUT_COLUMNS = ("prompt", "generated_image", "nsfw_content_detected", "seed")
_PARAM_TYPES = {str: "string", int: "long", float: "double", bool: "boolean"}
# The struct type to pass as spark_udf(result_type=...): names and order of the output columns.
SPARK_RESULT_TYPE = "prompt string, generated_image string, nsfw_content_detected boolean, seed long"


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
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=param_schema())


def output_frame(prompts: list[str], images: list[str], nsfw: list[bool | None], seeds: list[int]) -> pd.DataFrame:
    """The SPEC §4 output: one row per input row, in input order."""
    return pd.DataFrame(
        {
            "prompt": pd.Series(prompts, dtype=object),
            "generated_image": pd.Series(images, dtype=object),
            "nsfw_content_detected": pd.Series(nsfw, dtype=object),
            "seed": pd.Series(seeds, dtype="int64"),
        }
    )
