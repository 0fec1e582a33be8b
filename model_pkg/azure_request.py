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

from model_pkg.contract import check_columns


def azure_request_to_frame(body: dict[str, Any] | str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The model input and params of an Azure request (a dict, or its JSON text).

    Raises ``MlflowException`` (INVALID_PARAMETER_VALUE) for a body of another shape, ``ValueError``
    for text that is not JSON or rows that do not fit the columns.
    """
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except RecursionError:  # Python's JSON parser recurses per level (~50,000 levels exhaust it)
            raise MlflowException.invalid_parameter_value(
                "The request body is nested deeper than JSON parsing allows"
            ) from None
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
        columns = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    if columns is not None and not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        raise MlflowException.invalid_parameter_value("'input_data.columns' must be a list of column names (strings)")
    check_columns(columns or [])
    frame = pd.DataFrame(rows, columns=columns)
    if "index" in data:
        frame.index = data["index"]
    return frame, dict(body.get("params") or body.get("parameters") or {})
