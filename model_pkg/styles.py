"""Style presets: named prompt / negative-prompt templates (the SDXL presets of seeds 000 and 004).

The table is ``MLmodel_template/styles.json`` (with a ``version``), copied into the artifact when it
is built, so a deployed model always uses the table it was built and tested with. A style is applied
to the prompt text before it is encoded; the ``prompt`` column of the output stays the user's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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
