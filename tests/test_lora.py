"""LoRA adapters packaged in the artifact: build, load once, select per request/row, never leak."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from safetensors.torch import save_file

from model_pkg.generation import generate_batch
from model_pkg.lora import parse_selection
from model_pkg.request import parse_request
from sdxl_tools.artifact import save_artifact
from sdxl_tools.random_weights import write_tiny_lora
from sdxl_tools.staging import BuildError, stage_components
from testkit.helpers import FAST, frame, pixels

ROOT = Path(__file__).resolve().parent.parent
FAST = FAST | {"num_inference_steps": 5}  # ensemble: 4 base steps + 1 refiner step; enough to see an adapter


@pytest.fixture(scope="module")
def tiny_loras(tiny, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("loras")
    return {name: write_tiny_lora(work / name, tiny.base, seed=i + 1) for i, name in enumerate(("toy", "pixel"))}


@pytest.fixture(scope="module")
def lora_artifact(tiny, tiny_loras, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("lora-artifact")
    # one adapter as a folder, one as the .safetensors file itself
    loras = {"toy": tiny_loras["toy"], "pixel": tiny_loras["pixel"] / "pytorch_lora_weights.safetensors"}
    staged = stage_components(tiny.base, tiny.refiner, work / "sdxl", loras=loras)
    return save_artifact(staged, work / "model")


@pytest.fixture(scope="module")
def lora_model(lora_artifact):
    return mlflow.pyfunc.load_model(str(lora_artifact))


def run(model, lora: str = "", **params) -> list[str]:
    rows = frame({"prompt": "a cat with a hat", "seed": 5})
    return model.predict(rows, params=FAST | {"lora": lora} | params)["generated_image"].tolist()


def test_adapters_are_packaged_once_with_their_hashes(lora_artifact, lora_model):
    manifest = json.loads((lora_artifact / "artifacts" / "sdxl" / "components.json").read_text())
    assert sorted(manifest["loras"]) == ["pixel", "toy"]
    assert all(len(e["sha256"]) == 64 for e in manifest["loras"].values())
    assert lora_model.metadata.metadata["loras"] == {n: e["sha256"] for n, e in manifest["loras"].items()}
    assert sorted(lora_model.unwrap_python_model().pipelines.base.get_list_adapters()["unet"]) == ["pixel", "toy"]


def test_a_lora_changes_the_image_and_scale_zero_equals_no_lora(lora_model, model):
    none = run(lora_model)
    assert none == run(model)  # packaged but not selected: the artifact without adapters, byte for byte
    toy = run(lora_model, "toy")
    for a, b in zip(none, toy, strict=True):
        assert np.abs(pixels(a) - pixels(b)).mean() > 1
    zero = run(lora_model, "toy", lora_scale=0.0)
    assert [pixels(z).tolist() for z in zero] == [pixels(n).tolist() for n in none]
    assert run(lora_model, "toy:0") == zero  # the per-adapter weight form
    assert run(lora_model, "toy", lora_scale=0.5) != toy


def test_switching_adapters_never_leaks_into_the_next_request(lora_artifact, lora_model):
    sequence = ["toy", "pixel", "toy:0.7,pixel:0.4", ""]
    first = {spec: run(lora_model, spec) for spec in sequence}
    fresh = mlflow.pyfunc.load_model(str(lora_artifact))
    second = {spec: run(fresh, spec) for spec in reversed(sequence)}  # other history, same answers
    assert first == second
    assert len({tuple(v) for v in first.values()}) == len(sequence)


def test_rows_with_different_adapters_are_batched_apart(lora_model):
    rows = frame(
        {"prompt": "a cat", "seed": 1, "lora": "toy"},
        {"prompt": "a cat", "seed": 1},
        {"prompt": "a cat", "seed": 1, "lora": "pixel", "lora_scale": 0.5},
    )
    together = lora_model.predict(rows, params=FAST)["generated_image"]
    for i in range(3):
        alone = lora_model.predict(rows.iloc[[i]], params=FAST)["generated_image"][0]
        assert np.abs(pixels(alone) - pixels(together[i])).max() <= 1
    assert together.nunique() == 3


def test_a_failed_call_leaves_no_adapter_enabled(lora_model):
    python_model = lora_model.unwrap_python_model()
    pipes = python_model.pipelines
    long_prompt = " ".join(["a cat with a hat"] * 30)  # 150 tokens: 2 windows
    [spec] = parse_request(
        frame({"prompt": long_prompt}), FAST | {"lora": "toy"}, python_model.config, pipes.catalog
    ).rows
    # break the call after the adapter is enabled: promise one window where the prompt needs two
    object.__setattr__(spec, "settings", replace(spec.settings, prompt_chunks=1))
    with pytest.raises(ValueError, match="needs more than 1 windows"):
        generate_batch(pipes, [spec])
    layers = _lora_layers(pipes.base.unet) + _lora_layers(pipes.base.text_encoder_2)
    assert layers and all(layer.disable_adapters for layer in layers)


def _lora_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def test_unknown_adapters_and_bad_selections_are_clear_errors(lora_model, model):
    with pytest.raises(MlflowException, match=r"^Invalid param 'lora': unknown adapter 'offset'; packaged: pixel, toy"):
        lora_model.predict(frame({"prompt": "a"}), params=FAST | {"lora": "offset"})
    with pytest.raises(MlflowException, match=r"^Row 0: 'lora': unknown adapter 'x'; packaged: none"):
        model.predict(frame({"prompt": "a", "lora": "x"}), params=FAST)
    for spec, message in [
        ("toy:lots", "weight of 'toy' must be a number"),
        ("toy,toy", "named twice"),
        ("toy,", "empty adapter name"),
        ("toy:11", "between -10 and 10"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_selection(spec, 1.0, {"toy": "h", "pixel": "h"})
    assert parse_selection(" pixel:0.5 , toy", 0.8, {"toy": "h", "pixel": "h"}) == (("pixel", 0.5), ("toy", 0.8))


def test_build_packages_only_safetensors_loras(tiny, tiny_loras, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"lora.weight": torch.zeros(1)}, pickled / "adapter.bin")
    with pytest.raises(BuildError, match=r"no \.safetensors LoRA weights.*pickled adapter\.bin"):
        stage_components(tiny.base, tiny.refiner, tmp_path / "a", loras={"p": pickled})
    with pytest.raises(BuildError, match=r"only \.safetensors"):
        stage_components(tiny.base, tiny.refiner, tmp_path / "b", loras={"p": pickled / "adapter.bin"})
    save_file({"conv.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(BuildError, match="holds no LoRA weights"):
        stage_components(tiny.base, tiny.refiner, tmp_path / "c", loras={"m": tmp_path / "model.safetensors"})
    with pytest.raises(BuildError, match="LoRA name 'a:b'"):
        stage_components(tiny.base, tiny.refiner, tmp_path / "d", loras={"a:b": tiny_loras["toy"]})


def test_build_cli_lora_flag(tiny_loras, tmp_path, capsys):
    """``sdxl-pyfunc build --lora NAME=PATH --tiny-lora NAME``, run in-process (its ``main``)."""
    from sdxl_tools import cli

    out = str(tmp_path / "m")
    lora_args = ["--lora", f"toy={tiny_loras['toy']}", "--tiny-lora", "rnd"]
    assert cli.main(["build", "--tiny", *lora_args, "--output", out]) == 0
    manifest = json.loads((tmp_path / "m" / "artifacts" / "sdxl" / "components.json").read_text())
    assert sorted(manifest["loras"]) == ["rnd", "toy"]
    assert cli.main(["build", "--tiny", "--lora", "toy", "--output", str(tmp_path / "n")]) == 2
    assert "--lora expects NAME=PATH" in capsys.readouterr().err


def test_pai_eas_prompt_tags_select_adapters_and_round_trip_through_png_metadata(lora_model):
    from sdxl_tools.client import read_metadata

    tagged = lora_model.predict(frame({"prompt": "a cat <lora:toy:0.7> with a hat", "seed": 5}), params=FAST)
    by_param = lora_model.predict(frame({"prompt": "a cat with a hat", "seed": 5}), params=FAST | {"lora": "toy:0.7"})
    assert tagged["prompt"][0] == "a cat <lora:toy:0.7> with a hat"  # echoed as sent
    assert pixels(tagged["generated_image"][0]).tolist() == pixels(by_param["generated_image"][0]).tolist()

    out = lora_model.predict(frame({"prompt": "a dog <lora:pixel>", "seed": 2}), params=FAST | {"lora": "toy:0.5"})
    request = read_metadata(out["generated_image"][0])["request"]
    assert request["dataframe_records"] == [{"prompt": "a dog <lora:pixel>"}]
    assert request["params"]["lora"] == "toy:0.5"
    replay = lora_model.predict(frame(*request["dataframe_records"]), params=request["params"])
    assert replay["generated_image"][0] == out["generated_image"][0]

    unknown = r"^Row 0: 'prompt' <lora:\.\.\.> tag: unknown adapter 'x'; packaged: pixel"
    with pytest.raises(MlflowException, match=unknown):
        lora_model.predict(frame({"prompt": "a <lora:x:1>"}), params=FAST)
    with pytest.raises(MlflowException, match=re.escape("'toy' is selected by both 'lora' and a <lora:...> tag")):
        lora_model.predict(frame({"prompt": "a <lora:toy>"}), params=FAST | {"lora": "toy"})


def test_adapters_switch_per_request_under_torch_compile(lora_artifact, lora_model):
    """``compile: unet`` compiles the UNet in place, so diffusers still toggles its adapters: a request
    without ``lora`` is the adapter-free image, one with it the adapter's, in any order."""
    compiled = mlflow.pyfunc.load_model(str(lora_artifact), model_config={"compile": "unet", "warmup_size": 0})
    for spec in ["", "toy", ""]:
        eager, ours = run(lora_model, spec), run(compiled, spec)
        for a, b in zip(eager, ours, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 2, spec  # compiled kernels round differently


def test_an_adapter_reaches_the_inpainting_pipelines_over_the_same_modules(lora_model, model):
    from test_inpaint import BOX, mask_b64

    from testkit.helpers import png_b64

    row = frame({"prompt": "a cat with a hat", "image": png_b64(size=(64, 64)), "mask": mask_b64((64, 64)), "seed": 5})
    left, top, right, bottom = BOX
    for refiner in ("none", "ensemble"):
        params = FAST | {"refiner": refiner}
        none = lora_model.predict(row, params=params)["generated_image"][0]
        assert none == model.predict(row, params=params)["generated_image"][0]  # packaged, not selected: no effect
        toy = pixels(lora_model.predict(row, params=params | {"lora": "toy"})["generated_image"][0])
        assert np.abs(toy - pixels(none))[top:bottom, left:right].mean() > 1  # the adapter repaints differently
        assert (toy[:4] == pixels(none)[:4]).all()  # and leaves what is far from the mask alone
