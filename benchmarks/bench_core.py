#!/usr/bin/env python
"""Core overhead ratios, measured side by side in one run on the same machine.

1. pyfunc ``predict`` / raw diffusers pipeline + base64 PNG encoding, identical work, per refiner mode (≤ 1.05).
2. N rows in one batched ``predict`` / N single-row ``predict`` calls (goal ≤ 0.7 at N = 8 on CPU).
3. artifact load (``mlflow.pyfunc.load_model``) / raw ``from_pretrained`` of base + refiner (goal ≤ 1.1).
4. peak RSS loading with shared ``text_encoder_2``/``vae`` / loading both folders whole (goal ≤ 0.8).
5. artifact bytes on disk / sum of unique component bytes (goal 1.00).

Runs are interleaved (ours, raw, ours, raw, ...) and medians compared, so drift of the machine hits
both sides alike. With tiny models absolute times mean nothing; ratios do (see RESULTS.md).

  python benchmarks/bench_core.py [--repeats 7] [--size 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore")


@dataclass(frozen=True)
class Ratio:
    """One benchmark figure: ours / reference, measured in the same run."""

    name: str
    ours: float
    reference: float
    unit: str
    goal: str

    @property
    def ratio(self) -> float:
        return self.ours / self.reference

    def line(self) -> str:
        return (
            f"{self.name:<52} {self.ours:10.1f} {self.reference:10.1f} {self.unit:<3} "
            f"ratio {self.ratio:6.3f}  (goal {self.goal})"
        )


def write_section(name: str, lines: list[str]) -> Path:
    """Replace the ``<!-- BEGIN name -->`` … ``<!-- END name -->`` section of RESULTS.md with ``lines``
    (appended at the end the first time); a script's section holds only what its last run wrote."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    section = "\n".join([begin, *lines, end])
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def interleaved(ours, reference, repeats: int) -> tuple[float, float]:
    """Median ms of each, alternating calls; the first pair only warms up."""
    a, b = [], []
    for _ in range(repeats + 1):
        a.append(timed(ours))
        b.append(timed(reference))
    return statistics.median(a[1:]), statistics.median(b[1:])


def model_dtype():
    """The dtype the model runs in with the default config (``auto``): raw diffusers must use the same."""
    from model_pkg.config import ModelConfig
    from model_pkg.pipelines import choose_device_dtype

    return choose_device_dtype(ModelConfig())[1]


def raw_pipelines(tiny, share: bool = True):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    dtype = model_dtype()
    base = StableDiffusionXLPipeline.from_pretrained(tiny.base, dtype=dtype)
    shared = {"text_encoder_2": base.text_encoder_2, "vae": base.vae} if share else {}
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny.refiner, dtype=dtype, **shared)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def raw_call(base, refiner, mode: str, prompts: list[str], seeds: list[int], size: int, steps: int) -> list[str]:
    """What a hand-written diffusers scoring script does for the same rows: generate, then return
    base64 PNGs (as ``predict`` does; without the encoding the reference would do less work)."""
    import torch

    from model_pkg.images import encode_image

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    args = dict(prompt=prompts, height=size, width=size, num_inference_steps=steps, generator=gens)
    if mode == "none":
        images = base(**args).images
    elif mode == "ensemble":
        latents = base(**args, denoising_end=0.8, output_type="latent").images
        images = refiner(
            prompt=prompts, image=latents, num_inference_steps=steps, denoising_start=0.8, generator=gens
        ).images
    else:
        latents = base(**args, output_type="latent").images
        images = refiner(prompt=prompts, image=latents, num_inference_steps=steps, strength=0.3, generator=gens).images
    return [encode_image(image) for image in images]


