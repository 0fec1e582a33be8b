"""The model's MLflow signature, derived from the runtime's contract (``model_pkg.contract``).

Params (``ParamSchema``) come from :class:`~model_pkg.contract.GenerationParams`, the input columns
from its per-row fields, the output columns and their types from
:class:`~model_pkg.contract.RowResult` in the order of ``OUTPUT_COLUMNS`` (+ ``ERROR_COLUMN``).
``MLmodel_template/signature.json`` is this, rendered (``python build.py template``).
"""

from __future__ import annotations

import dataclasses
import types
import typing

from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

from model_pkg.contract import ERROR_COLUMN, IMAGE_COLUMNS, OUTPUT_COLUMNS, ROW_FIELDS, GenerationParams, RowResult

_PARAM_TYPES = {str: "string", int: "long", float: "double", bool: "boolean"}
# Output columns that are null in rows that succeeded too: no safety checker packaged; no error.
OPTIONAL_OUTPUTS = ("nsfw_content_detected", ERROR_COLUMN)


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
            *(ColSpec("string", name, required=False) for name in IMAGE_COLUMNS),
            *(ColSpec(AnyType(), name, required=False) for name in ROW_FIELDS),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=output_schema(), params=param_schema())


def output_schema() -> Schema:
    """The output columns (an ``error`` column last, present with ``on_error="null"``)."""
    hints = typing.get_type_hints(RowResult)
    assert [f.name for f in dataclasses.fields(RowResult)] == [*OUTPUT_COLUMNS, ERROR_COLUMN]
    return Schema(
        [
            ColSpec(_value_type(hints[name]), name, required=name not in OPTIONAL_OUTPUTS)
            for name in (*OUTPUT_COLUMNS, ERROR_COLUMN)
        ]
    )


def _value_type(hint: object) -> str:
    """``str | None`` → ``string``: the MLflow type of an optional value."""
    if isinstance(hint, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    return _PARAM_TYPES[hint]
