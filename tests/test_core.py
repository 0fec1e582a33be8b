"""The core artifact: build → log → load → predict, equal to raw diffusers, batched, shared components."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from model_pkg.config import ModelConfig
from model_pkg.contract import OUTPUT_COLUMNS, Mode
from model_pkg.generation import generate_batch
from model_pkg.plan import plan_batches
from model_pkg.request import parse_request
from model_pkg.spec import Settings
from sdxl_tools.artifact import log_artifact
from sdxl_tools.client import azure_request_to_frame, b64_to_image, to_azure_response
from sdxl_tools.staging import stage_components
from testkit.helpers import FAST, frame, pixels, png_b64, raw_pipelines

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SEED_001_BODY = """{
"input_data": {
"columns": ["prompt", "image"],
"data": [
{
"prompt": "Face of a yellow cat, high resolution, sitting on a park bench",
"image": "IMAGE1"
},
{
"prompt": "Face of a green cat, high resolution, sitting on a park bench",
"image": "IMAGE2"
}
],
"index": [0, 1]
}
}"""


def three_rows() -> pd.DataFrame:
    return frame(
        {"prompt": "a cat with a hat", "seed": 1},
        {"prompt": "a dog on a bench", "seed": 2},
        {"prompt": "a green cat", "image": png_b64(size=(96, 64)), "seed": 3},
    )


def test_log_load_predict_three_rows(tiny, tmp_path, sqlite_tracking):
    staged = stage_components(tiny.base, tiny.refiner, tmp_path / "sdxl")
    with mlflow.start_run():
        info = log_artifact(staged, name="sdxl")
    model = mlflow.pyfunc.load_model(info.model_uri)

    out = model.predict(three_rows(), params=FAST)

    assert list(out.columns) == list(OUTPUT_COLUMNS)
    assert out["prompt"].tolist() == ["a cat with a hat", "a dog on a bench", "a green cat"]
    assert out["seed"].tolist() == [1, 2, 3]
    assert out["nsfw_content_detected"].isna().all()  # no safety checker packaged
    assert [b64_to_image(b).size for b in out["generated_image"]] == [(64, 64), (64, 64), (96, 64)]
    assert all(b64_to_image(b).format == "PNG" for b in out["generated_image"])

    again = model.predict(three_rows(), params=FAST)
    assert again["generated_image"].tolist() == out["generated_image"].tolist()  # same seeds → same bytes

    other = model.predict(three_rows().assign(seed=[11, 12, 13]), params=FAST)
    for a, b in zip(out["generated_image"], other["generated_image"], strict=True):
        assert np.abs(pixels(a) - pixels(b)).mean() > 1  # different seeds → different images


def test_returned_random_seed_reproduces_the_image(model):
    first = model.predict(frame({"prompt": "a red hat"}), params=FAST)  # no seed: random
    seed = int(first["seed"][0])
    replay = model.predict(frame({"prompt": "a red hat", "seed": seed}), params=FAST)
    assert replay["generated_image"][0] == first["generated_image"][0]


def test_request_seed_gives_row_i_seed_plus_i(model):
    out = model.predict(frame({"prompt": "a cat"}, {"prompt": "a cat"}, {"prompt": "a cat"}), params=FAST | {"seed": 7})
    assert out["seed"].tolist() == [7, 8, 9]
    assert out["generated_image"].nunique() == 3
    alone = model.predict(frame({"prompt": "a cat", "seed": 8}), params=FAST)
    assert alone["generated_image"][0] == out["generated_image"][1]


@pytest.fixture(scope="module")
def raw(tiny):
    return raw_pipelines(tiny, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)


def raw_image(raw, mode: str, prompt: str, seed: int, image=None):
    base, refiner = raw
    g = torch.Generator().manual_seed(seed)
    args = dict(prompt=prompt, height=64, width=64, num_inference_steps=10, generator=g)
    if mode == "none":
        return base(**args).images[0]
    if mode == "ensemble":
        latents = base(**args, denoising_end=0.8, output_type="latent").images
        return refiner(prompt=prompt, image=latents, num_inference_steps=10, denoising_start=0.8, generator=g).images[0]
    if mode == "sequential":
        latents = base(**args, output_type="latent").images
        return refiner(prompt=prompt, image=latents, strength=0.3, num_inference_steps=10, generator=g).images[0]
    return refiner(prompt=prompt, image=image, strength=0.3, num_inference_steps=10, generator=g).images[0]


@pytest.mark.parametrize("mode", ["none", "ensemble", "sequential", "img2img"])
def test_pyfunc_equals_raw_diffusers(model, raw, mode):
    image_b64 = png_b64(size=(64, 64)) if mode == "img2img" else None
    row = {"prompt": "a yellow cat on a bench", "seed": 5} | ({"image": image_b64} if image_b64 else {})
    params = FAST | ({"refiner": mode} if mode != "img2img" else {})

    ours = pixels(model.predict(frame(row), params=params)["generated_image"][0])
    theirs = raw_image(raw, mode, row["prompt"], 5, b64_to_image(image_b64).convert("RGB") if image_b64 else None)

    np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.int16))


def count_steps(model, rows: pd.DataFrame, params: dict) -> tuple[Counter, int]:
    """(steps per stage, pipeline batches) for a request, observed through diffusers' step callback."""
    python_model = model.unwrap_python_model()
    specs = parse_request(rows, params, python_model.config).rows
    steps: Counter = Counter()
    batches = plan_batches(specs, 8)
    for batch in batches:
        generate_batch(python_model.pipelines, batch, on_step=lambda stage, i, pipe: steps.update([stage]))
    return steps, len(batches)


