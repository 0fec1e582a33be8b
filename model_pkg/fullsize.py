"""Full-size random-weight SDXL 1.0 base + refiner, for honest GPU timing without downloading weights.

The module configs are the published SDXL 1.0 ones (Stability-AI/generative-models
``sd_xl_base.yaml`` / ``sd_xl_refiner.yaml`` in diffusers form): base UNet 2,567,463,684 params,
refiner UNet 2,259,526,660, OpenCLIP bigG text encoder 694,659,840, CLIP ViT-L text encoder
123,060,480, VAE 83,653,863. Compute per image equals the real model's; the images are noise (and
may be NaN in float16: random weights are not trained to stay in range). The tokenizer is the small
local one: prompts are still padded to 77 tokens, so text-encoder cost is unchanged.

Needs ~12 GB of RAM in float16 (the default) and ~11 GB of disk.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from model_pkg.tiny import TinySDXL, save_sdxl_pipelines, write_tokenizer

VOCAB = 49408


def base_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),  # 64 channels per head
        use_linear_projection=True,
        cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG)
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 × 256 + 1280
    )


def refiner_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(384, 768, 1536, 1536),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=4,
        attention_head_dim=(6, 12, 24, 24),
        use_linear_projection=True,
        cross_attention_dim=1280,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,  # 5 × 256 + 1280 (aesthetic score)
    )


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def text_encoder(eos: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, eos_token_id=eos,
        )
    )  # fmt: skip


def text_encoder_2(eos: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=VOCAB, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, hidden_act="gelu", projection_dim=1280, eos_token_id=eos,
        )
    )  # fmt: skip


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def write_fullsize_sdxl(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> TinySDXL:
    """Write full-size random-weight SDXL 1.0 base and refiner pipelines in diffusers format."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    with _default_dtype(dtype):  # built directly in `dtype`: no float32 copy of 5.7 B parameters
        modules = (
            text_encoder(tokenizer.eos_token_id).eval(),
            text_encoder_2(tokenizer.eos_token_id).eval(),
            vae().eval(),
            base_unet().eval(),
            refiner_unet().eval(),
        )
    return save_sdxl_pipelines(out, tokenizer, *modules)
