"""The row spec: what parsing resolves one input row into, and all that planning, generation and encoding read.

Every default and sentinel is resolved here once, at parse time (``model_pkg.request``): the stages
after it never look at a raw param again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from model_pkg.contract import GenerationParams, Mode
from model_pkg.lora import Selection


@dataclass(frozen=True)
class Settings:
    """What rows must share to be generated in one batched pipeline call (hashable: a group key)."""

    mode: Mode  # the refiner param's mode, img2img for image rows (inpainting rows have a refiner mode too)
    height: int  # the size the pipeline runs at
    width: int
    num_inference_steps: int
    guidance_scale: float
    refiner_ratio: float
    num_inference_steps_refiner: int
    guidance_scale_refiner: float
    strength: float  # the pass over the input image: img2img (image rows), the base's inpainting
    refiner_strength: float  # the sequential refiner's img2img pass over the base's latents
    scheduler: str
    timestep_spacing: str
    lora: Selection = ()  # every adapter enabled: the lora param's and the prompt's <lora:...> tags
    prompt_chunks: int = 0  # 0: prompts go to diffusers as text; n: weighted embeddings of n 75-token windows
    watermark: bool = False
    mask_blur: int = 0
    inpaint: bool = False  # rows with an image and a mask: the base inpaints, then the refiner per ``mode``
    controlnet: Selection = ()  # the base runs diffusers' ControlNet pipeline of its kind with these (name, scale)
    control_guidance: tuple[float, float] = (0.0, 1.0)  # control_guidance_start, control_guidance_end

    @property
    def handoff(self) -> float:  # ensemble: the base's denoising_end, the refiner's denoising_start
        return 1.0 - self.refiner_ratio


@dataclass(frozen=True, eq=False)
class RowSpec:
    """One output image: what to generate and with which seed."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int
    image: Image.Image | None
    settings: Settings
    style: str = ""
    styled_prompt: str | None = None  # the text encoded, when a style changed it (or <lora:...> tags were cut)
    styled_negative_prompt: str | None = None
    mask: Image.Image | None = None  # inpainting: the binary mask (255 = repaint), the image's size
    control_image: Image.Image | None = None  # the ControlNets' map at the base's size (resized, preprocessed)
    control_sha256: str = ""  # of the control image as decoded: what the PNG metadata records
    # the row's params as resolved (seed, size, lora weights, ...): the request that reproduces the image,
    # and the output options the encoder reads
    params: GenerationParams = field(default_factory=GenerationParams)

    @property
    def task(self) -> str:
        """What the row asks for, as the PNG metadata records it."""
        if self.mask is not None:
            return "inpainting"
        return "text-to-image" if self.image is None else "image-to-image"

    @property
    def effective_prompt(self) -> str:
        return self.prompt if self.styled_prompt is None else self.styled_prompt

    @property
    def effective_negative_prompt(self) -> str:
        return self.negative_prompt if self.styled_negative_prompt is None else self.styled_negative_prompt
