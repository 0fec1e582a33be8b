"""Limits set in model config change what the parser accepts, with messages naming the config key."""

from __future__ import annotations

import base64
import io
import sys
import time

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from model_pkg.config import ModelConfig, load_model_config
from model_pkg.request import RowError, parse_request
from testkit.helpers import FAST, frame


def noisy(fmt: str = "PNG", size=(64, 64)) -> str:
    """An incompressible image: its file is larger than its size suggests."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def parse(limits: ModelConfig, *rows: dict, **params):
    return parse_request(frame(*rows), FAST | params, limits).rows


def test_max_image_bytes_is_checked_before_decoding():
    image = noisy()  # ~12 KB PNG
    assert parse(ModelConfig(), {"prompt": "a", "image": image})[0].image.size == (64, 64)
    with pytest.raises(
        RowError, match=r"^Row 0: 'image': image is larger than the 4096-byte limit \(max_image_bytes\)"
    ):
        parse(ModelConfig(max_image_bytes=4096), {"prompt": "a", "image": image})


def test_max_image_pixels_and_max_prompt_chars_follow_the_config():
    limits = ModelConfig(max_image_pixels=64 * 64, max_prompt_chars=10)
    with pytest.raises(RowError, match=r"image is 96×64 = 6144 pixels, over the 4096-pixel limit"):
        parse(limits, {"prompt": "a", "image": noisy(size=(96, 64))})
    with pytest.raises(RowError, match=r"^Row 0: 'negative_prompt' has 11 characters, over the 10 limit"):
        parse(limits, {"prompt": "a", "negative_prompt": "x" * 11})


def test_image_formats_are_configurable_and_checked_at_load():
    limits = load_model_config({"image_formats": ["png"]}, environ={})
    assert limits.image_formats == ("PNG",)
    assert parse(limits, {"prompt": "a", "image": noisy("PNG")})[0].image is not None
    with pytest.raises(RowError, match=r"^Row 0: 'image': not an image in an accepted format \(PNG\)$"):
        parse(limits, {"prompt": "a", "image": noisy("JPEG")})
    with pytest.raises(
        MlflowException, match=r"Invalid model_config 'image_formats': .*unknown image format\(s\) \['HEIC2'\]"
    ):
        load_model_config({"image_formats": ["png", "heic2"]}, environ={})


def test_max_steps_and_max_pixels_follow_the_config():
    limits = ModelConfig(max_steps=8, max_pixels=64 * 64)
    with pytest.raises(MlflowException, match=r"^Invalid param 'num_inference_steps' 10 is over the limit of 8"):
        parse(limits, {"prompt": "a"})
    with pytest.raises(RowError, match=r"^Row 0: 'height'/'width' 64×72 is over the 4096-pixel limit \(max_pixels\)"):
        parse(limits, {"prompt": "a", "height": 72}, num_inference_steps=8)


def test_input_images_of_one_request_have_a_decoded_pixel_budget():
    """Every image row is decoded while parsing and held until the request ends: their pixels are
    bounded per request (max_request_image_pixels), a request error naming the row that passes it."""
    limits = ModelConfig(max_request_image_pixels=3 * 96 * 64)
    rows = [{"prompt": f"a {i}", "image": noisy(size=(96, 64))} for i in range(4)]
    assert len(parse(limits, *rows[:3], {"prompt": "text rows cost nothing"})) == 4
    for on_error in ("raise", "null"):
        with pytest.raises(MlflowException) as e:
            parse(limits, {"prompt": "b"}, *rows, on_error=on_error)
        assert str(e.value) == (
            "The input images pass the request's budget of 18432 decoded pixels (max_request_image_pixels) at "
            "row 4; send fewer or smaller images per request"
        )
    assert ModelConfig().max_request_image_pixels == 2 * 8 * ModelConfig().max_pixels  # two full batches of the largest


def test_the_prompts_of_one_request_have_a_character_budget():
    """Tokenizing and weighting cost ~1-10 µs per character: 9,999 weighted 3,630-character prompts parsed
    for minutes. The budget refuses such a request before any row is tokenized."""
    rows = frame(*[{"prompt": "(cat:1.1) " * 363}] * 30)
    with pytest.raises(
        MlflowException, match=r"108900 characters, over the budget of 100000.*max_request_prompt_chars"
    ):
        parse_request(rows, FAST, ModelConfig())
    assert len(parse_request(rows, FAST, ModelConfig(max_request_prompt_chars=200_000)).rows) == 30
    negative = frame(*[{"prompt": "a"}] * 3)
    with pytest.raises(MlflowException, match=r"max_request_prompt_chars"):
        parse_request(negative, FAST | {"negative_prompt": "x" * 40}, ModelConfig(max_request_prompt_chars=100))


def test_the_cheap_checks_of_every_row_run_before_any_image_is_decoded():
    """With on_error=raise an empty prompt in the last row fails before row 0's image is even decoded."""
    rows = frame({"prompt": "a", "image": "!!"}, {"prompt": "b"}, {"prompt": "\u0000"})
    with pytest.raises(RowError, match=r"^Row 2: 'prompt' is empty"):
        parse_request(rows, FAST, ModelConfig())
    kept = parse_request(rows, FAST | {"on_error": "null"}, ModelConfig()).rows  # each bad row keeps its own error
    assert [r.reason if isinstance(r, RowError) else None for r in kept][::2] == [
        "'image': not valid base64: invalid character '!' at position 0",
        "'prompt' is empty",
    ]


def test_request_timeout_s_defaults_from_the_scoring_servers_timeout():
    assert load_model_config({}, environ={}).request_timeout_s is None  # no deadline in-process / Spark
    assert load_model_config({}, environ={"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "30"}).request_timeout_s == 30
    stored = {"request_timeout_s": None}  # an artifact stores every key, defaults included
    assert load_model_config(stored, environ={"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "30"}).request_timeout_s == 30
    given = load_model_config({"request_timeout_s": 5}, environ={"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "30"})
    assert given.request_timeout_s == 5


def test_a_request_past_its_deadline_stops_at_the_next_denoising_step(model):
    """The deadline is checked after every step (diffusers' callback_on_step_end + interrupt): a batch that
    passes it runs no further step, and the request ends with a 504 (no row-by-row retry)."""
    python_model = model.unwrap_python_model()
    module = sys.modules[type(python_model).__module__]
    rows = parse_request(
        frame({"prompt": "a cat"}, {"prompt": "a dog"}), FAST | {"refiner": "none"}, ModelConfig()
    ).rows
    steps = []
    module_generate = module.generate_batch

    def counting(pipes, batch, on_step=None):
        def spy(stage, step, pipe):
            steps.append(step)
            on_step(stage, step, pipe)

        return module_generate(pipes, batch, spy)

    try:
        module.generate_batch = counting
        with pytest.raises(MlflowException, match="passed its deadline") as raised:
            module._generate(python_model.pipelines, rows, True, deadline=time.monotonic())
    finally:
        module.generate_batch = module_generate
    assert raised.value.get_http_status_code() == 504
    assert steps == [0]  # 1 of 10 steps, and the batch was not retried row by row
