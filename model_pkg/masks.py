"""Inpainting masks: what the pipeline repaints, and pasting its result back over the input image.

A mask is an image of the input's size: with ``mask_source`` ``mask_white`` (the default) any non-black
pixel (after conversion to greyscale) is repainted, black is kept; ``mask_black`` is the reverse;
``image_alpha`` takes the input image's alpha channel instead, repainting every pixel not fully opaque.
Three images are derived from it per row:

- the **paste mask**: the binary mask feathered by a Gaussian blur of radius ``mask_blur`` (SD
  WebUI's "mask blur"). The output is ``generated × paste + input × (1 - paste)`` per pixel, so where
  the paste mask is 0 the output pixels are the input's exactly: no VAE round trip shows there.
- the **pipeline mask**: every 8×8 latent cell that the paste mask touches, at the padded size.
  diffusers keeps the unmasked latents of the input (in the ensemble's refiner, still noisy ones),
  so every pixel that shows generated content must come from a latent cell that was repainted.
- the **padded image**: SDXL needs multiples of 8; the image (and the masks) are extended by
  repeating their last row / column, and the output is cropped back, so output size = input size
  without resampling. A mask that is already cell-aligned, with ``mask_blur=0``, reaches diffusers
  unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from model_pkg.contract import VAE_SCALE as CELL  # one latent cell is 8×8 pixels


def binary_mask(mask: Image.Image, source: str = "mask_white") -> Image.Image:
    """Greyscale mask, 255 = repaint, 0 = keep: ``mask_white``: where ``mask`` is not black; ``mask_black``: where
    it is black; ``image_alpha``: where ``mask`` (the RGBA input image) is not fully opaque."""
    if source == "image_alpha":
        return mask.getchannel("A").point(lambda v: 255 if v < 255 else 0)
    return mask.convert("L").point(lambda v: 255 if bool(v) != (source == "mask_black") else 0)


def padded_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) rounded up to multiples of :data:`CELL`."""
    return tuple(-(-x // CELL) * CELL for x in size)  # type: ignore[return-value]


def _pad(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` extended to ``size`` by repeating its last column and row."""
    width, height = image.size
    pixels = np.asarray(image)
    pad = ((0, size[1] - height), (0, size[0] - width)) + ((0, 0),) * (pixels.ndim - 2)
    return Image.fromarray(np.pad(pixels, pad, mode="edge"))


@dataclass(frozen=True)
class Inpainting:
    """One row's pipeline inputs and its paste mask."""

    image: Image.Image  # the input, padded
    mask: Image.Image  # the pipeline mask, padded: whole latent cells
    paste: Image.Image  # the feathered mask, the input's size


def prepare(image: Image.Image, mask: Image.Image, mask_blur: int) -> Inpainting:
    """The pipeline inputs for ``image`` with its :func:`binary_mask` ``mask`` (same size)."""
    paste = mask.filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur else mask
    size = padded_size(image.size)
    touched = np.asarray(_pad(paste, size)) > 0
    rows, cols = size[1] // CELL, size[0] // CELL
    cells = touched.reshape(rows, CELL, cols, CELL).any(axis=(1, 3))
    cell_mask = np.kron(cells, np.ones((CELL, CELL), dtype=bool))
    return Inpainting(_pad(image, size), Image.fromarray(np.where(cell_mask, 255, 0).astype(np.uint8)), paste)


def paste_back(generated: Image.Image, image: Image.Image, paste: Image.Image) -> Image.Image:
    """The generated image cropped to the input's size, over the input where ``paste`` is not 0."""
    return Image.composite(generated.crop((0, 0, *image.size)), image, paste)
