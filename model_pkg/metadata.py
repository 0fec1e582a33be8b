"""What a PNG says about how it was made: two text chunks, written when ``png_metadata`` is on.

- ``parameters``: the one-line summary that A1111-style tools (PAI-EAS ``png-info``) read:
  prompt, negative prompt, steps, sampler, CFG scale, seed, size, model hash, ...
- ``sdxl_pyfunc`` (:data:`~model_pkg.contract.METADATA_KEY`): JSON ``{"request": <MLflow scoring body>,
  "model": {...}, "mode": ...}``. ``request`` is a ``dataframe_records`` body with every resolved param
  of the row (all of :class:`~model_pkg.contract.GenerationParams` but
  :data:`~model_pkg.contract.NOT_REPRODUCED`), so posting it to ``/invocations`` (or
  ``predict(pd.DataFrame(r["dataframe_records"]), params=r["params"])``) reproduces the image byte
  for byte on the same artifact (``model.model_hash``), device and dtype (``model.device``,
  ``model.dtype``). Image-to-image and inpainting rows record the input image's (and mask's) sha256
  only: send the same image (and mask) again; so do ControlNet rows for their control image
  (``control_image_sha256``, with the ControlNets' sha256 in ``controlnets``). ``mode`` says which of
  text-to-image, image-to-image or inpainting made the image.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from model_pkg.catalog import Catalog
from model_pkg.contract import METADATA_KEY, NOT_REPRODUCED
from model_pkg.lora import format_selection
from model_pkg.spec import RowSpec


def reproduction_request(row: RowSpec) -> dict[str, Any]:
    """The MLflow scoring body that regenerates ``row``: its resolved params, but :data:`NOT_REPRODUCED`."""
    record: dict[str, Any] = {"prompt": row.prompt}
    if row.image is not None:
        record["image"] = None  # not embedded: send the same input image again
    if row.mask is not None and row.params.mask_source != "image_alpha":
        record["mask"] = None
    if row.control_image is not None:
        record["control_image"] = None
    params = row.params.model_dump(mode="json", exclude=set(NOT_REPRODUCED))
    return {"dataframe_records": [record], "params": dict(sorted(params.items()))}


# a line break in a prompt would start a line of its own (a forged "Negative prompt:" or "Key: value" line)
_BREAKS = str.maketrans({"\n": r"\n", "\r": r"\r", "\x85": r"\x85", "\u2028": r"\u2028", "\u2029": r"\u2029"})


def _summary(row: RowSpec, model: dict[str, Any]) -> str:
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
        "Refiner": s.mode.value,
        "Style": row.style or None,
        "Lora": format_selection(s.lora) or None,
        "ControlNet": format_selection(s.controlnet) or None,
        "Mask blur": s.mask_blur if row.mask is not None else None,
    }
    lines = [row.prompt.translate(_BREAKS)]
    if row.negative_prompt:
        lines.append(f"Negative prompt: {row.negative_prompt.translate(_BREAKS)}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def metadata(row: RowSpec, catalog: Catalog | None) -> dict[str, Any]:
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
    if row.control_image is not None:  # the decoded control image (before resizing and preprocessing)
        model["control_image_sha256"] = row.control_sha256
        model["controlnets"] = (
            {name: catalog.controlnets[name] for name, _ in row.settings.controlnet} if catalog else {}
        )
    return {"request": reproduction_request(row), "model": model, "mode": row.task}


def png_text(row: RowSpec, catalog: Catalog | None) -> dict[str, str]:
    """The PNG text chunks of ``row``'s image: none unless it is a PNG with ``png_metadata``."""
    if row.params.output_format != "png" or not row.params.png_metadata:
        return {}
    meta = metadata(row, catalog)
    request = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    return {"parameters": _summary(row, meta["model"]), METADATA_KEY: request}
