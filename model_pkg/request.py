"""Request parsing: the input DataFrame + request params → one validated :class:`RowSpec` per row.

Everything a user can get wrong is checked here, before any pipeline runs, and reported as an
``MlflowException`` (HTTP 400 in serving) that names the row and the field.
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image
from pydantic import ValidationError

from model_pkg import schedulers as schedulers_
from model_pkg.catalog import Catalog, check_request, resolve_row
from model_pkg.config import ModelConfig
from model_pkg.contract import (
    ASPECT_RATIOS,
    IMAGE_COLUMNS,
    MAX_SEED,
    ROW_FIELDS,
    GenerationParams,
    format_error,
    parse_params,
    resolve_strength,
)
from model_pkg.images import ImageError, check_encodable, decode_image
from model_pkg.masks import binary_mask, padded_size

VAE_SCALE = 8  # SDXL's VAE downsamples by 8: sizes must be multiples of it


@dataclass(frozen=True)
class Settings:
    """What rows must share to be generated in one batched pipeline call (hashable: a group key)."""

    mode: str  # "none" | "ensemble" | "sequential" | "img2img" (the refiner's mode; inpainting rows have one too)
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    refiner_ratio: float
    num_inference_steps_refiner: int
    guidance_scale_refiner: float
    strength: float
    scheduler: str
    timestep_spacing: str
    output_format: str
    safety_filter: bool
    lora: tuple[tuple[str, float], ...] = ()  # (adapter, weight) pairs, sorted
    prompt_chunks: int = 0  # 0: prompts go to diffusers as text; n: weighted embeddings of n 75-token windows
    watermark: bool = False
    output_quality: int = 95
    output_encoding: str = "base64"
    png_metadata: bool = False
    mask_blur: int = 0
    inpaint: bool = False  # rows with an image and a mask: the base inpaints, then the refiner per ``mode``

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
    styled_prompt: str | None = None  # the text encoded, when a style changed it
    styled_negative_prompt: str | None = None
    mask: Image.Image | None = None  # inpainting: the binary mask (255 = repaint), the image's size

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


class RowError(MlflowException):
    """A row that cannot be generated; ``row`` is its position in the input."""

    def __init__(self, row: int, message: str, prompt: str | None = None, seed: int | None = None):
        super().__init__(f"Row {row}: {message}", error_code=INVALID_PARAMETER_VALUE)  # HTTP 400
        self.row = row
        self.reason = message
        self.prompt = prompt  # echoed in the output row when it is a string
        self.seed = seed  # the seed the row was given (its column, or request seed + row), if any


def _present(value: Any) -> bool:
    """True for a real value; None, NaN and pandas NA mean "not given" (a missing JSON key, a Spark null)."""
    if value is None or value is pd.NA:
        return False
    return not (isinstance(value, float) and math.isnan(value))


def _python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def _given_seed(index: int, row: dict[str, Any], request: GenerationParams) -> int | None:
    """The row's own seed, else request seed + row; None when neither is given (a random one is drawn)."""
    value = _python(row.get("seed"))
    if _present(value) and (seed := GenerationParams(seed=value).seed) != -1:  # raises for a bad seed
        return seed
    if request.seed == -1:
        return None
    if request.seed + index > MAX_SEED:
        raise ValueError(f"request 'seed' {request.seed} + row {index} is over {MAX_SEED}; pass per-row seeds")
    return request.seed + index


def _check_size(height: int, width: int, limits: ModelConfig, what: str) -> None:
    if height % VAE_SCALE or width % VAE_SCALE:
        raise ValueError(f"{what} {width}×{height}: width and height must be multiples of {VAE_SCALE}")
    if height * width > limits.max_pixels:
        raise ValueError(f"{what} {width}×{height} is over the {limits.max_pixels}-pixel limit (max_pixels)")


def _refiner_steps(p: GenerationParams) -> int:
    return p.num_inference_steps if p.num_inference_steps_refiner == -1 else p.num_inference_steps_refiner


def _size(p: GenerationParams) -> tuple[int, int]:
    """(width, height) of a text-to-image row."""
    return ASPECT_RATIOS[p.aspect_ratio] if p.aspect_ratio else (p.width, p.height)


def check_limits(p: GenerationParams, limits: ModelConfig) -> None:
    """The configured limits that any row with these params must respect."""
    for name, steps in (
        ("num_inference_steps", p.num_inference_steps),
        ("num_inference_steps_refiner", _refiner_steps(p)),
    ):
        if steps > limits.max_steps:
            raise ValueError(f"'{name}' {steps} is over the limit of {limits.max_steps} (max_steps)")
    width, height = _size(p)
    _check_size(height, width, limits, "'height'/'width'")
    check_encodable(p.output_format, width, height)


