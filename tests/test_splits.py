"""How many denoising steps each stage runs: planned as diffusers cuts the real schedule, checked by counting.

diffusers hands an ensemble over on timestep values (``denoising_end`` / ``denoising_start``), which
depend on the scheduler and ``timestep_spacing``; second-order schedulers run two model evaluations
per step. The plan (:func:`model_pkg.plan.stage_steps`) must equal the loop iterations diffusers
runs, counted with ``callback_on_step_end``, and a plan that leaves a stage no step is a request error.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from mlflow.exceptions import MlflowException
from test_inpaint import mask_b64

from model_pkg.config import ModelConfig
from model_pkg.contract import Mode
from model_pkg.generation import generate_batch
from model_pkg.masks import binary_mask
from model_pkg.plan import stage_steps
from model_pkg.request import parse_request
from model_pkg.schedulers import DEFAULT, SCHEDULERS, sdxl_scheduler
from model_pkg.spec import RowSpec, Settings
from sdxl_tools.client import b64_to_image
from testkit.helpers import FAST, frame, png_b64

SPACINGS = ("default", "linspace", "leading", "trailing")
SDXL = (sdxl_scheduler(), sdxl_scheduler())  # the tiny artifact packages SDXL 1.0's scheduler
NAMES = (DEFAULT, *SCHEDULERS)


def settings(
    mode: str, steps: int, ratio: float = 0.2, name: str = DEFAULT, spacing: str = "default", **kw
) -> Settings:
    return Settings(
        mode=Mode(mode),
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=0.0,  # no classifier-free guidance: half the work, the same steps
        refiner_ratio=ratio,
        num_inference_steps_refiner=kw.pop("steps_refiner", steps),
        guidance_scale_refiner=0.0,
        strength=(strength := kw.pop("strength", 0.3)),
        refiner_strength=strength,
        scheduler=name,
        timestep_spacing=spacing,
        inpaint=kw.pop("inpaint", False),
    )


def counted(pipes, s: Settings) -> dict[str, int]:
    """Run ``s`` through the real pipelines: diffusers' loop iterations per stage (0 for a stage that ran none)."""
    image = b64_to_image(png_b64(size=(64, 64))).convert("RGB") if s.mode == "img2img" or s.inpaint else None
    mask = binary_mask(b64_to_image(mask_b64((64, 64)))) if s.inpaint else None
    row = RowSpec(0, "a cat", "", 1, image, s, mask=mask)
    steps: Counter = Counter()
    generate_batch(pipes, [row], on_step=lambda stage, i, pipe: steps.update([stage]))
    stages = {"none": ["base"], "img2img": ["refiner"]}.get(s.mode, ["base", "refiner"])
    assert set(steps) <= set(stages)
    return {stage: steps[stage] for stage in stages}


def assert_plan_is_what_diffusers_runs(pipes, s: Settings) -> None:
    try:
        planned = stage_steps(s, schedulers_of(pipes))
    except ValueError as e:  # a schedule diffusers cannot make: generating fails as well
        assert "cannot make a schedule" in str(e)
        with pytest.raises(ValueError):
            counted(pipes, s)
        return
    assert planned == counted(pipes, s), s


@pytest.fixture(scope="module")
def pipes(model):
    return model.unwrap_python_model().pipelines


def schedulers_of(pipes):
    return pipes.base.scheduler, pipes.refiner.scheduler


def test_the_catalog_plans_on_the_packaged_schedulers(pipes):
    assert pipes.catalog.schedulers == schedulers_of(pipes)


