"""Random-weight SDXL 1.0 base + refiner written in diffusers format: tiny ones and full-size ones.

Both are built from the real diffusers/transformers classes with the real SDXL wiring (two text
encoders, text-time conditioning, aesthetic-score refiner, a VAE with scale factor 8), so the
artifact built from them takes the path real weights take; nothing is downloaded.

- Tiny (:func:`write_tiny_sdxl`, plus a tiny safety checker and LoRA): used by the tests and the demo
  so that the whole build → log → serve → Spark → registry path runs in seconds on a CPU.
  Deterministic from ``seed``.
- Full size (:func:`write_fullsize_sdxl`): the published SDXL 1.0 module configs
  (Stability-AI/generative-models ``sd_xl_base.yaml`` / ``sd_xl_refiner.yaml`` in diffusers form):
  base UNet 2,567,463,684 params, refiner UNet 2,259,526,660, OpenCLIP bigG text encoder 694,659,840,
  CLIP ViT-L text encoder 123,060,480, VAE 83,653,863. Compute per image equals the real model's; the
  images are noise (and may be NaN in float16: random weights are not trained to stay in range). The
  tokenizer is the small local one: prompts are still padded to 77 tokens, so text-encoder cost is
  unchanged. Needs ~12 GB of RAM in float16 (the default) and ~11 GB of disk.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from model_pkg.schedulers import SDXL_SCHEDULER
from sdxl_tools.files import link_or_copy, publish_modes

TEXT_HIDDEN = 32
TIME_EMBED_DIM = 8
_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "cat", "dog", "hat", "face", "park", "bench"]
_WORDS += ["yellow", "green", "red", "blue", "photo", "art", "high", "resolution", "sitting"]


@dataclass(frozen=True)
class TinySDXL:
    """Where :func:`write_tiny_sdxl` put each component."""

    base: Path
    refiner: Path
    safety_checker: Path | None


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with a small vocabulary, written locally (no hub).

    Every byte maps to a token (so any text tokenizes, and different words get different ids);
    a few merges give whole-word tokens for common prompt words.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab_tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
            if parts[0] not in vocab_tokens:
                vocab_tokens.append(parts[0])
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    assert len(tokenizer) == len(vocab_tokens), "tokenizer did not read the local vocabulary"
    return tokenizer


def _text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _unet(cross_attention_dim: int, time_ids: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # SDXL: time ids (6 for base, 5 for the aesthetic-score refiner) + pooled text_encoder_2
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED_DIM + TEXT_HIDDEN,
        transformer_layers_per_block=1,
        norm_num_groups=32,
    )


def _vae() -> AutoencoderKL:
    # Four blocks → scale factor 8, as SDXL's, so latent sizes and size rules behave as in production.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def tiny_safety_checker(flag: str = "never"):
    """A tiny ``StableDiffusionSafetyChecker``; ``flag`` forces its verdict through its own weights.

    ``never``: concept weights so high no cosine distance reaches them; ``always``: negative weights,
    so every image passes the threshold. The checker's own logic decides, nothing is patched.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    config = CLIPConfig(
        text_config=dict(hidden_size=TEXT_HIDDEN, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37),
        vision_config=dict(
            hidden_size=TEXT_HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=32,
            patch_size=4,
        ),
        projection_dim=TEXT_HIDDEN,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    threshold = {"never": 10.0, "always": -10.0}[flag]
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    return checker


def write_tiny_sdxl(out_dir: str | Path, seed: int = 0, safety_checker: str | None = None) -> TinySDXL:
    """Write tiny random-weight SDXL base and refiner pipelines (and optionally a safety checker).

    The refiner shares ``text_encoder_2``, ``tokenizer_2`` and ``vae`` with the base, as SDXL 1.0
    does; like the published refiner folder, it still has its own files for them (hard links to the
    base's: the same bytes, written once).
    ``safety_checker`` is ``None`` (no checker), ``"never"`` or ``"always"`` (see :func:`tiny_safety_checker`).
    """
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp))
    vocab_size = len(tokenizer)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(vocab_size)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size)).eval()
    vae = _vae().eval()
    base_unet = _unet(cross_attention_dim=2 * TEXT_HIDDEN, time_ids=6).eval()
    refiner_unet = _unet(cross_attention_dim=TEXT_HIDDEN, time_ids=5).eval()

    return save_sdxl_pipelines(
        out, tokenizer, text_encoder, text_encoder_2, vae, base_unet, refiner_unet, safety_checker
    )