def _settings(
    p: GenerationParams, limits: ModelConfig, image: Image.Image | None, mask: Image.Image | None = None
) -> Settings:
    """Resolve sentinels and cross-field rules into the concrete settings of one row."""
    steps_refiner = _refiner_steps(p)
    guidance_refiner = p.guidance_scale if p.guidance_scale_refiner == -1 else p.guidance_scale_refiner
    check_limits(p, limits)

    if mask is not None:
        mode = p.refiner
        # the pipeline runs at the image's size padded to multiples of 8; the output is cropped back
        width, height = _inpaint_size(image, limits)
        check_encodable(p.output_format, *image.size)  # the output is the input's size
    elif image is not None:
        mode = "img2img"
        # diffusers floors an input image to multiples of the VAE scale; the output has that size
        width, height = (x - x % VAE_SCALE for x in image.size)
        if min(width, height) < 64:
            raise ValueError(f"'image' is {image.size[0]}×{image.size[1]}; at least 64×64 is needed")
        _check_size(height, width, limits, "'image'")
        check_encodable(p.output_format, width, height)
    else:
        mode = p.refiner
        width, height = _size(p)

    return Settings(
        mode=mode,
        height=height,
        width=width,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        refiner_ratio=p.refiner_ratio,
        num_inference_steps_refiner=steps_refiner,
        guidance_scale_refiner=guidance_refiner,
        strength=p.strength,
        scheduler=p.scheduler,
        timestep_spacing=p.timestep_spacing,
        output_format=p.output_format,
        safety_filter=p.safety_filter,
        output_quality=p.output_quality,
        output_encoding=p.output_encoding,
        png_metadata=p.png_metadata,
        mask_blur=p.mask_blur,
        inpaint=mask is not None,
    )


def _inpaint_size(image: Image.Image, limits: ModelConfig) -> tuple[int, int]:
    """(width, height) an inpainting row is generated at: the image's, padded to multiples of 8."""
    if min(image.size) < 64:
        raise ValueError(f"'image' is {image.size[0]}×{image.size[1]}; at least 64×64 is needed")
    width, height = padded_size(image.size)
    _check_size(height, width, limits, "'image'")
    return width, height


def stage_steps(s: Settings, schedulers: tuple[Any, Any]) -> dict[str, int]:
    """Denoising steps each stage of ``s.mode`` runs on the packaged (base, refiner) ``schedulers``, as
    diffusers decides them on the real schedule (loop iterations: what ``callback_on_step_end`` sees)."""
    base, refiner = (functools.partial(schedulers_.schedule, p, s.scheduler, s.timestep_spacing) for p in schedulers)
    steps, steps_refiner = s.num_inference_steps, s.num_inference_steps_refiner
    strength = resolve_strength(s.strength, inpainting=False)  # image rows, the sequential refiner pass
    base_schedule = base(steps) if s.mode != "img2img" else None
    if s.inpaint:  # the base inpaints with its own strength before any handoff
        base_schedule = schedulers_.with_strength(base_schedule, steps, resolve_strength(s.strength, True))
    if s.mode == "none":
        return {"base": len(base_schedule.timesteps)}
    if s.mode == "ensemble":
        base_steps = schedulers_.steps_until(base_schedule, s.handoff)
        return {"base": base_steps, "refiner": schedulers_.steps_from(refiner(steps), s.handoff)}
    if s.mode == "sequential":
        refined = schedulers_.with_strength(refiner(steps_refiner), steps_refiner, strength)
        return {"base": len(base_schedule.timesteps), "refiner": len(refined.timesteps)}
    if s.mode == "img2img":
        return {"refiner": len(schedulers_.with_strength(refiner(steps), steps, strength).timesteps)}
    raise ValueError(f"unknown mode {s.mode!r}")


def check_steps(s: Settings, schedulers: tuple[Any, Any]) -> None:
    """Every stage must run at least one denoising step; raises ``ValueError`` naming the params."""
    strength = resolve_strength(s.strength, inpainting=False)
    img2img_steps = {"img2img": s.num_inference_steps, "sequential": s.num_inference_steps_refiner}.get(s.mode)
    if img2img_steps is not None and int(img2img_steps * strength) < 1:
        steps_name = "num_inference_steps" if s.mode == "img2img" else "num_inference_steps_refiner"
        raise ValueError(
            f"'strength' {strength} × '{steps_name}' {img2img_steps} leaves no denoising step; raise either"
        )
    planned = stage_steps(s, schedulers)
    empty = next((stage for stage, steps in planned.items() if steps == 0), None)
    steps, train_steps = s.num_inference_steps, schedulers[0].config.num_train_timesteps
    cutoff = f"the refiner takes over at timestep {schedulers_.handoff_timestep(train_steps, s.handoff)}"
    if empty == "base" and s.inpaint:
        share = f", after the refiner's share ('refiner_ratio' {s.refiner_ratio}: {cutoff})," * (s.mode == "ensemble")
        strength = resolve_strength(s.strength, inpainting=True)
        message = f"'strength' {strength} × 'num_inference_steps' {steps}{share} leaves the base no inpainting step"
        raise ValueError(f"{message}; raise either")
    if empty:
        raise ValueError(
            f"'refiner_ratio' {s.refiner_ratio} with 'num_inference_steps' {steps} leaves the {empty} no denoising "
            f"step: {cutoff}, which splits the '{s.scheduler}' schedule ('timestep_spacing' {s.timestep_spacing}) "
            f"into {planned['base']} base and {planned['refiner']} refiner steps; raise num_inference_steps or move "
            "refiner_ratio towards 0.5"
        )


