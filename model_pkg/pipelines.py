"""Loading SDXL base + refiner (+ optional safety checker) from the artifact, once per process.

The artifact folder holds ``components.json`` (:data:`MANIFEST`, keys :class:`ManifestKey`, written
by ``sdxl_tools.artifact``), ``base/``, ``refiner/`` (without the components it shares with the
base) and optionally ``safety_checker/``, ``styles.json`` and ``loras/``. Shared modules are loaded
once and handed to the refiner, so they are the same objects.

Speed and memory options are applied once here, from the model config. Every option is plain
diffusers/PyTorch, and all but compile's speed-up can be exercised on a CPU: SDPA attention
(diffusers' default ``AttnProcessor2_0``), ``channels_last``, ``torch.compile`` of the UNets (and the
VAE decoder) with a warm-up generation, VAE slicing/tiling, model CPU offload. float16 safety of the
SDXL VAE is diffusers' own: a VAE whose config says ``force_upcast`` is run in float32 for
encode/decode; an fp16-fixed VAE (``build.py build --vae DIR``) says it needn't be.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.attention_processor import AttnProcessor

from model_pkg.catalog import Catalog, load_catalog
from model_pkg.config import ModelConfig
from model_pkg.controlnet import load_controlnets
from model_pkg.safety import SafetyChecker
from model_pkg.schedulers import make_scheduler
from model_pkg.weights import verify_weights

MANIFEST = "components.json"


class ManifestKey(StrEnum):
    """The keys of ``components.json``: what the artifact holds, where, and its provenance."""

    BASE = "base"  # folder of the base pipeline
    REFINER = "refiner"  # folder of the refiner pipeline (without the shared components)
    SHARED = "shared"  # refiner components loaded from the base: text_encoder_2, tokenizer_2, vae
    SAFETY_CHECKER = "safety_checker"  # folder, or null
    STYLES = "styles"  # style table file, or null
    LORAS = "loras"  # adapter name -> {"path", "weight_name", "sha256"}
    CONTROLNETS = "controlnets"  # ControlNet name -> {"path" (a diffusers ControlNetModel folder), "sha256"}
    HASHES = "hashes"  # component -> sha256 of its files (identity of the weights)
    FILES = "files"  # component folder -> {file: {"sha256", "size"}}: what verify_weights checks
    SOURCES = "sources"  # role -> the folder it was built from


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers 0.42 warns "modules ... should be kept in float32: []" on every VAE dtype cast
    (the img2img pipeline casts it in every call), even when the list is empty. Drop only that case."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_FP32_FILTER = _NoEmptyFp32Warning()
logger = logging.getLogger(__name__)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Pipelines:
    """The loaded pipelines. Never mutated per call: :func:`call_view` gives each call its own copy."""

    base: StableDiffusionXLPipeline
    refiner: StableDiffusionXLImg2ImgPipeline
    safety_checker: SafetyChecker | None
    device: torch.device
    dtype: torch.dtype
    catalog: Catalog | None = None  # styles, LoRA adapters (loaded into base), watermarker, model hash
    inpaint: StableDiffusionXLInpaintPipeline | None = None  # over the base's modules
    refiner_inpaint: StableDiffusionXLInpaintPipeline | None = None  # over the refiner's modules
    controlnets: dict[str, Any] = field(default_factory=dict)  # name → ControlNetModel (model_pkg.controlnet)


# CPU features (``torch.cpu.get_capabilities()`` keys) that run bfloat16 matrix maths in hardware:
# x86 AVX512-BF16 and AMX-BF16, Arm BF16 (and SVE-BF16). Without them bfloat16 is emulated: slower than float32.
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_capabilities() -> Mapping[str, Any]:
    """What torch detected about this CPU at run time (empty where torch has no probe)."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    return probe() if probe is not None else {}


def native_bf16(capabilities: Mapping[str, Any]) -> list[str]:
    """The features in ``capabilities`` that make bfloat16 native on this CPU (none: emulated)."""
    return [name for name in BF16_CPU_FEATURES if capabilities.get(name) is True]


