"""Building the artifact: stage SDXL components (safetensors only, shared ones once), save or log.

Staging takes each pipeline folder's components as listed in its ``model_index.json``, keeps
configs, tokenizer files and ``*.safetensors`` weights, refuses pickled weights, and stores the
refiner's ``text_encoder_2`` / ``tokenizer_2`` / ``vae`` only when they differ from the base's
(content hash). ``components.json`` records what is shared and every component's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml

from model_pkg.catalog import stage_styles
from model_pkg.config import load_model_config
from model_pkg.contract import signature
from model_pkg.lora import LoraError, stage_loras
from model_pkg.pipelines import MANIFEST
from model_pkg.styles import STYLES_FILE, load_styles

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "MLmodel_template"
MODEL_FILE = Path(__file__).resolve().parent / "model.py"
SHAREABLE = ("text_encoder_2", "tokenizer_2", "vae")
KEEP_SUFFIXES = (".json", ".txt", ".safetensors")
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
VARIANTS = ("all", "fp16", "fp32")


class BuildError(ValueError):
    """The source folders cannot be packaged; the message says what to fix."""


@dataclass(frozen=True)
class Staged:
    folder: Path
    manifest: dict[str, Any]


def _select_files(component: Path, variant: str) -> list[Path]:
    files = sorted(p for p in component.rglob("*") if p.is_file())
    pickled = [p for p in files if p.suffix in PICKLED_SUFFIXES]
    weights = [p for p in files if p.suffix == ".safetensors"]
    if pickled and not weights:
        raise BuildError(f"{component} has only pickled weights ({pickled[0].name}); convert them to safetensors first")
    half = [p for p in weights if ".fp16." in p.name]
    full = [p for p in weights if ".fp16." not in p.name]
    if variant == "fp16" and half:
        weights = half
    elif variant == "fp32" and full:
        weights = full
    configs = [p for p in files if p.suffix in KEEP_SUFFIXES and p.suffix != ".safetensors"]
    return configs + weights


def _hash(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _place(src: Path, dst: Path) -> None:
    """Hard-link when possible (no extra disk for multi-GB weights), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _components(pipeline_dir: Path, expected_class: str) -> list[str]:
    index_file = pipeline_dir / "model_index.json"
    if not index_file.is_file():
        raise BuildError(f"{pipeline_dir} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    if index.get("_class_name") != expected_class:
        raise BuildError(f"{pipeline_dir} holds a {index.get('_class_name')}, expected {expected_class}")
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]


