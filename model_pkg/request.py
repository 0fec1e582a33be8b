"""Request parsing: the input DataFrame + request params → one validated :class:`RowSpec` per row.

Everything a user can get wrong is checked here, before any pipeline runs, and reported as an
``MlflowException`` (HTTP 400 in serving) that names the row and the field.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image
from pydantic import ValidationError

from model_pkg.catalog import Catalog, check_request, controlnets, resolve_row
from model_pkg.config import ModelConfig
from model_pkg.contract import (
    ASPECT_RATIOS,
    IMAGE_COLUMNS,
    MAX_SEED,
    MIN_SIDE,
    ROW_FIELDS,
    VAE_SCALE,
    GenerationParams,
    Mode,
    format_error,
    is_missing,
    parse_params,
    resolve_strength,
)
from model_pkg.controlnet import control_map
from model_pkg.images import ImageError, check_encodable, decode_image
from model_pkg.lora import format_selection
from model_pkg.masks import binary_mask, padded_size
from model_pkg.plan import check_steps
from model_pkg.spec import RowSpec, Settings


class RowError(MlflowException):
    """A row that cannot be generated; ``row`` is its position in the input."""

    def __init__(self, row: int, message: str, prompt: str | None = None, seed: int | None = None):
        super().__init__(f"Row {row}: {message}", error_code=INVALID_PARAMETER_VALUE)  # HTTP 400
        self.row = row
        self.reason = message
        self.prompt = prompt  # echoed in the output row when it is a string
        self.seed = seed  # the seed the row was given (its column, or request seed + row), if any


def _python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def _given_seed(index: int, row: dict[str, Any], request: GenerationParams) -> int | None:
    """The row's own seed, else request seed + row; None when neither is given (a random one is drawn)."""
    value = _python(row.get("seed"))
    if not is_missing(value) and (seed := GenerationParams(seed=value).seed) != -1:  # raises for a bad seed
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


def _row_settings(
    p: GenerationParams, limits: ModelConfig, image: Image.Image | None, mask: Image.Image | None
) -> Settings:
    """The settings of a row: its mode and the size the pipeline runs at, from its params and images."""
    check_limits(p, limits)
    if mask is not None:
        # the pipeline runs at the image's size padded to multiples of 8; the output is cropped back
        width, height = padded_size(_check_input_size(image))
        _check_size(height, width, limits, "'image'")
        check_encodable(p.output_format, *image.size)  # the output is the input's size
        return _settings(p, Mode(p.refiner), True, width, height)
    if image is not None:
        # diffusers floors an input image to multiples of the VAE scale; the output has that size
        width, height = (x - x % VAE_SCALE for x in _check_input_size(image))
        _check_size(height, width, limits, "'image'")
        check_encodable(p.output_format, width, height)
        return _settings(p, Mode.IMG2IMG, False, width, height)
    return _settings(p, Mode(p.refiner), False, *_size(p))


def _settings(p: GenerationParams, mode: Mode, inpaint: bool, width: int, height: int) -> Settings:
    """Every sentinel and default of ``p`` resolved, once: what the stages after parsing read."""
    return Settings(
        mode=mode,
        height=height,
        width=width,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        refiner_ratio=p.refiner_ratio,
        num_inference_steps_refiner=_refiner_steps(p),
        guidance_scale_refiner=p.guidance_scale if p.guidance_scale_refiner == -1 else p.guidance_scale_refiner,
        strength=resolve_strength(p.strength, inpainting=inpaint),
        refiner_strength=resolve_strength(p.strength, inpainting=False),
        scheduler=p.scheduler,
        timestep_spacing=p.timestep_spacing,
        mask_blur=p.mask_blur,
        inpaint=inpaint,
    )


def _check_input_size(image: Image.Image) -> tuple[int, int]:
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"'image' is {image.size[0]}×{image.size[1]}; at least {MIN_SIDE}×{MIN_SIDE} is needed")
    return image.size


def _image_given(value: Any) -> bool:
    """Absent, null and blank values mean a text-to-image row."""
    return not is_missing(value) and not (isinstance(value, str) and not value.strip())


def _image(value: Any, limits: ModelConfig, field: str = "image", alpha: bool = False) -> Image.Image | None:
    if not _image_given(value):
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{field}' must be a base64 string, got {type(value).__name__}")
    try:
        return decode_image(
            value,
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            formats=limits.image_formats,
            alpha=alpha,
        )
    except ImageError as e:
        raise ValueError(f"'{field}': {e}") from None


