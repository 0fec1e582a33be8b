"""Masked inpainting: a ``mask`` column repaints what it covers and keeps the rest of the image exactly."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema
from PIL import Image

from model_pkg import masks
from model_pkg.generation import generate_batch
from model_pkg.plan import plan_batches
from model_pkg.request import parse_request
from sdxl_tools.batch import run
from sdxl_tools.client import azure_request_to_frame, b64_to_image, read_metadata, to_mlflow_request
from sdxl_tools.gate import breaking_changes
from sdxl_tools.signature import signature
from testkit.helpers import FAST, frame, pixels, png_b64, raw_pipelines

BOX = (24, 16, 56, 48)  # the repainted rectangle: left, top, right, bottom (8-aligned)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mask_b64(size: tuple[int, int], box: tuple[int, int, int, int] = BOX, value: int = 255) -> str:
    mask = Image.new("L", size, 0)
    mask.paste(value, box)
    return b64(mask)


def input_pixels(image: str) -> np.ndarray:
    return np.asarray(b64_to_image(image).convert("RGB"), dtype=np.int16)


def inpaint_row(size=(64, 64), seed: int = 5) -> dict:
    return {"prompt": "a yellow cat on a bench", "image": png_b64(size=size), "mask": mask_b64(size), "seed": seed}


def far_from(box: tuple[int, int, int, int], size: tuple[int, int], margin: int) -> np.ndarray:
    """True for the pixels farther than ``margin`` from ``box`` (height × width)."""
    far = np.ones(size[::-1], dtype=bool)
    left, top, right, bottom = box
    far[max(top - margin, 0) : bottom + margin, max(left - margin, 0) : right + margin] = False
    return far


# -- the rest of the image is kept exactly ------------------------------------------------------


@pytest.mark.parametrize("refiner", ["none", "ensemble", "sequential"])
@pytest.mark.parametrize(("size", "mask_blur"), [((64, 64), 0), ((100, 75), 4)])
def test_far_from_the_mask_the_output_is_the_input_exactly(model, refiner, size, mask_blur):
    row = inpaint_row(size)
    out = model.predict(frame(row), params=FAST | {"refiner": refiner, "mask_blur": mask_blur})

    image, before = b64_to_image(out["generated_image"][0]), input_pixels(row["image"])
    assert image.size == size  # not floored, not resized: 100×75 stays 100×75
    after = np.asarray(image.convert("RGB"), dtype=np.int16)
    far = far_from(BOX, size, margin=3 * mask_blur)  # a Gaussian of radius r reaches ~2.5 r
    np.testing.assert_array_equal(after[far], before[far])
    ring = far_from(BOX, size, margin=0) & ~far_from(BOX, size, margin=2)  # the 2 px just outside the mask
    if mask_blur:
        assert (after[ring] != before[ring]).any()  # feathered: the generated pixels fade out past the edge
    else:
        np.testing.assert_array_equal(after[ring], before[ring])  # a hard edge
    left, top, right, bottom = BOX
    inside = (slice(top + 3 * mask_blur, bottom - 3 * mask_blur), slice(left + 3 * mask_blur, right - 3 * mask_blur))
    assert np.abs(after[inside] - before[inside]).mean() > 10  # repainted


def test_without_paste_back_the_vae_round_trip_would_change_every_pixel(model):
    """What the paste-back is for: the decoded image differs from the input everywhere."""
    row = inpaint_row()
    specs = parse_request(frame(row), FAST | {"refiner": "none"}, model.unwrap_python_model().config).rows
    pipes = model.unwrap_python_model().pipelines
    inputs = masks.prepare(specs[0].image, specs[0].mask, 0)
    generator = torch.Generator().manual_seed(5)
    raw = pipes.inpaint(
        prompt=row["prompt"], image=inputs.image, mask_image=inputs.mask, height=64, width=64,
        num_inference_steps=10, strength=1.0, generator=generator,
    ).images[0]  # fmt: skip
    far = far_from(BOX, (64, 64), margin=8)
    assert (np.abs(np.asarray(raw, dtype=np.int16) - input_pixels(row["image"]))[far] > 0).mean() > 0.5


# -- equal to raw diffusers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_inpaint(tiny):
    return raw_pipelines(tiny, StableDiffusionXLInpaintPipeline, StableDiffusionXLInpaintPipeline)


def raw_inpainted(raw_inpaint, mode: str, prompt: str, seed: int, image: Image.Image, mask: Image.Image):
    base, refiner = raw_inpaint
    g = torch.Generator().manual_seed(seed)
    width, height = image.size
    # the inpainting pipeline's default guidance is 7.5; the artifact's (as the text-to-image pipeline's) 5.0
    args = dict(prompt=prompt, mask_image=mask, height=height, width=width, guidance_scale=5.0, generator=g)
    if mode == "none":
        return base(**args, image=image, num_inference_steps=10, strength=1.0).images[0]
    latents = base(
        **args, image=image, num_inference_steps=10, strength=1.0, denoising_end=0.8, output_type="latent"
    ).images
    return refiner(**args, image=latents, num_inference_steps=10, denoising_start=0.8).images[0]


@pytest.mark.parametrize("refiner", ["none", "ensemble"])
@pytest.mark.parametrize(("size", "mask_blur"), [((64, 64), 0), ((100, 75), 4)])
def test_pyfunc_equals_raw_diffusers_inpainting_before_paste_back(model, raw_inpaint, refiner, size, mask_blur):
    """The pyfunc's image is diffusers' SDXL inpainting output (same weights, seed and mask), pasted back.

    A cell-aligned mask of a 64×64 image with ``mask_blur=0`` reaches diffusers as it is, and the
    output is diffusers' pixels inside the mask, the input's outside. Otherwise diffusers gets the
    padded image and the latent-cell mask of :func:`masks.prepare`."""
    row = inpaint_row(size)
    ours = pixels(
        model.predict(frame(row), params=FAST | {"refiner": refiner, "mask_blur": mask_blur})["generated_image"][0]
    )

    image, mask = b64_to_image(row["image"]).convert("RGB"), b64_to_image(row["mask"]).convert("L")
    inputs = masks.prepare(image, mask, mask_blur)
    if size == (64, 64):
        assert inputs.image.tobytes() == image.tobytes() and inputs.mask.tobytes() == mask.tobytes()
    theirs = raw_inpainted(raw_inpaint, refiner, row["prompt"], 5, inputs.image, inputs.mask)

    np.testing.assert_array_equal(ours, np.asarray(masks.paste_back(theirs, image, inputs.paste), dtype=np.int16))
    if mask_blur == 0:  # inside the mask: diffusers' pixels, untouched
        inside = np.asarray(mask) > 0
        np.testing.assert_array_equal(ours[inside], np.asarray(theirs, dtype=np.int16)[: size[1], : size[0]][inside])


def test_inpainting_pipelines_share_every_module_with_the_loaded_ones(model):
    pipes = model.unwrap_python_model().pipelines
    for inpaint, pipe in ((pipes.inpaint, pipes.base), (pipes.refiner_inpaint, pipes.refiner)):
        assert isinstance(inpaint, StableDiffusionXLInpaintPipeline)
        for name, module in pipe.components.items():
            assert getattr(inpaint, name) is module, name  # no second copy of any weight
        assert inpaint.config.requires_aesthetics_score == pipe.config.get("requires_aesthetics_score", False)
        assert inpaint.watermark is None  # the watermark is chosen per call (watermark param)


# -- strength: the masked area is repainted fully by default --------------------------------------


def count_steps(model, rows: pd.DataFrame, params: dict) -> Counter:
    python_model = model.unwrap_python_model()
    steps: Counter = Counter()
    for batch in plan_batches(parse_request(rows, params, python_model.config).rows, 8):
        generate_batch(python_model.pipelines, batch, on_step=lambda stage, i, pipe: steps.update([stage]))
    return steps


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"refiner": "none"}, {"base": 10}),  # every step: diffusers' 0.9999 would run 9
        ({"refiner": "ensemble"}, {"base": 8, "refiner": 2}),
        ({"refiner": "sequential"}, {"base": 10, "refiner": 3}),  # the refiner pass: img2img strength 0.3
        ({"refiner": "none", "strength": 0.5}, {"base": 5}),
        ({"refiner": "sequential", "strength": 0.5, "num_inference_steps_refiner": 4}, {"base": 5, "refiner": 2}),
    ],
)
def test_each_refiner_mode_runs_the_expected_inpainting_steps(model, params, expected):
    assert dict(count_steps(model, frame(inpaint_row()), FAST | params)) == expected


def test_default_strength_is_full_repaint_and_image_rows_keep_their_default(model):
    row = frame(inpaint_row())
    default = model.predict(row, params=FAST | {"refiner": "none", "png_metadata": False})
    full = model.predict(row, params=FAST | {"refiner": "none", "strength": 1.0, "png_metadata": False})
    assert default["generated_image"][0] == full["generated_image"][0]
    img2img = frame({"prompt": "a cat", "image": png_b64(size=(64, 64)), "seed": 1})
    default = model.predict(img2img, params=FAST | {"png_metadata": False})
    explicit = model.predict(img2img, params=FAST | {"strength": 0.3, "png_metadata": False})
    assert default["generated_image"][0] == explicit["generated_image"][0]


# -- seeds, batching, metadata --------------------------------------------------------------------


def test_same_seed_same_bytes_and_a_row_does_not_depend_on_its_batch(model):
    rows = frame(
        inpaint_row(seed=1),
        {"prompt": "a dog", "seed": 2},  # text-to-image: another batch
        inpaint_row(seed=3) | {"prompt": "a red hat"},
        inpaint_row(seed=4) | {"mask": mask_b64((64, 64), (0, 0, 32, 32))},
    )
    params = FAST | {"refiner": "ensemble"}
    specs = parse_request(rows, params, model.unwrap_python_model().config).rows
    assert [[r.index for r in batch] for batch in plan_batches(specs, 8)] == [[0, 2, 3], [1]]

    batched = model.predict(rows, params=params)
    assert model.predict(rows, params=params)["generated_image"].tolist() == batched["generated_image"].tolist()
    assert batched["seed"].tolist() == [1, 2, 3, 4]
    for i in (0, 2, 3):
        single = model.predict(rows.iloc[[i]], params=params)["generated_image"][0]
        assert np.abs(pixels(single) - pixels(batched["generated_image"][i])).max() <= 1
    other_seed = model.predict(frame(inpaint_row(seed=9)), params=params)["generated_image"][0]
    assert np.abs(pixels(other_seed) - pixels(batched["generated_image"][0])).mean() > 1


def test_png_metadata_records_the_mode_and_the_request_reproduces_the_image(model):
    row = inpaint_row((100, 75))
    out = model.predict(frame(row), params=FAST | {"refiner": "sequential", "mask_blur": 2})
    meta = read_metadata(out["generated_image"][0])

    assert meta["mode"] == "inpainting"
    assert meta["request"]["dataframe_records"] == [{"prompt": row["prompt"], "image": None, "mask": None}]
    assert meta["request"]["params"]["refiner"] == "sequential" and meta["request"]["params"]["mask_blur"] == 2
    binary = masks.binary_mask(b64_to_image(row["mask"]))
    assert meta["model"]["input_mask_sha256"] == hashlib.sha256(binary.tobytes()).hexdigest()
    text = b64_to_image(out["generated_image"][0]).text["parameters"]
    assert "Size: 100x75" in text and "Mask blur: 2" in text and "Refiner: sequential" in text

    records = [{"prompt": row["prompt"], "image": row["image"], "mask": row["mask"]}]
    replay = model.predict(pd.DataFrame(records), params=meta["request"]["params"])
    assert replay["generated_image"][0] == out["generated_image"][0]
    plain = model.predict(frame({"prompt": "a cat", "seed": 1}), params=FAST)
    assert read_metadata(plain["generated_image"][0])["mode"] == "text-to-image"


@pytest.mark.parametrize(("size", "box", "mask_blur"), [((64, 64), BOX, 0), ((100, 75), (13, 9, 40, 30), 3)])
def test_the_pipeline_repaints_whole_latent_cells_covering_the_feathered_mask(size, box, mask_blur):
    image = Image.new("RGB", size, (30, 90, 160))
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    inputs = masks.prepare(image, mask, mask_blur)

    width, height = masks.padded_size(size)
    assert inputs.image.size == inputs.mask.size == (width, height) and inputs.paste.size == size
    cells = np.asarray(inputs.mask).reshape(height // 8, 8, width // 8, 8)
    assert (cells.min(axis=(1, 3)) == cells.max(axis=(1, 3))).all()  # whole cells, as diffusers downsamples them
    repainted = np.asarray(inputs.mask)[: size[1], : size[0]] == 255
    shown = np.asarray(inputs.paste) > 0
    assert repainted[shown].all()  # every pixel that shows generated content comes from a repainted cell
    if mask_blur == 0:
        assert inputs.mask.tobytes() == mask.tobytes()  # a cell-aligned hard mask reaches diffusers as it is
    else:
        assert shown.sum() > (np.asarray(mask) > 0).sum()  # feathering reaches past the mask
    np.testing.assert_array_equal(np.asarray(inputs.image)[: size[1], : size[0]], np.asarray(image))


def test_any_non_black_mask_pixel_is_repainted():
    mask = Image.new("RGB", (16, 16), (0, 0, 0))
    mask.putpixel((3, 4), (0, 40, 0))  # dark green: greyscale 23
    binary = np.asarray(masks.binary_mask(mask))
    assert binary[4, 3] == 255 and binary.sum() == 255


# -- errors -----------------------------------------------------------------------------------------

BAD_MASKS = [
    (
        "mask without image",
        {"mask": mask_b64((64, 64))},
        "Row 1: 'mask' needs an 'image' to inpaint; send the image the mask applies to",
    ),
    (
        "mask of another size",
        {"image": png_b64(size=(64, 64)), "mask": mask_b64((96, 64))},
        "Row 1: 'mask' is 96×64 but 'image' is 64×64; they must be the same size",
    ),
    (
        "mask not an image",
        {"image": png_b64(size=(64, 64)), "mask": "aGVsbG8gd29ybGQ="},
        "Row 1: 'mask': not an image in an accepted format (PNG, JPEG, WEBP)",
    ),
    ("mask not base64", {"image": png_b64(size=(64, 64)), "mask": "!!!"}, "Row 1: 'mask': not valid base64"),
    (
        "mask as a URL",
        {"image": png_b64(size=(64, 64)), "mask": "http://127.0.0.1/mask.png"},
        "Row 1: 'mask': URLs are not fetched",
    ),
    (
        "mask all black",
        {"image": png_b64(size=(64, 64)), "mask": mask_b64((64, 64), value=0)},
        "Row 1: 'mask' is black everywhere: nothing to repaint (white = repaint, black = keep)",
    ),
    ("mask of numbers", {"image": png_b64(size=(64, 64)), "mask": 5}, "Incompatible input types for column mask"),
]


@pytest.mark.parametrize(("fields", "message"), [c[1:] for c in BAD_MASKS], ids=[c[0] for c in BAD_MASKS])
def test_mask_errors_name_the_row_and_mask(model, fields, message):
    rows = frame({"prompt": "a cat", "seed": 1}, {"prompt": "a dog", **fields})
    with pytest.raises(MlflowException) as e:
        model.predict(rows, params=FAST)
    assert message in str(e.value)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 in serving


def test_with_on_error_null_a_bad_mask_costs_only_its_row(model):
    rows = frame(inpaint_row(seed=1), {"prompt": "a dog", "mask": mask_b64((64, 64)), "seed": 2})
    out = model.predict(rows, params=FAST | {"on_error": "null"})
    assert out["error"].tolist() == [None, "'mask' needs an 'image' to inpaint; send the image the mask applies to"]
    alone = model.predict(rows.iloc[[0]], params=FAST)
    assert out["generated_image"][0] == alone["generated_image"][0]


def test_inpainting_step_errors_say_which_params_to_raise(model):
    """The request's params leave its inpainting rows no step: a request error (also with on_error=null)."""
    message = r"Invalid param 'strength' 0.1 × 'num_inference_steps' 10, after the refiner's share"
    with pytest.raises(MlflowException, match=message):
        model.predict(frame(inpaint_row()), params=FAST | {"strength": 0.1, "on_error": "null"})
    with pytest.raises(MlflowException, match=r"Invalid param 'strength' 0.05 × 'num_inference_steps' 10 leaves the"):
        model.predict(frame(inpaint_row()), params=FAST | {"strength": 0.05, "refiner": "none"})
    with pytest.raises(MlflowException, match=r"Row 0: 'strength' 0.05 × 'num_inference_steps' 10 leaves the base"):
        model.predict(frame(inpaint_row() | {"strength": 0.05}), params=FAST | {"refiner": "none"})  # its own


