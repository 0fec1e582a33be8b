"""Building the artifact: safetensors only, shared components deduplicated by content, CLI."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
from safetensors.torch import load_file, save_file

from sdxl_tools import cli
from sdxl_tools.client import b64_to_image
from sdxl_tools.staging import BuildError, stage_components
from testkit.helpers import FAST, frame


def test_pickled_weights_are_refused(tiny, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(tiny.refiner, refiner)
    weights = refiner / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(BuildError, match=r"unet has only pickled weights \(diffusion_pytorch_model.bin\)"):
        stage_components(tiny.base, refiner, tmp_path / "out")


def test_pickled_files_next_to_safetensors_are_left_out(tiny, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    (base / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    staged = stage_components(base, tiny.refiner, tmp_path / "out")
    assert not list(staged.folder.rglob("*.bin"))


def test_a_refiner_component_that_differs_is_stored_and_loaded_separately(tiny, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(tiny.refiner, refiner)
    vae_file = refiner / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae_file)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 0.01
    save_file(tensors, vae_file)

    staged = stage_components(tiny.base, refiner, tmp_path / "out")
    assert staged.manifest["shared"] == ["text_encoder_2", "tokenizer_2"]
    assert (staged.folder / "refiner" / "vae").is_dir()

    model = mlflow.pyfunc.load_model(str(build_model(staged, tmp_path)))
    pipes = model.unwrap_python_model().pipelines
    assert pipes.refiner.vae is not pipes.base.vae
    assert pipes.refiner.text_encoder_2 is pipes.base.text_encoder_2
    out = model.predict(frame({"prompt": "a cat", "seed": 1}), params=FAST)
    assert b64_to_image(out["generated_image"][0]).size == (64, 64)


def build_model(staged, tmp_path):
    from sdxl_tools.artifact import save_artifact

    return save_artifact(staged, tmp_path / "model")


def test_fp16_variant_keeps_only_half_precision_weights(tiny, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    half = {k: v.half() for k, v in load_file(unet).items()}
    save_file(half, unet.with_name("diffusion_pytorch_model.fp16.safetensors"))

    staged = stage_components(base, tiny.refiner, tmp_path / "out", variant="fp16")
    assert sorted(p.name for p in (staged.folder / "base" / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    everything = stage_components(base, tiny.refiner, tmp_path / "all")
    assert len(list((everything.folder / "base" / "unet").glob("*.safetensors"))) == 2


def test_folders_that_are_not_sdxl_pipelines_are_refused(tiny, tmp_path):
    with pytest.raises(
        BuildError, match="holds a StableDiffusionXLImg2ImgPipeline, expected StableDiffusionXLPipeline"
    ):
        stage_components(tiny.refiner, tiny.refiner, tmp_path / "out")
    with pytest.raises(BuildError, match="is not a diffusers pipeline folder"):
        stage_components(tmp_path, tiny.refiner, tmp_path / "out2")


def test_cli_builds_a_loadable_model_with_model_config(tmp_path, capsys):
    assert cli.main(["build", "--tiny", "--output", str(tmp_path / "m"), "--config", "max_steps=12"]) == 0
    assert "shared components: text_encoder_2, tokenizer_2, vae" in capsys.readouterr().out
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    assert model.unwrap_python_model().config.max_steps == 12
    manifest = json.loads((tmp_path / "m" / "artifacts" / "sdxl" / "components.json").read_text())
    assert set(manifest["hashes"]) >= {"base/unet", "refiner/unet", "base/vae"}
