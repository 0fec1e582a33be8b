"""Loading SDXL base + refiner (+ optional safety checker) from the artifact, once per process.

The artifact folder holds ``components.json`` (written by ``packaging.py``), ``base/``,
``refiner/`` (without the components it shares with the base) and optionally ``safety_checker/``.
Shared modules are loaded once and handed to the refiner, so they are the same objects.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from model_pkg.config import ModelConfig
from model_pkg.performance import apply_options
from model_pkg.safety import SafetyChecker
from model_pkg.schedulers import make_scheduler

MANIFEST = "components.json"


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers 0.42 warns "modules ... should be kept in float32: []" on every VAE dtype cast
    (the img2img pipeline casts it in every call), even when the list is empty. Drop only that case."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_FP32_FILTER = _NoEmptyFp32Warning()
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Pipelines:
    """The loaded pipelines. Never mutated per call: :func:`call_view` gives each call its own copy."""

    base: StableDiffusionXLPipeline
    refiner: StableDiffusionXLImg2ImgPipeline
    safety_checker: SafetyChecker | None
    device: torch.device
    dtype: torch.dtype


def choose_device_dtype(config: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA in float16 when available, else CPU in float32."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if config.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, DTYPES[config.dtype]


def weights_variant(folder: Path, dtype: torch.dtype) -> str | None:
    """``fp16`` when the folder has fp16 weight files and we run in half precision (or it has only those)."""
    names = [p.name for p in folder.rglob("*.safetensors")]
    has_fp16 = any(".fp16." in n for n in names)
    has_full = any(".fp16." not in n for n in names)
    return "fp16" if has_fp16 and (dtype == torch.float16 or not has_full) else None


def _from_pretrained(cls: type[DiffusionPipeline], folder: Path, dtype: torch.dtype, **components: Any):
    return cls.from_pretrained(
        folder,
        dtype=dtype,
        variant=weights_variant(folder, dtype),
        use_safetensors=True,  # never unpickle weights
        local_files_only=True,  # never reach a hub
        add_watermarker=False,
        **components,
    )


def load_pipelines(root: str | Path, config: ModelConfig) -> Pipelines:
    """Load the artifact's pipelines onto the configured device."""
    root = Path(root)
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_FP32_FILTER)  # idempotent
    manifest = json.loads((root / MANIFEST).read_text())
    device, dtype = choose_device_dtype(config)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)

    base = _from_pretrained(StableDiffusionXLPipeline, root / manifest["base"], dtype)
    shared = {name: getattr(base, name) for name in manifest["shared"]}
    refiner = _from_pretrained(StableDiffusionXLImg2ImgPipeline, root / manifest["refiner"], dtype, **shared)
    apply_options(base, refiner, config, device)  # device placement, attention, compile, ...
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    checker = None
    if manifest.get("safety_checker"):
        checker = SafetyChecker.load(root / manifest["safety_checker"], device, dtype)
    return Pipelines(base=base, refiner=refiner, safety_checker=checker, device=device, dtype=dtype)


def call_view(pipe: DiffusionPipeline, scheduler: str, timestep_spacing: str) -> DiffusionPipeline:
    """A per-call view of ``pipe``: the same modules, its own scheduler and per-call attributes.

    Pipelines store call state on themselves (scheduler step index, ``_guidance_scale``, ...);
    a shallow copy keeps concurrent calls from sharing it without copying any weights.
    """
    view = copy.copy(pipe)
    view.scheduler = make_scheduler(pipe.scheduler, scheduler, timestep_spacing)
    return view