def _image_given(value: Any) -> bool:
    """Absent, null and blank values mean a text-to-image row."""
    return _present(value) and not (isinstance(value, str) and not value.strip())


def _image(value: Any, limits: ModelConfig, field: str = "image") -> Image.Image | None:
    if not _image_given(value):
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{field}' must be a base64 string, got {type(value).__name__}")
    try:
        return decode_image(
            value, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, formats=limits.image_formats
        )
    except ImageError as e:
        raise ValueError(f"'{field}': {e}") from None


def _mask(value: Any, image: Image.Image | None, limits: ModelConfig) -> Image.Image | None:
    """The row's inpainting mask as a binary greyscale image (255 = repaint), or None."""
    mask = _image(value, limits, "mask")
    if mask is None:
        return None
    if image is None:
        raise ValueError("'mask' needs an 'image' to inpaint; send the image the mask applies to")
    if mask.size != image.size:
        raise ValueError(
            f"'mask' is {mask.size[0]}×{mask.size[1]} but 'image' is {image.size[0]}×{image.size[1]}; "
            "they must be the same size"
        )
    binary = binary_mask(mask)
    if binary.getbbox() is None:
        raise ValueError("'mask' is black everywhere: nothing to repaint (white = repaint, black = keep)")
    return binary


def _prompt(value: Any, field: str, limits: ModelConfig, required: bool) -> str:
    if not _present(value):
        if required:
            raise ValueError(f"'{field}' is required")
        return ""
    if not isinstance(value, str):
        hint = " (pass a pandas DataFrame, one row per image)" if isinstance(value, (list, np.ndarray)) else ""
        raise ValueError(f"'{field}' must be a string, got {type(value).__name__}{hint}")
    if required and not value.strip():
        raise ValueError(f"'{field}' is empty")
    if len(value) > limits.max_prompt_chars:
        raise ValueError(
            f"'{field}' has {len(value)} characters, over the {limits.max_prompt_chars} limit (max_prompt_chars)"
        )
    try:
        value.encode("utf-8")  # a lone surrogate (valid in JSON) would crash the tokenizer later
    except UnicodeEncodeError as e:
        raise ValueError(f"'{field}' is not valid Unicode text ({e.reason} at position {e.start})") from None
    return value


def parse_row(
    index: int, row: dict[str, Any], request: GenerationParams, limits: ModelConfig, catalog: Catalog | None = None
) -> RowSpec:
    """Validate one input row against the request params; raises :class:`RowError`."""
    try:
        prompt = _prompt(row.get("prompt"), "prompt", limits, required=True)
        overrides = {k: _python(row[k]) for k in ROW_FIELDS if k in row and _present(row[k])}
        if ("height" in overrides or "width" in overrides) and "aspect_ratio" not in overrides:
            overrides["aspect_ratio"] = ""  # the row's own size beats the request's aspect ratio
        try:
            params = GenerationParams.model_validate({**request.model_dump(), **overrides}) if overrides else request
        except ValidationError as e:
            raise ValueError(format_error(e, "column").removeprefix("column ")) from None
        negative_prompt = _prompt(params.negative_prompt, "negative_prompt", limits, required=False)
        image = _image(row.get("image"), limits)
        mask = _mask(row.get("mask"), image, limits)
        seed = _given_seed(index, row, request)  # the seed column was validated with params
        if seed is None:
            seed = _random_seed()
        settings = _settings(params, limits, image, mask)
        check_steps(settings, (catalog or Catalog()).schedulers)
        text = resolve_row(params, prompt, negative_prompt, catalog)
        settings = replace(settings, lora=text.lora, prompt_chunks=text.prompt_chunks, watermark=text.watermark)
    except ValueError as e:
        prompt = row.get("prompt")
        try:  # a failed row is returned with the seed it was given
            seed = _given_seed(index, row, request)
        except ValueError:  # pydantic's ValidationError included
            seed = None
        raise RowError(index, str(e), prompt if isinstance(prompt, str) else None, seed) from None
    return RowSpec(
        index, prompt, negative_prompt, seed, image, settings, params.style, text.prompt, text.negative_prompt, mask
    )


