"""Generation: one batch of rows that share their settings (``model_pkg.plan``) → images, one pipeline call.

Modes (``Settings.mode``, a :class:`~model_pkg.contract.Mode`), following the diffusers SDXL docs:

- ``none``: the base alone.
- ``ensemble``: "ensemble of expert denoisers": the base runs the schedule down to timestep
  ``1000 × (1 - refiner_ratio)`` (``denoising_end``) and hands its latents to the refiner
  (``denoising_start``); how many steps that is per stage: :func:`model_pkg.plan.stage_steps`.
- ``sequential``: the base denoises fully, the refiner runs img2img (SDEdit) on its latents with its
  own steps, guidance and ``strength``.
- ``img2img``: rows with an input image run the refiner as img2img (the Azure refiner model).

Rows with an image and a mask (``Settings.inpaint``) are inpainted in the mode of ``refiner``, with
diffusers' SDXL inpainting pipelines over the same modules (:func:`_inpaint`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from PIL import Image

from model_pkg import controlnet, lora, masks, prompts
from model_pkg.config import ModelConfig
from model_pkg.contract import Mode
from model_pkg.pipelines import Pipelines, call_view
from model_pkg.request import parse_request
from model_pkg.spec import RowSpec, Settings

# on_step(stage, step_index, pipeline): called after every denoising step (diffusers'
# callback_on_step_end); stage is "base" or "refiner", pipeline the per-call view that ran it.
StepCallback = Callable[[str, int, Any], None]


def _step_callback(stage: str, on_step: StepCallback | None) -> dict[str, Any]:
    if on_step is None:
        return {}

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        on_step(stage, step, pipe)
        return tensors

    return {"callback_on_step_end": callback}


def generate_batch(pipes: Pipelines, rows: list[RowSpec], on_step: StepCallback | None = None) -> list[Image.Image]:
    """Run one batched pipeline call for rows that share :class:`Settings` (``model_pkg.plan.plan_batches``),
    with exactly their LoRA adapters enabled (all disabled again afterwards)."""
    with lora.activated(pipes.base, rows[0].settings.lora):
        return _generate_batch(pipes, rows, on_step)


def _generate_batch(pipes: Pipelines, rows: list[RowSpec], on_step: StepCallback | None) -> list[Image.Image]:
    s = rows[0].settings
    common = dict(
        prompt=[r.effective_prompt for r in rows],
        negative_prompt=[r.effective_negative_prompt for r in rows] if rows[0].effective_negative_prompt else None,
        # one CPU generator per row: each image depends only on its own seed, batched or not,
        # and the same seed gives the same initial noise on CPU and GPU
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in rows],
    )
    # per-call views of the pipelines this mode runs (img2img rows use only the refiner, none only the base;
    # with a ControlNet, img2img rows use only the base, as SDXL's refiner has no ControlNet)
    base_pipe, refiner_pipe = (pipes.inpaint, pipes.refiner_inpaint) if s.inpaint else (pipes.base, pipes.refiner)
    img2img, kind = s.mode is Mode.IMG2IMG, "inpaint" if s.inpaint else "text"
    if s.controlnet:  # diffusers' ControlNet pipeline of the row kind, over the base's modules
        base_pipe = controlnet.pipeline(pipes, s.controlnet, "img2img" if img2img else kind)
    base = call_view(base_pipe, s.scheduler, s.timestep_spacing) if not img2img or s.controlnet else None
    refiner = None if s.mode is Mode.NONE or (img2img and s.controlnet) else refiner_pipe
    refiner = call_view(refiner, s.scheduler, s.timestep_spacing) if refiner is not None else None
    views = [view for view in (base, refiner) if view is not None]
    if s.watermark and pipes.catalog is not None:
        for view in views:
            view.watermark = pipes.catalog.watermarker  # as SDXL 1.0 does
    base_common = refiner_common = common
    if s.prompt_chunks:  # weighted / long prompts: embeddings instead of text (see prompts.py)
        generator = dict(generator=common["generator"])
        texts = (common["prompt"], common["negative_prompt"], s.prompt_chunks)
        if base is not None:
            base_common = generator | prompts.embeddings(base, *texts)
        if refiner is not None:
            refiner_common = generator | prompts.embeddings(refiner, *texts)
    base_args = dict(
        base_common,
        height=s.height,
        width=s.width,
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
        **_step_callback("base", on_step),
    )
    refiner_args = dict(refiner_common, **_step_callback("refiner", on_step))
    if s.controlnet:
        control = [r.control_image for r in rows]
        base_args |= controlnet.call_args(s.controlnet, s.control_guidance, control, kind if not img2img else "img2img")
    if img2img and s.controlnet:
        return base(**base_args, image=[r.image for r in rows], strength=s.strength).images
    if s.mode is Mode.IMG2IMG:
        return refiner(
            **refiner_args,
            image=[r.image for r in rows],
            strength=s.strength,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
        ).images
    if not s.inpaint:
        return _base_then_refiner(s, base, refiner, base_args, refiner_args)
    # Inpainting, as the diffusers SDXL docs do it: the same stages over the inpainting pipelines, each
    # given the mask; the result is pasted back over the input outside the (blurred) mask.
    inputs = [masks.prepare(r.image, r.mask, s.mask_blur) for r in rows]
    mask_image = [i.mask for i in inputs]
    base_args |= dict(image=[i.image for i in inputs], mask_image=mask_image, strength=s.strength)
    # the refiner gets the base's latents: height and width must be given (diffusers' default is 1024)
    refiner_args |= dict(mask_image=mask_image, height=s.height, width=s.width)
    images = _base_then_refiner(s, base, refiner, base_args, refiner_args)
    return [masks.paste_back(out, r.image, i.paste) for out, r, i in zip(images, rows, inputs, strict=True)]


def _base_then_refiner(
    s: Settings, base: Any, refiner: Any, base_args: dict[str, Any], refiner_args: dict[str, Any]
) -> list[Image.Image]:
    """The base, then the refiner as ``s.mode`` says: ``none`` (base only), ``ensemble`` (the base stops
    at the hand-off and the refiner finishes from there) or ``sequential`` (the base finishes and the
    refiner runs img2img on its latents with its own steps)."""
    if s.mode is Mode.NONE:
        return base(**base_args).images
    if s.mode is Mode.ENSEMBLE:
        split = s.handoff  # the steps each stage runs: plan.stage_steps
        latents = base(**base_args, denoising_end=split, output_type="latent").images
        return refiner(
            **refiner_args,
            image=latents,
            num_inference_steps=s.num_inference_steps,
            denoising_start=split,
            guidance_scale=s.guidance_scale_refiner,
        ).images
    if s.mode is Mode.SEQUENTIAL:
        latents = base(**base_args, output_type="latent").images
        return refiner(
            **refiner_args,
            image=latents,
            strength=s.refiner_strength,
            num_inference_steps=s.num_inference_steps_refiner,
            guidance_scale=s.guidance_scale_refiner,
        ).images
    raise ValueError(f"unknown mode {s.mode!r}")


def warm_up(pipes: Pipelines, config: ModelConfig) -> None:
    """One short ensemble generation at ``warmup_size``², so that ``torch.compile`` compiles the
    base UNet, the refiner UNet and the VAE decoder at load time rather than in the first request."""
    size = config.warmup_size
    params = {"height": size, "width": size, "num_inference_steps": 5, "seed": 0}
    rows = parse_request(pd.DataFrame({"prompt": ["warm-up"]}), params, config, pipes.catalog).rows
    generate_batch(pipes, rows)


CALIBRATION_SIZE = 256  # small enough to cost little at load, large enough for the UNet to dominate


def calibrate(pipes: Pipelines, config: ModelConfig) -> tuple[float, float]:
    """(seconds per UNet step per megapixel, seconds per image per megapixel) measured on this machine:
    base-only generations at 1 and 3 steps (best of 3 each) after one untimed call; the cost estimate's."""

    def seconds(steps: int) -> float:
        params = {"height": CALIBRATION_SIZE, "width": CALIBRATION_SIZE, "num_inference_steps": steps}
        params |= {"refiner": "none", "seed": 0, "watermark": False}
        rows = parse_request(pd.DataFrame({"prompt": ["calibration"]}), params, config, pipes.catalog).rows
        start = time.perf_counter()
        generate_batch(pipes, rows)
        return time.perf_counter() - start

    seconds(1)
    one, three = (min(seconds(n) for _ in range(3)) for n in (1, 3))  # min: the least disturbed run
    megapixels = CALIBRATION_SIZE**2 / 1e6
    per_step = max((three - one) / 2, 1e-6) / megapixels
    per_image = max(one - per_step * megapixels, 0.0) / megapixels
    logging.getLogger(__name__).warning(  # warning: shown by servers that configure no logging (mlflow serve)
        "cost calibration at %d²: %.3f s per UNet step per megapixel, %.3f s per image per megapixel",
        CALIBRATION_SIZE, per_step, per_image,
    )  # fmt: skip
    return per_step, per_image
