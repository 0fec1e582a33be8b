"""MLServer runtime for the SDXL MLflow artifact: ``mlserver_mlflow.MLflowRuntime`` with nulls in its answers.

MLServer 1.7.1's pandas codec cannot write a V2 response from this model's output frame: it calls
``numpy.isnan`` on every value of a column holding a null (``nsfw_content_detected`` is null without a
packaged safety checker; ``generated_image``, ``seed`` and ``error`` may be with ``on_error=null``),
which raises on ``None`` (an HTTP 500 after the images were made), and it sends an object column of
booleans as strings. This runtime writes each output column as the V2 type its signature declares, with
JSON ``null`` for nulls, and answers the model's bad-input errors (which name the row and the field)
with HTTP 400 instead of 500 (a request stopped at the model's deadline: 504). Requests are read as by
the stock runtime: one V2 input per column, and request ``parameters`` other than ``content_type`` /
``headers`` are the model's params.

The raw inputs are checked before MLServer's codec reads them (:func:`check_inputs`), and the codec runs
inside the runtime's error handling: a value its datatype cannot hold (``INT8 [300]``, ``INT64 [1.5]``),
a shape that is not its data, inputs of unequal row counts (2 prompts, 1 seed) or an unknown input name
is a 400 naming the input, where MLServer's codec answered 500 or silently filled the short column.

It is copied into every artifact beside ``model-settings.json`` (``artifacts/mlserver/``), where
``mlserver start`` finds both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlserver.codecs import PandasCodec
from mlserver.errors import InferenceError, MLServerError
from mlserver.types import Datatype, InferenceRequest, InferenceResponse, Parameters, ResponseOutput
from mlserver_mlflow import MLflowRuntime

CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
INT_BITS = {f"{sign}INT{bits}": (bits, sign == "") for sign in ("", "U") for bits in (8, 16, 32, 64)}
TEXT_INPUTS = {"prompt", "negative_prompt", "image", "mask", "aspect_ratio", "style", "lora"}


def _leaves(data: Any) -> list[Any]:
    """V2 ``data`` may be flat or nested row-major: its values, flattened."""
    if not isinstance(data, list):
        return [data]
    return [leaf for item in data for leaf in _leaves(item)]


def _fits(value: Any, datatype: str) -> bool:
    if value is None:  # null: "not given" (the model reads a missing value per row)
        return True
    if datatype in INT_BITS:
        bits, signed = INT_BITS[datatype]
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if datatype.startswith("FP"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, bool) if datatype == "BOOL" else isinstance(value, str)  # BYTES: text


def check_inputs(payload: InferenceRequest, known: tuple[str, ...]) -> None:
    """What MLServer's codec would fail on (500) or misread (a short column filled with defaults): raises
    ``InferenceError`` (400) naming the input."""
    rows: dict[str, int] = {}
    for tensor in payload.inputs:
        name, datatype = tensor.name, getattr(tensor.datatype, "value", tensor.datatype)
        if name not in known:
            raise InferenceError(f"Input '{name}' is unknown; the model's inputs are {', '.join(known)}")
        if name in TEXT_INPUTS and datatype != "BYTES":
            raise InferenceError(f"Input '{name}' must be BYTES (text), got {datatype}")
        values = _leaves(tensor.data.root if hasattr(tensor.data, "root") else tensor.data)
        if math.prod(tensor.shape) != len(values) or not tensor.shape:
            plural = "value" if len(values) == 1 else "values"
            raise InferenceError(
                f"Input '{name}': shape {list(tensor.shape)} holds {math.prod(tensor.shape)} values but its data "
                f"has {len(values)} {plural}; send shape [rows] or [rows, 1] with one value per row"
            )
        bad = next((i for i, v in enumerate(values) if not _fits(v, datatype)), None)
        if bad is not None:
            raise InferenceError(f"Input '{name}': value {values[bad]!r:.40} at position {bad} does not fit {datatype}")
        rows[name] = tensor.shape[0]
    if len(set(rows.values())) > 1:
        (first, n), *others = rows.items()
        name, m = next((k, v) for k, v in others if v != n)
        raise InferenceError(
            f"Input '{name}' has {m} row{'s' * (m != 1)} but '{first}' has {n}; send one value per row in every input"
        )


class DeadlineExceeded(MLServerError):
    """HTTP 504: the request was stopped at the model's deadline (``request_timeout_s``). The status is the
    class's own, so it survives the way back from a parallel worker (an exception travels as its message)."""

    def __init__(self, msg: str):
        super().__init__(msg, 504)


class SDXLRuntime(MLflowRuntime):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        from model_pkg.contract import INPUT_COLUMNS  # the artifact's code, on sys.path once the model loaded

        check_inputs(payload, INPUT_COLUMNS)
        try:
            frame = self.decode_request(payload)
        except (ValueError, TypeError, OverflowError) as e:  # what the checks above did not foresee
            raise InferenceError(f"The V2 inputs cannot be read as a table of rows: {e}") from None
        params = payload.parameters.model_extra if payload.parameters else None
        try:
            output = self._model.predict(frame, params=params or None)
        except MlflowException as e:
            if e.error_code in CLIENT_ERRORS:
                raise InferenceError(e.message) from None  # HTTP 400
            if e.error_code == "DEADLINE_EXCEEDED":
                raise DeadlineExceeded(e.message) from None
            raise
        declared = {tensor.name: tensor.datatype for tensor in self.outputs}  # from the signature, at load
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            parameters=Parameters(content_type=PandasCodec.ContentType),
            outputs=[encode_column(output[name], declared[name]) for name in output.columns],
        )


def encode_column(column: pd.Series, datatype: Datatype) -> ResponseOutput:
    """One V2 output of the declared type; nulls (None, NaN, NA) become JSON null."""
    return ResponseOutput(
        name=str(column.name),
        shape=[len(column), 1],
        datatype=datatype,
        data=[_plain(value) for value in column],
        parameters=Parameters(content_type="str") if datatype == Datatype.BYTES else None,
    )


def _plain(value: Any) -> Any:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value
