"""ControlNet: packaged SDXL ControlNets conditioning the base stage of any row kind on a per-row control image.

- Build: ``build.py build --controlnet NAME=DIR`` stages a diffusers ``ControlNetModel`` folder as
  ``controlnets/NAME/`` with its sha256 in ``components.json``. Load: each is loaded once
  (:func:`load_controlnets`); nothing else is: the ControlNet pipelines of a call are built over the
  modules already loaded (:func:`pipeline`), so UNet, VAE and text encoders are the same objects.
- Select: ``controlnet`` is ``NAME`` or ``NAME:SCALE``, comma-separated for several (multi-ControlNet,
  all conditioned on the row's one ``control_image``); a name without a scale gets
  ``controlnet_conditioning_scale``. Control applies to the base; SDXL's refiner has no ControlNet.
- The control image is resized to the size the base runs at (Lanczos) and, with ``control_preprocess``
  ``canny``, turned into OpenCV's Canny edge map (:func:`control_map`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image

from model_pkg.lora import Selection


def load_controlnets(root: Path, entries: dict[str, dict[str, str]], dtype: torch.dtype, device) -> dict[str, Any]:
    """Every packaged ControlNet, loaded once onto ``device``: name → ``ControlNetModel``."""
    return {
        name: ControlNetModel.from_pretrained(
            root / entry["path"], dtype=dtype, use_safetensors=True, local_files_only=True
        ).to(device)
        for name, entry in sorted(entries.items())
    }


def control_map(image: Image.Image, size: tuple[int, int], preprocess: str, low: int, high: int) -> Image.Image:
    """The control image at ``size`` (Lanczos), as given (``none``: already a map) or as its Canny edges."""
    image = image.resize(size, Image.Resampling.LANCZOS)  # PIL returns a copy when the size is already right
    if preprocess == "none":
        return image
    import cv2  # only canny rows need OpenCV (installed with invisible-watermark)

    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))  # RGB, as the SDXL ControlNets are trained


def pipeline(pipes: Any, selection: Selection, kind: str) -> Any:
    """diffusers' SDXL ControlNet pipeline for ``kind`` (text, img2img, inpaint) over the base's modules."""
    classes = {
        "text": StableDiffusionXLControlNetPipeline,
        "img2img": StableDiffusionXLControlNetImg2ImgPipeline,
        "inpaint": StableDiffusionXLControlNetInpaintPipeline,
    }
    nets = [pipes.controlnets[name] for name, _ in selection]
    extra = {} if kind == "text" else {"requires_aesthetics_score": False}
    pipe = classes[kind](
        **pipes.base.components,
        controlnet=nets[0] if len(nets) == 1 else nets,
        force_zeros_for_empty_prompt=pipes.base.config.force_zeros_for_empty_prompt,
        add_watermarker=False,
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_args(selection: Selection, window: tuple[float, float], images: list[Image.Image], kind: str) -> dict:
    """The ControlNet arguments of one pipeline call over rows with these control ``images``."""
    scales = [scale for _, scale in selection]
    if len(selection) == 1:
        control: Any = images
    else:  # diffusers takes one image (or batch tensor) per ControlNet: the same batch for each
        pixels = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # as its image processor
        control = [torch.from_numpy(pixels.transpose(0, 3, 1, 2))] * len(selection)
    return {
        "image" if kind == "text" else "control_image": control,
        "controlnet_conditioning_scale": scales[0] if len(scales) == 1 else scales,
        "control_guidance_start": window[0],
        "control_guidance_end": window[1],
    }