# Generation cases (each one runs the tiny pipelines): the packaged scheduler on the cases that ran a
# stage with no step when the split was planned as round(steps × ratio), then every other scheduler
# once, spacings rotating (second-order schedulers, PNDM's extra Runge-Kutta steps, Karras sigmas).
GENERATED = [
    (DEFAULT, "default", 2, 0.66),
    (DEFAULT, "default", 5, 0.9),
    (DEFAULT, "trailing", 7, 0.1),
    (DEFAULT, "linspace", 7, 0.1),
    (DEFAULT, "default", 10, 0.2),
    (DEFAULT, "leading", 4, 0.3),
    *((name, SPACINGS[i % 4], 4, 0.3) for i, name in enumerate(SCHEDULERS)),
    ("K_DPMPP_2M", "default", 4, 0.2),  # the refiner would run no step
    ("PNDM", "default", 3, 0.5),  # diffusers cannot make a PNDM schedule of fewer than 4 steps
]


@pytest.mark.parametrize(("name", "spacing", "steps", "ratio"), GENERATED)
def test_ensemble_split_is_what_diffusers_runs(pipes, name, spacing, steps, ratio):
    assert_plan_is_what_diffusers_runs(pipes, settings("ensemble", steps, ratio, name, spacing))


@pytest.mark.parametrize("name", NAMES)
def test_sequential_and_img2img_steps_are_what_diffusers_runs(pipes, name):
    assert_plan_is_what_diffusers_runs(pipes, settings("sequential", 4, name=name, steps_refiner=4, strength=0.5))
    if name in (DEFAULT, "K_HEUN"):
        assert_plan_is_what_diffusers_runs(pipes, settings("img2img", 4, name=name, strength=0.5))


# Inpainting: the base inpaints with its own strength (default 1.0), then hands over as in its mode.
INPAINTED = [
    settings("none", 4, strength=1.0, inpaint=True),
    settings("ensemble", 10, 0.2, strength=0.3, inpaint=True),
    settings("ensemble", 10, 0.2, strength=0.1, inpaint=True),  # the base would run no step
    settings("ensemble", 5, 0.3, "K_DPM_2", "trailing", strength=0.6, inpaint=True),
    settings("sequential", 4, name="K_HEUN", steps_refiner=4, strength=0.5, inpaint=True),
]


@pytest.mark.parametrize("s", INPAINTED, ids=lambda s: f"{s.mode}-{s.scheduler}-{s.strength}")
def test_inpainting_steps_are_what_diffusers_runs(pipes, s):
    assert_plan_is_what_diffusers_runs(pipes, s)


def test_inpainting_splits():
    assert stage_steps(INPAINTED[0], SDXL) == {"base": 4}  # strength 1 (inpainting's default): a full repaint
    assert stage_steps(INPAINTED[1], SDXL) == {"base": 1, "refiner": 2}  # the last 3 of 10, cut at 200
    assert stage_steps(INPAINTED[2], SDXL) == {"base": 0, "refiner": 2}


# Parsing only (no generation): steps × ratios × spacings of the packaged scheduler.
ENSEMBLE_GRID = list(itertools.product((1, 2, 3, 5, 7), (0.1, 0.5, 0.66, 0.9), SPACINGS))


@pytest.mark.parametrize(
    ("steps", "ratio", "spacing", "planned"),
    [
        (10, 0.2, "default", {"base": 8, "refiner": 2}),
        (50, 0.2, "default", {"base": 40, "refiner": 10}),
        (2, 0.66, "default", {"base": 0, "refiner": 2}),  # the base would run no step (round(2 × 0.66) = 1)
        (5, 0.9, "default", {"base": 0, "refiner": 5}),
        (7, 0.9, "default", {"base": 0, "refiner": 7}),
        (7, 0.1, "trailing", {"base": 7, "refiner": 0}),  # the refiner would run no step
        (7, 0.1, "linspace", {"base": 6, "refiner": 1}),
    ],
)
def test_known_splits(pipes, steps, ratio, spacing, planned):
    assert stage_steps(settings("ensemble", steps, ratio, spacing=spacing), schedulers_of(pipes)) == planned


