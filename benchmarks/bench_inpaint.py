#!/usr/bin/env python
"""Inpainting overhead: pyfunc ``predict`` of an image + mask row / raw diffusers SDXL inpainting + PNG.

Both sides run the same denoising (same weights, seed, mask, steps; ``mask_blur=0`` and a cell-aligned
mask so diffusers gets the same mask); ours also parses and decodes the base64 image and mask, pads,
pastes back and writes PNG metadata. Runs are interleaved and medians compared (see bench_core).

  python benchmarks/bench_inpaint.py [--repeats 7] [--size 128] [--steps 20] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore")

from benchmarks.bench_core import Ratio, interleaved  # noqa: E402


def png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def run(repeats: int = 7, size: int = 128, steps: int = 20) -> list[Ratio]:
    import mlflow
    import pandas as pd
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline
    from PIL import Image

    from model_pkg.images import encode_image
    from sdxl_tools.artifact import save_artifact
    from sdxl_tools.random_weights import write_tiny_sdxl
    from sdxl_tools.staging import stage_components

    image = Image.new("RGB", (size, size), (30, 90, 160))
    image.paste((200, 40, 40), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, size // 2, size // 2))
    row = pd.DataFrame({"prompt": ["a cat with a hat"], "image": [png(image)], "mask": [png(mask)], "seed": [1]})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_sdxl(Path(tmp) / "src")
        artifact = save_artifact(stage_components(tiny.base, tiny.refiner, Path(tmp) / "sdxl"), Path(tmp) / "m")
        model = mlflow.pyfunc.load_model(str(artifact))
        base = StableDiffusionXLInpaintPipeline.from_pretrained(tiny.base)
        refiner = StableDiffusionXLInpaintPipeline.from_pretrained(
            tiny.refiner, text_encoder_2=base.text_encoder_2, vae=base.vae
        )
        for pipe in (base, refiner):
            pipe.set_progress_bar_config(disable=True)

        def raw(mode: str) -> str:
            g = torch.Generator().manual_seed(1)
            args = dict(prompt="a cat with a hat", mask_image=mask, height=size, width=size, guidance_scale=5.0)
            if mode == "none":
                out = base(**args, image=image, num_inference_steps=steps, strength=1.0, generator=g).images
            else:
                latents = base(
                    **args, image=image, num_inference_steps=steps, strength=1.0, denoising_end=0.8,
                    output_type="latent", generator=g,
                ).images  # fmt: skip
                out = refiner(**args, image=latents, num_inference_steps=steps, denoising_start=0.8, generator=g).images
            return encode_image(out[0])

        for mode in ("none", "ensemble"):
            params = {"refiner": mode, "num_inference_steps": steps, "mask_blur": 0}
            ours, reference = interleaved(lambda p=params: model.predict(row, params=p), lambda m=mode: raw(m), repeats)
            results.append(Ratio(f"inpainting predict / raw diffusers + PNG ({mode})", ours, reference, "ms", "≤ 1.05"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--torch-threads", type=int, default=0, help="pin torch's threads (0: its default)")
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    for ratio in run(args.repeats, args.size, args.steps):
        print(ratio.line())


if __name__ == "__main__":
    main()
