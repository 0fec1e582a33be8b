"""Images in and out: decoding input images, encoding outputs, and the PNG generation metadata.

Input: base64 / ``data:`` URI → PIL, in every base64 form clients send: standard or URL-safe alphabet,
with or without padding, MIME line-wrapped (``base64.encodebytes``, LF or CRLF) or with other
whitespace, behind any ``data:<type>[;params];base64,`` prefix. Only inline images are accepted: a URL
is refused and never fetched (no server-side request forgery). Size limits are checked on the encoded bytes and on the
header's dimensions before the pixel data is decoded, so a decompression bomb costs nothing.

Output: PNG / JPEG / WebP with ``output_quality``, as bare base64 or a ``data:`` URI. A PNG carries
two text chunks (``png_metadata``, on by default):

- ``parameters``: the one-line summary that A1111-style tools (PAI-EAS ``png-info``) read:
  prompt, negative prompt, steps, sampler, CFG scale, seed, size, model hash, ...
- ``sdxl_pyfunc``: JSON ``{"request": <MLflow scoring body>, "model": {...}}``. ``request`` is a
  ``dataframe_records`` body with every resolved param, so posting it to ``/invocations`` (or
  ``predict(pd.DataFrame(r["dataframe_records"]), params=r["params"])``) reproduces the image byte
  for byte on the same artifact (``model.model_hash``), device and dtype (``model.device``,
  ``model.dtype``). Image-to-image and inpainting rows record the input image's (and mask's) sha256
  only: send the same image (and mask) again. ``mode`` says which of text-to-image, image-to-image or
  inpainting made the image.

JPEG and WebP carry no metadata.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from model_pkg import lora
from model_pkg.contract import GenerationParams

_DATA_URI = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)  # any media type and parameters
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/\-_=\s]")  # both alphabets, padding, whitespace
_URL_SAFE = str.maketrans("-_", "+/")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# The largest side each output format can hold (libjpeg: 65500, libwebp: 16383; PNG: 2^31 - 1).
MAX_SIDE = {"png": 2**31 - 1, "jpeg": 65500, "webp": 16383}


class ImageError(ValueError):
    """An input image that cannot be used; the message says why."""


def decode_image(
    text: str, *, max_bytes: int, max_pixels: int, formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
) -> Image.Image:
    """Decode a base64 string or ``data:image/...;base64,`` URI into an RGB image."""
    if _URL.match(text.strip()):
        raise ImageError("URLs are not fetched; send the image inline as base64 or a data:image/...;base64, URI")
    raw = decode_base64(text.strip(), max_bytes)
    try:
        image = Image.open(io.BytesIO(raw), formats=list(formats))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(f"not an image in an accepted format ({', '.join(formats)})") from None
    except Image.DecompressionBombError:  # PIL's own check on the header (over ~179 M pixels)
        raise ImageError(f"image header claims over {max_pixels} pixels (max_image_pixels); refused") from None
    except Exception as e:  # Pillow's header parsers raise many types on hostile bytes
        raise ImageError(f"image header is corrupt ({type(e).__name__}: {e})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}×{height} = {width * height} pixels, over the {max_pixels}-pixel limit (max_image_pixels)"
        )
    try:
        image.load()
        return image.convert("RGB")
    except Exception as e:  # truncated or corrupt pixel data: OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageError(f"image data is corrupt ({type(e).__name__}: {e})") from None


def check_encodable(fmt: str, width: int, height: int) -> None:
    """Raise ``ValueError`` when ``fmt`` cannot hold a ``width``×``height`` image (checked before generating)."""
    if max(width, height) > MAX_SIDE[fmt]:
        raise ValueError(
            f"'output_format' {fmt} cannot hold a {width}×{height} image: {fmt.upper()} is limited to "
            f"{MAX_SIDE[fmt]} pixels a side; use png or a smaller size"
        )


def decode_base64(text: str, max_bytes: int) -> bytes:
    """The bytes of any common base64 form of ``text`` (see the module docstring), or an
    :class:`ImageError` that says what is wrong and where (positions count from the start of ``text``)."""
    prefix = _DATA_URI.match(text)
    start = prefix.end() if prefix else 0
    if text[:5].lower() == "data:" and not prefix:
        raise ImageError("a data: URI must be base64-encoded: data:<type>;base64,<data>")
    if bad := _NOT_BASE64.search(text, start):
        raise ImageError(f"not valid base64: invalid character {bad.group()!r} at position {bad.start()}")
    body = "".join(text[start:].split()).translate(_URL_SAFE).rstrip("=")
    if "=" in body:
        raise ImageError(f"not valid base64: padding '=' at position {text.index('=', start)}, before the end")
    if len(body) % 4 == 1:
        raise ImageError(f"not valid base64: {len(body)} base64 characters cannot be whole bytes (truncated?)")
    if len(body) * 3 // 4 > max_bytes:
        raise ImageError(f"image is larger than the {max_bytes}-byte limit (max_image_bytes)")
    return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 95, pnginfo: object = None) -> str:
    """Base64 text of ``image`` in ``fmt`` (png, jpeg, webp). PNG is lossless and deterministic;
    ``pnginfo`` (a ``PngImagePlugin.PngInfo``) adds its text chunks."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", pnginfo=pnginfo)
    else:
        image.save(buffer, format=fmt.upper(), quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def to_data_uri(b64: str, fmt: str = "png") -> str:
    """``data:image/<fmt>;base64,...`` form of a base64 image (the Instill output shape)."""
    return f"data:{MIME[fmt]};base64,{b64}"


# -- output metadata ----------------------------------------------------------------------------

METADATA_KEY = "sdxl_pyfunc"


def _param_selection(row: Any) -> lora.Selection:
    """The adapters selected by the ``lora`` param (those tagged in the prompt stay in the prompt)."""
    tagged = {spec.split(":")[0] for spec in lora.split_prompt_tags(row.prompt)[1].split(",") if spec}
    return tuple((name, weight) for name, weight in row.settings.lora if name not in tagged)


# Params a reproduction request leaves out, and why: the image does not depend on them as given.
NOT_REPRODUCED = {
    "on_error": "how failures are reported, not what is drawn",
    "aspect_ratio": "resolved into height and width",
    "lora_scale": "folded into the weights written in lora",
}


def reproduction_request(row: Any) -> dict[str, Any]:
    """The MLflow scoring body that regenerates ``row`` (a :class:`~model_pkg.request.RowSpec`).

    Every param of :class:`~model_pkg.contract.GenerationParams` is recorded with its resolved value,
    except :data:`NOT_REPRODUCED`: settings of the same name first, then what the row resolved itself.
    """
    s = row.settings
    params: dict[str, Any] = {name: getattr(s, name) for name in GenerationParams.model_fields if hasattr(s, name)}
    params |= {
        "negative_prompt": row.negative_prompt,
        "seed": row.seed,
        "style": row.style,
        "lora": lora.format_selection(_param_selection(row)),
        "prompt_weighting": "auto" if s.prompt_chunks else "off",
    }
    if s.mode != "img2img":  # image rows run the refiner as img2img whatever ``refiner`` says
        params["refiner"] = s.mode
    record: dict[str, Any] = {"prompt": row.prompt}
    if row.image is not None:
        record["image"] = None  # not embedded: send the same input image again
    if row.mask is not None:
        record["mask"] = None
    return {"dataframe_records": [record], "params": dict(sorted(params.items()))}


def _summary(row: Any, model: dict[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt, negative prompt, then ``Key: value`` pairs."""
    s = row.settings
    width, height = row.image.size if row.mask is not None else (s.width, s.height)  # inpainting keeps the size
    pairs = {
        "Steps": s.num_inference_steps,
        "Sampler": s.scheduler,
        "CFG scale": s.guidance_scale,
        "Seed": row.seed,
        "Size": f"{width}x{height}",
        "Model hash": model["model_hash"][:10],
        "Model": "sdxl-1.0",
        "Refiner": s.mode,
        "Style": row.style or None,
        "Lora": lora.format_selection(s.lora) or None,
        "Mask blur": s.mask_blur if row.mask is not None else None,
    }
    lines = [row.prompt]
    if row.negative_prompt:
        lines.append(f"Negative prompt: {row.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def metadata(row: Any, catalog: Any) -> dict[str, Any]:
    """Everything needed to reproduce ``row``'s image: the request and the model's identity."""
    model = {
        "model_hash": catalog.model_hash if catalog else "",
        "styles_version": catalog.styles.version if catalog else "none",
        "loras": {name: catalog.loras[name] for name, _ in row.settings.lora} if catalog else {},
        # where and in which precision the image was computed (same seed, other dtype: other pixels)
        "device": catalog.runtime.get("device", "") if catalog else "",
        "dtype": catalog.runtime.get("dtype", "") if catalog else "",
    }
    if row.image is not None:
        model["input_image_sha256"] = hashlib.sha256(row.image.tobytes()).hexdigest()
    if row.mask is not None:
        model["input_mask_sha256"] = hashlib.sha256(row.mask.tobytes()).hexdigest()
    return {"request": reproduction_request(row), "model": model, "mode": row.task}


def encode_output(image: Image.Image, row: Any, catalog: Any) -> str:
    """The ``generated_image`` value of ``row``: base64 (or a ``data:`` URI) of the encoded image."""
    s = row.settings
    info = None
    if s.output_format == "png" and s.png_metadata:
        meta = metadata(row, catalog)
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", _summary(row, meta["model"]))
        info.add_text(METADATA_KEY, json.dumps(meta, sort_keys=True, ensure_ascii=False))
    text = encode_image(image, s.output_format, s.output_quality, pnginfo=info)
    return to_data_uri(text, s.output_format) if s.output_encoding == "data_uri" else text
