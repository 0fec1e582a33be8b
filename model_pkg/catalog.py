"""What the artifact offers beyond the two pipelines: style table, LoRA adapters, watermarker, identity.

Loaded once with the pipelines (:func:`load_catalog`) and used twice per request: while parsing, to
validate ``style`` / ``lora`` and decide how prompts are encoded (:func:`resolve_row`), and while
generating and encoding (watermark, PNG metadata).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_pkg import lora, prompts
from model_pkg.styles import STYLES_FILE, StyleTable, load_styles


@dataclass(frozen=True)
class Catalog:
    styles: StyleTable = field(default_factory=StyleTable)
    loras: dict[str, str] = field(default_factory=dict)  # packaged adapter name → sha256
    tokenizers: tuple[Any, ...] = ()  # the base's two tokenizers: for counting prompt windows
    watermarker: Any = None  # diffusers' StableDiffusionXLWatermarker when invisible-watermark is installed
    model_hash: str = ""  # sha256 over the components' hashes: which weights made an image


@dataclass(frozen=True)
class RowText:
    """The parse-time decisions about one row's text."""

    prompt: str  # what is encoded: the styled prompt
    negative_prompt: str
    lora: lora.Selection
    prompt_chunks: int  # 0: plain diffusers text encoding; n: weighted/chunked, n windows of 75 tokens
    watermark: bool


def make_watermarker() -> Any:
    """SDXL 1.0's reference watermarker, or None where ``invisible-watermark`` is not installed."""
    from diffusers.utils import is_invisible_watermark_available

    if not is_invisible_watermark_available():
        return None
    from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

    return StableDiffusionXLWatermarker()


def model_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest.get("hashes", {}), sort_keys=True).encode()).hexdigest()


def load_catalog(root: Path, manifest: dict[str, Any], base: Any) -> Catalog:
    """Styles from the artifact, its LoRA adapters loaded into ``base`` (disabled), the watermarker."""
    styles = load_styles(root / manifest["styles"]) if manifest.get("styles") else StyleTable()
    loras = lora.load_loras(base, root, manifest.get("loras") or {})
    return Catalog(
        styles=styles,
        loras=loras,
        tokenizers=tuple(t for t in (base.tokenizer, base.tokenizer_2) if t is not None),
        watermarker=make_watermarker(),
        model_hash=model_hash(manifest),
    )


def check_request(params: Any, catalog: Catalog | None) -> None:
    """Request-level checks that need the catalog (so the error names the param, not a row)."""
    catalog = catalog or Catalog()
    try:
        catalog.styles.check(params.style)
    except ValueError as e:
        raise ValueError(f"'style': {e}") from None
    lora.parse_selection(params.lora, params.lora_scale, catalog.loras)


def resolve_row(params: Any, prompt: str, negative_prompt: str, catalog: Catalog | None) -> RowText:
    """Apply the style, parse the LoRA selection, choose the prompt encoding; raises ``ValueError``."""
    catalog = catalog or Catalog()
    prompt, tag_spec = lora.split_prompt_tags(prompt)
    try:
        styled, styled_negative = catalog.styles.apply(params.style, prompt, negative_prompt)
    except ValueError as e:
        raise ValueError(f"'style': {e}") from None
    selection = lora.parse_selection(params.lora, params.lora_scale, catalog.loras)
    if tag_spec:
        try:
            tagged = lora.parse_selection(tag_spec, 1.0, catalog.loras)
        except ValueError as e:
            raise ValueError(str(e).replace("'lora':", "'prompt' <lora:...> tag:", 1)) from None
        twice = {n for n, _ in selection} & {n for n, _ in tagged}
        if twice:
            raise ValueError(f"'prompt': adapter {sorted(twice)[0]!r} is selected by both 'lora' and a <lora:...> tag")
        selection = tuple(sorted(selection + tagged))
    chunks = 0
    if params.prompt_weighting == "auto" and catalog.tokenizers:
        chunks = prompts.needs_chunked_encoding([styled, styled_negative], catalog.tokenizers)
    return RowText(
        prompt=styled,
        negative_prompt=styled_negative,
        lora=selection,
        prompt_chunks=chunks,
        watermark=params.watermark and catalog.watermarker is not None,
    )


def stage_styles(out: Path, source: Path) -> str:
    """Copy the style table into the artifact folder; its manifest entry."""
    (out / STYLES_FILE).write_bytes(Path(source).read_bytes())
    return STYLES_FILE
