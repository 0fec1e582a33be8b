"""Staging the artifact's ``sdxl`` folder: SDXL components (safetensors only, shared ones once),
LoRA adapters and the style table.

Staging takes each pipeline folder's components as listed in its ``model_index.json``, keeps
configs, tokenizer files and ``*.safetensors`` weights, refuses pickled weights, and stores the
refiner's ``text_encoder_2`` / ``tokenizer_2`` / ``vae`` only when they differ from the base's
(content hash). ``components.json`` (keys: ``model_pkg.pipelines.ManifestKey``) records what is
shared, every component's hash and where it came from. LoRA adapters (``--lora NAME=PATH``) and the
style table are staged beside the pipelines. Files are hard-linked where the filesystem allows it
(else copied); :mod:`sdxl_tools.artifact` saves the staged folder as the MLflow model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_pkg.catalog import STYLES_FILE, load_styles
from model_pkg.pipelines import MANIFEST
from model_pkg.pipelines import ManifestKey as K
from model_pkg.weights import component_digest, file_sha256
from sdxl_tools import TEMPLATE, VARIANTS
from sdxl_tools.files import FILE_MODE, byte_bar, link_or_copy, make_dirs

LORA_DIR = "loras"
CONTROLNET_DIR = "controlnets"
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SHAREABLE = ("text_encoder_2", "tokenizer_2", "vae")
# Shared, but its files (a few MB) also stay in the refiner folder: loading that folder by hand with
# only ``text_encoder_2=`` and ``vae=`` (the diffusers docs' way) would otherwise get a silently empty
# tokenizer from transformers 5 and fail at the first call. A missing text_encoder_2 / vae fails loudly.
KEEP_IN_REFINER = ("tokenizer_2",)
KEEP_SUFFIXES = (".json", ".txt", ".safetensors")
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


class BuildError(ValueError):
    """The source folders cannot be packaged; the message says what to fix."""


class LoraError(BuildError):
    """A LoRA source that cannot be packaged."""


def parse_build_arg(pair: str, flag: str = "--lora") -> tuple[str, Path]:
    """``NAME=PATH`` of ``build.py build --lora`` / ``--controlnet``."""
    name, sep, path = pair.partition("=")
    if not sep or not path:
        raise LoraError(f"{flag} expects NAME=PATH, got {pair!r}")
    check_name(name, flag)
    return name, Path(path)


def check_name(name: str, flag: str = "--lora") -> None:
    if not LORA_NAME.match(name):
        what = "LoRA" if flag == "--lora" else "ControlNet"
        raise LoraError(f"{what} name {name!r}: use letters, digits, '_', '-', '.' (no ':' or ',')")


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


Records = dict[str, dict[str, dict[str, Any]]]  # component folder -> file -> {"sha256", "size"}


def stage_loras(loras: dict[str, Path], out: Path) -> tuple[dict[str, dict[str, str]], Records]:
    """Copy each adapter's safetensors file under ``out/loras/NAME/``; the manifest entries and file records."""
    manifest, records = {}, {}
    for name, source in sorted(loras.items()):
        check_name(name)
        weights = _weights_file(Path(source))
        _check_lora_file(weights)
        target = out / LORA_DIR / name / weights.name
        link_or_copy(weights, target)
        path = f"{LORA_DIR}/{name}"
        records[path] = _records([target], target.parent, path)
        manifest[name] = {"path": path, "weight_name": weights.name, "sha256": records[path][weights.name]["sha256"]}
    return manifest, records


def stage_controlnets(
    controlnets: dict[str, Path], out: Path, variant: str
) -> tuple[dict[str, dict[str, str]], Records]:
    """Copy each diffusers ``ControlNetModel`` folder (config + safetensors) under ``out/controlnets/NAME/``;
    the manifest entries (folder and sha256 of its files) and file records."""
    manifest, records = {}, {}
    for name, source in sorted(controlnets.items()):
        check_name(name, "--controlnet")
        source = Path(source)
        config = source / "config.json"
        if not config.is_file() or json.loads(config.read_text()).get("_class_name") != "ControlNetModel":
            raise BuildError(f"--controlnet {name}: {source} is not a diffusers ControlNetModel folder (config.json)")
        files = _select_files(source, variant)  # refuses pickled-only weights
        if not any(f.suffix == ".safetensors" for f in files):
            raise BuildError(f"--controlnet {name}: {source} has no safetensors weights")
        for f in files:
            link_or_copy(f, out / CONTROLNET_DIR / name / f.relative_to(source))
        path = f"{CONTROLNET_DIR}/{name}"
        records[path] = _records(files, source, path)
        manifest[name] = {"path": path, "sha256": _hash(records[path])}
    return manifest, records


