"""LoRA adapters packaged in the artifact: loaded once, selected per request.

- Build (``sdxl_tools.artifact``): ``build.py build --lora NAME=PATH`` (repeatable) stages a
  ``.safetensors`` file as ``loras/NAME/<file>`` with its sha256 in ``components.json``.
- Load: every adapter is loaded into the base pipeline once (``load_lora_weights(...,
  adapter_name=NAME)``, peft backend) and left disabled. ``text_encoder_2`` is shared with the
  refiner, so an adapter's ``text_encoder_2`` layers also condition the refiner; the refiner's UNet
  has no adapters (SDXL LoRAs are trained for the base UNet).
- Select: the ``lora`` param / column is ``NAME`` or ``NAME:WEIGHT``, several joined by commas
  (``"pixel:0.8,toy"``); a name without its own weight gets ``lora_scale``. The prompt may also
  carry PAI-EAS / A1111 tags, ``"girls <lora:toy:0.8>"``: they select the adapter and are taken out
  of the encoded text. No adapter is ever fetched: unknown names are an error listing the packaged ones.
- Generate: :func:`activated` enables exactly the selected adapters for one pipeline call and
  disables them all afterwards, even when the call fails, so nothing leaks into the next request
  (the model's lock serializes calls).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from model_pkg.contract import MAX_LORA_WEIGHT

PROMPT_TAG = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>", re.IGNORECASE)
Selection = tuple[tuple[str, float], ...]  # sorted (name, weight) pairs: part of the batching key


def load_loras(base, root: Path, entries: dict[str, dict[str, str]]) -> dict[str, str]:
    """Load every packaged adapter into ``base`` (disabled); name → sha256."""
    if not entries:
        return {}
    # transformers 5 logs a "LOAD REPORT" listing every base weight as "MISSING" when it loads an
    # adapter into a text encoder; the adapter is loaded correctly, so keep that report out of the logs.
    report = logging.getLogger("transformers.utils.loading_report")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # peft warns on every adapter after the first that the model now holds several: intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            _load_all(base, root, entries)
    finally:
        report.setLevel(level)
    base.disable_lora()
    return {name: entry["sha256"] for name, entry in entries.items()}


def _load_all(base, root: Path, entries: dict[str, dict[str, str]]) -> None:
    for name, entry in entries.items():
        base.load_lora_weights(
            str(root / entry["path"]),
            weight_name=entry["weight_name"],
            adapter_name=name,
            use_safetensors=True,
            local_files_only=True,
        )


def parse_selection(
    spec: str,
    scale: float,
    packaged: dict[str, str] | None,
    field: str = "lora",
    bounds: tuple[float, float] = (-MAX_LORA_WEIGHT, MAX_LORA_WEIGHT),
) -> Selection:
    """``"a:0.5, b"`` with ``lora_scale`` 0.8 → ``(("a", 0.5), ("b", 0.8))``; raises ``ValueError``.
    Also parses the ``controlnet`` param (``field``), whose scales lie in ``bounds``."""
    if not spec.strip():
        return ()
    packaged = packaged or {}
    what, kind = ("adapter", "LoRA adapters") if field == "lora" else ("ControlNet", "ControlNets")
    chosen: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, weight_text = item.strip().partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"'{field}': empty {what} name in {spec!r}; use NAME or NAME:WEIGHT, comma-separated")
        if name not in packaged:
            valid = ", ".join(sorted(packaged)) or f"none (this artifact has no {kind})"
            raise ValueError(f"'{field}': unknown {what} {name!r}; packaged: {valid}")
        try:
            weight = float(weight_text) if sep else scale
        except ValueError:
            raise ValueError(f"'{field}': weight of {name!r} must be a number, got {weight_text!r}") from None
        if not (bounds[0] <= weight <= bounds[1]):
            raise ValueError(
                f"'{field}': weight of {name!r} must be between {bounds[0]:g} and {bounds[1]:g}, got {weight}"
            )
        if name in chosen:
            raise ValueError(f"'{field}': {what} {name!r} is named twice")
        chosen[name] = weight
    return tuple(sorted(chosen.items()))


def split_prompt_tags(prompt: str) -> tuple[str, str]:
    """PAI-EAS / A1111 tags: ``"girls <lora:toy:0.8>"`` → ``("girls", "toy:0.8")``.

    The tags are taken out of the text that is encoded; a tag without a weight means weight 1.0 (as in
    A1111; ``lora_scale`` applies to the ``lora`` param only). The second item is a ``lora`` spec.
    """
    specs = [f"{m.group(1).strip()}:{(m.group(2) or '1').strip()}" for m in PROMPT_TAG.finditer(prompt)]
    if not specs:
        return prompt, ""
    text = " ".join(PROMPT_TAG.sub(" ", prompt).split())
    return text, ",".join(specs)


def format_selection(selection: Selection) -> str:
    return ",".join(f"{name}:{weight:g}" for name, weight in selection)


@contextmanager
def activated(base: Any, selection: Selection) -> Iterator[None]:
    """Enable exactly ``selection`` on ``base`` (and so on the shared text encoder) for one call."""
    if not selection:
        yield
        return
    base.enable_lora()
    try:
        base.set_adapters([n for n, _ in selection], adapter_weights=[w for _, w in selection])
        yield
    finally:
        base.disable_lora()