def save_sdxl_pipelines(
    out: Path,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    vae: AutoencoderKL,
    base_unet: UNet2DConditionModel,
    refiner_unet: UNet2DConditionModel,
    safety_checker: str | None = None,
) -> TinySDXL:
    """Assemble SDXL base + refiner pipelines from modules, as SDXL 1.0 wires them, and save them."""
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=base_unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=refiner_unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    base.save_pretrained(out / "base", safe_serialization=True)
    publish_modes(out / "base")  # save_pretrained writes 0600 weights; link_or_copy links only readable ones
    # The refiner folder as save_pretrained lays it out, but the components it shares with the base
    # are hard links to the base's files: a full-size build would otherwise write 1.6 GB twice.
    refiner.save_config(out / "refiner")  # model_index.json
    refiner.unet.save_pretrained(out / "refiner" / "unet", safe_serialization=True)
    refiner.scheduler.save_pretrained(out / "refiner" / "scheduler")
    for name in ("text_encoder_2", "tokenizer_2", "vae"):
        for file in sorted((out / "base" / name).rglob("*")):
            if file.is_file():
                link_or_copy(file, out / "refiner" / name / file.relative_to(out / "base" / name))

    publish_modes(out / "refiner")
    checker_dir = None
    if safety_checker is not None:
        checker_dir = write_tiny_safety_checker(out / "safety_checker", safety_checker)
    return TinySDXL(base=out / "base", refiner=out / "refiner", safety_checker=checker_dir)


def write_tiny_lora(out_dir: str | Path, base_dir: str | Path, seed: int = 1, rank: int = 4) -> Path:
    """A tiny random LoRA for the tiny base (UNet attention + both text encoders), written as diffusers'
    training scripts write one: peft adapters → ``pytorch_lora_weights.safetensors``.

    ``init_lora_weights=False`` gives random (not zero) up-projections, so the adapter changes images.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = StableDiffusionXLPipeline.from_pretrained(base_dir, add_watermarker=False)
    torch.manual_seed(seed)
    unet_config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    text_config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    base.unet.add_adapter(unet_config)
    base.text_encoder.add_adapter(text_config)
    base.text_encoder_2.add_adapter(text_config)
    out = Path(out_dir)
    StableDiffusionXLPipeline.save_lora_weights(
        out,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(base.text_encoder)),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(base.text_encoder_2)),
        safe_serialization=True,
    )
    publish_modes(out)
    return out


def write_tiny_controlnet(out_dir: str | Path, base_dir: str | Path, seed: int = 1) -> Path:
    """A tiny random SDXL ControlNet for the tiny base: diffusers' ``ControlNetModel.from_unet`` of its UNet
    (the UNet's encoder weights), saved as a diffusers folder (config + safetensors).

    ``from_unet`` zero-initialises the "zero convolutions" (as training starts), which would make the
    ControlNet a no-op; they get random weights here so that the conditioning changes images.
    """
    from diffusers import ControlNetModel

    unet = UNet2DConditionModel.from_pretrained(Path(base_dir) / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    generator = torch.Generator().manual_seed(seed)
    zero = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        for conv in zero:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    controlnet.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def write_tiny_safety_checker(folder: str | Path, flag: str = "never", seed: int = 0) -> Path:
    """Write a tiny checker (:func:`tiny_safety_checker`) + its CLIP image processor: a ``--safety-checker`` folder."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tiny_safety_checker(flag).save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    publish_modes(folder)
    return folder


# -- full size --------------------------------------------------------------------------------------

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