@pytest.mark.parametrize(
    ("params", "image", "expected"),
    [
        ({"refiner": "none"}, None, {"base": 10}),
        ({"refiner": "ensemble", "refiner_ratio": 0.2}, None, {"base": 8, "refiner": 2}),
        ({"refiner": "ensemble", "refiner_ratio": 0.5}, None, {"base": 5, "refiner": 5}),
        ({"refiner": "sequential", "num_inference_steps_refiner": 20}, None, {"base": 10, "refiner": 6}),
        ({"refiner": "ensemble", "strength": 0.5}, png_b64(size=(64, 64)), {"refiner": 5}),  # image rows: img2img
    ],
)
def test_each_mode_runs_the_expected_steps(model, params, image, expected):
    row = {"prompt": "a cat", "seed": 1} | ({"image": image} if image else {})
    steps, _ = count_steps(model, frame(row), FAST | params)
    assert dict(steps) == expected


def test_rows_sharing_a_configuration_run_as_one_call_equal_to_single_calls(model):
    rows = frame(
        {"prompt": "a cat", "seed": 1},
        {"prompt": "a dog", "seed": 2},
        {"prompt": "a hat", "seed": 3, "height": 96},  # other size: its own call
        {"prompt": "a bench", "seed": 4},
    )
    steps, batches = count_steps(model, rows, FAST | {"refiner": "none"})
    assert batches == 2 and steps["base"] == 2 * 10  # 3 rows in one call + 1 row, not 4 calls

    batched = model.predict(rows, params=FAST | {"refiner": "none"})
    for i in range(len(rows)):
        single = model.predict(rows.iloc[[i]], params=FAST | {"refiner": "none"})
        assert np.abs(pixels(single["generated_image"][0]) - pixels(batched["generated_image"][i])).max() <= 1
    assert [b64_to_image(b).size for b in batched["generated_image"]] == [(64, 64), (64, 64), (64, 96), (64, 64)]


def test_negative_prompt_presence_splits_batches():
    """A missing negative prompt means zero embeddings in SDXL; mixing it with given ones would change images."""
    specs = parse_request(
        frame({"prompt": "a"}, {"prompt": "b", "negative_prompt": "blurry"}, {"prompt": "c"}), FAST, ModelConfig()
    ).rows
    assert [[r.index for r in batch] for batch in plan_batches(specs, 8)] == [[0, 2], [1]]


def test_shared_components_are_stored_once_and_loaded_once(artifact, tiny, model):
    sdxl = artifact / "artifacts" / "sdxl"
    manifest = json.loads((sdxl / "components.json").read_text())
    assert sorted(manifest["shared"]) == ["text_encoder_2", "tokenizer_2", "vae"]
    # weights once; the refiner keeps its tokenizer files so its folder loads by hand (test_build_disk.py)
    refiner_folder = sorted(p.name for p in (sdxl / "refiner").iterdir())
    assert refiner_folder == ["model_index.json", "scheduler", "tokenizer_2", "unet"]
    stored = sum(p.stat().st_size for p in sdxl.rglob("*.safetensors"))
    unique = sum(p.stat().st_size for p in tiny.base.rglob("*.safetensors")) + sum(
        p.stat().st_size for p in (tiny.refiner / "unet").rglob("*.safetensors")
    )
    assert stored == unique

    pipes = model.unwrap_python_model().pipelines
    assert pipes.refiner.vae is pipes.base.vae
    assert pipes.refiner.text_encoder_2 is pipes.base.text_encoder_2
    assert pipes.refiner.tokenizer_2 is pipes.base.tokenizer_2
    assert pipes.refiner.text_encoder is None


