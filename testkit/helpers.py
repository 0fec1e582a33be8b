"""Small helpers shared by the tests: decoding outputs, making real input images."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from sdxl_tools.client import b64_to_image

# Small, fast settings every test can share: 64×64 at 10 steps takes ~0.1 s with the tiny models.
FAST = {"num_inference_steps": 10, "height": 64, "width": 64}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(b64_to_image(b64).convert("RGB"), dtype=np.int16)


def png_b64(color=(200, 40, 40), size=(96, 64)) -> str:
    """A real PNG of a shape on a background, base64-encoded."""
    image = Image.new("RGB", size, (30, 90, 160))
    image.paste(color, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def raw_pipelines(tiny: Any, base_class: type, refiner_class: type) -> tuple[Any, Any]:
    """Plain diffusers pipelines of the tiny SDXL, loaded the way the diffusers SDXL docs do it
    (the refiner shares the base's second text encoder and VAE)."""
    base = base_class.from_pretrained(tiny.base)
    refiner = refiner_class.from_pretrained(tiny.refiner, text_encoder_2=base.text_encoder_2, vae=base.vae)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def tensor_bytes(path: Any, name: str) -> tuple[int, int]:
    """The byte range ``[start, end)`` of tensor ``name`` in a safetensors file."""
    import json
    from pathlib import Path

    with Path(path).open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        begin, end = json.loads(f.read(length))[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def overwrite_tensor(path: Any, name: str, byte: int = 0xFF) -> None:
    """Fill tensor ``name`` with ``byte`` in place (0xFF: every float32/float16 a NaN); size unchanged."""
    start, end = tensor_bytes(path, name)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes([byte]) * (end - start))


def flip_mantissa_bits(path: Any, name: str, count: int = 64) -> None:
    """Flip the lowest mantissa bit of the first ``count`` float32 values of tensor ``name``."""
    start, end = tensor_bytes(path, name)
    assert end - start >= 4 * count
    with open(path, "r+b") as f:
        for i in range(count):
            f.seek(start + 4 * i)
            low = f.read(1)[0]
            f.seek(start + 4 * i)
            f.write(bytes([low ^ 1]))  # little endian: the first byte holds the lowest mantissa bits


CALIBRATION = re.compile(r"cost calibration at (\d+)²: ([\d.]+) s per UNet step per megapixel, ([\d.]+) s per image")
LATE_STEPS, LATE_SIDE = 150, 64


def guidance_outlasting_the_estimate(server_log: Path, limit_s: float) -> list[float]:
    """Per-row ``guidance_scale`` values for a request of 64² rows at 150 steps that the server's own cost
    calibration (read from its log) estimates at about a third of ``limit_s``. Distinct values make each
    row its own pipeline call; at 64² fixed per-step costs dominate, so each call takes several times its
    per-megapixel estimate (benchmarks/bench_deadline.py) and the request passes the up-front check, then
    runs past its deadline, on a quiet machine and on a busy one alike (the calibration scales with it)."""
    found = CALIBRATION.search(server_log.read_text(errors="replace"))
    assert found, f"no cost calibration in the server log:\n{server_log.read_text(errors='replace')[-3000:]}"
    per_step, per_image = float(found[2]), float(found[3])
    per_row = LATE_SIDE**2 / 1e6 * (LATE_STEPS * per_step + per_image)
    rows = max(1, min(16, int(limit_s / 3 / per_row)))
    assert rows * per_row < limit_s, f"one 64² row at 150 steps is estimated at {per_row:.1f} s: raise the limit"
    return distinct_guidance(rows)


MID_RUN_ROW = {"height": 256, "width": 256, "num_inference_steps": 40}  # one row of a mid-run request


def guidance_lasting(seconds: float, timed: Callable[[list[float]], float], most: int = 64) -> list[float]:
    """Per-row ``guidance_scale`` values for a request of about ``seconds`` of ``MID_RUN_ROW`` rows on this
    server now; ``timed(guidance)`` sends such a request and returns its seconds. Distinct values make each
    row its own pipeline call, so the time grows with the rows: one and two rows are timed (after an untimed
    warm-up) and the rows are counted from the difference, so the request is still generating a few seconds
    in on an idle CPU and not minutes long on a busy one (at most ``most`` rows)."""
    timed([5.0])
    one, two = timed([5.0]), timed([5.0, 5.1])
    per_row = max(two - one, 0.05)
    return distinct_guidance(max(1, min(most, round((seconds - one) / per_row) + 1)))


def distinct_guidance(rows: int) -> list[float]:
    """``rows`` distinct ``guidance_scale`` values: rows that differ in one setting are never batched together."""
    return [5.0 + i / 10 for i in range(rows)]
