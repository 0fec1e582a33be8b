"""The contract, declared once: generation params, per-row input columns, output columns, constants.

:class:`GenerationParams` is the single declaration of every param's name, type, default and
range. The MLflow signature (``ParamSchema``, input and output schemas) is derived from this module
when the artifact is built (``sdxl_tools.signature``), the parser validates requests with
it, and the PNG reproduction request is checked against it by the tests. MLflow always fills every
param in, so "not given" is spelled with a sentinel: ``seed=-1`` draws a random seed,
``num_inference_steps_refiner=-1`` / ``guidance_scale_refiner=-1`` inherit the base values,
``aspect_ratio=""`` uses ``height``/``width``. The parser resolves every sentinel once, into the row spec
(``model_pkg.spec``) that planning, generation and encoding read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, get_args, get_origin

import pandas as pd
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from model_pkg.schedulers import TIMESTEP_SPACINGS, canonical_scheduler, scheduler_names

MAX_SEED = 2**32 - 1  # the seed range of the SDXL services; exact in float64 (pandas, JSON, Spark)
VAE_SCALE = 8  # SDXL's VAE downsamples by 8: sizes are multiples of it, one latent cell is 8×8 pixels
MIN_SIDE = 64  # the smallest side of a generated (or input) image
MAX_LORA_WEIGHT = 10.0  # LoRA adapter weights (lora_scale and NAME:WEIGHT) lie in [-10, 10]
MAX_CONTROLNET_SCALE = 2.0  # ControlNet conditioning scales lie in [0, 2] (SD WebUI's control weight range)


def is_missing(value: Any) -> bool:
    """True for "not given": None, NaN and pandas NA (a missing JSON key, a null column, a Spark null)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


class Mode(StrEnum):
    """How a row runs the two pipelines: the ``refiner`` param's choices, and img2img for image rows."""

    NONE = "none"  # the base alone
    ENSEMBLE = "ensemble"  # the base hands its latents to the refiner at 1 - refiner_ratio
    SEQUENTIAL = "sequential"  # the base finishes, the refiner runs img2img on its latents
    IMG2IMG = "img2img"  # rows with an input image: the refiner alone, as img2img


REFINER_MODES = (Mode.NONE.value, Mode.ENSEMBLE.value, Mode.SEQUENTIAL.value)

# Stability AI's SDXL 1.0 resolutions (their SDXL API parameters): aspect ratio → (width, height).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "4:3": (1152, 896),
    "3:4": (896, 1152),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "21:9": (1536, 640),
    "9:21": (640, 1536),
}

# Per-row image columns (base64 / data URI): the starting image, to inpaint it its mask, and the ControlNet's
# control image (every route that carries an image carries these).
IMAGE_COLUMNS = ("image", "mask", "control_image")

# Where an inpainting row's mask comes from (Stability's mask sources): the mask column, either way round,
# or the image's alpha channel.
MASK_SOURCES = ("mask_white", "mask_black", "image_alpha")

# What strength=-1 (the default) means for each kind of pass.
INPAINT_STRENGTH = 1.0  # inpainting: the masked area starts from pure noise, as users of inpainting tools expect
IMG2IMG_STRENGTH = 0.3  # image-to-image: image rows (the refiner) and the sequential refiner pass


def resolve_strength(strength: float, inpainting: bool) -> float:
    """The strength of one pass: the given one, or the default of its kind of pass for -1."""
    if strength != -1:
        return strength
    return INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH


# Params that may also come as per-row columns of the input (Spark UDF params are fixed per UDF).
ROW_FIELDS = (
    "negative_prompt",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "strength",
    "aspect_ratio",
    "style",
    "lora",
    "lora_scale",
    "controlnet",
    "controlnet_conditioning_scale",
)

# Every input column the model reads; others are dropped by MLflow's schema enforcement (see docs/limits.md).
INPUT_COLUMNS = ("prompt", *IMAGE_COLUMNS, *ROW_FIELDS)


def check_columns(columns: list[str]) -> None:
    """Refuse a column the model does not read (a typo would otherwise be dropped without a word)."""
    if unknown := [c for c in columns if c not in INPUT_COLUMNS]:
        raise MlflowException.invalid_parameter_value(
            f"Column '{unknown[0]}' is unknown; the model's columns are {', '.join(INPUT_COLUMNS)}"
        )


