#!/usr/bin/env python
"""Core overhead benchmark, measured side by side in one run (tiny models, CPU unless a GPU is present).

1. pyfunc ``predict`` / raw diffusers pipeline, identical work, per refiner mode (goal ≤ 1.05).
2. N rows in one batched ``predict`` / N single-row ``predict`` calls (goal < 1 at N = 8).

Runs are interleaved (ours, raw, ours, raw, ...) and the median of each is compared, so drift of
the machine hits both sides alike. Absolute times of tiny models mean nothing; ratios do.

  python benchmarks/bench_core.py [--repeats 7] [--size 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline  # noqa: E402

from model_pkg.packaging import save_artifact, stage_components  # noqa: E402
from model_pkg.tiny import write_tiny_sdxl  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_call(base, refiner, mode: str, prompts: list[str], seeds: list[int], size: int, steps: int) -> None:
    """What a hand-written diffusers script does for the same rows."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    args = dict(prompt=prompts, height=size, width=size, num_inference_steps=steps, generator=gens)
    if mode == "none":
        base(**args)
    elif mode == "ensemble":
        latents = base(**args, denoising_end=0.8, output_type="latent").images
        refiner(prompt=prompts, image=latents, num_inference_steps=steps, denoising_start=0.8, generator=gens)
    else:
        latents = base(**args, output_type="latent").images
        refiner(prompt=prompts, image=latents, num_inference_steps=steps, strength=0.3, generator=gens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_sdxl(Path(tmp) / "src")
        model_dir = save_artifact(stage_components(tiny.base, tiny.refiner, Path(tmp) / "sdxl"), Path(tmp) / "m")
        model = mlflow.pyfunc.load_model(str(model_dir))
        base = StableDiffusionXLPipeline.from_pretrained(tiny.base)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            tiny.refiner, text_encoder_2=base.text_encoder_2, vae=base.vae
        )
        for pipe in (base, refiner):
            pipe.set_progress_bar_config(disable=True)

        size, steps = args.size, args.steps
        print(
            f"device: {model.unwrap_python_model().pipelines.device}; torch threads: {torch.get_num_threads()}; "
            f"{size}x{size}, {steps} steps, median of {args.repeats}\n"
        )

        print("1. pyfunc predict / raw diffusers, same rows, same seeds (goal <= 1.05)")
        for mode in ("none", "ensemble", "sequential"):
            params = {"refiner": mode, "num_inference_steps": steps, "height": size, "width": size, "seed": 1}
            frame = pd.DataFrame({"prompt": ["a cat with a hat"]})
            ours, raw = [], []
            for _ in range(args.repeats + 1):  # the first pair warms up
                ours.append(timed(lambda: model.predict(frame, params=params)))  # noqa: B023
                raw.append(timed(lambda: raw_call(base, refiner, mode, ["a cat with a hat"], [1], size, steps)))  # noqa: B023
            o, r = statistics.median(ours[1:]), statistics.median(raw[1:])
            print(f"   {mode:<11} pyfunc {o * 1000:7.1f} ms   raw {r * 1000:7.1f} ms   ratio {o / r:.3f}")

        print("\n2. N rows in one predict / N single-row predicts (goal < 1; 0.7 at N = 8)")
        params = {"refiner": "ensemble", "num_inference_steps": steps, "height": size, "width": size}
        for n in (1, 2, 4, 8):
            frame = pd.DataFrame({"prompt": [f"a cat number {i}" for i in range(n)], "seed": list(range(n))})
            batched, single = [], []
            for _ in range(max(3, args.repeats // 2) + 1):
                batched.append(timed(lambda: model.predict(frame, params=params)))  # noqa: B023
                single.append(
                    timed(lambda: [model.predict(frame.iloc[[i]], params=params) for i in range(n)])  # noqa: B023
                )
            b, s = statistics.median(batched[1:]), statistics.median(single[1:])
            print(f"   N={n}  batched {b * 1000:8.1f} ms   singles {s * 1000:8.1f} ms   ratio {b / s:.3f}")


if __name__ == "__main__":
    main()
