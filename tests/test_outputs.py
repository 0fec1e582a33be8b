"""Output options: quality, data: URIs, and PNG metadata that reproduces the image from itself."""

from __future__ import annotations

import base64
import io

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from model_pkg.contract import METADATA_KEY
from sdxl_tools.client import b64_to_image, read_metadata
from testkit.helpers import FAST, frame


def test_jpeg_and_webp_honour_output_quality(model):
    sizes = {}
    for fmt in ("jpeg", "webp"):
        for quality in (20, 95):
            out = model.predict(
                frame({"prompt": "a cat", "seed": 1}), params=FAST | {"output_format": fmt, "output_quality": quality}
            )
            image = b64_to_image(out["generated_image"][0])
            assert image.format == fmt.upper() and image.size == (64, 64)
            sizes[fmt, quality] = len(base64.b64decode(out["generated_image"][0]))
    assert sizes["jpeg", 20] < sizes["jpeg", 95] and sizes["webp", 20] < sizes["webp", 95]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_data_uri_output_is_the_instill_shape(model, fmt):
    params = FAST | {"output_format": fmt, "output_encoding": "data_uri", "seed": 3, "png_metadata": False}
    uri = model.predict(frame({"prompt": "a cat"}), params=params)["generated_image"][0]
    prefix = f"data:image/{fmt};base64,"
    assert uri.startswith(prefix)
    plain = model.predict(frame({"prompt": "a cat"}), params=params | {"output_encoding": "base64"})
    assert plain["generated_image"][0] == uri.removeprefix(prefix)


def test_png_metadata_round_trips_to_the_request_that_reproduces_the_image(model):
    params = FAST | {
        "seed": 41,
        "refiner": "sequential",
        "num_inference_steps_refiner": 8,
        "scheduler": "K_EULER_ANCESTRAL",
        "guidance_scale": 6.5,
        "negative_prompt": "blurry",
        "style": "anime",
    }
    rows = frame({"prompt": "a red hat"}, {"prompt": "a dog on a bench", "guidance_scale": 3})
    out = model.predict(rows, params=params)

    meta = read_metadata(out["generated_image"][1])
    request = meta["request"]
    assert request["dataframe_records"] == [{"prompt": "a dog on a bench"}]
    p = request["params"]
    assert (p["seed"], p["guidance_scale"], p["refiner"], p["scheduler"]) == (
        42,
        3.0,
        "sequential",
        "K_EULER_ANCESTRAL",
    )
    assert (p["style"], p["negative_prompt"], p["num_inference_steps"], p["height"]) == ("anime", "blurry", 10, 64)
    assert meta["model"]["model_hash"] == model.unwrap_python_model().pipelines.catalog.model_hash

    replay = model.predict(pd.DataFrame(request["dataframe_records"]), params=request["params"])
    assert replay["generated_image"][0] == out["generated_image"][1]  # byte-identical, metadata included

    text = b64_to_image(out["generated_image"][1]).text
    assert text["parameters"].splitlines()[0] == "a dog on a bench"  # the user's prompt, not the styled one
    assert "Seed: 42" in text["parameters"] and "Sampler: K_EULER_ANCESTRAL" in text["parameters"]


def test_png_metadata_can_be_turned_off_and_pixels_do_not_depend_on_it(model):
    row = frame({"prompt": "a cat", "seed": 2})
    with_meta = model.predict(row, params=FAST)["generated_image"][0]
    without = model.predict(row, params=FAST | {"png_metadata": False})["generated_image"][0]
    assert METADATA_KEY not in b64_to_image(without).text and read_metadata(without) is None
    assert b64_to_image(with_meta).tobytes() == b64_to_image(without).tobytes()


