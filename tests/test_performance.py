"""Speed/memory options give the same images (within tolerance) and still load and generate on CPU.

Correctness only: timings belong to benchmarks/, never to tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FAST, frame

from model_pkg.config import ModelConfig
from model_pkg.generation import generate_batch
from model_pkg.pipelines import load_pipelines
from model_pkg.request import parse_request
from sdxl_tools.artifact import save_artifact, stage_components
from sdxl_tools.random_weights import base_unet, refiner_unet, text_encoder, text_encoder_2, vae

ROWS = frame({"prompt": "a cat with a hat", "seed": 1}, {"prompt": "a dog on a bench", "seed": 2})


def images(sdxl_dir, params: dict | None = None, **options) -> np.ndarray:
    """Generate ROWS with pipelines loaded under the given model-config options."""
    config = ModelConfig(**({"dtype": "float32"} | options))  # float32 unless the test asks otherwise
    pipes = load_pipelines(sdxl_dir, config)
    rows = parse_request(ROWS, FAST | (params or {}), config).rows
    return np.stack([np.asarray(im, dtype=np.int16) for im in generate_batch(pipes, rows)])


@pytest.fixture(scope="module")
def sdxl_dir(artifact):
    return artifact / "artifacts" / "sdxl"


@pytest.fixture(scope="module")
def reference(sdxl_dir) -> np.ndarray:
    return images(sdxl_dir)


@pytest.mark.parametrize(
    "options",
    [
        {"attention": "classic"},
        {"channels_last": True},
        {"vae_slicing": True},
        {"cpu_offload": "model"},  # on CPU the hooks move modules cpu → cpu: the code path runs
    ],
    ids=lambda o: next(iter(o)),
)
def test_option_gives_the_same_images(sdxl_dir, reference, options):
    assert np.abs(images(sdxl_dir, **options) - reference).max() <= 2


def test_sdpa_is_the_default_attention(sdxl_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipes = load_pipelines(sdxl_dir, ModelConfig())
    processors = {type(p) for p in pipes.base.unet.attn_processors.values()}
    assert processors == {AttnProcessor2_0}


def test_vae_tiling_decodes_large_images(sdxl_dir):
    """The tiny VAE tiles above 64 px; a 192×128 image is decoded in overlapping tiles."""
    out = images(sdxl_dir, {"height": 128, "width": 192, "num_inference_steps": 5}, vae_tiling=True)
    assert out.shape == (2, 128, 192, 3)
    assert out.std() > 1  # a real picture, not a constant


def test_torch_compile_of_unet_and_vae_gives_the_same_images(sdxl_dir, reference):
    compiled = images(sdxl_dir, compile="unet+vae", warmup_size=0)
    assert np.abs(compiled - reference).max() <= 2


def test_float16_runs_with_the_vae_upcast_and_stays_finite(sdxl_dir, reference):
    """SDXL's VAE overflows in float16; diffusers upcasts it (force_upcast) — images must not be NaN/black."""
    half = images(sdxl_dir, device="cpu", dtype="float16")
    assert half.std() > 1
    assert np.abs(half - reference).mean() < 8  # same picture, float16 rounding


def test_an_fp16_fixed_vae_replaces_both_pipelines_vae_and_is_shared(tiny, tmp_path):
    from diffusers import AutoencoderKL

    fixed = AutoencoderKL.from_pretrained(tiny.base / "vae")
    fixed.register_to_config(force_upcast=False)  # what madebyollin/sdxl-vae-fp16-fix declares
    fixed.save_pretrained(tmp_path / "vae_fix")

    staged = stage_components(tiny.base, tiny.refiner, tmp_path / "sdxl", vae=tmp_path / "vae_fix")
    assert "vae" in staged.manifest["shared"]
    pipes = load_pipelines(save_artifact(staged, tmp_path / "m") / "artifacts" / "sdxl", ModelConfig())
    assert pipes.refiner.vae is pipes.base.vae and pipes.base.vae.config.force_upcast is False


def test_fullsize_configs_have_the_published_sdxl_parameter_counts():
    with torch.device("meta"):  # shapes only, no memory
        counts = {
            name: sum(p.numel() for p in build().parameters())
            for name, build in {
                "base_unet": base_unet,
                "refiner_unet": refiner_unet,
                "vae": vae,
                "text_encoder": lambda: text_encoder(49407),
                "text_encoder_2": lambda: text_encoder_2(49407),
            }.items()
        }
    assert counts == {
        "base_unet": 2_567_463_684,
        "refiner_unet": 2_259_526_660,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
