"""Scheduler names and timestep spacings: the scheduler each pipeline call actually ran with.

The expected classes and settings are written out here, independently of ``model_pkg.schedulers``,
and read back from the pipeline inside diffusers' step callback: a name mapped to the wrong class
or settings, or a spacing that is not applied, fails.
"""

from __future__ import annotations

import pytest
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from model_pkg import schedulers
from model_pkg.generation import generate_batch
from model_pkg.request import parse_request
from testkit.helpers import FAST, frame

DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}
KARRAS = DPMPP_2M | {"use_karras_sigmas": True}
# name → (class, config values it must run with)
EXPECTED = {
    "default": (EulerDiscreteScheduler, {}),  # the artifact's packaged one (SDXL 1.0)
    "DDIM": (DDIMScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    "PNDM": (PNDMScheduler, {}),
    "K_EULER": (EulerDiscreteScheduler, {}),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "EulerA": (EulerAncestralDiscreteScheduler, {}),
    "K_HEUN": (HeunDiscreteScheduler, {}),
    "HeunDiscrete": (HeunDiscreteScheduler, {}),
    "K_DPM_2": (KDPM2DiscreteScheduler, {}),
    "K_DPM_2_ANCESTRAL": (KDPM2AncestralDiscreteScheduler, {}),
    "K_DPMPP_2M": (DPMSolverMultistepScheduler, DPMPP_2M),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, DPMPP_2M),
    "KarrasDPM": (DPMSolverMultistepScheduler, KARRAS),
    "K_DPMPP_2M_KARRAS": (DPMSolverMultistepScheduler, KARRAS),
    "K_LMS": (LMSDiscreteScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
}
# The packaged (SDXL 1.0) settings every scheduler inherits.
PACKAGED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
SPACINGS = ("default", "linspace", "leading", "trailing")


def ran(model, name: str, spacing: str) -> dict[str, tuple[type, dict]]:
    """stage → (scheduler class, config) as seen by diffusers' callback_on_step_end during a call."""
    python_model = model.unwrap_python_model()
    pipes = python_model.pipelines
    params = FAST | {"scheduler": name, "timestep_spacing": spacing, "refiner": "sequential", "strength": 0.25}
    params |= {"num_inference_steps": 4, "num_inference_steps_refiner": 4, "guidance_scale": 0.0}  # PNDM: 4 steps
    rows = parse_request(frame({"prompt": "a cat", "seed": 1}), params, python_model.config, pipes.catalog).rows
    seen: dict[str, tuple[type, dict]] = {}

    def on_step(stage, step, pipe):
        seen.setdefault(stage, (type(pipe.scheduler), dict(pipe.scheduler.config)))

    generate_batch(pipes, rows, on_step=on_step)
    assert sorted(seen) == ["base", "refiner"]
    return seen


def test_every_accepted_name_has_an_expectation():
    assert set(schedulers.scheduler_names()) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_name_runs_its_scheduler_with_the_requested_spacing(model, name):
    spacing = SPACINGS[list(EXPECTED).index(name) % len(SPACINGS)]  # every spacing over the names
    cls, settings = EXPECTED[name]
    for stage, (ran_cls, config) in ran(model, name.lower() if name != "default" else name, spacing).items():
        assert ran_cls is cls, (stage, ran_cls)
        assert {k: config[k] for k in settings} == settings, stage
        assert {k: config[k] for k in PACKAGED} == PACKAGED, stage
        assert config["timestep_spacing"] == ("leading" if spacing == "default" else spacing), stage


def test_a_name_mapped_to_the_wrong_scheduler_is_caught(model, monkeypatch):
    """The check above fails under mutation: map DDIM to the packaged Euler scheduler."""
    monkeypatch.setitem(schedulers.SCHEDULERS, "DDIM", (EulerDiscreteScheduler, {}))
    assert {cls for cls, _ in ran(model, "DDIM", "trailing").values()} == {EulerDiscreteScheduler}
    assert EXPECTED["DDIM"][0] is not EulerDiscreteScheduler
