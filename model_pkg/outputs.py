"""Encoding generated images: format and quality, ``data:`` URI form, and PNG generation metadata.

A PNG carries two text chunks (``png_metadata``, on by default):

- ``parameters``: the one-line summary that A1111-style tools (PAI-EAS ``png-info``) read:
  prompt, negative prompt, steps, sampler, CFG scale, seed, size, model hash, ...
- ``sdxl_pyfunc``: JSON ``{"request": <MLflow scoring body>, "model": {...}}``. ``request`` is a
  ``dataframe_records`` body with every resolved param, so posting it to ``/invocations`` (or
  ``predict(pd.DataFrame(r["dataframe_records"]), params=r["params"])``) reproduces the image byte
  for byte on the same artifact (``model.model_hash``). Image-to-image rows record the input image's
  sha256 only: send the same image again.

JPEG and WebP carry no metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

from model_pkg import lora
from model_pkg.image_codec import encode_image, output_bytes, to_data_uri

METADATA_KEY = "sdxl_pyfunc"


def _param_selection(row: Any) -> lora.Selection:
    """The adapters selected by the ``lora`` param (those tagged in the prompt stay in the prompt)."""
    tagged = {spec.split(":")[0] for spec in lora.split_prompt_tags(row.prompt)[1].split(",") if spec}
    return tuple((name, weight) for name, weight in row.settings.lora if name not in tagged)


def reproduction_request(row: Any) -> dict[str, Any]:
    """The MLflow scoring body that regenerates ``row`` (a :class:`~model_pkg.request.RowSpec`)."""
    s = row.settings
    params: dict[str, Any] = {
        "num_inference_steps": s.num_inference_steps,
        "guidance_scale": s.guidance_scale,
        "refiner_ratio": s.refiner_ratio,
        "num_inference_steps_refiner": s.num_inference_steps_refiner,
        "guidance_scale_refiner": s.guidance_scale_refiner,
        "strength": s.strength,
        "negative_prompt": row.negative_prompt,
        "seed": row.seed,
        "height": s.height,
        "width": s.width,
        "scheduler": s.scheduler,
        "timestep_spacing": s.timestep_spacing,
        "style": row.style,
        "lora": lora.format_selection(_param_selection(row)),
        "prompt_weighting": "auto" if s.prompt_chunks else "off",
        "watermark": s.watermark,
        "safety_filter": s.safety_filter,
        "output_format": s.output_format,
        "output_quality": s.output_quality,
        "output_encoding": s.output_encoding,
        "png_metadata": s.png_metadata,
    }
    if s.mode != "img2img":
        params["refiner"] = s.mode
    record: dict[str, Any] = {"prompt": row.prompt}
    if row.image is not None:
        record["image"] = None  # not embedded: send the same input image again
    return {"dataframe_records": [record], "params": dict(sorted(params.items()))}


def _summary(row: Any, model: dict[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt, negative prompt, then ``Key: value`` pairs."""
    s = row.settings
    pairs = {
        "Steps": s.num_inference_steps,
        "Sampler": s.scheduler,
        "CFG scale": s.guidance_scale,
        "Seed": row.seed,
        "Size": f"{s.width}x{s.height}",
        "Model hash": model["model_hash"][:10],
        "Model": "sdxl-1.0",
        "Refiner": s.mode,
        "Style": row.style or None,
        "Lora": lora.format_selection(s.lora) or None,
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
    }
    if row.image is not None:
        model["input_image_sha256"] = hashlib.sha256(row.image.tobytes()).hexdigest()
    return {"request": reproduction_request(row), "model": model}


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


def read_metadata(image: str | bytes) -> dict[str, Any] | None:
    """The ``sdxl_pyfunc`` metadata of an output image (base64, ``data:`` URI or raw bytes), or None."""
    if isinstance(image, str):
        image = output_bytes(image)
    with Image.open(io.BytesIO(image)) as opened:
        text = getattr(opened, "text", {}).get(METADATA_KEY)
    return json.loads(text) if text else None
