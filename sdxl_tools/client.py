"""Client-side helpers: the Azure ML request/response shape, and reading the images the model returns.

Azure ML's MLflow deployments accept ``{"input_data": {"columns", "data", "index"}, "params"}``
(the SDXL refiner model card's shape) and build the DataFrame themselves; ``mlflow models serve``
refuses ``input_data`` (HTTP 400), so clients of the plain MLflow server convert with
:func:`to_mlflow_request` and read the answer back with :func:`to_azure_response`.
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from PIL import Image

from model_pkg.images import METADATA_KEY

_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)

AZURE_OUTPUT_KEYS = ("prompt", "generated_image", "nsfw_content_detected")
# A comma before a closing bracket, outside strings: the model card's sample has them.
_TRAILING_COMMA = re.compile(r'("(?:\\.|[^"\\])*")|,(\s*[}\]])')


def loads_lenient(text: str) -> Any:
    """``json.loads`` that also takes trailing commas, as the model card's sample is written."""
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
    """The model card's response list: prompt, generated_image, nsfw_content_detected per row."""
    records = output.to_dict("records") if isinstance(output, pd.DataFrame) else output
    return [{key: _plain(record.get(key)) for key in AZURE_OUTPUT_KEYS} for record in records]


def _plain(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and value != value) else value


# -- images the model returns --------------------------------------------------------------------


def output_bytes(value: str) -> bytes:
    """The image file in a ``generated_image`` value (base64 or a ``data:`` URI)."""
    return base64.b64decode(_DATA_URI.sub("", value, count=1))


def b64_to_image(b64: str) -> Image.Image:
    """Decode the model's own output (trusted), e.g. in samples and tests."""
    return Image.open(io.BytesIO(output_bytes(b64)))


def read_metadata(image: str | bytes) -> dict[str, Any] | None:
    """The ``sdxl_pyfunc`` metadata of an output image (base64, ``data:`` URI or raw bytes), or None."""
    if isinstance(image, str):
        image = output_bytes(image)
    with Image.open(io.BytesIO(image)) as opened:
        text = getattr(opened, "text", {}).get(METADATA_KEY)
    return json.loads(text) if text else None