def test_seed_001_body_converts_scores_and_answers_in_azure_shape(model):
    body = json.loads((SAMPLES / "azure_request.json").read_text())
    df, _ = azure_request_to_frame(body)
    assert list(df.columns) == ["prompt", "image"] and len(df) == 2

    out = model.predict(df, params=FAST)
    response = to_azure_response(out)

    assert [list(r) for r in response] == [["prompt", "generated_image", "nsfw_content_detected"]] * 2
    assert [r["prompt"] for r in response] == df["prompt"].tolist()
    assert all(r["nsfw_content_detected"] is None for r in response)
    assert [b64_to_image(r["generated_image"]).size for r in response] == [(128, 128), (128, 128)]  # the inputs' size


def test_seed_001_body_with_object_rows():
    image1, image2 = png_b64((250, 200, 0)), png_b64((0, 200, 0))
    df, params = azure_request_to_frame(SEED_001_BODY.replace("IMAGE1", image1).replace("IMAGE2", image2))
    assert df.to_dict("records") == [
        {"prompt": "Face of a yellow cat, high resolution, sitting on a park bench", "image": image1},
        {"prompt": "Face of a green cat, high resolution, sitting on a park bench", "image": image2},
    ]
    assert params == {}
    with pytest.raises(ValueError):  # JSON, not JSON with trailing commas: the samples are written as JSON
        azure_request_to_frame(SEED_001_BODY.replace('"IMAGE2"\n', '"IMAGE2",\n'))


def test_on_error_null_keeps_every_row_and_names_the_bad_ones(model):
    rows = frame(
        {"prompt": "a cat", "seed": 1},
        {"prompt": "a dog", "seed": "lots"},
        {"prompt": "a hat", "seed": 3},
        {"prompt": "", "seed": 4},
        {"prompt": "a bench", "image": "http://127.0.0.1/cat.png"},
    )
    out = model.predict(rows, params=FAST | {"on_error": "null"})

    assert list(out.columns) == [*OUTPUT_COLUMNS, "error"]
    assert out["prompt"].tolist() == ["a cat", "a dog", "a hat", "", "a bench"]
    assert out["generated_image"].notna().tolist() == [True, False, True, False, False]
    assert out["error"][[0, 2]].tolist() == [None, None]
    assert out["error"][1].startswith("'seed': Input should be a valid integer")
    assert out["error"][3] == "'prompt' is empty"
    assert out["error"][4].startswith("'image': URLs are not fetched")
    assert out["seed"].tolist()[:3] == [1, pd.NA, 3]
    good = model.predict(rows.iloc[[0, 2]], params=FAST)  # the good rows are what they would be alone
    assert out["generated_image"][[0, 2]].tolist() == good["generated_image"].tolist()


def test_on_error_raise_is_the_default_and_names_the_first_bad_row_cheap_checks_first(model):
    """The prompt checks run over every row before any row is fully parsed: a bad prompt is named first
    (a bad last row fails at once); then the first row that fails the rest of its checks."""
    rows = frame({"prompt": "a cat"}, {"prompt": "a dog", "num_inference_steps": 0}, {"prompt": ""})
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"^Row 2: 'prompt' is empty"):
        model.predict(rows, params=FAST)
    rows = frame({"prompt": "a cat"}, {"prompt": "a dog", "num_inference_steps": 0}, {"prompt": "a hat", "width": 9})
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"^Row 1: 'num_inference_steps': Input should be"):
        model.predict(rows, params=FAST)


def test_a_failing_row_keeps_the_seed_it_was_given(model):
    """on_error=null: a row's own seed, or request seed + row, is returned even when the row fails;
    only a row given no usable seed gets null (a random one is drawn only for rows that run)."""
    rows = frame(
        {"prompt": "", "seed": 4},  # own seed
        {"prompt": "a dog", "seed": "lots"},  # no usable seed
        {"prompt": "a hat", "width": 100},  # request seed + row
    )
    out = model.predict(rows, params=FAST | {"on_error": "null", "seed": 40})
    assert out["generated_image"].isna().all()
    assert seeds(out) == [4, None, 42]
    assert seeds(model.predict(frame({"prompt": ""}), params=FAST | {"on_error": "null"})) == [None]