def _mask(
    value: Any, image: Image.Image | None, limits: ModelConfig, source: str
) -> tuple[Image.Image | None, Image.Image | None]:
    """The row's RGB image and its inpainting mask as a binary greyscale image (255 = repaint), or None."""
    if source == "image_alpha":
        if _image_given(value):
            raise ValueError("'mask' is not used with 'mask_source' image_alpha (the image's alpha is the mask)")
        if image is None:
            return None, None
        if image.mode != "RGBA":
            raise ValueError("'image' has no alpha channel, but 'mask_source' is image_alpha; send an RGBA PNG/WebP")
        binary = binary_mask(image, source)
        if binary.getbbox() is None:
            raise ValueError("'image' is opaque everywhere: nothing to repaint ('mask_source' image_alpha)")
        return image.convert("RGB"), binary
    mask = _image(value, limits, "mask")
    if mask is None:
        return image, None
    if image is None:
        raise ValueError("'mask' needs an 'image' to inpaint; send the image the mask applies to")
    if mask.size != image.size:
        raise ValueError(
            f"'mask' is {mask.size[0]}×{mask.size[1]} but 'image' is {image.size[0]}×{image.size[1]}; "
            "they must be the same size"
        )
    binary = binary_mask(mask, source)
    if binary.getbbox() is None:
        if source == "mask_black":
            raise ValueError(
                "'mask' has no black pixel: nothing to repaint ('mask_source' mask_black: black = repaint)"
            )
        raise ValueError("'mask' is black everywhere: nothing to repaint (white = repaint, black = keep)")
    return image, binary


# a visible character: not whitespace, not a C0/C1 control, not a zero-width / direction mark or BOM
_VISIBLE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f\u200b-\u200f\u2060\ufeff]")


def _prompt(value: Any, field: str, limits: ModelConfig, required: bool) -> str:
    if is_missing(value):
        if required:
            raise ValueError(f"'{field}' is required")
        return ""
    if not isinstance(value, str):
        hint = " (pass a pandas DataFrame, one row per image)" if isinstance(value, (list, np.ndarray)) else ""
        raise ValueError(f"'{field}' must be a string, got {type(value).__name__}{hint}")
    if required and not _VISIBLE.search(value):  # "\u0000" alone is empty
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
        overrides = {k: _python(row[k]) for k in ROW_FIELDS if k in row and not is_missing(row[k])}
        if ("height" in overrides or "width" in overrides) and "aspect_ratio" not in overrides:
            overrides["aspect_ratio"] = ""  # the row's own size beats the request's aspect ratio
        try:
            params = GenerationParams.model_validate({**request.model_dump(), **overrides}) if overrides else request
        except ValidationError as e:
            raise ValueError(format_error(e, "column").removeprefix("column ")) from None
        negative_prompt = _prompt(params.negative_prompt, "negative_prompt", limits, required=False)
        image = _image(row.get("image"), limits, alpha=params.mask_source == "image_alpha")
        image, mask = _mask(row.get("mask"), image, limits, params.mask_source)
        seed = _given_seed(index, row, request)  # the seed column was validated with params
        if seed is None:
            seed = _random_seed()
        settings = _row_settings(params, limits, image, mask)
        check_steps(settings, (catalog or Catalog()).schedulers)
        text = resolve_row(params, prompt, negative_prompt, catalog)
        selection, control = controlnets(params, catalog), _image(row.get("control_image"), limits, "control_image")
        if bool(selection) != (control is not None):
            raise ValueError(
                "'controlnet' needs a 'control_image' in the row"
                if selection
                else "'control_image' needs a ControlNet: name one in 'controlnet'"
            )
    except ValueError as e:
        prompt = row.get("prompt")
        try:  # a failed row is returned with the seed it was given
            seed = _given_seed(index, row, request)
        except ValueError:  # pydantic's ValidationError included
            seed = None
        raise RowError(index, str(e), prompt if isinstance(prompt, str) else None, seed) from None
    settings = replace(settings, lora=text.lora, prompt_chunks=text.prompt_chunks, watermark=text.watermark)
    if selection:
        window = (params.control_guidance_start, params.control_guidance_end)
        settings = replace(settings, controlnet=selection, control_guidance=window)
    resolved = dict(  # the reproduction request records the values the row was generated with
        seed=seed,
        height=settings.height,
        width=settings.width,
        num_inference_steps_refiner=settings.num_inference_steps_refiner,
        guidance_scale_refiner=settings.guidance_scale_refiner,
        watermark=text.watermark,
        lora=format_selection(text.param_lora),  # the prompt's <lora:...> tags stay in the prompt
        prompt_weighting="auto" if text.prompt_chunks else "off",
        controlnet=format_selection(selection),
    )
    if control is not None:
        sha = hashlib.sha256(control.tobytes()).hexdigest()
        low, high = params.canny_low_threshold, params.canny_high_threshold
        control = control_map(control, (settings.width, settings.height), params.control_preprocess, low, high)
    return RowSpec(
        index,
        prompt,
        negative_prompt,
        seed,
        image,
        settings,
        params.style,
        text.prompt,
        text.negative_prompt,
        mask,
        control,
        sha if control is not None else "",
        params.model_copy(update=resolved),
    )


