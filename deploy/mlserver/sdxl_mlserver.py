"""MLServer runtime for the SDXL MLflow artifact: ``mlserver_mlflow.MLflowRuntime`` with nulls in its answers.

MLServer 1.7.1's pandas codec cannot write a V2 response from this model's output frame: it calls
``numpy.isnan`` on every value of a column holding a null (``nsfw_content_detected`` is null without a
packaged safety checker; ``generated_image``, ``seed`` and ``error`` may be with ``on_error=null``),
which raises on ``None`` (an HTTP 500 after the images were made), and it sends an object column of
booleans as strings. This runtime writes each output column as the V2 type its signature declares, with
JSON ``null`` for nulls, and answers the model's bad-input errors (which name the row and the field)
with HTTP 400 instead of 500. Requests are read as by the stock runtime: one V2 input per column, and
request ``parameters`` other than ``content_type`` / ``headers`` are the model's params.

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
from mlserver.errors import InferenceError
from mlserver.types import Datatype, InferenceRequest, InferenceResponse, Parameters, ResponseOutput
from mlserver_mlflow import MLflowRuntime

CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}


class SDXLRuntime(MLflowRuntime):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        frame = self.decode_request(payload)
        params = payload.parameters.model_extra if payload.parameters else None
        try:
            output = self._model.predict(frame, params=params or None)
        except MlflowException as e:
            if e.error_code in CLIENT_ERRORS:
                raise InferenceError(e.message) from None  # HTTP 400
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
