"""ControlNet: packaged SDXL ControlNets condition the base stage of text, image-to-image and inpainting rows."""

from __future__ import annotations

import base64
import hashlib
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from mlflow.exceptions import MlflowException
from PIL import Image

from model_pkg import controlnet
from model_pkg.plan import plan_batches
from model_pkg.request import parse_request
from sdxl_tools.batch import run
from sdxl_tools.client import azure_request_to_frame, b64_to_image, read_metadata
from sdxl_tools.staging import BuildError, stage_controlnets
from testkit.helpers import FAST, frame, pixels, png_b64
from tests.test_inpaint import b64, mask_b64

NONE = FAST | {"refiner": "none"}


def control_b64(color=(250, 250, 250), size=(64, 64)) -> str:
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste(color, (8, 16, 40, 56))
    return b64(image)


def row(**extra) -> dict:
    return {"prompt": "a yellow cat on a bench", "seed": 7, "control_image": control_b64()} | extra


def ours(model, rows: list[dict], params: dict) -> list[np.ndarray]:
    out = model.predict(frame(*rows), params=params)
    return [pixels(b) for b in out["generated_image"]]


def raw(tiny, controlnets, cls, names=("edges",)):
    loaded = [ControlNetModel.from_pretrained(controlnets[n]) for n in names]
    pipe = cls.from_pretrained(tiny.base, controlnet=loaded[0] if len(loaded) == 1 else loaded)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image() -> Image.Image:
    return b64_to_image(control_b64()).convert("RGB")


def raw_args() -> dict:
    """What ``FAST`` and :func:`row` ask for, as raw diffusers arguments (guidance 5.0 is the artifact's
    default); a fresh generator per call, shared by both stages of an ensemble call."""
    generator = torch.Generator().manual_seed(row()["seed"])
    return dict(
        prompt=row()["prompt"], height=FAST["height"], width=FAST["width"],
        num_inference_steps=FAST["num_inference_steps"], guidance_scale=5.0, generator=generator,
    )  # fmt: skip


# -- equal to raw diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("refiner", ["none", "ensemble"])
def test_text_rows_equal_raw_diffusers_controlnet(cn_model, tiny, controlnets, refiner):
    image = ours(cn_model, [row()], FAST | {"refiner": refiner, "controlnet": "edges:0.8"})[0]
    base = raw(tiny, controlnets, StableDiffusionXLControlNetPipeline)
    args = raw_args()
    control = dict(image=control_image(), controlnet_conditioning_scale=0.8)
    if refiner == "none":
        theirs = base(**args, **control).images[0]
    else:
        refiner_pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            tiny.refiner, text_encoder_2=base.text_encoder_2, vae=base.vae
        )
        refiner_pipe.set_progress_bar_config(disable=True)
        latents = base(**args, **control, denoising_end=0.8, output_type="latent").images
        theirs = refiner_pipe(**args, image=latents, denoising_start=0.8).images[0]
    np.testing.assert_array_equal(image, np.asarray(theirs, dtype=np.int16))


def test_image_rows_equal_raw_diffusers_controlnet_img2img(cn_model, tiny, controlnets):
    start = b64_to_image(png_b64(size=(64, 64))).convert("RGB")
    image = ours(cn_model, [row(image=b64(start))], NONE | {"controlnet": "edges"})[0]
    pipe = raw(tiny, controlnets, StableDiffusionXLControlNetImg2ImgPipeline)
    theirs = pipe(
        **raw_args(),
        image=start,
        control_image=control_image(),
        controlnet_conditioning_scale=1.0,  # this pipeline's default is 0.8; the artifact's 1.0
        strength=0.3,
    ).images[0]
    np.testing.assert_array_equal(image, np.asarray(theirs, dtype=np.int16))


def test_inpainting_rows_equal_raw_diffusers_controlnet_inpaint(cn_model, tiny, controlnets):
    start = b64_to_image(png_b64(size=(64, 64))).convert("RGB")
    mask = mask_b64((64, 64))
    image = ours(cn_model, [row(image=b64(start), mask=mask)], NONE | {"controlnet": "edges", "mask_blur": 0})[0]
    pipe = raw(tiny, controlnets, StableDiffusionXLControlNetInpaintPipeline)
    theirs = pipe(
        **raw_args(),
        image=start,
        mask_image=b64_to_image(mask).convert("L"),
        control_image=control_image(),
        controlnet_conditioning_scale=1.0,
        strength=1.0,
    ).images[0]
    inside = np.asarray(b64_to_image(mask).convert("L")) > 0
    np.testing.assert_array_equal(image[inside], np.asarray(theirs, dtype=np.int16)[inside])
    np.testing.assert_array_equal(image[~inside], pixels(b64(start))[~inside])  # pasted back over the input


