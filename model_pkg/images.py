"""The image codec: decoding input images, encoding outputs (what the PNG text chunks say: ``model_pkg.metadata``).

Input: base64 / ``data:`` URI → PIL, in every base64 form clients send: standard or URL-safe alphabet,
with or without padding, MIME line-wrapped (``base64.encodebytes``, LF or CRLF) or with other
whitespace, behind any ``data:<type>[;params];base64,`` prefix. Only inline images are accepted: a URL
is refused and never fetched (no server-side request forgery). Size limits are checked on the encoded bytes and on the
header's dimensions before the pixel data is decoded, so a decompression bomb costs nothing.

Output: PNG / JPEG / WebP with ``output_quality``, as bare base64 or a ``data:`` URI; a PNG may carry
text chunks. PNG is lossless and deterministic; JPEG and WebP carry no metadata.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping

from PIL import Image, PngImagePlugin, UnidentifiedImageError

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
    text: str, *, max_bytes: int, max_pixels: int, formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP"), alpha=False
) -> Image.Image:
    """Decode a base64 string or ``data:image/...;base64,`` URI into an RGB image (RGBA: ``alpha`` and it has one)."""
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
        has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        return image.convert("RGBA" if alpha and has_alpha else "RGB")
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


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 95, text: Mapping[str, str] | None = None) -> str:
    """Base64 text of ``image`` in ``fmt`` (png, jpeg, webp); a PNG carries ``text`` as text chunks."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo() if text else None
        for key, value in (text or {}).items():
            info.add_text(key, value)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        image.save(buffer, format=fmt.upper(), quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def to_data_uri(b64: str, fmt: str = "png") -> str:
    """``data:image/<fmt>;base64,...`` form of a base64 image (the Instill output shape)."""
    return f"data:{MIME[fmt]};base64,{b64}"


def encode_output(image: Image.Image, fmt: str, quality: int, encoding: str, text: Mapping[str, str] | None) -> str:
    """A ``generated_image`` value: base64 (``encoding="base64"``) or a ``data:`` URI of the encoded image."""
    b64 = encode_image(image, fmt, quality, text)
    return to_data_uri(b64, fmt) if encoding == "data_uri" else b64
