"""Property: any DataFrame and params either parse to valid rows or raise ``MlflowException`` with a
message; no other exception type ever leaks out of the request parser (it would be a 500 in serving)."""

from __future__ import annotations

import base64
import math

import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from model_pkg.config import ModelConfig
from model_pkg.contract import MAX_SEED, GenerationParams
from model_pkg.request import RowError, RowSpec, parse_request
from testkit.helpers import png_b64

LIMITS = ModelConfig(max_rows=5)
PARAMS = list(GenerationParams.model_fields)
COLUMNS = ["prompt", "image", "mask", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "height"]
COLUMNS += ["width", "strength", "aspect_ratio", "junk"]
PNG = png_b64(size=(64, 64))

hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 8, 64, 1024, MAX_SEED, MAX_SEED + 1, 10**6]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, 1e308]),
    st.text(max_size=30),
    st.sampled_from(["", " ", "a cat", "K_EULER", "ddim", "16:9", "png", "null", "true", "a\ud800b"]),
    st.sampled_from([PNG, "data:image/png;base64," + PNG, "http://127.0.0.1/x.png", "not base64!", "aGVsbG8="]),
    st.binary(max_size=20).map(lambda b: base64.b64encode(b"\x89PNG\r\n\x1a\n" + b).decode()),  # PNG-ish junk
    st.binary(max_size=10),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
small = {"num_inference_steps": 4, "height": 64, "width": 64}  # most draws keep cheap, valid sizes


@st.composite
def requests(draw):
    columns = draw(st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=5, unique=True))
    n = draw(st.integers(min_value=0, max_value=6))
    data = {c: pd.Series([draw(hostile) for _ in range(n)], dtype=object) for c in columns}
    if draw(st.booleans()):
        data["prompt"] = pd.Series([draw(st.sampled_from(["a cat", "", None])) for _ in range(n)], dtype=object)
    frame = pd.DataFrame(data, index=range(n))
    names = draw(st.lists(st.sampled_from([*PARAMS, "num_images"]), max_size=4, unique=True))
    params = small | {name: draw(hostile) for name in names}
    if draw(st.integers(0, 9)) == 0:
        params = draw(st.sampled_from([None, {}, "steps=4", [1, 2]]))
    return frame, params


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.sampled_from(["raise", "null"]))
def test_the_parser_returns_rows_or_raises_mlflow_exception(request, on_error):
    frame, params = request
    if isinstance(params, dict):
        params = {**params, "on_error": params.get("on_error", on_error)}
    try:
        parsed = parse_request(frame, params, LIMITS)
    except MlflowException as e:
        assert e.message.strip(), "an error without a message"
        assert e.error_code == "INVALID_PARAMETER_VALUE"
        return
    assert len(parsed.rows) == len(frame)
    for i, row in enumerate(parsed.rows):
        if isinstance(row, RowError):
            assert parsed.params.on_error == "null" and row.row == i and row.reason
            continue
        assert isinstance(row, RowSpec) and row.index == i
        assert isinstance(row.prompt, str) and row.prompt.strip()
        assert 0 <= row.seed <= MAX_SEED
        s = row.settings
        assert s.height % 8 == 0 and s.width % 8 == 0 and s.height * s.width <= LIMITS.max_pixels
        assert 1 <= s.num_inference_steps <= LIMITS.max_steps
        assert math.isfinite(s.guidance_scale) and (s.strength == -1 or 0 < s.strength <= 1)


@given(st.one_of(hostile, st.lists(hostile, max_size=3), st.dictionaries(st.text(max_size=8), hostile, max_size=3)))
@example([{}, None])  # records with a None among them: pandas 2 raises AttributeError
@settings(max_examples=150, deadline=None)
def test_any_python_value_as_model_input_is_refused_or_parsed(model_input):
    try:
        parse_request(model_input, small, LIMITS)
    except MlflowException as e:
        assert e.message.strip()
