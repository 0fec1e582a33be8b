"""Scheduler names of the SDXL services (DataCrunch, Stability/AWS samplers) → diffusers schedulers.

A new scheduler is made for every pipeline call (schedulers keep per-run state such as the step
index), always from the artifact's packaged scheduler config, so beta schedule, ``steps_offset``
and prediction type stay the ones the model was trained with.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

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
from diffusers.schedulers.scheduling_utils import SchedulerMixin

DEFAULT = "default"  # the scheduler packaged with the artifact (EulerDiscrete for SDXL 1.0)
# The SDXL 1.0 scheduler config (stabilityai/stable-diffusion-xl-base-1.0/scheduler).
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)

# canonical name → (class, config overrides)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DDIM": (DDIMScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    "PNDM": (PNDMScheduler, {}),
    "K_EULER": (EulerDiscreteScheduler, {}),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "K_HEUN": (HeunDiscreteScheduler, {}),
    "K_DPM_2": (KDPM2DiscreteScheduler, {}),
    "K_DPM_2_ANCESTRAL": (KDPM2AncestralDiscreteScheduler, {}),
    "K_DPMPP_2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "KarrasDPM": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "K_LMS": (LMSDiscreteScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
}
# Other spellings used by the seed services.
ALIASES = {
    "EulerA": "K_EULER_ANCESTRAL",
    "HeunDiscrete": "K_HEUN",
    "DPMSolverMultistep": "K_DPMPP_2M",
    "K_DPMPP_2M_KARRAS": "KarrasDPM",
}
TIMESTEP_SPACINGS = ("default", "linspace", "leading", "trailing")
_BY_LOWER = {name.lower(): name for name in [*SCHEDULERS, *ALIASES, DEFAULT]}


def scheduler_names() -> list[str]:
    """Every accepted name (case-insensitive), canonical names first."""
    return [DEFAULT, *SCHEDULERS, *ALIASES]


def canonical_scheduler(name: str) -> str | None:
    """The canonical name for ``name`` (any case, aliases resolved), or None if unknown."""
    found = _BY_LOWER.get(name.strip().lower())
    return ALIASES.get(found, found) if found else None


def make_scheduler(packaged: SchedulerMixin, name: str, timestep_spacing: str) -> SchedulerMixin:
    """A fresh scheduler for one pipeline call, built from the packaged scheduler's config."""
    overrides = {} if timestep_spacing == "default" else {"timestep_spacing": timestep_spacing}
    if name == DEFAULT and not overrides:
        return copy.deepcopy(packaged)  # the loaded one is never stepped itself: a pristine prototype, ~8x faster
    if name == DEFAULT:
        return type(packaged).from_config(packaged.config, **overrides)
    cls, extra = SCHEDULERS[name]
    return cls.from_config(packaged.config, **extra, **overrides)


@functools.cache
def sdxl_scheduler() -> SchedulerMixin:
    """SDXL 1.0's packaged scheduler: what step plans assume when no artifact's scheduler is at hand."""
    return EulerDiscreteScheduler(**SDXL_SCHEDULER)
