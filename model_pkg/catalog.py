"""What the artifact offers beyond the two pipelines: style table, LoRA adapters, watermarker, identity.

Loaded once with the pipelines (:func:`load_catalog`) and used twice per request: while parsing, to
validate ``style`` / ``lora`` and decide how prompts are encoded (:func:`resolve_row`), and while
generating and encoding (watermark, PNG metadata).

Style presets are named prompt / negative-prompt templates (the SDXL presets of the DataCrunch and
Stability services). The table is ``MLmodel_template/styles.json`` (with a ``version``), copied into
the artifact when it is built, so a deployed model always uses the table it was built and tested
with. A style is applied to the prompt text before it is encoded; the ``prompt`` column of the output
stays the user's text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_pkg import lora, prompts
from model_pkg.contract import MAX_CONTROLNET_SCALE
from model_pkg.schedulers import sdxl_scheduler

STYLES_FILE = "styles.json"
PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class StyleTable:
    """name → (prompt template with ``{prompt}``, negative prompt)."""

    version: str = "none"
    styles: dict[str, tuple[str, str]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.styles)

    def check(self, name: str) -> None:
        """Raise ``ValueError`` naming the valid styles when ``name`` is not "" and not in the table."""
        if name and name not in self.styles:
            valid = ", ".join(self.names()) or "none (this artifact has no style table)"
            raise ValueError(f"unknown style {name!r}; valid: {valid}")

    def apply(self, name: str, prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The (prompt, negative prompt) to encode. The style's negative prompt comes first, the
        request's after it, so both are kept."""
        if not name:
            return prompt, negative_prompt
        self.check(name)
        template, style_negative = self.styles[name]
        styled = template.replace(PLACEHOLDER, prompt)
        negative = ", ".join(p for p in (style_negative, negative_prompt) if p)
        return styled, negative


def parse_styles(data: dict) -> StyleTable:
    """Validate the JSON structure of a style table."""
    if not isinstance(data, dict) or "version" not in data or not isinstance(data.get("styles"), dict):
        raise ValueError("a style table is a JSON object with 'version' and 'styles'")
    styles = {}
    for name, entry in data["styles"].items():
        template = entry.get("prompt", "")
        if PLACEHOLDER not in template:
            raise ValueError(f"style {name!r}: the prompt template must contain {PLACEHOLDER}")
        styles[name] = (template, entry.get("negative_prompt", ""))
    return StyleTable(version=str(data["version"]), styles=styles)


def load_styles(path: str | Path | None) -> StyleTable:
    """The table at ``path``; an empty table when the artifact has none (built before styles existed)."""
    if path is None or not Path(path).is_file():
        return StyleTable()
    return parse_styles(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class Catalog:
    styles: StyleTable = field(default_factory=StyleTable)
    loras: dict[str, str] = field(default_factory=dict)  # packaged adapter name → sha256
    controlnets: dict[str, str] = field(default_factory=dict)  # packaged ControlNet name → sha256
    tokenizers: tuple[Any, ...] = ()  # the base's two tokenizers: for counting prompt windows
    watermarker: Any = None  # diffusers' StableDiffusionXLWatermarker when invisible-watermark is installed
    model_hash: str = ""  # sha256 over the components' hashes: which weights made an image
    schedulers: tuple[Any, Any] = field(default_factory=lambda: (sdxl_scheduler(),) * 2)  # (base, refiner), packaged
    runtime: dict[str, str] = field(default_factory=dict)  # {"device", "dtype"} the images are computed in


@dataclass(frozen=True)
class RowText:
    """The parse-time decisions about one row's text."""

    prompt: str  # what is encoded: the styled prompt
    negative_prompt: str
    lora: lora.Selection  # every adapter to enable
    param_lora: lora.Selection  # those the lora param selected (the rest: the prompt's <lora:...> tags)
    prompt_chunks: int  # 0: plain diffusers text encoding; n: weighted/chunked, n windows of 75 tokens
    watermark: bool


def make_watermarker() -> Any:
    """SDXL 1.0's reference watermarker, or None where ``invisible-watermark`` is not installed."""
    from diffusers.utils import is_invisible_watermark_available

    if not is_invisible_watermark_available():
        return None
    from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

    return StableDiffusionXLWatermarker()


def model_hash(hashes: dict[str, str]) -> str:
    """One sha256 over the components' hashes: which weights made an image."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def load_catalog(
    root: Path,
    base: Any,
    styles: str | None,
    loras: dict[str, dict[str, str]],
    hashes: dict[str, str],
    runtime: dict[str, str] | None = None,
    controlnets: dict[str, dict[str, str]] | None = None,
) -> Catalog:
    """The artifact's style table, its LoRA adapters loaded into ``base`` (disabled), the watermarker;
    ``runtime``: the device and dtype the pipelines were loaded in."""
    return Catalog(
        styles=load_styles(root / styles) if styles else StyleTable(),
        loras=lora.load_loras(base, root, loras),
        controlnets={name: entry["sha256"] for name, entry in (controlnets or {}).items()},
        tokenizers=tuple(t for t in (base.tokenizer, base.tokenizer_2) if t is not None),
        watermarker=make_watermarker(),
        model_hash=model_hash(hashes),
        runtime=dict(runtime or {}),
    )


def check_request(params: Any, catalog: Catalog | None) -> None:
    """Request-level checks that need the catalog (so the error names the param, not a row)."""
    catalog = catalog or Catalog()
    try:
        catalog.styles.check(params.style)
    except ValueError as e:
        raise ValueError(f"'style': {e}") from None
    lora.parse_selection(params.lora, params.lora_scale, catalog.loras)
    controlnets(params, catalog)
    if params.control_guidance_start >= params.control_guidance_end:
        raise ValueError(
            f"'control_guidance_start' {params.control_guidance_start} must be below 'control_guidance_end' "
            f"{params.control_guidance_end}"
        )
    if params.canny_low_threshold > params.canny_high_threshold:
        raise ValueError("'canny_low_threshold' must not be above 'canny_high_threshold'")


def controlnets(params: Any, catalog: Catalog | None) -> lora.Selection:
    """The ControlNets ``params`` select, with their scales; raises ``ValueError``."""
    bounds = (0.0, MAX_CONTROLNET_SCALE)
    spec, scale = params.controlnet, params.controlnet_conditioning_scale
    return lora.parse_selection(spec, scale, (catalog or Catalog()).controlnets, "controlnet", bounds)


def resolve_row(params: Any, prompt: str, negative_prompt: str, catalog: Catalog | None) -> RowText:
    """Apply the style, parse the LoRA selection, choose the prompt encoding; raises ``ValueError``."""
    catalog = catalog or Catalog()
    prompt, tag_spec = lora.split_prompt_tags(prompt)
    try:
        styled, styled_negative = catalog.styles.apply(params.style, prompt, negative_prompt)
    except ValueError as e:
        raise ValueError(f"'style': {e}") from None
    selection = param_selection = lora.parse_selection(params.lora, params.lora_scale, catalog.loras)
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
    if params.prompt_weighting == "auto":  # "off": the text goes to diffusers as it is, weights included
        prompts.check_weights(prompt, "prompt")
        prompts.check_weights(negative_prompt, "negative_prompt")
    if params.prompt_weighting == "auto" and catalog.tokenizers:
        chunks = prompts.needs_chunked_encoding([styled, styled_negative], catalog.tokenizers)
    return RowText(
        prompt=styled,
        negative_prompt=styled_negative,
        lora=selection,
        param_lora=param_selection,
        prompt_chunks=chunks,
        watermark=params.watermark and catalog.watermarker is not None,
    )