def test_two_controlnets_equal_raw_diffusers_multi_controlnet(cn_model, tiny, controlnets):
    image = ours(cn_model, [row()], NONE | {"controlnet": "edges:0.5,depth:1.5"})[0]
    pipe = raw(tiny, controlnets, StableDiffusionXLControlNetPipeline, names=("depth", "edges"))  # sorted by name
    theirs = pipe(**raw_args(), image=[control_image()] * 2, controlnet_conditioning_scale=[1.5, 0.5]).images[0]
    np.testing.assert_array_equal(image, np.asarray(theirs, dtype=np.int16))
    one = ours(cn_model, [row()], NONE | {"controlnet": "edges:0.5"})[0]
    assert (image != one).any()


# -- what the conditioning does -----------------------------------------------------------------


def test_the_control_image_changes_the_image_and_scale_0_is_no_controlnet(cn_model):
    plain = ours(cn_model, [{"prompt": row()["prompt"], "seed": 7}], NONE)[0]
    controlled = ours(cn_model, [row()], NONE | {"controlnet": "edges"})[0]
    other = ours(cn_model, [row(control_image=control_b64(size=(96, 80)))], NONE | {"controlnet": "edges"})[0]
    zero = ours(cn_model, [row()], NONE | {"controlnet": "edges:0"})[0]
    assert (controlled != plain).any()
    assert (controlled != other).any()  # another control map (resized to 64×64), another image
    np.testing.assert_array_equal(zero, plain)


def test_rows_with_different_control_images_batch_together_as_they_run_alone(cn_model):
    rows = [row(), row(control_image=control_b64((120, 250, 30)), seed=8)]
    params = NONE | {"controlnet": "edges"}
    python_model = cn_model.unwrap_python_model()
    specs = parse_request(frame(*rows), params, python_model.config, python_model.pipelines.catalog).rows
    assert len(plan_batches(specs, 8)) == 1
    together = ours(cn_model, rows, params)
    for r, image in zip(rows, together, strict=True):
        # the ControlNet's convolutions round differently at batch size 2: a few pixels one level apart
        alone = ours(cn_model, [r], params)[0]
        np.testing.assert_allclose(alone, image, atol=1, rtol=0)
        assert (alone == image).mean() > 0.99


def test_canny_map_is_opencvs_canny_of_the_resized_image(cn_model):
    python_model = cn_model.unwrap_python_model()
    given = b64_to_image(control_b64(size=(96, 80))).convert("RGB")
    params = NONE | {"controlnet": "edges", "control_preprocess": "canny", "canny_low_threshold": 50}
    catalog = python_model.pipelines.catalog
    spec = parse_request(frame(row(control_image=b64(given))), params, python_model.config, catalog).rows[0]
    resized = given.resize((64, 64), Image.Resampling.LANCZOS)
    edges = cv2.Canny(np.asarray(resized.convert("L")), 50, 200)
    np.testing.assert_array_equal(np.asarray(spec.control_image), np.stack([edges] * 3, axis=-1))
    assert edges.any()


def test_controlnet_pipelines_share_the_loaded_modules(cn_model):
    pipes = cn_model.unwrap_python_model().pipelines
    for kind in ("text", "img2img", "inpaint"):
        pipe = controlnet.pipeline(pipes, (("edges", 1.0),), kind)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert id(getattr(pipe, name)) == id(getattr(pipes.base, name)), (kind, name)
        assert pipe.controlnet is pipes.controlnets["edges"]


def test_a_controlnet_adds_only_its_own_parameters(model, cn_model):
    def distinct_bytes(pipes) -> int:
        modules = [pipes.base, pipes.refiner]
        tensors = {}
        for pipe in modules:
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    tensors |= {p.data_ptr(): p.numel() * p.element_size() for p in module.parameters()}
        for net in pipes.controlnets.values():
            tensors |= {p.data_ptr(): p.numel() * p.element_size() for p in net.parameters()}
        return sum(tensors.values())

    plain, with_nets = model.unwrap_python_model().pipelines, cn_model.unwrap_python_model().pipelines
    nets_bytes = sum(p.numel() * p.element_size() for n in with_nets.controlnets.values() for p in n.parameters())
    assert distinct_bytes(with_nets) - distinct_bytes(plain) == nets_bytes


# -- the record ---------------------------------------------------------------------------------


