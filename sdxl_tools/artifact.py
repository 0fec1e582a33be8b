"""Building the artifact: stage SDXL components (safetensors only, shared ones once), save or log.

Staging takes each pipeline folder's components as listed in its ``model_index.json``, keeps
configs, tokenizer files and ``*.safetensors`` weights, refuses pickled weights, and stores the
refiner's ``text_encoder_2`` / ``tokenizer_2`` / ``vae`` only when they differ from the base's
(content hash). ``components.json`` (keys: ``model_pkg.pipelines.ManifestKey``) records what is
shared, every component's hash and where it came from. LoRA adapters (``--lora NAME=PATH``) and the
style table are staged beside the pipelines.

The weights are written once. Staging hard-links files where the filesystem allows it (else copies);
:func:`save_artifact` lets MLflow save the model with the staged folder's small files only, then puts
each weight file in place itself: moved when the staged file has no other name (a copy staging made,
or a file generated for this build), copied otherwise, so the model never shares a file with a user's
source folder (which may be rewritten in place later).

The MLflow model is models-from-code: ``model_pkg/model.py`` with ``model_pkg/`` as its only
``code_paths`` entry (this package is never shipped), the signature derived from
``model_pkg.contract``, requirements and an input example from ``MLmodel_template/``, and MLServer's
model settings with their runtime class (``deploy/mlserver/``, as the ``mlserver`` artifact).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

import model_pkg
from model_pkg.catalog import STYLES_FILE, load_styles
from model_pkg.config import load_model_config
from model_pkg.contract import ERROR_COLUMN, IMAGE_COLUMNS, ROW_FIELDS, GenerationParams
from model_pkg.pipelines import MANIFEST
from model_pkg.pipelines import ManifestKey as K

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "MLmodel_template"
RUNTIME = Path(model_pkg.__file__).resolve().parent  # the artifact's only code_paths entry
MODEL_FILE = RUNTIME / "model.py"
# model-settings.json + the MLServer runtime class: copied into every artifact (artifacts/mlserver/),
# where `mlserver start <model>` and KServe's MLServer find them
MLSERVER = ROOT / "deploy" / "mlserver"
LORA_DIR = "loras"
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PARAM_TYPES = {str: "string", int: "long", float: "double", bool: "boolean"}
SHAREABLE = ("text_encoder_2", "tokenizer_2", "vae")
# Shared, but its files (a few MB) also stay in the refiner folder: loading that folder by hand with
# only ``text_encoder_2=`` and ``vae=`` (the diffusers docs' way) would otherwise get a silently empty
# tokenizer from transformers 5 and fail at the first call. A missing text_encoder_2 / vae fails loudly.
KEEP_IN_REFINER = ("tokenizer_2",)
KEEP_SUFFIXES = (".json", ".txt", ".safetensors")
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
VARIANTS = ("all", "fp16", "fp32")


class BuildError(ValueError):
    """The source folders cannot be packaged; the message says what to fix."""


# -- the signature, derived from model_pkg.contract ----------------------------------------------


def _param_type(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return _PARAM_TYPES[type(typing.get_args(annotation)[0])]
    return _PARAM_TYPES[annotation]


def param_schema() -> ParamSchema:
    return ParamSchema(
        [
            ParamSpec(name, _param_type(field.annotation), field.default)
            for name, field in GenerationParams.model_fields.items()
        ]
    )


def signature() -> ModelSignature:
    inputs = Schema(
        [
            ColSpec("string", "prompt"),
            *(ColSpec("string", name, required=False) for name in IMAGE_COLUMNS),
            *(ColSpec(AnyType(), name, required=False) for name in ROW_FIELDS),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("string", "generated_image"),
            ColSpec("boolean", "nsfw_content_detected", required=False),
            ColSpec("long", "seed"),
            ColSpec("string", ERROR_COLUMN, required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=param_schema())


# -- LoRA adapters and the style table --------------------------------------------------------------


class LoraError(BuildError):
    """A LoRA source that cannot be packaged."""


def parse_build_arg(pair: str) -> tuple[str, Path]:
    """``NAME=PATH`` of ``build.py build --lora``."""
    name, sep, path = pair.partition("=")
    if not sep or not path:
        raise LoraError(f"--lora expects NAME=PATH, got {pair!r}")
    check_name(name)
    return name, Path(path)


def check_name(name: str) -> None:
    if not LORA_NAME.match(name):
        raise LoraError(f"LoRA name {name!r}: use letters, digits, '_', '-', '.' (no ':' or ',')")


def _weights_file(source: Path) -> Path:
    if source.is_file():
        if source.suffix != ".safetensors":
            raise LoraError(f"{source}: only .safetensors LoRA files are packaged (no pickled weights)")
        return source
    if not source.is_dir():
        raise LoraError(f"{source} does not exist")
    files = [p for p in source.rglob("*") if p.is_file()]
    pickled = [p for p in files if p.suffix in PICKLED_SUFFIXES]
    weights = [p for p in files if p.suffix == ".safetensors"]
    if not weights:
        hint = f" (found pickled {pickled[0].name}; convert it to safetensors)" if pickled else ""
        raise LoraError(f"{source} has no .safetensors LoRA weights{hint}")
    if len(weights) > 1:
        raise LoraError(f"{source} has {len(weights)} .safetensors files; pass the LoRA file itself")
    return weights[0]


def _check_lora_file(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # not a safetensors file at all
        raise LoraError(f"{path} is not a readable safetensors file ({e})") from None
    if not any("lora" in k.lower() for k in keys):
        raise LoraError(f"{path} holds no LoRA weights (no 'lora' keys); is it a full model?")


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stage_loras(loras: dict[str, Path], out: Path) -> dict[str, dict[str, str]]:
    """Copy each adapter's safetensors file under ``out/loras/NAME/``; the manifest entries."""
    manifest = {}
    for name, source in sorted(loras.items()):
        check_name(name)
        weights = _weights_file(Path(source))
        _check_lora_file(weights)
        target = out / LORA_DIR / name / weights.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(weights, target)
        manifest[name] = {"path": f"{LORA_DIR}/{name}", "weight_name": weights.name, "sha256": sha256(target)}
    return manifest


