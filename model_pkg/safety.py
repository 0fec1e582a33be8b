"""Optional NSFW safety checker packaged in the artifact.

SDXL pipelines have no safety checker of their own (``safety_checker=`` is ignored), so the
artifact carries a diffusers ``StableDiffusionSafetyChecker`` + its CLIP image processor (or any
checker with that interface) and calls it on the generated images here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


class _NoBlackImageNotice(logging.Filter):
    """diffusers' checker logs "A black image will be returned instead", which is wrong with
    ``safety_filter=false``; :func:`filter_images` logs what actually happens instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Potential NSFW content was detected" not in record.getMessage()


_NOTICE_FILTER = _NoBlackImageNotice()


@dataclass(frozen=True)
class SafetyChecker:
    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").addFilter(_NOTICE_FILTER)
        model = StableDiffusionSafetyChecker.from_pretrained(
            folder,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,  # never unpickle, never download
        )
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        return cls(model.to(device).eval(), processor, device, dtype)

    def flags(self, images: list[Image.Image]) -> list[bool]:
        """True for each image the checker flags as NSFW."""
        clip_input = self.processor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        pixels = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        with torch.no_grad():
            _, flagged = self.model(clip_input=clip_input, images=pixels)
        return [bool(f) for f in flagged]


def filter_images(
    images: list[Image.Image], checker: SafetyChecker | None, replace: bool
) -> tuple[list[Image.Image], list[bool | None]]:
    """Check ``images``; with ``replace``, flagged ones become black images of the same size.

    Without a checker every flag is None (nothing was checked), as in the Azure response.
    """
    if checker is None:
        return images, [None] * len(images)
    flags = checker.flags(images)
    if any(flags):
        action = "replaced by black images" if replace else "returned unchanged (safety_filter=false)"
        logger.warning("safety checker flagged %d of %d images: %s", sum(flags), len(flags), action)
    if replace:
        images = [Image.new("RGB", im.size) if flag else im for im, flag in zip(images, flags, strict=True)]
    return images, list(flags)