def resolve_dtype(setting: str, device: torch.device, cpu_bf16: bool) -> torch.dtype:
    """The dtype the pipelines run in. An explicit ``setting`` wins; ``auto`` picks float16 on CUDA,
    bfloat16 on a CPU with native bfloat16 (``cpu_bf16``: half the memory of float32 and 1.6–3× faster
    per SDXL UNet step), float32 elsewhere (other CPUs, MPS; emulated bfloat16 is slower)."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16 else torch.float32


def task_gpus() -> list[str]:
    """The GPU addresses Spark gave the running task, via an already imported pyspark (never imported here)."""
    task = getattr(sys.modules.get("pyspark"), "TaskContext", None)
    context = task.get() if task else None  # None outside a task
    gpu = context.resources().get("gpu") if context else None
    return list(gpu.addresses) if gpu else []


def decide_device(setting: str, cuda_count: int, gpus: list[str], visible: str | None) -> tuple[str, str]:
    """(device, why). ``auto`` in a Spark task with GPUs: its first GPU address as a CUDA ordinal, or
    that address's position in ``CUDA_VISIBLE_DEVICES`` when the executor sees a subset."""
    if setting != "auto" or cuda_count == 0 or not gpus:
        why = "configured" if setting != "auto" else "CUDA available" if cuda_count else "no CUDA device"
        chosen = setting if setting != "auto" else "cuda" if cuda_count else "cpu"
        return chosen, why + (f" (the Spark task was assigned GPU {gpus[0]})" if gpus and chosen == "cpu" else "")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    ordinal = ids.index(gpus[0]) if ids and gpus[0] in ids else None if ids or not gpus[0].isdigit() else int(gpus[0])
    if ordinal is None or ordinal >= cuda_count:
        return "cuda", f"Spark task GPU {gpus[0]} is not one of the {cuda_count} visible CUDA devices; the current one"
    return f"cuda:{ordinal}", f"Spark task GPU {gpus[0]}" + (
        f" (position in CUDA_VISIBLE_DEVICES={visible})" * bool(ids)
    )


def warn_if_task_moved(device: torch.device) -> None:
    """A reused Python worker keeps its model where it was loaded: say so when this task has another GPU."""
    wanted = decide_device("auto", torch.cuda.device_count(), task_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))[0]
    if device.index is not None and wanted.startswith("cuda:") and torch.device(wanted) != device:
        logger.warning("this Spark task was assigned %s but the model is loaded on %s", wanted, device)


def choose_device_dtype(
    config: ModelConfig, capabilities: Mapping[str, Any] | None = None
) -> tuple[torch.device, torch.dtype]:
    """Device: :func:`decide_device` (``auto``: CUDA when available, else CPU); dtype: :func:`resolve_dtype`."""
    count = torch.cuda.device_count() if config.device == "auto" else 0
    name, why = decide_device(config.device, count, task_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    device = torch.device(name)
    logger.info("device %s: %s", device, why)
    cpu_bf16 = bool(native_bf16(cpu_capabilities() if capabilities is None else capabilities))
    return device, resolve_dtype(config.dtype, device, cpu_bf16)


def weights_variant(folder: Path, dtype: torch.dtype) -> str | None:
    """``fp16`` when the folder has fp16 weight files and we run in half precision (or it has only those).

    bfloat16 also loads the fp16 files: half the bytes of the full ones to read and map, so the peak
    RSS while loading stays lower. Rounding float16 weights to bfloat16 ends one bfloat16 unit away
    from rounding the float32 ones for ~6% of the values: noise of the size of bfloat16 rounding
    itself (build with ``--variant fp32`` to package the full weights only).
    """
    names = [p.name for p in folder.rglob("*.safetensors")]
    has_fp16 = any(".fp16." in n for n in names)
    has_full = any(".fp16." not in n for n in names)
    half = dtype in (torch.float16, torch.bfloat16)
    return "fp16" if has_fp16 and (half or not has_full) else None


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
    K = ManifestKey
    if K.FILES in manifest or config.verify_weights == "full":  # artifacts older than file digests: not cheaply
        verify_weights(root, manifest.get(K.FILES), manifest.get(K.HASHES) or {}, config.verify_weights == "full")
    capabilities = cpu_capabilities()
    device, dtype = choose_device_dtype(config, capabilities)
    logger.info("loading SDXL base + refiner on %s in %s (%s)", device, dtype, _why(config, device, capabilities))
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)

    base = _from_pretrained(StableDiffusionXLPipeline, root / manifest[K.BASE], dtype)
    shared = {name: getattr(base, name) for name in manifest[K.SHARED]}
    refiner = _from_pretrained(StableDiffusionXLImg2ImgPipeline, root / manifest[K.REFINER], dtype, **shared)
    apply_options(base, refiner, config, device)  # device placement, attention, compile, ...
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    checker = None
    if manifest.get(K.SAFETY_CHECKER):
        checker = SafetyChecker.load(root / manifest[K.SAFETY_CHECKER], device, dtype)
    catalog = load_catalog(
        root,
        base,
        manifest.get(K.STYLES),
        manifest.get(K.LORAS) or {},
        manifest.get(K.HASHES) or {},
        runtime={"device": str(device), "dtype": str(dtype).removeprefix("torch.")},
        controlnets=manifest.get(K.CONTROLNETS) or {},
    )
    catalog = replace(catalog, schedulers=(base.scheduler, refiner.scheduler))  # steps are planned on them
    return Pipelines(
        base=base,
        refiner=refiner,
        safety_checker=checker,
        device=device,
        dtype=dtype,
        catalog=catalog,
        inpaint=inpaint_pipeline(base),
        refiner_inpaint=inpaint_pipeline(refiner),
        controlnets=load_controlnets(root, manifest.get(K.CONTROLNETS) or {}, dtype, device),
    )


