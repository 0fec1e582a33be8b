"""The Azure ML request/response shape of seed ``001`` ↔ what the model takes and returns.

Azure ML's MLflow deployments accept ``{"input_data": {"columns", "data", "index"}, "params"}``
and build the DataFrame themselves; ``mlflow models serve`` refuses ``input_data`` (HTTP 400), so
clients of the plain MLflow server convert with :func:`to_mlflow_request`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException

AZURE_OUTPUT_KEYS = ("prompt", "generated_image", "nsfw_content_detected")
# A comma before a closing bracket, outside strings: the seed document's sample has them.
_TRAILING_COMMA = re.compile(r'("(?:\\.|[^"\\])*")|,(\s*[}\]])')


def loads_lenient(text: str) -> Any:
    """``json.loads`` that also takes trailing commas, as the seed ``001`` sample is written."""
    return json.loads(_TRAILING_COMMA.sub(lambda m: m.group(1) or m.group(2), text))


def azure_request_to_frame(body: dict[str, Any] | str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The model input and params of an Azure request; ``data`` rows may be lists or objects."""
    if isinstance(body, str):
        body = loads_lenient(body)
    if not isinstance(body, dict) or not isinstance(body.get("input_data"), dict):
        raise MlflowException.invalid_parameter_value(
            'An Azure request is {"input_data": {"columns": [...], "data": [...]}} (optionally "params")'
        )
    data = body["input_data"]
    rows = data.get("data")
    if not isinstance(rows, list):
        raise MlflowException.invalid_parameter_value("'input_data.data' must be a list of rows")
    columns = data.get("columns")
    if columns is None and rows and isinstance(rows[0], dict):
        columns = list(dict.fromkeys(k for row in rows for k in row))
    frame = pd.DataFrame(rows, columns=columns)
    if "index" in data:
        frame.index = data["index"]
    return frame, dict(body.get("params") or body.get("parameters") or {})


def to_mlflow_request(body: dict[str, Any] | str) -> dict[str, Any]:
    """An ``/invocations`` body for ``mlflow models serve`` (``dataframe_split`` + ``params``)."""
    frame, params = azure_request_to_frame(body)
    split = json.loads(frame.to_json(orient="split"))
    request: dict[str, Any] = {"dataframe_split": {"columns": split["columns"], "data": split["data"]}}
    if params:
        request["params"] = params
    return request


def to_azure_response(output: pd.DataFrame | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed ``001`` response list: prompt, generated_image, nsfw_content_detected per row."""
    records = output.to_dict("records") if isinstance(output, pd.DataFrame) else output
    return [{key: _plain(record.get(key)) for key in AZURE_OUTPUT_KEYS} for record in records]


def _plain(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and value != value) else value
