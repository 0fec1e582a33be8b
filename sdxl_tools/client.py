"""Client-side helpers: the Azure ML request/response shape, and reading the images the model returns.

Azure ML's MLflow deployments accept ``{"input_data": {"columns", "data", "index"}, "params"}``
(the SDXL refiner model card's shape; the runtime's :func:`~model_pkg.azure_request.azure_request_to_frame`
reads it); ``mlflow models serve`` refuses ``input_data`` (HTTP 400), so clients of the plain MLflow
server convert with :func:`to_mlflow_request` and read the answer back with :func:`to_azure_response`.
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import pandas as pd
from PIL import Image

from model_pkg.azure_request import azure_request_to_frame
from model_pkg.contract import METADATA_KEY, OUTPUT_COLUMNS, is_missing

_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)

# The model card's response keys: the output columns less the seed.
AZURE_OUTPUT_KEYS = tuple(column for column in OUTPUT_COLUMNS if column != "seed")


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
    return None if is_missing(value) else value


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
