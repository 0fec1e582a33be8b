"""A build writes each weight file once, records where the weights came from, and leaves an artifact
whose refiner folder loads by hand the way the diffusers docs load SDXL's refiner."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from mlflow.models import Model

from sdxl_tools import cli
from sdxl_tools.artifact import save_artifact
from sdxl_tools.random_weights import write_tiny_controlnet
from sdxl_tools.staging import stage_components
from testkit.helpers import FAST, frame


def weights(folder) -> dict[str, tuple[int, int]]:
    """relative path → (inode, link count) of every weight file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_nlink) for p in sorted(folder.rglob("*.safetensors"))
    }


def inodes(*folders) -> set[int]:
    return {ino for folder in folders for ino, _ in weights(folder).values()}


def test_saving_copies_weights_linked_to_a_users_folder_and_leaves_the_folder_alone(tiny, tmp_path):
    users = inodes(tiny.base, tiny.refiner)
    staged = stage_components(tiny.base, tiny.refiner, tmp_path / "sdxl")
    assert inodes(staged.folder) <= users  # staging: hard links, no bytes written
    out = save_artifact(staged, tmp_path / "model", move_weights=True)

    saved = weights(out / "artifacts" / "sdxl")
    assert len(saved) == 5 and all(links == 1 for _, links in saved.values())  # copies: never the user's files
    assert inodes(staged.folder) <= users and inodes(tiny.base, tiny.refiner) == users


def test_saving_moves_weights_that_have_no_other_name(tiny, tmp_path):
    """Generated weights (their source folder removed after staging) are renamed into the model: no second copy."""
    source = tmp_path / "generated"
    shutil.copytree(tiny.base.parent, source)
    staged = stage_components(source / "base", source / "refiner", tmp_path / "sdxl")
    shutil.rmtree(source)
    inodes = {path: ino for path, (ino, links) in weights(staged.folder).items() if links == 1}
    assert len(inodes) == len(weights(staged.folder))

    out = save_artifact(staged, tmp_path / "model", move_weights=True)
    assert {path: ino for path, (ino, _) in weights(out / "artifacts" / "sdxl").items()} == inodes
    assert not list(staged.folder.rglob("*.safetensors"))  # spent

    size = Model.load(str(out)).model_size_bytes  # MLflow counted the skeleton; the weights are added
    weight_bytes = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    assert weight_bytes < size < sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    picture = mlflow.pyfunc.load_model(str(out)).predict(frame({"prompt": "a cat", "seed": 1}), params=FAST)
    assert picture["generated_image"][0]


def test_cli_build_records_random_sources_and_leaves_no_temporary_folders(tmp_path):
    args = ["build", "--tiny", "--tiny-safety-checker", "never", "--output", str(tmp_path / "m"), "--seed", "3"]
    assert cli.main([*args, "--tiny-controlnet", "edges", "--tiny-controlnet", "depth"]) == 0
    manifest = json.loads((tmp_path / "m" / "artifacts" / "sdxl" / "components.json").read_text())
    assert manifest["sources"] == {
        "base": "random tiny weights (seed 3)",
        "refiner": "random tiny weights (seed 3)",
        "safety_checker": "random tiny checker that flags never",
        "controlnets/edges": "random tiny ControlNet of the base UNet (seed 1)",  # keyed as its file records
        "controlnets/depth": "random tiny ControlNet of the base UNet (seed 2)",
    }
    assert set(manifest["controlnets"]) == {"edges", "depth"}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # staging and skeleton folders are gone
    assert all(links == 1 for _, links in weights(tmp_path / "m").values())
    card = Model.load(str(tmp_path / "m")).metadata["components"]
    assert card["sources"] == manifest["sources"]


def test_user_sources_are_recorded_with_their_component_hashes(tiny, tmp_path):
    edges = write_tiny_controlnet(tmp_path / "edges-source", tiny.base)
    staged = stage_components(tiny.base, tiny.refiner, tmp_path / "sdxl", controlnets={"edges": edges})
    assert staged.manifest["sources"] == {
        "base": str(tiny.base.resolve()),
        "refiner": str(tiny.refiner.resolve()),
        "controlnets/edges": str(edges.resolve()),
    }
    assert set(staged.manifest["hashes"]) >= {"base/unet", "base/vae", "base/text_encoder_2", "refiner/unet"}
    assert set(staged.manifest["hashes"]) >= set(staged.manifest["sources"]) - {"base", "refiner"}


def test_the_refiner_folder_loads_by_hand_with_text_encoder_2_and_vae(artifact):
    """The diffusers docs' way: ``from_pretrained(refiner, text_encoder_2=base.text_encoder_2, vae=base.vae)``.

    The artifact stores the refiner's tokenizer_2 files (a few MB) although the runtime shares the
    base's: without them transformers 5 builds an empty tokenizer and the first call fails.
    """
    sdxl = artifact / "artifacts" / "sdxl"
    base = StableDiffusionXLPipeline.from_pretrained(sdxl / "base")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        sdxl / "refiner", text_encoder_2=base.text_encoder_2, vae=base.vae
    )
    assert refiner.tokenizer_2.get_vocab() == base.tokenizer_2.get_vocab()
    latents = base("a cat", height=64, width=64, num_inference_steps=4, output_type="latent").images
    image = refiner("a cat", image=latents, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert np.asarray(image.images[0]).std() > 0


def test_the_runtime_hands_the_refiner_the_bases_tokenizer_2(model):
    pipes = model.unwrap_python_model().pipelines
    assert pipes.refiner.tokenizer_2 is pipes.base.tokenizer_2
    assert pipes.refiner.text_encoder_2 is pipes.base.text_encoder_2 and pipes.refiner.vae is pipes.base.vae
