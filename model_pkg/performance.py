"""Speed and memory options, applied once at load time from the model config (issue: GPU path).

Every option is plain diffusers/PyTorch, and all but compile's speed-up can be exercised on a CPU:
SDPA attention (diffusers' default ``AttnProcessor2_0``), ``channels_last``, ``torch.compile`` of the
UNets (and the VAE decoder) with a warm-up generation, VAE slicing/tiling, model CPU offload.
float16 safety of the SDXL VAE is diffusers' own: a VAE whose config says ``force_upcast`` is run in
float32 for encode/decode; an fp16-fixed VAE (``build.py build --vae DIR``) says it needn't be.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor

from model_pkg.config import ModelConfig


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
        for pipe in (base, refiner):
            pipe.unet = torch.compile(pipe.unet, mode=config.compile_mode)
        if config.compile == "unet+vae":
            for vae in vaes:
                vae.decode = torch.compile(vae.decode, mode=config.compile_mode)
