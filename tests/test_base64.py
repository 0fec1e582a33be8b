"""Input images in every base64 form real clients send, through ``predict``; only what does not decode is refused."""

from __future__ import annotations

import base64
import re

import pytest
from mlflow.exceptions import MlflowException

from testkit.helpers import FAST, frame, png_b64

PNG = base64.b64decode(png_b64(color=(10, 40, 40), size=(64, 64)))
STANDARD = base64.b64encode(PNG).decode()
URL_SAFE = base64.urlsafe_b64encode(PNG).decode()
assert STANDARD != URL_SAFE, "the test image must use the characters the two alphabets differ in"
assert STANDARD.endswith("="), "the test image must need padding"

VARIANTS = {
    "standard": STANDARD,
    "encodebytes (Azure's sample client: LF every 76 chars)": base64.encodebytes(PNG).decode(),
    "MIME CRLF-wrapped": base64.encodebytes(PNG).decode().replace("\n", "\r\n"),
    "embedded spaces and tabs": " ".join(STANDARD[i : i + 10] for i in range(0, len(STANDARD), 10)) + "\t",
    "URL-safe alphabet": URL_SAFE,
    "unpadded": STANDARD.rstrip("="),
    "URL-safe unpadded": URL_SAFE.rstrip("="),
    "data URI": f"data:image/png;base64,{STANDARD}",
    "data URI with params": f"data:image/png;charset=utf-8;base64,{STANDARD}",
    "data URI, other media type": f"data:application/octet-stream;base64,{STANDARD}",
    "data URI, upper case": f"DATA:IMAGE/PNG;BASE64,{STANDARD}",
    "data URI, wrapped": "data:image/png;base64," + base64.encodebytes(PNG).decode(),
}
PARAMS = {**FAST, "seed": 3}


@pytest.fixture(scope="module")
def reference(model) -> str:
    return model.predict(frame({"prompt": "a cat", "image": STANDARD}), params=PARAMS)["generated_image"][0]


@pytest.mark.parametrize("text", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_common_base64_form_gives_the_same_image(model, reference, text):
    out = model.predict(frame({"prompt": "a cat", "image": text}), params=PARAMS)
    assert out["generated_image"][0] == reference


REFUSED = {
    "a character outside both alphabets": (STANDARD[:12] + "!" + STANDARD[12:], "invalid character '!' at position 12"),
    "a data URI's prefix counts in the position": (f"data:image/png;base64,ab*{STANDARD}", "'*' at position 24"),
    "a data URI that is not base64": ("data:image/png,%89PNG", "a data: URI must be base64-encoded"),
    "padding before the end": (STANDARD[:8] + "==" + STANDARD[8:], "padding '=' at position 8, before the end"),
    "a truncated string": (STANDARD[: (len(STANDARD) // 4 - 1) * 4 + 1], "cannot be whole bytes (truncated?)"),
}


@pytest.mark.parametrize(("text", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_only_what_does_not_decode_is_refused_and_the_message_says_why(model, text, message):
    with pytest.raises(MlflowException, match=r"Row 1: 'image': .*" + re.escape(message)):
        model.predict(frame({"prompt": "a cat"}, {"prompt": "a dog", "image": text}), params=PARAMS)