def stage_styles(out: Path, source: Path) -> str:
    """Copy the style table into the artifact folder; its manifest entry."""
    load_styles(source)  # a malformed table fails the build, not the first request
    (out / STYLES_FILE).write_bytes(Path(source).read_bytes())
    return STYLES_FILE


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
    sources: dict[str, str] | None = None,
) -> Staged:
    """Lay out the artifact's ``sdxl`` folder under ``out`` (which must not exist).

    ``components.json`` ``sources`` records each role's source folder; ``sources`` replaces entries
    whose folder is not the user's (e.g. random weights generated for this build and deleted after it).

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
                shared.append(name)  # identical to the base's: loaded once, stored once (weights)
                if name not in KEEP_IN_REFINER:
                    continue
            else:
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
    lora_entries = stage_loras(loras or {}, out)
    manifest = {
        K.STYLES: stage_styles(out, TEMPLATE / STYLES_FILE),
        K.LORAS: lora_entries,
        K.BASE: "base",
        K.REFINER: "refiner",
        K.SAFETY_CHECKER: "safety_checker" if safety_checker is not None else None,
        K.SHARED: shared,
        K.HASHES: hashes,
        K.SOURCES: {"base": str(base.resolve()), "refiner": str(refiner.resolve())}
        | ({"safety_checker": str(Path(safety_checker).resolve())} if safety_checker else {})
        | ({"vae": str(Path(vae).resolve())} if vae else {})
        | (sources or {}),
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
    has_checker = staged.manifest[K.SAFETY_CHECKER] is not None
    card["safety_checker"] = (
        "packaged: nsfw_content_detected is true/false; flagged images are blacked out unless safety_filter=false"
        if has_checker
        else "none: nsfw_content_detected is null (nothing is checked); use a content-safety service"
    )
    card["styles"] = {"version": styles_version(staged), "names": sorted(styles_names(staged))}
    card["loras"] = {name: entry["sha256"] for name, entry in (staged.manifest.get(K.LORAS) or {}).items()}
    card["components"] = {
        "shared_by_base_and_refiner": staged.manifest[K.SHARED],
        "sha256": staged.manifest[K.HASHES],
        "sources": staged.manifest[K.SOURCES],
    }
    return card


def styles_version(staged: Staged) -> str:
    return load_styles(staged.folder / STYLES_FILE).version


def styles_names(staged: Staged) -> list[str]:
    return load_styles(staged.folder / STYLES_FILE).names()


def _model_kwargs(staged: Staged, model_config: dict[str, Any] | None, folder: Path | None = None) -> dict[str, Any]:
    return dict(
        python_model=str(MODEL_FILE),
        artifacts={"sdxl": str(folder or staged.folder), "mlserver": str(MLSERVER)},
        code_paths=[str(RUNTIME)],  # the runtime package only: tools stay home
        signature=signature(),
        input_example=input_example(),
        pip_requirements=requirements(),
        # every key, defaults included: MLflow lets load_model/spark_udf(model_config=...) override
        # only keys already stored, and ignores all overrides when none is stored
        model_config=load_model_config(model_config, environ={}).model_dump(mode="json"),
        metadata=model_card(staged),
    )


WEIGHTS = ".safetensors"


def save_artifact(
    staged: Staged, output: Path, model_config: dict[str, Any] | None = None, move_weights: bool = False
) -> Path:
    """Write a model directory that ``mlflow.pyfunc.load_model(output)`` loads, writing each weight once.

    MLflow copies its artifacts; so it gets a skeleton of the staged folder (everything but the
    ``*.safetensors`` files, hard-linked) and the weights are then put in place here. ``move_weights``
    moves staged weight files that have no other name (copies staging made, files generated for this
    build whose source folder is gone): a rename when the staged folder is on the output's filesystem,
    and the staged folder is spent. Every other weight file is copied.
    """
    output = Path(output)
    output.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sdxl-skeleton-", dir=output.resolve().parent) as tmp:
        skeleton = Path(tmp) / staged.folder.name
        for path in sorted(staged.folder.rglob("*")):
            if path.is_file() and path.suffix != WEIGHTS:
                _place(path, skeleton / path.relative_to(staged.folder))
        mlflow.pyfunc.save_model(path=str(output), **_model_kwargs(staged, model_config, folder=skeleton))
    try:
        _put_weights(staged.folder, output, move_weights)
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)  # no half-written model
        raise
    return output


def _put_weights(staged: Path, output: Path, move: bool) -> None:
    """Put the staged ``*.safetensors`` files into the saved model's ``sdxl`` artifact folder."""
    model = Model.load(str(output))
    entry = model.flavors["python_function"]["artifacts"]["sdxl"]
    entry["uri"] = str(staged)  # where it was built from, not the deleted skeleton
    folder = output / entry["path"]
    weight_bytes = 0
    for path in sorted(staged.rglob(f"*{WEIGHTS}")):
        target = folder / path.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        weight_bytes += path.stat().st_size
        if move and path.stat().st_nlink == 1:
            shutil.move(path, target)  # os.rename on one filesystem: no bytes written
        else:
            shutil.copy2(path, target)  # never a link to a user's file
    model.model_size_bytes = (model.model_size_bytes or 0) + weight_bytes  # MLflow counted the skeleton
    model.save(str(output / MLMODEL_FILE_NAME))


def log_artifact(
    staged: Staged, name: str = "sdxl", model_config: dict[str, Any] | None = None, **log_kwargs: Any
) -> mlflow.models.model.ModelInfo:
    """Log to the active tracking URI (MLflow validates the input example by scoring it once).

    ``log_kwargs`` go to ``mlflow.pyfunc.log_model`` and override the defaults (e.g. ``signature``).
    """
    return mlflow.pyfunc.log_model(name=name, **(_model_kwargs(staged, model_config) | log_kwargs))