def seeds(out: pd.DataFrame) -> list[int | None]:
    return [None if pd.isna(s) else int(s) for s in out["seed"]]


@pytest.mark.parametrize("mode", ["ensemble", "sequential"])
def test_the_refiner_runs_with_its_own_guidance_scale_refiner(model, raw, mode):
    """``guidance_scale_refiner`` reaches the refiner's call (and only it), as in raw diffusers."""
    base, refiner = raw
    prompt, seed = "a yellow cat on a bench", 5
    params = FAST | {"refiner": mode, "guidance_scale": 5.0, "guidance_scale_refiner": 1.5}
    ours = pixels(model.predict(frame({"prompt": prompt, "seed": seed}), params=params)["generated_image"][0])

    g = torch.Generator().manual_seed(seed)
    args = dict(prompt=prompt, height=64, width=64, num_inference_steps=10, generator=g, guidance_scale=5.0)
    if mode == "ensemble":
        latents = base(**args, denoising_end=0.8, output_type="latent").images
        cut = dict(denoising_start=0.8, num_inference_steps=10)
    else:
        latents = base(**args, output_type="latent").images
        cut = dict(strength=0.3, num_inference_steps=10)
    theirs = refiner(prompt=prompt, image=latents, generator=g, guidance_scale=1.5, **cut).images[0]
    np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.int16))
    inherited = model.predict(frame({"prompt": prompt, "seed": seed}), params=params | {"guidance_scale_refiner": -1})
    assert not np.array_equal(ours, pixels(inherited["generated_image"][0]))


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Settings)])
def test_rows_differing_in_any_one_setting_are_never_batched_together(field):
    """Every field of ``Settings`` is part of the batching key: one call runs one value of each."""
    row = parse_request(frame({"prompt": "a"}), FAST, ModelConfig()).rows[0]
    value = getattr(row.settings, field)
    special = {"mode": Mode.SEQUENTIAL, "lora": (("toy", 0.5),), "controlnet": (("edges", 0.5),)}
    special["control_guidance"] = (0.1, 0.9)
    other = {bool: lambda v: not v, int: lambda v: v + 8, float: lambda v: v / 2 + 0.3, str: lambda v: v + "x"}
    changed = special[field] if field in special else other[type(value)](value)
    twin = dataclasses.replace(row, index=1, settings=dataclasses.replace(row.settings, **{field: changed}))
    assert [[r.index for r in batch] for batch in plan_batches([row, twin], 8)] == [[0], [1]]


def test_rows_differing_in_guidance_scale_run_as_two_calls_each_equal_to_its_own(model):
    rows = frame({"prompt": "a cat", "seed": 1}, {"prompt": "a cat", "seed": 1, "guidance_scale": 9.0})
    _, batches = count_steps(model, rows, FAST | {"refiner": "none"})
    assert batches == 2
    out = model.predict(rows, params=FAST | {"refiner": "none"})
    alone = model.predict(rows.iloc[[1]], params=FAST | {"refiner": "none"})
    assert out["generated_image"][1] == alone["generated_image"][0] != out["generated_image"][0]


def test_a_generation_failure_in_a_batch_with_on_error_null_costs_only_its_own_row(model, monkeypatch):
    """The batch is retried row by row: the failing row gets its error, the others their images. The failure
    is a real one from torch (a seed past the generator's range: ValueError) raised inside the real pipeline call."""
    model_module = sys.modules[type(model.unwrap_python_model()).__module__]  # models-from-code loads its file
    real = model_module.generate_batch

    def one_row_overflows(pipes, rows, on_step=None):
        poisoned = [dataclasses.replace(r, seed=2**64) if r.prompt == "poison" else r for r in rows]
        return real(pipes, poisoned, on_step)

    monkeypatch.setattr(model_module, "generate_batch", one_row_overflows)
    rows = frame({"prompt": "a cat", "seed": 1}, {"prompt": "poison", "seed": 2}, {"prompt": "a dog", "seed": 3})
    out = model.predict(rows, params=FAST | {"on_error": "null"})
    assert out["generated_image"].notna().tolist() == [True, False, True]
    assert out["error"][1].startswith("generation failed: ValueError: Overflow") and out["seed"][1] == 2
    for i in (0, 2):  # retried alone: each is exactly its single-row image
        assert out["generated_image"][i] == model.predict(rows.iloc[[i]], params=FAST)["generated_image"][0]
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"^Rows 0, 1, 2: generation failed"):
        model.predict(rows, params=FAST)
