"""dtype on CPU machines: ``auto`` picks bfloat16 where the CPU runs it natively, float32 elsewhere;
an explicit dtype wins; the pipelines run in the resolved dtype; bfloat16 images differ from float32
ones only by rounding."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from model_pkg.config import ModelConfig, load_model_config
from model_pkg.pipelines import choose_device_dtype, native_bf16, resolve_dtype, weights_variant
from sdxl_tools.client import b64_to_image, read_metadata
from testkit.helpers import FAST, frame, pixels, png_b64

CPU = torch.device("cpu")
# torch.cpu.get_capabilities() of three machines (the keys that matter)
SAPPHIRE_RAPIDS = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}
ZEN4 = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": False}
GRAVITON3 = {"architecture": "aarch64", "neon": True, "bf16": True, "sve_bf16": True}
SKYLAKE = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
HASWELL = {"architecture": "x86_64", "avx2": True}


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        (SAPPHIRE_RAPIDS, torch.bfloat16),
        (ZEN4, torch.bfloat16),
        (GRAVITON3, torch.bfloat16),
        (SKYLAKE, torch.float32),
        (HASWELL, torch.float32),
        ({}, torch.float32),  # torch without a probe
    ],
    ids=["amx", "avx512_bf16", "arm_bf16", "avx512_without_bf16", "avx2", "unknown"],
)
def test_auto_is_bfloat16_on_a_cpu_with_native_bf16_and_float32_without(capabilities, expected):
    assert choose_device_dtype(ModelConfig(device="cpu"), capabilities) == (CPU, expected)
    assert bool(native_bf16(capabilities)) == (expected == torch.bfloat16)


def test_auto_keeps_float16_on_cuda_and_float32_on_mps():
    assert resolve_dtype("auto", torch.device("cuda"), cpu_bf16=True) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda:1"), cpu_bf16=False) == torch.float16
    assert resolve_dtype("auto", torch.device("mps"), cpu_bf16=True) == torch.float32


@pytest.mark.parametrize("setting", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("capabilities", [SAPPHIRE_RAPIDS, HASWELL], ids=["bf16_cpu", "no_bf16_cpu"])
def test_an_explicit_dtype_wins(setting, capabilities):
    assert choose_device_dtype(ModelConfig(device="cpu", dtype=setting), capabilities)[1] == getattr(torch, setting)


def test_sdxl_dtype_env_wins_over_the_model_config():
    config = load_model_config({"dtype": "float32"}, environ={"SDXL_DTYPE": "bfloat16"})
    assert config.dtype == "bfloat16"


def test_bfloat16_loads_the_fp16_weight_files(tmp_path):
    (tmp_path / "unet").mkdir()
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        (tmp_path / "unet" / name).write_bytes(b"")
    assert weights_variant(tmp_path, torch.bfloat16) == "fp16"
    assert weights_variant(tmp_path, torch.float16) == "fp16"
    assert weights_variant(tmp_path, torch.float32) is None


def module_dtypes(pipes) -> dict[str, torch.dtype]:
    modules = {f"base.{n}": getattr(pipes.base, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    modules |= {f"refiner.{n}": getattr(pipes.refiner, n) for n in ("unet", "vae", "text_encoder_2")}
    return {name: module.dtype for name, module in modules.items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_resolved_dtype_is_the_one_the_pipelines_run_in_and_the_png_says_so(artifact, monkeypatch, dtype):
    monkeypatch.delenv("SDXL_DTYPE", raising=False)  # the model config decides here
    model = mlflow.pyfunc.load_model(str(artifact), model_config={"dtype": dtype, "device": "cpu"})
    pipes = model.unwrap_python_model().pipelines
    assert pipes.dtype == getattr(torch, dtype)
    assert set(module_dtypes(pipes).values()) == {getattr(torch, dtype)}

    image = model.predict(frame({"prompt": "a cat", "seed": 1}), params=FAST)["generated_image"][0]
    meta = read_metadata(image)
    assert (meta["model"]["device"], meta["model"]["dtype"]) == ("cpu", dtype)
    assert "dtype" not in meta["request"]["params"]  # the request reproduces the image; it stays as it was


def test_auto_loads_in_what_this_cpu_supports(artifact, monkeypatch):
    monkeypatch.delenv("SDXL_DTYPE", raising=False)
    pipes = mlflow.pyfunc.load_model(str(artifact), model_config={"device": "cpu"}).unwrap_python_model().pipelines
    expected = torch.bfloat16 if native_bf16(torch.cpu.get_capabilities()) else torch.float32
    assert pipes.dtype == expected
    assert set(module_dtypes(pipes).values()) == {expected}


# -- quality guard --------------------------------------------------------------------------------

# bfloat16 keeps 8 significant bits (float32: 24): every UNet and VAE activation is rounded to ~0.4%.
# Measured on the tiny models over these rows at 64×64 and 128×128: text-to-image at most 6 levels
# (of 255) apart in a pixel and 0.66 on average; img2img of a hard-edged picture 13 and 0.87. Most of
# it is the VAE decoder's rounding (the same latents decoded in bfloat16 and float32: 10 and 0.63).
# The bounds leave room for other CPUs' kernels, not for a broken path: a NaN turns an image black,
# a wrong latent scale or dtype mix-up moves the average by tens of levels.
MAX_LEVELS = 16
MEAN_LEVELS = 1.5
ROWS = [
    ({"prompt": "a yellow cat on a bench", "seed": 5}, {"refiner": "none"}),
    ({"prompt": "a dog with a hat", "seed": 6}, {"refiner": "ensemble"}),
    ({"prompt": "a red hat", "seed": 7}, {"refiner": "sequential"}),
    ({"prompt": "a (green:1.4) park", "seed": 8}, {"refiner": "none"}),  # weighted prompt embeddings
    ({"prompt": "a cat", "seed": 9, "image": png_b64(size=(128, 96))}, {}),  # img2img: VAE encode + decode
]


@pytest.fixture(scope="module")
def both_dtypes(artifact):
    sdxl = artifact / "artifacts" / "sdxl"
    from model_pkg.generation import generate_batch
    from model_pkg.pipelines import load_pipelines
    from model_pkg.request import parse_request

    out = {}
    for dtype in ("float32", "bfloat16"):
        config = ModelConfig(device="cpu", dtype=dtype)
        pipes = load_pipelines(sdxl, config)
        images = []
        for row, params in ROWS:
            spec = parse_request(frame(row), FAST | params, config).rows
            images.append(np.asarray(generate_batch(pipes, spec)[0], dtype=np.int16))
        out[dtype] = images
    return out


def test_bfloat16_images_differ_from_float32_only_by_rounding(both_dtypes):
    for full, half in zip(both_dtypes["float32"], both_dtypes["bfloat16"], strict=True):
        difference = np.abs(full - half)
        assert difference.max() <= MAX_LEVELS
        assert difference.mean() <= MEAN_LEVELS
    assert max(np.abs(f - h).max() for f, h in zip(*both_dtypes.values(), strict=True)) > 0  # really bf16


def test_bfloat16_images_are_never_nan_or_black(both_dtypes):
    """SDXL's VAE overflows in float16 (diffusers upcasts it there); bfloat16 has float32's range."""
    for image in both_dtypes["bfloat16"]:
        assert image.std() > 1 and image.mean() > 5


def test_bfloat16_serves_every_mode_through_predict(artifact, monkeypatch):
    monkeypatch.delenv("SDXL_DTYPE", raising=False)
    model = mlflow.pyfunc.load_model(str(artifact), model_config={"dtype": "bfloat16", "device": "cpu"})
    for row, params in ROWS:
        image = model.predict(frame(row), params=FAST | params)["generated_image"][0]
        assert pixels(image).std() > 1
        assert b64_to_image(image).size[0] in (64, 128)
