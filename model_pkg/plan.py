"""Planning: how many denoising steps each stage of a row runs, and which rows share one pipeline call.

diffusers cuts a schedule on timestep values, not on step numbers (``denoising_end`` /
``denoising_start``, img2img's ``strength``), so the steps of a stage are counted on the real schedule
of the packaged scheduler. Counts are loop iterations (model evaluations, what ``callback_on_step_end``
sees): second-order schedulers (Heun, KDPM2) run ~2 per step. Parsing refuses a row whose plan leaves a
stage no step (:func:`check_steps`), naming the params to change.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

from diffusers.schedulers.scheduling_utils import SchedulerMixin

from model_pkg.contract import Mode
from model_pkg.schedulers import make_scheduler
from model_pkg.spec import RowSpec, Settings


def plan_batches(rows: list[RowSpec], max_batch_size: int) -> list[list[RowSpec]]:
    """Group rows that can share one pipeline call, in order of first appearance, chunked.

    Rows must share their settings, and either all or none must have a negative prompt: a
    missing negative prompt means zero embeddings in SDXL, an empty string does not.
    """
    groups: dict[tuple[Settings, bool], list[RowSpec]] = {}
    for row in rows:
        groups.setdefault((row.settings, bool(row.effective_negative_prompt)), []).append(row)
    return [group[i : i + max_batch_size] for group in groups.values() for i in range(0, len(group), max_batch_size)]


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple[float, ...]
    order: int
    num_train_timesteps: int


@functools.lru_cache(maxsize=1024)  # a pure function of its arguments; KDPM2's set_timesteps takes ~0.1 s
def schedule(packaged: SchedulerMixin, name: str, timestep_spacing: str, steps: int) -> Schedule:
    """The schedule a pipeline call with ``steps`` runs on (``set_timesteps``, as ``retrieve_timesteps`` does)."""
    scheduler = make_scheduler(packaged, name, timestep_spacing)
    try:
        scheduler.set_timesteps(steps, device="cpu")
    except Exception as e:  # diffusers refuses some counts (PNDM: fewer than 4 steps)
        raise ValueError(f"'scheduler' {name} cannot make a schedule of {steps} steps ({e})") from None
    return Schedule(tuple(float(t) for t in scheduler.timesteps), scheduler.order, scheduler.config.num_train_timesteps)


def handoff_timestep(num_train_timesteps: int, fraction: float) -> int:
    """The timestep at which ``denoising_end`` / ``denoising_start`` = ``fraction`` cuts a schedule."""
    return round(num_train_timesteps - fraction * num_train_timesteps)  # diffusers: int(round(...))


def steps_until(s: Schedule, denoising_end: float) -> int:
    """Steps of a pipeline with ``denoising_end``: the timesteps at or above the cut."""
    return sum(t >= handoff_timestep(s.num_train_timesteps, denoising_end) for t in s.timesteps)


def steps_from(s: Schedule, denoising_start: float) -> int:
    """Steps of an img2img / inpainting pipeline with ``denoising_start`` (``get_timesteps``)."""
    steps = sum(t < handoff_timestep(s.num_train_timesteps, denoising_start) for t in s.timesteps)
    if s.order == 2 and steps % 2 == 0:  # diffusers ends a second-order step on its second evaluation
        steps += 1
    return min(steps, len(s.timesteps))


def with_strength(s: Schedule, steps: int, strength: float) -> Schedule:
    """What img2img / inpainting runs with ``strength``: all but the first ``steps - int(steps × strength)``."""
    start = max(steps - min(int(steps * strength), steps), 0)
    return replace(s, timesteps=s.timesteps[start * s.order :])


def stage_steps(s: Settings, schedulers: tuple[Any, Any]) -> dict[str, int]:
    """Denoising steps each stage of ``s.mode`` runs on the packaged (base, refiner) ``schedulers``."""
    base, refiner = (functools.partial(schedule, p, s.scheduler, s.timestep_spacing) for p in schedulers)
    steps, steps_refiner = s.num_inference_steps, s.num_inference_steps_refiner
    base_schedule = base(steps) if s.mode is not Mode.IMG2IMG else None
    if s.inpaint:  # the base inpaints with its own strength before any handoff
        base_schedule = with_strength(base_schedule, steps, s.strength)
    if s.mode is Mode.NONE:
        return {"base": len(base_schedule.timesteps)}
    if s.mode is Mode.ENSEMBLE:
        return {"base": steps_until(base_schedule, s.handoff), "refiner": steps_from(refiner(steps), s.handoff)}
    if s.mode is Mode.SEQUENTIAL:
        refined = with_strength(refiner(steps_refiner), steps_refiner, s.refiner_strength)
        return {"base": len(base_schedule.timesteps), "refiner": len(refined.timesteps)}
    stage, stage_schedule = ("base", base) if s.controlnet else ("refiner", refiner)  # ControlNet: the base's img2img
    return {stage: len(with_strength(stage_schedule(steps), steps, s.strength).timesteps)}  # img2img


def check_steps(s: Settings, schedulers: tuple[Any, Any]) -> None:
    """Every stage must run at least one denoising step; raises ``ValueError`` naming the params."""
    img2img = {Mode.IMG2IMG: (s.num_inference_steps, s.strength, "num_inference_steps")}
    img2img[Mode.SEQUENTIAL] = (s.num_inference_steps_refiner, s.refiner_strength, "num_inference_steps_refiner")
    if s.mode in img2img and int(img2img[s.mode][0] * img2img[s.mode][1]) < 1:
        steps, strength, name = img2img[s.mode]
        raise ValueError(f"'strength' {strength} × '{name}' {steps} leaves no denoising step; raise either")
    planned = stage_steps(s, schedulers)
    empty = next((stage for stage, steps in planned.items() if steps == 0), None)
    steps, train_steps = s.num_inference_steps, schedulers[0].config.num_train_timesteps
    cutoff = f"the refiner takes over at timestep {handoff_timestep(train_steps, s.handoff)}"
    if empty == "base" and s.inpaint:
        share = f", after the refiner's share ('refiner_ratio' {s.refiner_ratio}: {cutoff}),"
        share *= s.mode is Mode.ENSEMBLE
        message = f"'strength' {s.strength} × 'num_inference_steps' {steps}{share} leaves the base no inpainting step"
        raise ValueError(f"{message}; raise either")
    if empty:
        raise ValueError(
            f"'refiner_ratio' {s.refiner_ratio} with 'num_inference_steps' {steps} leaves the {empty} no denoising "
            f"step: {cutoff}, which splits the '{s.scheduler}' schedule ('timestep_spacing' {s.timestep_spacing}) "
            f"into {planned['base']} base and {planned['refiner']} refiner steps; raise num_inference_steps or move "
            "refiner_ratio towards 0.5"
        )