# -- everywhere rows go -----------------------------------------------------------------------------


def test_azure_body_with_a_mask_column_converts_and_inpaints(model):
    row = inpaint_row()
    body = {
        "input_data": {"columns": ["prompt", "image", "mask"], "data": [[row["prompt"], row["image"], row["mask"]]]},
        "params": FAST | {"seed": 5},
    }
    df, params = azure_request_to_frame(json.dumps(body))
    assert list(df.columns) == ["prompt", "image", "mask"]
    assert to_mlflow_request(body)["dataframe_split"]["columns"] == ["prompt", "image", "mask"]

    out = model.predict(df, params=params)
    assert out["generated_image"][0] == model.predict(frame(row), params=FAST)["generated_image"][0]


def test_file_batch_job_inpaints_rows_with_a_mask_column(model, tmp_path):
    good, size = inpaint_row((100, 75), seed=3), (100, 75)
    rows = [good, {"prompt": "a dog", "seed": 4}, {"prompt": "a hat", "mask": mask_b64(size), "seed": 5}]
    source = tmp_path / "prompts.csv"
    pd.DataFrame(rows).to_csv(source, index=False)

    summary = run(model, source, tmp_path / "out", FAST, chunk_size=2, progress=False)

    assert (summary.images, summary.errors) == (2, 1)
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [line["error"] for line in sorted(lines, key=lambda x: x["row"])][2].startswith("'mask' needs an 'image'")
    written = (tmp_path / "out" / "images" / "000000.png").read_bytes()
    expected = model.predict(frame(good), params=FAST)["generated_image"][0]
    assert written == base64.b64decode(expected)
    assert Image.open(io.BytesIO(written)).size == size


def test_gate_treats_a_new_optional_input_column_as_compatible():
    current = signature()
    without_mask = ModelSignature(
        inputs=Schema([c for c in current.inputs.inputs if c.name != "mask"]),
        outputs=current.outputs,
        params=current.params,
    )
    assert breaking_changes(without_mask, current) == []  # a version that adds `mask` may be promoted
    assert breaking_changes(current, without_mask) == ["input column 'mask' removed"]