@dataclass(frozen=True)
class Request:
    params: GenerationParams
    rows: list[RowSpec | RowError]  # one per input row, in order; errors only with on_error="null"


def parse_request(
    model_input: Any, params: dict | None, limits: ModelConfig, catalog: Catalog | None = None
) -> Request:
    """Validate a whole request. With ``on_error="raise"`` the first row with a bad prompt raises (checked
    over all rows first), else the first row that fails the rest; with ``"null"`` bad rows are kept as
    :class:`RowError` in their place."""
    request, frame = check_whole_request(model_input, params, limits, catalog)
    records = frame.to_dict("records")
    _cheap_checks(records, request, limits)
    rows: list[RowSpec | RowError] = []
    image_pixels = 0  # decoded input images are held until the request ends: bounded per request
    for i, record in enumerate(records):
        try:
            row = parse_row(i, record, request, limits, catalog)
        except RowError as e:
            if request.on_error == "raise":
                raise
            rows.append(e)
            continue
        held = (row.image, row.mask, row.control_image)
        image_pixels += sum(im.width * im.height for im in held if im is not None)
        if image_pixels > limits.max_request_image_pixels:
            raise MlflowException.invalid_parameter_value(
                f"The input images pass the request's budget of {limits.max_request_image_pixels} decoded "
                f"pixels (max_request_image_pixels) at row {i}; send fewer or smaller images per request"
            )
        rows.append(row)
    return Request(request, rows)


def _cheap_checks(records: list[dict[str, Any]], request: GenerationParams, limits: ModelConfig) -> None:
    """Before any row is tokenized, weighted or decoded: the request's prompt-character budget, and (with
    ``on_error="raise"``) each row's prompt checks, so a bad last row fails in milliseconds, not minutes."""
    total = 0
    for i, record in enumerate(records):
        prompt, negative = record.get("prompt"), record.get("negative_prompt")
        negative = request.negative_prompt if is_missing(negative) else negative
        total += sum(len(text) for text in (prompt, negative) if isinstance(text, str))
        if request.on_error == "raise":
            try:
                _prompt(prompt, "prompt", limits, required=True)
            except ValueError as e:
                raise RowError(i, str(e), prompt if isinstance(prompt, str) else None) from None
    if total > limits.max_request_prompt_chars:
        raise MlflowException.invalid_parameter_value(
            f"The request's prompts and negative prompts have {total} characters, over the budget of "
            f"{limits.max_request_prompt_chars} per request (max_request_prompt_chars); send fewer rows per request"
        )


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
        own |= ~frame[field].map(is_missing).astype(bool)
    given = {c: frame[c].map(_image_given).astype(bool) if c in frame.columns else own & False for c in IMAGE_COLUMNS}
    modes = set()
    for image, mask in zip(given["image"][~own], given["mask"][~own], strict=True):
        mask = mask or (image and request.mask_source == "image_alpha")
        mode = Mode(request.refiner) if mask or not image else Mode.IMG2IMG
        modes.add((mode, bool(image and mask)))
    try:
        for mode, inpaint in sorted(modes):
            check_steps(_settings(request, mode, inpaint, *_size(request)), (catalog or Catalog()).schedulers)
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