class GenerationParams(BaseModel):
    """Per-request generation params; rows may override :data:`ROW_FIELDS`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    refiner: Literal[REFINER_MODES] = Field(  # type: ignore[valid-type]
        "ensemble",
        description="none: base only; ensemble: the base runs the first 1 - refiner_ratio of the schedule and hands "
        "its latents to the refiner; sequential: the base finishes, then refiner img2img; inpainting rows too",
    )
    refiner_ratio: float = Field(
        0.2, gt=0, lt=1, description="ensemble: the refiner runs the schedule below timestep 1000 × (1 - ratio)"
    )
    num_inference_steps: int = Field(50, ge=1, description="denoising steps (img2img, inpainting: steps × strength)")
    num_inference_steps_refiner: int = Field(
        -1, ge=-1, description="sequential: refiner steps; -1 = num_inference_steps"
    )
    guidance_scale: float = Field(5.0, ge=0, le=50, description="classifier-free guidance")
    guidance_scale_refiner: float = Field(-1.0, ge=-1, le=50, description="refiner guidance; -1 = guidance_scale")
    strength: float = Field(
        -1.0,
        ge=-1,
        le=1,
        description="noise added to a starting image, (0, 1]; -1: 1.0 for inpainting (the masked area is repainted "
        "fully), 0.3 for image-to-image (image rows, the sequential refiner)",
    )
    mask_blur: int = Field(
        4, ge=0, le=64, description="inpainting: feathering of the mask's edge in pixels (Gaussian radius); 0 hard"
    )
    mask_source: Literal[MASK_SOURCES] = Field(  # type: ignore[valid-type]
        "mask_white",
        description="inpainting: mask_white (mask non-black = repaint), mask_black (mask black = repaint), "
        "image_alpha (no mask column: the image's transparent pixels, alpha < 255, are repainted)",
    )
    negative_prompt: str = Field("", description="what not to draw")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random; request seed s gives row i the seed s + i")
    height: int = Field(1024, ge=MIN_SIDE, description=f"pixels, multiple of {VAE_SCALE}; height × width ≤ max_pixels")
    width: int = Field(1024, ge=MIN_SIDE, description=f"pixels, multiple of {VAE_SCALE}; height × width ≤ max_pixels")
    aspect_ratio: Literal["", *ASPECT_RATIOS] = Field(  # type: ignore[valid-type]
        "", description="an SDXL resolution; overrides height/width (a row's own height/width beat it)"
    )
    scheduler: str = Field(
        "default", description="default: the packaged one (EulerDiscrete for SDXL 1.0); or a sampler by name"
    )
    timestep_spacing: Literal[TIMESTEP_SPACINGS] = Field(  # type: ignore[valid-type]
        "default", description="how the steps spread over the schedule; default: the packaged scheduler's"
    )
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="encoding of generated_image")
    safety_filter: bool = Field(True, description="with a packaged safety checker, flagged images become black")
    on_error: Literal["raise", "null"] = Field(
        "raise",
        description="raise: the first bad row fails the whole request (HTTP 400); null: a bad row gets a "
        "null image and its message in an 'error' column while the other rows complete (batch jobs)",
    )
    style: str = Field("", description="a preset of the artifact's style table (e.g. photographic, anime); '' none")
    lora: str = Field(
        "", description="packaged LoRA adapters: NAME or NAME:WEIGHT, comma-separated (e.g. 'toy:0.8,pixel'); '' none"
    )
    lora_scale: float = Field(
        1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, description="weight of the adapters named in 'lora' without one"
    )
    controlnet: str = Field(
        "",
        description="packaged ControlNets conditioned on control_image: NAME or NAME:SCALE, comma-separated; '' none",
    )
    controlnet_conditioning_scale: float = Field(
        1.0, ge=0, le=MAX_CONTROLNET_SCALE, description="scale of the ControlNets named in 'controlnet' without one"
    )
    control_guidance_start: float = Field(
        0.0, ge=0, lt=1, description="fraction of the base's steps where control starts"
    )
    control_guidance_end: float = Field(1.0, gt=0, le=1, description="fraction of the base's steps where control ends")
    control_preprocess: Literal["none", "canny"] = Field(
        "none", description="none: control_image is already a control map; canny: its Canny edges (OpenCV)"
    )
    canny_low_threshold: int = Field(100, ge=1, le=255, description="canny: the lower hysteresis threshold")
    canny_high_threshold: int = Field(200, ge=1, le=255, description="canny: the upper hysteresis threshold")
    prompt_weighting: Literal["auto", "off"] = Field(
        "auto",
        description="auto: '(text:1.3)' weights and prompts past 77 tokens use chunked weighted embeddings, other "
        "prompts go to diffusers as text; off: always plain text (CLIP truncates at 77 tokens)",
    )
    watermark: bool = Field(
        True, description="SDXL's invisible watermark (images ≥ 256 px) where invisible-watermark is installed"
    )
    output_quality: int = Field(95, ge=1, le=100, description="jpeg/webp quality (png is lossless)")
    output_encoding: Literal["base64", "data_uri"] = Field(
        "base64", description="generated_image as plain base64 or as a data:image/...;base64, URI"
    )
    png_metadata: bool = Field(
        True, description="embed the generation parameters (a request that reproduces the image) in PNG text chunks"
    )

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        canonical = canonical_scheduler(name)
        if canonical is None:
            raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(scheduler_names())}")
        return canonical

    @field_validator("strength")
    @classmethod
    def _positive_or_default(cls, value: float) -> float:
        if value != -1 and value <= 0:
            raise ValueError("Input should be greater than 0 (or -1: the mode's default)")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        """pydantic's lax mode would read ``true`` as 1 for a number field (``seed: true`` → seed 1)."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in (int, float):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _choices_in_any_case(cls, value: object, info: ValidationInfo) -> object:
        """A choice param (a ``Literal``) matches in any case, as scheduler names do: ``"None"`` → ``"none"``."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and get_origin(annotation) is Literal:
            return next((choice for choice in get_args(annotation) if choice.lower() == value.lower()), value)
        return value


def format_error(error: ValidationError, where: str) -> str:
    """One line per problem: ``<where> '<field>': <message> (got <value>)``."""
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown"
        lines.append(f"{where} '{field}': {message} (got {item['input']!r:.80})")
    return "; ".join(lines)


def parse_params(params: dict | None) -> GenerationParams:
    """Validate request params; unknown names are refused (MLflow serving drops them earlier)."""
    try:
        return GenerationParams.model_validate(params or {})
    except ValidationError as e:
        raise MlflowException.invalid_parameter_value(format_error(e, "Invalid param")) from e


# Params the PNG reproduction request leaves out, and why: the image does not depend on them as given.
# It records every other param of the row, as the parser resolved it (``RowSpec.params``).
NOT_REPRODUCED = {
    "on_error": "how failures are reported, not what is drawn",
    "aspect_ratio": "resolved into height and width",
    "lora_scale": "folded into the weights written in lora",
    "controlnet_conditioning_scale": "folded into the scales written in controlnet",
}


# -- outputs ------------------------------------------------------------------------------------

OUTPUT_COLUMNS = ("prompt", "generated_image", "nsfw_content_detected", "seed")
ERROR_COLUMN = "error"  # added with on_error="null"
METADATA_KEY = "sdxl_pyfunc"  # the PNG text chunk holding the reproduction request (model_pkg.metadata)


@dataclass(frozen=True)
class RowResult:
    """One output row; ``generated_image`` is None and ``error`` says why when the row failed."""

    prompt: str | None
    generated_image: str | None
    nsfw_content_detected: bool | None
    seed: int | None
    error: str | None = None


def output_frame(results: list[RowResult], with_errors: bool) -> pd.DataFrame:
    """One row per input row, in input order (+ ``error`` in error mode)."""
    columns = [*OUTPUT_COLUMNS, ERROR_COLUMN] if with_errors else list(OUTPUT_COLUMNS)
    out = pd.DataFrame({c: pd.Series([getattr(r, c) for r in results], dtype=object) for c in columns})
    out["seed"] = out["seed"].astype("Int64" if with_errors else "int64")  # a failed row may have no seed
    return out