def stage_components(
    base: Path,
    refiner: Path,
    out: Path,
    safety_checker: Path | None = None,
    variant: str = "all",
    vae: Path | None = None,
    loras: dict[str, Path] | None = None,
) -> Staged:
    """Lay out the artifact's ``sdxl`` folder under ``out`` (which must not exist).

    ``loras`` (name → safetensors file or folder) are packaged under ``loras/``; the style table
    ``MLmodel_template/styles.json`` is always copied in.

    ``vae`` replaces the VAE of both pipelines (e.g. an fp16-fixed SDXL VAE, whose config needs no
    float32 upcast); it is stored once and shared.
    """
    if variant not in VARIANTS:
        raise BuildError(f"variant must be one of {VARIANTS}")
    base, refiner, out = Path(base), Path(refiner), Path(out)
    hashes: dict[str, str] = {}
    shared: list[str] = []
    pipelines = {  # validated before anything is written
        "base": (base, _components(base, "StableDiffusionXLPipeline")),
        "refiner": (refiner, _components(refiner, "StableDiffusionXLImg2ImgPipeline")),
    }
    for role, (src, components) in pipelines.items():
        _place(src / "model_index.json", out / role / "model_index.json")
        for name in components:
            folder = Path(vae) if vae is not None and name == "vae" else src / name
            files = _select_files(folder, variant)
            digest = _hash(files, folder)
            if role == "refiner" and name in SHAREABLE and hashes.get(f"base/{name}") == digest:
                shared.append(name)  # identical to the base's: stored and loaded once
                continue
            hashes[f"{role}/{name}"] = digest
            for f in files:
                _place(f, out / role / name / f.relative_to(folder))
    if safety_checker is not None:
        files = _select_files(Path(safety_checker), variant)
        if not any(f.suffix == ".safetensors" for f in files):
            raise BuildError(f"{safety_checker} has no safetensors weights")
        hashes["safety_checker"] = _hash(files, Path(safety_checker))
        for f in files:
            _place(f, out / "safety_checker" / f.relative_to(safety_checker))
    try:
        lora_entries = stage_loras(loras or {}, out)
    except LoraError as e:
        raise BuildError(str(e)) from None
    manifest = {
        "styles": stage_styles(out, TEMPLATE / STYLES_FILE),
        "loras": lora_entries,
        "base": "base",
        "refiner": "refiner",
        "safety_checker": "safety_checker" if safety_checker is not None else None,
        "shared": shared,
        "hashes": hashes,
        "sources": {"base": str(base.resolve()), "refiner": str(refiner.resolve())}
        | ({"safety_checker": str(Path(safety_checker).resolve())} if safety_checker else {})
        | ({"vae": str(Path(vae).resolve())} if vae else {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Staged(out, manifest)


def requirements() -> list[str]:
    lines = (TEMPLATE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def input_example() -> tuple[pd.DataFrame, dict[str, Any]]:
    """The Azure row shape (``prompt``, ``image``) with small params, so validating it is cheap."""
    example = json.loads((TEMPLATE / "input_example.json").read_text())
    return pd.DataFrame(example["data"], columns=example["columns"]), example["params"]


def model_card(staged: Staged) -> dict[str, Any]:
    """MLmodel ``metadata``: the static model card plus this build's provenance."""
    card = yaml.safe_load((TEMPLATE / "model_card.yaml").read_text())
    has_checker = staged.manifest["safety_checker"] is not None
    card["safety_checker"] = (
        "packaged: nsfw_content_detected is true/false; flagged images are blacked out unless safety_filter=false"
        if has_checker
        else "none: nsfw_content_detected is null (nothing is checked); use a content-safety service"
    )
    card["styles"] = {"version": styles_version(staged), "names": sorted(styles_names(staged))}
    card["loras"] = {name: entry["sha256"] for name, entry in (staged.manifest.get("loras") or {}).items()}
    card["components"] = {
        "shared_by_base_and_refiner": staged.manifest["shared"],
        "sha256": staged.manifest["hashes"],
        "sources": staged.manifest["sources"],
    }
    return card


def styles_version(staged: Staged) -> str:
    return load_styles(staged.folder / STYLES_FILE).version


def styles_names(staged: Staged) -> list[str]:
    return load_styles(staged.folder / STYLES_FILE).names()


def _model_kwargs(staged: Staged, model_config: dict[str, Any] | None) -> dict[str, Any]:
    return dict(
        python_model=str(MODEL_FILE),
        artifacts={"sdxl": str(staged.folder)},
        code_paths=[str(MODEL_FILE.parent)],
        signature=signature(),
        input_example=input_example(),
        pip_requirements=requirements(),
        # every key, defaults included: MLflow lets load_model/spark_udf(model_config=...) override
        # only keys already stored, and ignores all overrides when none is stored
        model_config=load_model_config(model_config, environ={}).model_dump(mode="json"),
        metadata=model_card(staged),
    )


def save_artifact(staged: Staged, output: Path, model_config: dict[str, Any] | None = None) -> Path:
    """Write a model directory that ``mlflow.pyfunc.load_model(output)`` loads."""
    mlflow.pyfunc.save_model(path=str(output), **_model_kwargs(staged, model_config))
    return Path(output)


def log_artifact(
    staged: Staged, name: str = "sdxl", model_config: dict[str, Any] | None = None, **log_kwargs: Any
) -> mlflow.models.model.ModelInfo:
    """Log to the active tracking URI (MLflow validates the input example by scoring it once).

    ``log_kwargs`` go to ``mlflow.pyfunc.log_model`` and override the defaults (e.g. ``signature``).
    """
    return mlflow.pyfunc.log_model(name=name, **(_model_kwargs(staged, model_config) | log_kwargs))