def test_png_metadata_records_the_controlnets_window_preprocessor_and_control_image_hash(cn_model, cn_artifact):
    params = NONE | {
        "controlnet": "edges,depth:0.5",
        "controlnet_conditioning_scale": 0.7,
        "control_guidance_start": 0.1,
        "control_guidance_end": 0.9,
        "control_preprocess": "canny",
    }
    out = cn_model.predict(frame(row()), params=params)
    meta = read_metadata(out["generated_image"][0])
    recorded = meta["request"]["params"]
    assert recorded["controlnet"] == "depth:0.5,edges:0.7"
    assert "controlnet_conditioning_scale" not in recorded  # folded into the scales
    assert (recorded["control_guidance_start"], recorded["control_guidance_end"]) == (0.1, 0.9)
    assert recorded["control_preprocess"] == "canny"
    assert meta["request"]["dataframe_records"][0]["control_image"] is None  # not its bytes
    decoded = b64_to_image(control_b64()).convert("RGB")
    assert meta["model"]["control_image_sha256"] == hashlib.sha256(decoded.tobytes()).hexdigest()
    manifest = json.loads((cn_artifact / "artifacts").glob("**/components.json").__next__().read_text())
    assert meta["model"]["controlnets"] == {n: e["sha256"] for n, e in manifest["controlnets"].items()}
    again = cn_model.predict(
        pd.DataFrame([{**row(), **meta["request"]["dataframe_records"][0], "control_image": control_b64()}]),
        params=meta["request"]["params"],
    )
    assert again["generated_image"][0] == out["generated_image"][0]  # it reproduces the image


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "params", "message"),
    [
        ([row()], {"controlnet": "pose"}, "'controlnet': unknown ControlNet 'pose'; packaged: depth, edges"),
        ([row(controlnet="pose")], {}, "Row 0: 'controlnet': unknown ControlNet 'pose'; packaged: depth, edges"),
        ([{"prompt": "x"}], {"controlnet": "edges"}, "Row 0: 'controlnet' needs a 'control_image' in the row"),
        ([row()], {}, "Row 0: 'control_image' needs a ControlNet: name one in 'controlnet'"),
        ([row(control_image="bm90IGFuIGltYWdl")], {"controlnet": "edges"}, "Row 0: 'control_image': not an image"),
        ([row()], {"controlnet": "edges:2.5"}, "'controlnet': weight of 'edges' must be between 0 and 2, got 2.5"),
        ([row()], {"controlnet": "edges", "controlnet_conditioning_scale": -1}, "'controlnet_conditioning_scale'"),
        (
            [row()],
            {"controlnet": "edges", "control_guidance_start": 0.6, "control_guidance_end": 0.5},
            "'control_guidance_start' 0.6 must be below 'control_guidance_end' 0.5",
        ),
    ],
)
def test_bad_controlnet_input_names_the_row_and_field(cn_model, rows, params, message):
    with pytest.raises(MlflowException) as caught:
        cn_model.predict(frame(*rows), params=NONE | params)
    assert message in caught.value.message
    assert caught.value.get_http_status_code() == 400


def test_an_artifact_without_controlnets_lists_none(model):
    with pytest.raises(MlflowException, match="packaged: none \\(this artifact has no ControlNets\\)"):
        model.predict(frame(row()), params=NONE | {"controlnet": "edges"})


def test_pickled_controlnet_weights_are_refused(tmp_path, controlnets):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((controlnets["edges"] / "config.json").read_text())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BuildError, match="only pickled weights"):
        stage_controlnets({"pickled": folder}, tmp_path / "out", "all")


# -- everywhere rows go -------------------------------------------------------------------------


def test_control_image_is_an_input_column_of_every_route():
    from sdxl_tools.signature import signature
    from sdxl_tools.spark import INPUT_COLUMNS

    assert "control_image" in INPUT_COLUMNS  # Spark's struct (derived from the contract)
    assert "control_image" in signature().inputs.input_names()  # REST, MLServer, Azure's no-code route


def test_azure_body_with_a_control_image_converts_and_is_conditioned(cn_model):
    r = row()
    body = {
        "input_data": {"columns": ["prompt", "control_image"], "data": [[r["prompt"], r["control_image"]]]},
        "params": NONE | {"seed": 7, "controlnet": "edges"},
    }
    df, params = azure_request_to_frame(json.dumps(body))
    out = cn_model.predict(df, params=params)
    assert (
        out["generated_image"][0]
        == cn_model.predict(frame(r), params=NONE | {"controlnet": "edges"})["generated_image"][0]
    )


def test_file_batch_job_carries_control_images_and_continues_past_a_bad_one(cn_model, tmp_path):
    rows = [row(controlnet="edges"), {"prompt": "a dog", "seed": 4, "controlnet": "edges"}]
    source = tmp_path / "prompts.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    summary = run(cn_model, source, tmp_path / "out", NONE, chunk_size=2, progress=False)
    assert (summary.images, summary.errors) == (1, 1)
    lines = sorted(
        (json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()),
        key=lambda x: x["row"],
    )
    assert lines[1]["error"].startswith("'controlnet' needs a 'control_image'")
    written = (tmp_path / "out" / "images" / "000000.png").read_bytes()
    expected = cn_model.predict(frame(row()), params=NONE | {"controlnet": "edges"})["generated_image"][0]
    assert written == base64.b64decode(expected)
