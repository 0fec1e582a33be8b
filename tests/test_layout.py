"""The layout's one rule: the runtime (``model_pkg``, shipped in the artifact) never imports the tools
(``sdxl_tools``), pyspark, argparse or registry clients; and the artifact carries exactly the runtime."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import model_pkg

RUNTIME = Path(model_pkg.__file__).parent
# What the runtime may not import: the tools, Spark, CLIs, registry clients.
FORBIDDEN = ("sdxl_tools", "pyspark", "argparse", "mlflow.tracking", "mlflow.client", "mlflow.MlflowClient")
RUNTIME_MODULES = {
    "__init__.py",
    "azure_request.py",
    "catalog.py",
    "config.py",
    "contract.py",
    "controlnet.py",
    "generation.py",
    "images.py",
    "lora.py",
    "masks.py",
    "metadata.py",
    "model.py",
    "pipelines.py",
    "plan.py",
    "prompts.py",
    "request.py",
    "safety.py",
    "schedulers.py",
    "spark_nulls.py",
    "spec.py",
    "weights.py",
}
# 2,519 + 33 (the Spark task GPU choice) + 58 (unknown-column refusal, Azure nesting/columns checks,
# cheap-first parsing and the prompt budget, escaped PNG text) + 78 (request_timeout_s: calibration,
# up-front refusal, stop between steps) + 220 (ControlNet 192, mask_source 28) + 80 (the weight-file
# check at load: weights.py 73, config/pipelines 7) + 5 (verify_weights reports each file done: a progress bar)
MAX_RUNTIME_LINES = 2995


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` / ``from ... import`` statement names, at any depth (also in functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def forbidden_imports(source: str) -> set[str]:
    return {m for m in imported_modules(source) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}


@pytest.mark.parametrize("path", sorted(RUNTIME.glob("*.py")), ids=lambda p: p.name)
def test_runtime_never_imports_tools_spark_or_clis(path):
    assert forbidden_imports(path.read_text()) == set()


def test_the_layering_check_can_fail():
    """The check sees imports anywhere in a module, including lazy ones inside functions."""
    source = "import os\n\ndef f():\n    from sdxl_tools.batch import run\n    import pyspark.sql\n"
    assert forbidden_imports(source) == {"sdxl_tools.batch", "sdxl_tools.batch.run", "pyspark.sql"}
    assert forbidden_imports("from mlflow import MlflowClient\n") == {"mlflow.MlflowClient"}


def test_runtime_is_the_expected_modules_and_fits_the_budget():
    assert {p.name for p in RUNTIME.glob("*.py")} == RUNTIME_MODULES
    lines = sum(len(p.read_text().splitlines()) for p in RUNTIME.glob("*.py"))
    assert lines <= MAX_RUNTIME_LINES, f"the runtime has {lines} lines"


def test_the_artifact_carries_exactly_the_runtime(artifact):
    """``code/`` holds model_pkg's modules and nothing else: no packaging, registry, batch or Spark code."""
    code = artifact / "code"
    shipped = {str(p.relative_to(code)) for p in code.rglob("*.py")}
    assert shipped == {f"model_pkg/{name}" for name in RUNTIME_MODULES}
    assert not [p for p in code.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
