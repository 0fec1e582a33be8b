"""Long prompts (chunked, not truncated) and (text:weight) prompts, for both text encoders."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from model_pkg.config import ModelConfig
from model_pkg.prompts import parse_weighted
from model_pkg.request import parse_request
from testkit.helpers import FAST, frame, pixels


@pytest.mark.parametrize(
    ("text", "segments", "weighted"),
    [
        ("a cat", [("a cat", 1.0)], False),
        ("a (red:1.5) cat", [("a ", 1.0), ("red", 1.5), (" cat", 1.0)], True),
        ("(a (red:2) cat:0.5)", [("a ", 0.5), ("red", 1.0), (" cat", 0.5)], True),
        ("a cat (sitting)", [("a cat (sitting)", 1.0)], False),  # no weight: literal parentheses
        (r"\(cat:1.2\) x", [("(cat:1.2) x", 1.0)], False),
        ("time 10:30 (cat: 1.25 ) ok", [("time 10:30 ", 1.0), ("cat", 1.25), (" ok", 1.0)], True),
        ("unbalanced (cat", [("unbalanced (cat", 1.0)], False),
    ],
)
def test_parse_weighted(text, segments, weighted):
    assert parse_weighted(text) == (segments, weighted)


def image(model, prompt: str, **params) -> np.ndarray:
    out = model.predict(frame({"prompt": prompt, "seed": 3}), params=FAST | params)
    return pixels(out["generated_image"][0])


HEAD = " ".join(["a cat with a hat"] * 15)  # 75 tokens with the tiny tokenizer
LONG = HEAD + " " + " ".join(["the red dog on the green bench"] * 18)  # + 126 tokens


def test_a_200_token_prompt_is_chunked_not_truncated(model):
    catalog = model.unwrap_python_model().pipelines.catalog
    [head, long] = parse_request(frame({"prompt": HEAD}, {"prompt": LONG}), FAST, ModelConfig(), catalog).rows
    assert (head.settings.prompt_chunks, long.settings.prompt_chunks) == (0, 3)  # 75 tokens: plain diffusers

    assert changed(image(model, LONG), image(model, HEAD)) > 0.05  # the tail matters
    # prompt_weighting=off is plain diffusers: CLIP silently keeps the first 77 tokens
    np.testing.assert_array_equal(image(model, LONG, prompt_weighting="off"), image(model, HEAD))


def changed(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixel values that differ. The tiny random text encoders condition the UNet weakly:
    even another prompt moves pixels by ~1 level on average, so a changed image is a changed fraction."""
    return float((a != b).mean())


def test_weighting_a_word_changes_the_image_and_weight_one_is_the_plain_prompt(model):
    plain = image(model, "a cat with a hat")
    np.testing.assert_array_equal(image(model, "a (cat:1.0) with a hat"), plain)
    assert changed(image(model, "a (cat:1.6) with a hat"), plain) > 0.02
    assert changed(image(model, "a (cat:0.3) with a hat"), plain) > 0.02


def test_weighted_negative_prompts_and_every_mode_work(model):
    for refiner in ("none", "ensemble", "sequential"):
        plain = image(model, "a cat", refiner=refiner, negative_prompt="a dog", num_inference_steps=5)
        weighted = image(model, "a cat", refiner=refiner, negative_prompt="a (dog:1.8)", num_inference_steps=5)
        assert changed(weighted, plain) > 0.02


def test_rows_needing_different_window_counts_are_batched_apart_and_equal_single_rows(model):
    rows = frame({"prompt": LONG, "seed": 1}, {"prompt": "a (cat:1.2)", "seed": 2}, {"prompt": "a cat", "seed": 3})
    batched = model.predict(rows, params=FAST)
    for i in range(len(rows)):
        single = model.predict(rows.iloc[[i]], params=FAST)
        assert np.abs(pixels(single["generated_image"][0]) - pixels(batched["generated_image"][i])).max() <= 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a (cat:1" + "0" * 30 + ") hat"}, "Row 0: 'prompt': weight 1e+30 of 'cat' is outside [-10, 10]"),
        ({"prompt": "a ((cat:5) hat:3)"}, "Row 0: 'prompt': weight 15 of 'cat' is outside [-10, 10]"),  # nested: ×
        ({"prompt": "a cat", "negative_prompt": "(blurry:-11)"}, "Row 0: 'negative_prompt': weight -11 of 'blurry'"),
    ],
)
def test_prompt_weights_outside_the_range_are_refused(model, row, message):
    """``(cat:1e30)`` gave an all-black image with status 200; weights are limited to [-10, 10]."""
    with pytest.raises(MlflowException) as e:
        model.predict(frame(row), params=FAST)
    assert str(e.value).startswith(message), str(e.value)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


def test_prompt_weights_at_the_range_edges_and_with_weighting_off_are_accepted():
    rows = frame({"prompt": "a (cat:10) (hat:-10)"}, {"prompt": "a (cat:1000) as text", "negative_prompt": "(x:99)"})
    auto = parse_request(rows, FAST | {"on_error": "null"}, ModelConfig()).rows
    assert [type(r).__name__ for r in auto] == ["RowSpec", "RowError"]
    off = parse_request(rows, FAST | {"prompt_weighting": "off"}, ModelConfig()).rows  # plain text: no weights
    assert [r.prompt for r in off] == ["a (cat:10) (hat:-10)", "a (cat:1000) as text"]
