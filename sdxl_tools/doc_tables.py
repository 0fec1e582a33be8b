"""The reference tables of the docs, rendered from the runtime's pydantic declarations.

``docs/contract.md`` lists every generation param and ``docs/limits.md`` every model-config key, each
between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``. Name, type, default,
allowed values and meaning come from :class:`~model_pkg.contract.GenerationParams` and
:class:`~model_pkg.config.ModelConfig` (``Field`` defaults, constraints, ``Literal`` choices and
descriptions), so a param added in code appears in the docs by ``sdxl-pyfunc template``, and the tests
fail while the docs lag behind.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from model_pkg.config import ModelConfig
from model_pkg.contract import ASPECT_RATIOS, GenerationParams
from model_pkg.schedulers import scheduler_names

_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _code(value: object) -> str:
    return f"`{value}`"


def _type(annotation: object) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return _TYPE_NAMES[type(args[0])]
    if origin in (typing.Union, types.UnionType):  # `float | None`
        return " or ".join("null" if a is type(None) else _type(a) for a in args)
    if origin is tuple:
        return f"list of {_type(args[0])}"
    return _TYPE_NAMES[annotation]


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ", ".join(value)
    return '""' if value == "" else _code(value)


def _interval(field: FieldInfo) -> str:
    """``[0, 1)``-style bounds from the field's ``ge``/``gt``/``le``/``lt`` constraints ("" if none)."""
    bound = {key: getattr(c, key) for c in field.metadata for key in ("ge", "gt", "le", "lt") if hasattr(c, key)}
    num = {key: str(v) if isinstance(v, int) else f"{v:g}" for key, v in bound.items()}
    low = f"[{num['ge']}" if "ge" in num else f"({num['gt']}" if "gt" in num else ""
    high = f"{num['le']}]" if "le" in num else f"{num['lt']})" if "lt" in num else ""
    if low and high:
        return f"{low}, {high}"
    if low:
        return ("≥ " if "ge" in num else "> ") + low[1:]
    if high:
        return ("≤ " if "le" in num else "< ") + high[:-1]
    return ""


def _values(name: str, field: FieldInfo) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        choices = [c for c in typing.get_args(annotation) if c != ""]
        if name == "aspect_ratio":
            return ", ".join(f"`{c}` {w}×{h}" for c, (w, h) in ASPECT_RATIOS.items())
        return ", ".join(_code(c) for c in choices)
    if name == "scheduler":  # a str checked by a validator against the scheduler table
        return ", ".join(_code(s) for s in scheduler_names()) + "; any case"
    if annotation is bool:
        return "true, false"
    if name == "image_formats":
        return "Pillow format names"
    return _interval(field) or ("text" if annotation is str else "")


def table(model: type[BaseModel], first: str) -> str:
    """One markdown row per field of ``model``, in declaration order."""
    rows = [f"| {first} | type | default | values | meaning |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        cells = (f"`{name}`", _type(field.annotation), _default(field), _values(name, field), meaning)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# (doc page, block name) -> its table
TABLES = {
    ("contract.md", "params"): lambda: table(GenerationParams, "param"),
    ("limits.md", "model_config"): lambda: table(ModelConfig, "key"),
}


def render(text: str, name: str, body: str) -> str:
    """``text`` with the block ``name`` replaced by ``body``; a page without the block is an error."""
    pattern = re.compile(
        rf"(<!-- BEGIN generated: {re.escape(name)} .*?-->\n).*?(\n<!-- END generated: {re.escape(name)} -->)", re.S
    )
    if not pattern.search(text):
        raise ValueError(f"no generated block {name!r}")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def rendered_docs(docs: Path) -> dict[Path, str]:
    """Each page that holds generated tables, as it should read."""
    pages: dict[Path, str] = {}
    for (page, name), make in TABLES.items():
        path = docs / page
        pages[path] = render(pages.get(path) or path.read_text(), name, make())
    return pages
