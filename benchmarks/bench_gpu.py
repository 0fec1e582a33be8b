#!/usr/bin/env python
"""Seconds per image, our pyfunc vs raw diffusers in the same run: the GPU figures of the perf issue.

On a CUDA machine (defaults): full-size random-weight SDXL 1.0 (published sizes, so compute per
image equals the real model's; no download), 1024×1024, 30 steps, float16, batch 1 and 4, refiner
``none`` and ``ensemble``, eager and ``torch.compile``-d UNets. Appends a table to RESULTS.md.

  python benchmarks/bench_gpu.py                                  # on a GPU machine
  python benchmarks/bench_gpu.py --tiny --size 128 --steps 4      # checks the script on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
warnings.filterwarnings("ignore")


def seconds(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(model, base, refiner, label: str, args, sync) -> list[str]:
    """Table rows: s/image of our predict and of the same raw diffusers calls, per mode and batch."""
    import pandas as pd
    import torch

    lines = []
    for mode in ("none", "ensemble"):
        for n in (int(b) for b in args.batches.split(",")):
            prompts = [f"a photo of a cat, number {i}" for i in range(n)]
            frame = pd.DataFrame({"prompt": prompts, "seed": list(range(n))})
            params = {"refiner": mode, "num_inference_steps": args.steps, "height": args.size, "width": args.size}

            def ours(frame=frame, params=params):
                return model.predict(frame, params=params)

            def raw(n=n, mode=mode, prompts=prompts):
                gens = [torch.Generator().manual_seed(i) for i in range(n)]
                common = dict(prompt=prompts, num_inference_steps=args.steps, generator=gens)
                if mode == "none":
                    return base(**common, height=args.size, width=args.size)
                size = dict(height=args.size, width=args.size)
                latents = base(**common, **size, denoising_end=0.8, output_type="latent").images
                return refiner(**common, image=latents, denoising_start=0.8)

            a, b = [], []
            for _ in range(args.repeats + 1):  # the first pair warms up (and compiles the raw UNets)
                a.append(seconds(ours, sync))
                b.append(seconds(raw, sync))
            o, r = statistics.median(a[1:]) / n, statistics.median(b[1:]) / n
            line = f"| {label} | {mode} | {n} | {o:.3f} | {r:.3f} | {o / r:.3f} |"
            print(line, flush=True)
            lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models (check the script on a CPU)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    import mlflow
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from model_pkg.config import ModelConfig
    from model_pkg.pipelines import choose_device_dtype
    from sdxl_tools.artifact import save_artifact
    from sdxl_tools.staging import stage_components

    cuda = torch.cuda.is_available()
    device, dtype = choose_device_dtype(ModelConfig())  # what the model picks with the default config
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from sdxl_tools.random_weights import write_tiny_sdxl

            src = write_tiny_sdxl(Path(tmp) / "src")
        else:
            from sdxl_tools.random_weights import write_fullsize_sdxl

            src = write_fullsize_sdxl(Path(tmp) / "src")
        artifact = save_artifact(stage_components(src.base, src.refiner, Path(tmp) / "sdxl"), Path(tmp) / "m")

        for compiled in [False] if args.no_compile else [False, True]:
            config = {"compile": "unet" if compiled else "none", "warmup_size": args.size}
            model = mlflow.pyfunc.load_model(str(artifact), model_config=config)
            base = StableDiffusionXLPipeline.from_pretrained(src.base, dtype=dtype).to(device)
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                src.refiner, text_encoder_2=base.text_encoder_2, vae=base.vae, dtype=dtype
            ).to(device)
            for pipe in (base, refiner):
                pipe.set_progress_bar_config(disable=True)
                if compiled:
                    pipe.unet = torch.compile(pipe.unet)

            lines += measure(model, base, refiner, "compiled" if compiled else "eager", args, sync)
            del model, base, refiner
            if cuda:
                torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    weights = "tiny random" if args.tiny else "full-size random SDXL 1.0"
    header = (
        f"\n## Seconds per image on {name} ({weights} weights, {args.size}×{args.size}, {args.steps} steps, "
        f"{str(dtype).removeprefix('torch.')}, torch {torch.__version__})\n\n"
        "| UNets | refiner | batch | pyfunc s/image | raw diffusers s/image | ratio |\n|---|---|---|---|---|---|\n"
    )
    with (HERE / "RESULTS.md").open("a") as f:
        f.write(header + "\n".join(lines) + "\n")
    print(f"appended to {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