def peak_rss_mb(tiny, artifact: Path, shared: bool) -> float:
    """Peak RSS of a fresh process that loads the pipelines (shared: from the artifact)."""
    code = (
        "import resource, sys, warnings; warnings.filterwarnings('ignore');"
        "from pathlib import Path; from types import SimpleNamespace as N;"
        "from model_pkg.config import ModelConfig; from model_pkg.pipelines import load_pipelines;"
        "from benchmarks.bench_core import raw_pipelines;"
        "load_pipelines(Path(sys.argv[2]), ModelConfig()) if sys.argv[1] == 'shared' else "
        "raw_pipelines(N(base=Path(sys.argv[3]), refiner=Path(sys.argv[4])), share=False);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    args = ["shared" if shared else "separate", str(artifact / "artifacts" / "sdxl")]
    out = subprocess.run(
        [sys.executable, "-c", code, *args, str(tiny.base), str(tiny.refiner)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def run(repeats: int = 7, size: int = 128, steps: int = 20) -> list[Ratio]:
    import tempfile

    import mlflow
    import pandas as pd

    from sdxl_tools.artifact import save_artifact
    from sdxl_tools.random_weights import write_tiny_sdxl
    from sdxl_tools.staging import stage_components

    results: list[Ratio] = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_sdxl(Path(tmp) / "src")
        artifact = save_artifact(stage_components(tiny.base, tiny.refiner, Path(tmp) / "sdxl"), Path(tmp) / "m")
        model = mlflow.pyfunc.load_model(str(artifact))
        base, refiner = raw_pipelines(tiny)

        for mode in ("none", "ensemble", "sequential"):
            params = {"refiner": mode, "num_inference_steps": steps, "height": size, "width": size, "seed": 1}
            frame = pd.DataFrame({"prompt": ["a cat with a hat"]})
            o, r = interleaved(
                lambda: model.predict(frame, params=params),  # noqa: B023
                lambda: raw_call(base, refiner, mode, ["a cat with a hat"], [1], size, steps),  # noqa: B023
                repeats,
            )
            results.append(Ratio(f"1. predict / raw diffusers + PNG, refiner={mode}", o, r, "ms", "<= 1.05"))

        params = {"refiner": "ensemble", "num_inference_steps": steps, "height": size, "width": size}
        for n in (1, 2, 4, 8):
            frame = pd.DataFrame({"prompt": [f"a cat number {i}" for i in range(n)], "seed": list(range(n))})
            b, s = interleaved(
                lambda: model.predict(frame, params=params),  # noqa: B023
                lambda: [model.predict(frame.iloc[[i]], params=params) for i in range(n)],  # noqa: B023
                max(3, repeats // 2),
            )
            results.append(Ratio(f"2. {n} rows batched / {n} single-row predicts", b, s, "ms", "<= 0.7 at 8"))

        o, r = interleaved(lambda: mlflow.pyfunc.load_model(str(artifact)), lambda: raw_pipelines(tiny), repeats)
        results.append(Ratio("3. load_model / raw from_pretrained base + refiner", o, r, "ms", "<= 1.1"))

        shared, separate = peak_rss_mb(tiny, artifact, True), peak_rss_mb(tiny, artifact, False)
        results.append(Ratio("4. peak RSS shared / unshared (tiny)", shared, separate, "MB", "<= 0.8"))

        stored = sum(p.stat().st_size for p in (artifact / "artifacts").rglob("*.safetensors"))
        unique = sum(p.stat().st_size for p in tiny.base.rglob("*.safetensors")) + sum(
            p.stat().st_size for p in (tiny.refiner / "unet").rglob("*.safetensors")
        )
        results.append(
            Ratio("5. artifact weight bytes / unique component bytes", stored / 1e3, unique / 1e3, "kB", "1.00")
        )
    return results


def fullsize_sharing_ratio() -> float:
    """Weight bytes with sharing / without, for the published SDXL 1.0 sizes (exact arithmetic)."""
    import torch

    from sdxl_tools import random_weights as fullsize

    with torch.device("meta"):
        n = {
            name: sum(p.numel() for p in build().parameters())
            for name, build in {
                "base_unet": fullsize.base_unet,
                "refiner_unet": fullsize.refiner_unet,
                "vae": fullsize.vae,
                "te1": lambda: fullsize.text_encoder(0),
                "te2": lambda: fullsize.text_encoder_2(0),
            }.items()
        }
    shared = sum(n.values())
    return shared / (shared + n["te2"] + n["vae"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    for result in run(args.repeats, args.size, args.steps):
        print(result.line())
    print(f"   (full-size SDXL 1.0 weight bytes shared / unshared: {fullsize_sharing_ratio():.3f}, by arithmetic)")


if __name__ == "__main__":
    main()