@dataclass(frozen=True)
class Request:
    params: GenerationParams
    rows: list[RowSpec | RowError]  # one per input row, in order; errors only with on_error="null"


def parse_request(
    model_input: Any, params: dict | None, limits: ModelConfig, catalog: Catalog | None = None
) -> Request:
    """Validate a whole request. With ``on_error="raise"`` the first bad row raises with its row number;
    with ``"null"`` bad rows are kept as :class:`RowError` in their place."""
    request, frame = check_whole_request(model_input, params, limits, catalog)
    rows: list[RowSpec | RowError] = []
    image_pixels = 0  # decoded input images are held until the request ends: bounded per request
    for i, record in enumerate(frame.to_dict("records")):
        try:
            row = parse_row(i, record, request, limits, catalog)
        except RowError as e:
            if request.on_error == "raise":
                raise
            rows.append(e)
            continue
        image_pixels += sum(im.width * im.height for im in (row.image, row.mask) if im is not None)
        if image_pixels > limits.max_request_image_pixels:
            raise MlflowException.invalid_parameter_value(
                f"The input images pass the request's budget of {limits.max_request_image_pixels} decoded "
                f"pixels (max_request_image_pixels) at row {i}; send fewer or smaller images per request"
            )
        rows.append(row)
    return Request(request, rows)


def check_whole_request(
    model_input: Any, params: dict | None, limits: ModelConfig, catalog: Catalog | None = None
) -> tuple[GenerationParams, pd.DataFrame]:
    """The request-level checks (params, limits, the input's shape, the steps of its rows' modes): they raise
    ``MlflowException`` naming the param, never ``Row N:``, also with ``on_error="null"``."""
    if params is not None and not isinstance(params, dict):
        raise MlflowException.invalid_parameter_value(
            f"Params must be a mapping of names to values, got {type(params).__name__}"
        )
    request = parse_params(params)
    try:
        check_limits(request, limits)
        check_request(request, catalog)
    except ValueError as e:
        raise MlflowException.invalid_parameter_value(f"Invalid param {e}") from None
    frame = to_frame(model_input, limits)
    _check_modes(request, frame, limits, catalog)
    return request, frame


STEP_FIELDS = ("num_inference_steps", "strength")  # the row columns that change how many steps a row runs


def _check_modes(request: GenerationParams, frame: pd.DataFrame, limits: ModelConfig, catalog: Catalog | None) -> None:
    """The request's params must give every stage a step in each mode of the rows that rely on them (text:
    ``refiner``; image: img2img; image and mask: inpainting); rows with their own steps or strength are rows'."""
    own = pd.Series(False, index=frame.index)
    for field in (f for f in STEP_FIELDS if f in frame.columns):
        own |= frame[field].map(_present).astype(bool)
    given = {c: frame[c].map(_image_given).astype(bool) if c in frame.columns else own & False for c in IMAGE_COLUMNS}
    settings = _settings(request, limits, None)
    modes = set()
    for image, mask in zip(given["image"][~own], given["mask"][~own], strict=True):
        modes.add((settings.mode, True) if image and mask else ("img2img", False) if image else (settings.mode, False))
    try:
        for mode, inpaint in sorted(modes):
            check_steps(replace(settings, mode=mode, inpaint=inpaint), (catalog or Catalog()).schedulers)
    except ValueError as e:
        raise MlflowException.invalid_parameter_value(f"Invalid param {e}") from None


def to_frame(model_input: Any, limits: ModelConfig) -> pd.DataFrame:
    """The input as a DataFrame with a ``prompt`` column and at most ``max_rows`` rows."""
    try:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        elif isinstance(model_input, list):
            records = model_input and isinstance(model_input[0], dict)
            model_input = pd.DataFrame(model_input if records else {"prompt": model_input})
    except (ValueError, TypeError, AttributeError) as e:  # ragged columns, no index, mixed records (pandas 2)
        raise MlflowException.invalid_parameter_value(
            f"Cannot read the input as a table of rows ({e}); send a DataFrame with a 'prompt' column"
        ) from None
    if not isinstance(model_input, pd.DataFrame):
        raise MlflowException.invalid_parameter_value(
            f"Expected a DataFrame with a 'prompt' column, got {type(model_input).__name__}"
        )
    if "prompt" not in model_input.columns:
        raise MlflowException.invalid_parameter_value("Missing required column 'prompt'")
    if model_input.empty:
        raise MlflowException.invalid_parameter_value("The request has no rows; send at least one prompt")
    if len(model_input) > limits.max_rows:
        raise MlflowException.invalid_parameter_value(
            f"The request has {len(model_input)} rows, over the limit of {limits.max_rows} (max_rows)"
        )
    return model_input.reset_index(drop=True)