def stage_styles(out: Path, source: Path) -> str:
    """Copy the style table into the artifact folder; its manifest entry."""
    load_styles(source)  # a malformed table fails the build, not the first request
    make_dirs(out)
    (out / STYLES_FILE).write_bytes(Path(source).read_bytes())
    (out / STYLES_FILE).chmod(FILE_MODE)
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


def _records(files: list[Path], root: Path, label: str) -> dict[str, dict[str, Any]]:
    """What ``verify_weights`` checks later: each file's sha256 and size, by path in its component."""
    records: dict[str, dict[str, Any]] = {}
    with byte_bar(sum(p.stat().st_size for p in files), f"hashing {label}") as bar:
        for p in sorted(files):
            records[str(p.relative_to(root))] = record = {"sha256": file_sha256(p), "size": p.stat().st_size}
            bar.update(record["size"])
    return records


def _hash(records: dict[str, dict[str, Any]]) -> str:
    return component_digest({name: record["sha256"] for name, record in records.items()})


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
    controlnets: dict[str, Path] | None = None,
) -> Staged:
    """Lay out the artifact's ``sdxl`` folder under ``out`` (which must not exist).

    ``components.json`` ``sources`` records each role's source folder; ``sources`` replaces entries
    whose folder is not the user's (e.g. random weights generated for this build and deleted after it).

    ``loras`` (name → safetensors file or folder) are packaged under ``loras/``; the style table
    ``MLmodel_template/styles.json`` is always copied in. ``controlnets`` (name → diffusers ControlNetModel
    folder) are packaged under ``controlnets/``, each once.

    ``vae`` replaces the VAE of both pipelines (e.g. an fp16-fixed SDXL VAE, whose config needs no
    float32 upcast); it is stored once and shared.
    """
    if variant not in VARIANTS:
        raise BuildError(f"variant must be one of {VARIANTS}")
    base, refiner, out = Path(base), Path(refiner), Path(out)
    hashes: dict[str, str] = {}
    records: Records = {}
    shared: list[str] = []
    pipelines = {  # validated before anything is written
        "base": (base, _components(base, "StableDiffusionXLPipeline")),
        "refiner": (refiner, _components(refiner, "StableDiffusionXLImg2ImgPipeline")),
    }
    for role, (src, components) in pipelines.items():
        link_or_copy(src / "model_index.json", out / role / "model_index.json")
        for name in components:
            folder = Path(vae) if vae is not None and name == "vae" else src / name
            files = _select_files(folder, variant)
            component = _records(files, folder, f"{role}/{name}")
            digest = _hash(component)
            if role == "refiner" and name in SHAREABLE and hashes.get(f"base/{name}") == digest:
                shared.append(name)  # identical to the base's: loaded once, stored once (weights)
                if name not in KEEP_IN_REFINER:
                    continue
            else:
                hashes[f"{role}/{name}"] = digest
            records[f"{role}/{name}"] = component
            for f in files:
                link_or_copy(f, out / role / name / f.relative_to(folder))
    if safety_checker is not None:
        files = _select_files(Path(safety_checker), variant)
        if not any(f.suffix == ".safetensors" for f in files):
            raise BuildError(f"{safety_checker} has no safetensors weights")
        records["safety_checker"] = _records(files, Path(safety_checker), "safety_checker")
        hashes["safety_checker"] = _hash(records["safety_checker"])
        for f in files:
            link_or_copy(f, out / "safety_checker" / f.relative_to(safety_checker))
    lora_entries, lora_records = stage_loras(loras or {}, out)
    controlnet_entries, controlnet_records = stage_controlnets(controlnets or {}, out, variant)
    records |= lora_records | controlnet_records
    hashes |= {entry["path"]: entry["sha256"] for entry in controlnet_entries.values()}  # keyed by folder, as records
    manifest = {
        K.CONTROLNETS: controlnet_entries,
        K.STYLES: stage_styles(out, TEMPLATE / STYLES_FILE),
        K.LORAS: lora_entries,
        K.BASE: "base",
        K.REFINER: "refiner",
        K.SAFETY_CHECKER: "safety_checker" if safety_checker is not None else None,
        K.SHARED: shared,
        K.HASHES: hashes,
        K.FILES: records,
        K.SOURCES: {"base": str(base.resolve()), "refiner": str(refiner.resolve())}
        | ({"safety_checker": str(Path(safety_checker).resolve())} if safety_checker else {})
        | ({"vae": str(Path(vae).resolve())} if vae else {})
        | {f"{CONTROLNET_DIR}/{name}": str(Path(src).resolve()) for name, src in (controlnets or {}).items()}
        | (sources or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / MANIFEST).chmod(FILE_MODE)
    return Staged(out, manifest)
