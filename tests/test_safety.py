"""The optional safety checker : real nsfw_content_detected per row, black images, model card.

Checkers are tiny real ``StableDiffusionSafetyChecker`` models whose verdict is forced through their
own weights (extreme concept thresholds), packaged with the session's tiny SDXL.
"""

from __future__ import annotations

import re

import mlflow
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPImageProcessor

from sdxl_tools import cli
from sdxl_tools.artifact import save_artifact
from sdxl_tools.client import b64_to_image
from sdxl_tools.random_weights import tiny_safety_checker, write_tiny_safety_checker
from sdxl_tools.staging import BuildError, stage_components
from testkit.helpers import frame, pixels, png_b64

ROWS = frame(
    {"prompt": "a cat with a hat", "seed": 1},
    {"prompt": "a dog on a bench", "seed": 2},
    {"prompt": "a red hat", "seed": 3, "height": 96},  # another size: another pipeline call
    {"prompt": "a green cat", "image": png_b64(size=(96, 64)), "seed": 4},  # img2img
)
FAST = {"num_inference_steps": 4, "height": 64, "width": 64, "refiner": "none"}  # safety does not need the refiner
SIZES = [(64, 64), (64, 64), (64, 96), (96, 64)]
PROCESSOR = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})  # as tiny.py


def build_loaded(tiny, tmp_path_factory, flag: str) -> mlflow.pyfunc.PyFuncModel:
    work = tmp_path_factory.mktemp(f"checker-{flag}")
    checker = write_tiny_safety_checker(work / "checker", flag)
    staged = stage_components(tiny.base, tiny.refiner, work / "sdxl", safety_checker=checker)
    return mlflow.pyfunc.load_model(str(save_artifact(staged, work / "model")))


# Byte comparisons across artifacts: leave out the PNG metadata, which names each artifact's hash.
PARAMS = FAST | {"png_metadata": False}


@pytest.fixture(scope="module")
def flagging(tiny, tmp_path_factory):
    return build_loaded(tiny, tmp_path_factory, "always")


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory):
    return build_loaded(tiny, tmp_path_factory, "never")


@pytest.fixture(scope="module")
def unchecked(model):
    """The session artifact without a checker: its images for ROWS, the reference."""
    return model.predict(ROWS, params=PARAMS)


def test_without_a_checker_every_row_is_null_and_the_card_says_so(model, unchecked):
    assert unchecked["nsfw_content_detected"].tolist() == [None] * 4
    assert model.metadata.metadata["safety_checker"].startswith("none: nsfw_content_detected is null")
    assert model.unwrap_python_model().pipelines.safety_checker is None


def test_flagged_images_become_black_images_of_the_same_size(flagging, caplog):
    out = flagging.predict(ROWS, params=PARAMS)  # batched: rows 0-1 share one pipeline call
    assert out["nsfw_content_detected"].tolist() == [True] * 4
    assert [b64_to_image(b).size for b in out["generated_image"]] == SIZES
    for b64 in out["generated_image"]:
        assert pixels(b64).max() == 0  # black
    assert out["seed"].tolist() == [1, 2, 3, 4]
    assert "flagged 2 of 2 images: replaced by black images" in caplog.text
    assert "A black image will be returned instead" not in caplog.text  # diffusers' notice is filtered
    assert flagging.metadata.metadata["safety_checker"].startswith("packaged: nsfw_content_detected is true/false")


def test_with_safety_filter_false_flagged_images_are_returned_unchanged_and_still_flagged(flagging, unchecked, caplog):
    out = flagging.predict(ROWS, params=PARAMS | {"safety_filter": False})
    assert out["nsfw_content_detected"].tolist() == [True] * 4
    assert out["generated_image"].tolist() == unchecked["generated_image"].tolist()
    assert all(pixels(b).max() > 0 for b in out["generated_image"])
    assert "returned unchanged (safety_filter=false)" in caplog.text


def test_a_clean_verdict_leaves_images_unchanged(clean, unchecked):
    out = clean.predict(ROWS, params=PARAMS)
    assert out["nsfw_content_detected"].tolist() == [False] * 4
    assert out["generated_image"].tolist() == unchecked["generated_image"].tolist()


def concept_scores(checker, images) -> torch.Tensor:
    """Each image's highest cosine score against the checker's concepts (what its threshold is compared to)."""
    clip = PROCESSOR(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip)[1])
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        concepts = checker.concept_embeds / checker.concept_embeds.norm(dim=-1, keepdim=True)
        return (embeds @ concepts.T).max(dim=1).values


def test_the_verdict_is_per_row_in_a_batched_call(model, unchecked, tiny, tmp_path):
    """A checker whose threshold lies between the scores of rows 0 and 1 (one pipeline call) flags one of them."""
    torch.manual_seed(0)
    checker = tiny_safety_checker("never")
    images = [b64_to_image(b).convert("RGB") for b in unchecked["generated_image"]]
    scores = concept_scores(checker, images)
    assert scores[0] != scores[1]
    threshold = float(scores[:2].mean())
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
    checker.save_pretrained(tmp_path / "checker", safe_serialization=True)
    PROCESSOR.save_pretrained(tmp_path / "checker")
    staged = stage_components(tiny.base, tiny.refiner, tmp_path / "sdxl", safety_checker=tmp_path / "checker")
    mixed = mlflow.pyfunc.load_model(str(save_artifact(staged, tmp_path / "model")))

    out = mixed.predict(ROWS, params=PARAMS)

    expected = (scores > threshold).tolist()
    assert expected[0] != expected[1]
    assert out["nsfw_content_detected"].tolist() == expected
    for flagged, ours, reference in zip(expected, out["generated_image"], unchecked["generated_image"], strict=True):
        if flagged:
            assert pixels(ours).max() == 0 and b64_to_image(ours).size == b64_to_image(reference).size
        else:
            assert ours == reference


def test_a_checker_folder_with_only_pickled_weights_is_refused(tiny, tmp_path):
    folder = write_tiny_safety_checker(tmp_path / "checker", "never")
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(BuildError, match=r"checker has only pickled weights \(pytorch_model.bin\)"):
        stage_components(tiny.base, tiny.refiner, tmp_path / "out", safety_checker=folder)


def test_staging_packages_the_checker_with_its_processor_and_hash(tiny, tmp_path):
    folder = write_tiny_safety_checker(tmp_path / "checker", "never")
    staged = stage_components(tiny.base, tiny.refiner, tmp_path / "out", safety_checker=folder)
    assert staged.manifest["safety_checker"] == "safety_checker"
    assert "safety_checker" in staged.manifest["hashes"]
    names = sorted(p.name for p in (staged.folder / "safety_checker").iterdir())
    assert names == ["config.json", "model.safetensors", "preprocessor_config.json"]


def test_cli_packages_a_checker_and_refuses_a_pickled_one(tmp_path, capsys):
    assert cli.main(["build", "--tiny", "--tiny-safety-checker", "always", "--output", str(tmp_path / "m")]) == 0
    card = mlflow.models.Model.load(str(tmp_path / "m")).metadata
    assert card["safety_checker"].startswith("packaged:")
    assert (tmp_path / "m" / "artifacts" / "sdxl" / "safety_checker" / "model.safetensors").is_file()

    folder = write_tiny_safety_checker(tmp_path / "pickled", "never")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert cli.main(["build", "--tiny", "--safety-checker", str(folder), "--output", str(tmp_path / "m2")]) == 1
    assert re.search(r"build failed: .*pickled has only pickled weights", capsys.readouterr().err)
    assert not (tmp_path / "m2").exists()