def inpaint_pipeline(pipe: DiffusionPipeline) -> StableDiffusionXLInpaintPipeline:
    """An SDXL inpainting pipeline over ``pipe``'s modules, the same objects (as configured by
    :func:`apply_options`, LoRA adapters included): no weights are copied or cast.

    Built by its constructor rather than ``from_pipe``, which casts the shared modules to its
    ``dtype`` (float32 by default) and adds a watermarker of its own.
    """
    inpaint = StableDiffusionXLInpaintPipeline(
        **pipe.components,
        requires_aesthetics_score=pipe.config.get("requires_aesthetics_score", False),
        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def _why(config: ModelConfig, device: torch.device, capabilities: Mapping[str, Any]) -> str:
    """How the dtype was chosen, for the load log line."""
    if config.dtype != "auto":
        return "dtype set in the model config or SDXL_DTYPE"
    if device.type == "cpu":
        features = native_bf16(capabilities)
        return f"auto: native bfloat16 ({', '.join(features)})" if features else "auto: no native bfloat16 on this CPU"
    return f"auto on {device.type}"


def _unique(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    return list({id(m): m for m in modules}.values())


def apply_options(base: DiffusionPipeline, refiner: DiffusionPipeline, config: ModelConfig, device) -> None:
    """Configure the loaded pipelines in place (before the first call)."""
    unets = [base.unet, refiner.unet]
    vaes = _unique([base.vae, refiner.vae])
    if config.attention == "classic":  # SDPA (AttnProcessor2_0) is already diffusers' default on torch 2
        for module in (*unets, *vaes):
            module.set_attn_processor(AttnProcessor())
    if config.channels_last:
        for module in (*unets, *vaes):
            module.to(memory_format=torch.channels_last)
    for vae in vaes:
        if config.vae_slicing:
            vae.enable_slicing()
        if config.vae_tiling:
            vae.enable_tiling()
    if config.cpu_offload == "model":
        # modules stay on the CPU; accelerate hooks move each to `device` for its forward pass
        for pipe in (base, refiner):
            pipe.enable_model_cpu_offload(device=device)
    else:
        for pipe in (base, refiner):
            pipe.to(device)
    if config.compile != "none":
        for unet in unets:
            # in place: the UNet stays a diffusers model, so LoRA switching (enable/disable_lora,
            # set_adapters) still reaches it; a torch.compile wrapper would be skipped by diffusers
            unet.compile(mode=config.compile_mode)
        if config.compile == "unet+vae":
            for vae in vaes:
                vae.decode = torch.compile(vae.decode, mode=config.compile_mode)


def call_view(pipe: DiffusionPipeline, scheduler: str, timestep_spacing: str) -> DiffusionPipeline:
    """A per-call view of ``pipe``: the same modules, its own scheduler and per-call attributes.

    Pipelines store call state on themselves (scheduler step index, ``_guidance_scale``, ...);
    a shallow copy keeps concurrent calls from sharing it without copying any weights.
    """
    view = copy.copy(pipe)
    view.scheduler = make_scheduler(pipe.scheduler, scheduler, timestep_spacing)
    return view
