"""Style presets: a versioned table shipped in the artifact, applied before encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from model_pkg.catalog import load_styles
from model_pkg.config import ModelConfig
from model_pkg.request import parse_request
from sdxl_tools import TEMPLATE
from testkit.helpers import FAST, frame, pixels

PRESETS = [
    "photographic", "cinematic", "anime", "digital-art", "comic-book", "fantasy-art", "line-art", "analog-film",
    "neon-punk", "isometric", "low-poly", "origami", "modeling-compound", "3d-model", "pixel-art", "tile-texture",
    "enhance",
]  # fmt: skip


def test_table_is_versioned_has_the_sdxl_presets_and_ships_in_the_artifact(artifact):
    table = load_styles(TEMPLATE / "styles.json")
    assert table.version == json.loads((TEMPLATE / "styles.json").read_text())["version"]
    assert sorted(table.names()) == sorted(PRESETS)
    shipped = artifact / "artifacts" / "sdxl" / "styles.json"
    assert shipped.read_bytes() == (TEMPLATE / "styles.json").read_bytes()
    assert Model.load(str(artifact)).metadata["styles"]["version"] == table.version


def test_style_changes_the_encoded_prompt_and_image_but_not_the_echoed_prompt(model):
    pipes = model.unwrap_python_model().pipelines
    [plain, styled] = parse_request(
        frame({"prompt": "a cat"}, {"prompt": "a cat", "style": "pixel-art"}), FAST, ModelConfig(), pipes.catalog
    ).rows
    assert styled.effective_prompt == "pixel-art a cat . low-res, blocky, pixel art style, 8-bit graphics"
    assert styled.effective_negative_prompt.startswith("sloppy, messy")
    with torch.no_grad():
        plain_embeds = pipes.base.encode_prompt(plain.effective_prompt, device="cpu")[0]
        styled_embeds = pipes.base.encode_prompt(styled.effective_prompt, device="cpu")[0]
    assert not torch.equal(plain_embeds, styled_embeds)

    out = model.predict(frame({"prompt": "a cat", "seed": 1}), params=FAST | {"style": "pixel-art"})
    none = model.predict(frame({"prompt": "a cat", "seed": 1}), params=FAST)
    assert out["prompt"][0] == "a cat"
    assert np.abs(pixels(out["generated_image"][0]) - pixels(none["generated_image"][0])).mean() > 1


def test_a_row_style_beats_the_request_style_and_negative_prompts_are_kept(model):
    catalog = model.unwrap_python_model().pipelines.catalog
    [a, b] = parse_request(
        frame({"prompt": "a"}, {"prompt": "b", "style": "enhance"}),
        FAST | {"style": "anime", "negative_prompt": "text"},
        ModelConfig(),
        catalog,
    ).rows
    assert a.effective_prompt.startswith("anime artwork a .") and b.effective_prompt.startswith("breathtaking b .")
    assert b.effective_negative_prompt == "ugly, deformed, noisy, blurry, distorted, grainy, text"
    assert (b.prompt, b.negative_prompt, b.style) == ("b", "text", "enhance")


def test_unknown_style_is_an_error_listing_the_valid_ones(model):
    with pytest.raises(MlflowException, match=r"^Invalid param 'style': unknown style 'vaporwave'; valid: 3d-model, "):
        model.predict(frame({"prompt": "a cat"}), params=FAST | {"style": "vaporwave"})
    with pytest.raises(MlflowException, match=r"^Row 1: 'style': unknown style 'Anime'; valid: .*anime"):
        model.predict(frame({"prompt": "a"}, {"prompt": "b", "style": "Anime"}), params=FAST)