@pytest.mark.parametrize(("steps", "ratio", "spacing"), ENSEMBLE_GRID)
def test_a_split_without_steps_for_a_stage_is_a_request_error_even_with_on_error_null(pipes, steps, ratio, spacing):
    params = FAST | {"num_inference_steps": steps, "refiner_ratio": ratio, "timestep_spacing": spacing}
    planned = stage_steps(settings("ensemble", steps, ratio, spacing=spacing), schedulers_of(pipes))
    rows = frame({"prompt": "a cat"}, {"prompt": "a dog"})
    if min(planned.values()) > 0:
        assert len(parse_request(rows, params, ModelConfig(), pipes.catalog).rows) == 2
        return
    empty = "base" if planned["base"] == 0 else "refiner"
    with pytest.raises(MlflowException) as e:
        parse_request(rows, params | {"on_error": "null"}, ModelConfig(), pipes.catalog)
    message = str(e.value)
    assert message.startswith(f"Invalid param 'refiner_ratio' {ratio} with 'num_inference_steps' {steps} leaves the ")
    assert f"{empty} no denoising step" in message, message
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


def test_request_errors_fail_the_model_before_any_row_and_row_overrides_stay_row_errors(model):
    with pytest.raises(MlflowException, match=r"^Invalid param 'refiner_ratio' 0.2 with 'num_inference_steps' 1 "):
        model.predict(frame({"prompt": "a cat"}), params=FAST | {"num_inference_steps": 1, "on_error": "null"})
    out = model.predict(
        frame({"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "seed": 2, "num_inference_steps": 1}),
        params=FAST | {"on_error": "null"},
    )
    assert out["generated_image"].notna().tolist() == [True, False]
    assert out["error"][1].startswith("'refiner_ratio' 0.2 with 'num_inference_steps' 1 leaves the base no")


def test_the_model_runs_the_request_checks_alone_for_batch_jobs(model):
    """``check_request`` raises what ``predict`` raises for the whole request, without generating."""
    python_model = model.unwrap_python_model()
    rows = frame({"prompt": "a cat"}, {"prompt": "a dog", "num_inference_steps": 1})
    python_model.check_request(rows, FAST | {"on_error": "null"})  # row 1's own steps: a row error later
    with pytest.raises(MlflowException, match=r"^Invalid param 'refiner_ratio' 0.2 with 'num_inference_steps' 1 "):
        python_model.check_request(rows, FAST | {"num_inference_steps": 1, "on_error": "null"})
    many = frame(*[{"prompt": "a cat"}] * (python_model.config.max_rows + 1))  # a whole batch input
    python_model.check_request(many, FAST)


def test_request_checks_follow_the_modes_the_rows_run():
    """Image rows run img2img whatever ``refiner`` says: one step at strength 1 is a valid image row,
    and the ensemble split is only checked when a row runs text-to-image."""
    image_only = frame({"prompt": "a", "image": png_b64(size=(64, 64))})
    params = FAST | {"num_inference_steps": 1, "strength": 1.0}
    [row] = parse_request(image_only, params, ModelConfig()).rows
    assert row.settings.mode == "img2img"
    with pytest.raises(MlflowException, match=r"^Invalid param 'refiner_ratio' 0.2 with 'num_inference_steps' 1"):
        parse_request(frame({"prompt": "a", "image": None}, {"prompt": "b"}), params, ModelConfig())
    with pytest.raises(MlflowException, match=r"^Invalid param 'strength' 0.3 × 'num_inference_steps' 3 leaves no"):
        parse_request(image_only, FAST | {"num_inference_steps": 3}, ModelConfig())
    # rows with their own steps or strength do not rely on the request's: checked (and failing) as rows
    own = frame({"prompt": "a", "num_inference_steps": 1}, {"prompt": "b", "image": png_b64(), "strength": 0.05})
    a, b = parse_request(own, FAST | {"on_error": "null"}, ModelConfig()).rows
    assert str(a).startswith("Row 0: 'refiner_ratio' 0.2 with 'num_inference_steps' 1 leaves the base no")
    assert str(b).startswith("Row 1: 'strength' 0.05 × 'num_inference_steps' 10 leaves no denoising step")
