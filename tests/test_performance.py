"""Speed/memory options give the same images (within tolerance), still load and generate on CPU, and
take effect: each test also checks the option's mark on the loaded modules, so an option that does
nothing fails.

Correctness only: timings belong to benchmarks/, never to tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.hooks import CpuOffload
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from model_pkg.config import ModelConfig
from model_pkg.generation import generate_batch
from model_pkg.pipelines import Pipelines, load_pipelines
from model_pkg.request import parse_request
from sdxl_tools.artifact import save_artifact
from sdxl_tools.random_weights import base_unet, refiner_unet, text_encoder, text_encoder_2, vae
from sdxl_tools.staging import stage_components
from testkit.helpers import FAST, frame

ROWS = frame({"prompt": "a cat with a hat", "seed": 1}, {"prompt": "a dog on a bench", "seed": 2})


def generate(sdxl_dir, params: dict | None = None, **options) -> tuple[np.ndarray, Pipelines]:
    """Generate ROWS with pipelines loaded under the given model-config options; (images, pipelines)."""
    config = ModelConfig(**({"dtype": "float32"} | options))  # float32 unless the test asks otherwise
    pipes = load_pipelines(sdxl_dir, config)
    rows = parse_request(ROWS, FAST | (params or {}), config).rows
    return np.stack([np.asarray(im, dtype=np.int16) for im in generate_batch(pipes, rows)]), pipes


def modules(pipes: Pipelines) -> list[torch.nn.Module]:
    """The UNets and the (shared) VAE: what the speed options change."""
    return [pipes.base.unet, pipes.refiner.unet, pipes.base.vae]


def attention_processors(pipes: Pipelines) -> set[type]:
    return {type(p) for module in modules(pipes) for p in module.attn_processors.values()}


def channels_last(pipes: Pipelines) -> set[bool]:
    """For every 4-D weight (convolutions): is it stored channels_last?"""
    return {
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for module in modules(pipes)
        for p in module.parameters()
        if p.ndim == 4 and p.shape[1] > 1 and p.shape[2:] != (1, 1)  # where the two layouts differ
    }


def offload_hooks(pipes: Pipelines) -> set[bool]:
    return {isinstance(getattr(m, "_hf_hook", None), CpuOffload) for m in modules(pipes)}


# option → does the loaded pipelines show it?
EFFECTS = {
    "attention": lambda p: attention_processors(p) == {AttnProcessor},
    "channels_last": lambda p: channels_last(p) == {True},
    "vae_slicing": lambda p: p.base.vae.use_slicing and p.refiner.vae.use_slicing,
    "vae_tiling": lambda p: p.base.vae.use_tiling and p.refiner.vae.use_tiling,
    "cpu_offload": lambda p: offload_hooks(p) == {True},
}


@pytest.fixture(scope="module")
def sdxl_dir(artifact):
    return artifact / "artifacts" / "sdxl"


@pytest.fixture(scope="module")
def reference(sdxl_dir) -> tuple[np.ndarray, Pipelines]:
    return generate(sdxl_dir)


def test_without_options_no_option_shows(reference):
    _, pipes = reference
    assert not any(took_effect(pipes) for took_effect in EFFECTS.values())
    assert attention_processors(pipes) == {AttnProcessor2_0}  # SDPA: diffusers' default on torch 2
    assert channels_last(pipes) == {False}


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
def test_option_takes_effect_and_gives_the_same_images(sdxl_dir, reference, options):
    out, pipes = generate(sdxl_dir, **options)
    assert EFFECTS[next(iter(options))](pipes)
    assert np.abs(out - reference[0]).max() <= 2


def test_vae_tiling_decodes_large_images(sdxl_dir):
    """The tiny VAE tiles above 64 px; a 192×128 image is decoded in overlapping tiles."""
    out, pipes = generate(sdxl_dir, {"height": 128, "width": 192, "num_inference_steps": 5}, vae_tiling=True)
    assert EFFECTS["vae_tiling"](pipes)
    assert out.shape == (2, 128, 192, 3)
    assert out.std() > 1  # a real picture, not a constant


def test_torch_compile_of_unet_and_vae_gives_the_same_images(sdxl_dir, reference):
    compiled, pipes = generate(sdxl_dir, compile="unet+vae", warmup_size=0)
    for unet in (pipes.base.unet, pipes.refiner.unet):  # compiled in place: still the diffusers class
        assert type(unet).__name__ == "UNet2DConditionModel" and unet._compiled_call_impl is not None
    assert hasattr(pipes.base.vae.decode, "_torchdynamo_orig_callable")
    assert reference[1].base.unet._compiled_call_impl is None
    assert np.abs(compiled - reference[0]).max() <= 2


def test_float16_runs_with_the_vae_upcast_and_stays_finite(sdxl_dir, reference):
    """SDXL's VAE overflows in float16; diffusers upcasts it (force_upcast) — images must not be NaN/black."""
    half, pipes = generate(sdxl_dir, device="cpu", dtype="float16")
    assert pipes.dtype == pipes.base.unet.dtype == torch.float16
    assert half.std() > 1
    assert np.abs(half - reference[0]).mean() < 8  # same picture, float16 rounding


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
