"""Azure ML's request body → the model input and params (carried in the artifact for the scoring script).

Azure ML's MLflow deployments take ``{"input_data": {"columns", "data", "index"?}, "params"?}`` (the
SDXL refiner model card's shape); ``data`` rows may be lists or objects. The scoring script
(``deploy/azureml/score.py``) and the client helpers (``sdxl_tools.client``) both convert with
:func:`azure_request_to_frame`, so the deployment needs nothing but the script and the model.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException


def azure_request_to_frame(body: dict[str, Any] | str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The model input and params of an Azure request (a dict, or its JSON text).

    Raises ``MlflowException`` (INVALID_PARAMETER_VALUE) for a body of another shape, ``ValueError``
    for text that is not JSON or rows that do not fit the columns.
    """
    if isinstance(body, str):
        body = json.loads(body)
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