def test_image_rows_record_the_input_image_hash_not_the_image(model):
    from testkit.helpers import png_b64

    image = png_b64(size=(64, 64))
    out = model.predict(frame({"prompt": "a cat", "image": image, "seed": 1}), params=FAST)
    meta = read_metadata(out["generated_image"][0])
    assert meta["request"]["dataframe_records"] == [{"prompt": "a cat", "image": None}]
    rgb = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
    import hashlib

    assert meta["model"]["input_image_sha256"] == hashlib.sha256(rgb.tobytes()).hexdigest()
    records = [{"prompt": "a cat", "image": image}]
    replay = model.predict(pd.DataFrame(records), params=meta["request"]["params"])
    assert replay["generated_image"][0] == out["generated_image"][0]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"output_quality": 0}, "Invalid param 'output_quality': Input should be greater than or equal to 1"),
        ({"output_encoding": "url"}, "Invalid param 'output_encoding': Input should be 'base64' or 'data_uri'"),
    ],
)
def test_bad_output_params_are_named(model, params, message):
    with pytest.raises(MlflowException, match=message):
        model.predict(frame({"prompt": "a cat"}), params=FAST | params)


@pytest.mark.parametrize(
    ("params", "row", "message"),
    [
        (
            {"output_format": "webp", "width": 16384},
            {},
            "Invalid param 'output_format' webp cannot hold a 16384×64 image: WEBP is limited to 16383 pixels",
        ),
        (
            {"output_format": "jpeg", "width": 65504},
            {},
            "Invalid param 'output_format' jpeg cannot hold a 65504×64 image: JPEG is limited to 65500 pixels",
        ),
        (
            {"output_format": "WEBP", "on_error": "null"},
            {"width": 16384},
            "Row 0: 'output_format' webp cannot hold a 16384×64 image",
        ),
    ],
)
def test_sizes_the_encoder_cannot_write_are_refused_before_generating(model, params, row, message):
    """WebP holds at most 16383 px a side, JPEG 65500: refused at parse time, never after generating."""
    from model_pkg.request import parse_request

    python_model = model.unwrap_python_model()
    request = FAST | {"height": 64, "refiner": "none", "num_inference_steps": 1} | params
    try:
        rows = parse_request(frame({"prompt": "a cat"} | row), request, python_model.config).rows
    except MlflowException as e:
        assert str(e).startswith(message), str(e)
        return
    assert str(rows[0]).startswith(message), rows[0]


def test_an_encoding_failure_is_that_rows_error(model):
    """Whatever the encoder still refuses after parsing fails only its row (on_error=null), or the
    request naming the row (raise), never the whole request with a stack trace."""
    from dataclasses import replace

    from model_pkg.model import encode_result
    from model_pkg.request import parse_request

    python_model = model.unwrap_python_model()
    [row] = parse_request(
        frame({"prompt": "a cat", "seed": 7}), FAST | {"output_format": "webp"}, python_model.config
    ).rows
    too_wide = Image.new("RGB", (16400, 8))  # past parsing's check: as if the encoder had a lower limit
    result = encode_result(row, too_wide, None, python_model.pipelines.catalog, keep_going=True)
    assert (result.generated_image, result.seed, result.prompt) == (None, 7, "a cat")
    assert result.error.startswith("encoding failed: ")
    with pytest.raises(MlflowException, match=r"^Row 0: encoding failed: ") as e:
        encode_result(replace(row), too_wide, None, python_model.pipelines.catalog, keep_going=False)
    assert e.value.error_code == "INTERNAL_ERROR"


def test_png_parameters_text_escapes_line_breaks_so_a_prompt_cannot_forge_a_line(model):
    """A1111-style readers take the lines of ``parameters`` as prompt / ``Negative prompt:`` / ``Key: value``
    pairs: a line break in a prompt must not start a line of its own."""
    forged = "a cat\nSteps: 1, Model hash: 0000000000"
    negative = "blurry\r\nNegative prompt: sharp\u2028x"
    out = model.predict(frame({"prompt": forged, "negative_prompt": negative, "seed": 2}), params=FAST)
    image = b64_to_image(out["generated_image"][0])
    lines = image.text["parameters"].split("\n")
    assert lines[:2] == [
        r"a cat\nSteps: 1, Model hash: 0000000000",
        r"Negative prompt: blurry\r\nNegative prompt: sharp\u2028x",
    ]
    assert len(lines) == 3 and lines[2].startswith("Steps: 10, ")
    assert read_metadata(out["generated_image"][0])["request"]["dataframe_records"] == [{"prompt": forged}]
