"""Images in and out: base64 / ``data:`` URI ↔ PIL, with limits checked before pixels are decoded.

Only inline images are accepted: a URL is refused and never fetched (no server-side request
forgery). Size limits are checked on the encoded bytes and on the header's dimensions before the
pixel data is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError

_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageError(ValueError):
    """An input image that cannot be used; the message says why."""


def decode_image(
    text: str, *, max_bytes: int, max_pixels: int, formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
) -> Image.Image:
    """Decode a base64 string or ``data:image/...;base64,`` URI into an RGB image."""
    text = text.strip()
    if _URL.match(text):
        raise ImageError("URLs are not fetched; send the image inline as base64 or a data:image/...;base64, URI")
    text = _DATA_URI.sub("", text, count=1)
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise ImageError(f"image is larger than the {max_bytes}-byte limit (max_image_bytes)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"not valid base64 ({e})") from None
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


def output_bytes(value: str) -> bytes:
    """The image file in a ``generated_image`` value of ours (base64 or a ``data:`` URI)."""
    return base64.b64decode(_DATA_URI.sub("", value, count=1))


def b64_to_image(b64: str) -> Image.Image:
    """Decode our own output (trusted), e.g. in samples and tests."""
    return Image.open(io.BytesIO(output_bytes(b64)))
