"""Azure ML scoring script for the SDXL MLflow artifact (``azmlinfsrv``: ``init()`` once per worker,
``run()`` per request).

Takes Azure ML's request body as it is, ``{"input_data": {"columns", "data", "index"?}, "params"?}``
with ``data`` rows as lists or as objects, and returns the model's rows as a JSON list:
``prompt``, ``generated_image``, ``nsfw_content_detected``, ``seed`` (and ``error`` with
``on_error=null``). Bad input is an HTTP 400 whose ``message`` names the row and the field (Azure's
generic MLflow script answers every failure with a 500); a request stopped at the model's deadline
(``request_timeout_s``) is a 504. The script needs only itself and the model:
the request conversion is the artifact's own code (``model_pkg.azure_request``), importable once
``load_model`` has put the artifact's ``code/`` folder on ``sys.path``. ``deployment.yml`` beside it
uploads this folder alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
from azureml.contrib.services.aml_response import AMLResponse
from mlflow.exceptions import MlflowException

CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
_model: mlflow.pyfunc.PyFuncModel | None = None


def model_path() -> Path:
    """The MLflow model folder: ``$AZUREML_MODEL_DIR/$MLFLOW_MODEL_FOLDER``, else the one folder with an MLmodel."""
    root = Path(os.environ["AZUREML_MODEL_DIR"])
    if folder := os.environ.get("MLFLOW_MODEL_FOLDER"):
        return root / folder
    found = sorted(path.parent for path in root.rglob("MLmodel"))
    if len(found) != 1:
        raise RuntimeError(f"expected one MLflow model under {root}, found {[str(p) for p in found]}")
    return found[0]


def init() -> None:
    global _model
    _model = mlflow.pyfunc.load_model(str(model_path()))


def run(raw_data: str) -> list[dict[str, Any]] | AMLResponse:
    """``raw_data``: the request body (an undecorated ``run`` gets it as text)."""
    from model_pkg.azure_request import azure_request_to_frame  # the artifact's code, on sys.path since init()

    try:
        frame, params = azure_request_to_frame(raw_data)
    except MlflowException as e:
        return _bad_request(e.message, e.error_code)
    except (ValueError, TypeError) as e:  # not JSON, or rows that do not fit the columns
        return _bad_request(f"The request body is not an Azure ML input_data request: {e}")
    try:
        output = _model.predict(frame, params=params or None)
    except MlflowException as e:
        if e.error_code == "DEADLINE_EXCEEDED":  # stopped at request_timeout_s: MLflow's 504, not a 500
            return _error(e.message, e.error_code, e.get_http_status_code())
        if e.error_code not in CLIENT_ERRORS:
            raise  # azmlinfsrv answers 500 and logs the traceback
        return _bad_request(e.message, e.error_code)
    return json.loads(output.to_json(orient="records"))  # NaN / None → null, numpy ints → ints


def _bad_request(message: str, error_code: str = "BAD_REQUEST") -> AMLResponse:
    return _error(message, error_code, 400)


def _error(message: str, error_code: str, status: int) -> AMLResponse:
    """The server's own error shape (``message``) plus MLflow's ``error_code``."""
    return AMLResponse({"message": message, "error_code": error_code}, status, json_str=True)
