#!/usr/bin/env python
"""Full-size SDXL 1.0 base + refiner on a CPU machine, measured side by side in one run.

  python benchmarks/bench_fullsize_cpu.py          # full size: ~30 min on 2 busy cores; needs 20 GB of free
                                                   # RAM (peak RSS 16.6 GB in bfloat16) and ~12 GB of disk
  python benchmarks/bench_fullsize_cpu.py --tiny   # the same steps on tiny models in ~2 min (checks the script)

1. build     ``build.py build --random-fullsize --output`` (the published SDXL 1.0 module sizes with random
             float16 weights: compute and memory equal the real model's; nothing is downloaded), sampling
             the disk the build folder uses: peak / artifact bytes.
2. generate  ``load_model`` with the default model config (``dtype: auto``), then our ``predict`` and
             raw diffusers on identical work (refiner ``none`` and ``ensemble``, interleaved, medians;
             the raw pipelines are ``from_pipe`` of the loaded ones: the same modules, no second copy
             of the weights), whether their pixels are equal, and the process's peak RSS.
3. load      fresh processes, interleaved: ``load_model`` / raw ``from_pretrained`` of base + refiner
             (sharing ``text_encoder_2`` and ``vae``, as the diffusers docs do) in the same dtype; and one
             raw load that does not share them: after-load RSS shared / unshared.
4. unet      seconds per base UNet step at 512×512 with classifier-free guidance (batch 2), bfloat16
             and float32, one process each (float32 alone is 10.3 GB).

Every step runs in its own process, one after the other, so memory never holds two full-size models.
The artifact is deleted at the end; the figures replace the full-size section of RESULTS.md (not with
``--tiny``, which only prints them).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from benchmarks.bench_core import write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
warnings.filterwarnings("ignore")

GIB = 2**30
NEEDS_FREE_RAM = 20 * GIB


# -- measuring ------------------------------------------------------------------------------------


def rss() -> dict[str, float]:
    """Current and peak resident memory of this process, in GB (10^9 bytes)."""
    import resource

    import psutil

    return {
        "rss_gb": psutil.Process().memory_info().rss / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def disk_bytes(root: Path) -> int:
    """Bytes of the files under ``root``, each inode counted once (hard links share their bytes)."""
    seen: dict[tuple[int, int], int] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:  # moved or removed while we looked
                continue
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


class DiskSampler:
    """Peak of :func:`disk_bytes` while a command runs, sampled in a thread."""

    def __init__(self, root: Path, interval: float) -> None:
        self.root, self.interval, self.peak = root, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_bytes(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_bytes(self.root))


def worker(name: str, *args: str) -> dict:
    """Run one step in a fresh process (this script with ``--worker``); its last stdout line is JSON."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--worker", name, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"step {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- steps, each run in its own process -----------------------------------------------------------


def step_generate(artifact: str, size: int, steps: int, repeats: int) -> dict:
    import mlflow
    import numpy as np
    import pandas as pd
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from PIL import Image

    from benchmarks.bench_core import interleaved, raw_call  # raw_call encodes PNGs as predict does

    def pixels(b64: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))

    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(artifact)  # the default model config
    load_s = time.perf_counter() - start
    after_load = rss()
    pipes = model.unwrap_python_model().pipelines
    # the same modules: no second copy. from_pipe casts the shared modules to its dtype (float32 by
    # default, which doubles the memory of a bfloat16 model): give it theirs.
    base = StableDiffusionXLPipeline.from_pipe(pipes.base, dtype=pipes.dtype)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pipe(pipes.refiner, dtype=pipes.dtype)
    assert {pipes.base.unet.dtype, pipes.refiner.unet.dtype, pipes.base.vae.dtype} == {pipes.dtype}
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)

    prompt, seed = "a photo of a cat with a hat", 1
    result = {"device": str(pipes.device), "dtype": str(pipes.dtype).removeprefix("torch."), "load_s": load_s}
    for mode in ("none", "ensemble"):
        params = {"refiner": mode, "num_inference_steps": steps, "height": size, "width": size, "seed": seed}
        frame = pd.DataFrame({"prompt": [prompt]})
        ours = model.predict(frame, params=params)["generated_image"][0]
        theirs = raw_call(base, refiner, mode, [prompt], [seed], size, steps)[0]
        same = bool(np.array_equal(pixels(ours), pixels(theirs)))
        o, r = interleaved(
            lambda frame=frame, params=params: model.predict(frame, params=params),
            lambda mode=mode: raw_call(base, refiner, mode, [prompt], [seed], size, steps),
            repeats,
        )
        result[mode] = {"ours_s": o / 1000, "raw_s": r / 1000, "pixels_equal": same}
    return result | {"after_load": after_load, "end": rss()}


def step_load(artifact: str, kind: str) -> dict:
    """``pyfunc``: load_model; ``raw``: from_pretrained sharing text_encoder_2 + vae; ``unshared``: not sharing."""
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    from model_pkg.config import ModelConfig
    from model_pkg.pipelines import choose_device_dtype

    _, dtype = choose_device_dtype(ModelConfig())
    sdxl = Path(artifact) / "artifacts" / "sdxl"
    start = time.perf_counter()
    if kind == "pyfunc":
        import mlflow

        loaded = mlflow.pyfunc.load_model(artifact)
    else:
        kw = dict(dtype=dtype, use_safetensors=True, local_files_only=True)
        base = StableDiffusionXLPipeline.from_pretrained(sdxl / "base", **kw)
        if kind == "raw":
            shared = dict(text_encoder_2=base.text_encoder_2, vae=base.vae)
        else:  # what a refiner folder with its own copies loads
            shared = dict(
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(sdxl / "base" / "text_encoder_2", **kw),
                vae=AutoencoderKL.from_pretrained(sdxl / "base" / "vae", **kw),
            )
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl / "refiner", **kw, **shared)
        loaded = (base, refiner)
    seconds = time.perf_counter() - start
    assert loaded is not None
    return {"seconds": seconds, "dtype": str(dtype).removeprefix("torch.")} | rss()


def step_unet(artifact: str, dtype_name: str, size: int, repeats: int) -> dict:
    """Median seconds of one base UNet forward pass with CFG (batch 2) at ``size``²."""
    import torch
    from diffusers import UNet2DConditionModel

    dtype = getattr(torch, dtype_name)
    unet = UNet2DConditionModel.from_pretrained(
        Path(artifact) / "artifacts" / "sdxl" / "base" / "unet", dtype=dtype, use_safetensors=True
    ).eval()
    c = unet.config
    time_dim = c.addition_time_embed_dim * 6
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        sample=torch.randn(2, c.in_channels, size // 8, size // 8, generator=g).to(dtype),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, c.cross_attention_dim, generator=g).to(dtype),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, c.projection_class_embeddings_input_dim - time_dim, generator=g).to(dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=dtype),
        },
    )
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first one warms up
            start = time.perf_counter()
            unet(**inputs)
            times.append(time.perf_counter() - start)
    return {"seconds_per_step": statistics.median(times[1:])} | rss()


# -- the run --------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    import psutil
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )  # fmt: skip
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = [f for f in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16", "sve") if caps.get(f)]
    return {
        "cpu": model,
        "flags": " ".join(flags) or "unknown",
        "cores": str(os.cpu_count()),
        "ram": f"{psutil.virtual_memory().total / GIB:.0f} GiB",
        "torch": torch.__version__,
        "date": str(datetime.date.today()),
        "load": f"{os.getloadavg()[0]:.1f}",  # other work on the machine inflates every figure
    }


def run(args: argparse.Namespace) -> tuple[dict, list[str]]:
    figures: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="sdxl-fullsize-bench-") as tmp:
        work = Path(tmp) / "build"  # the build's own folder: its staging and the output
        work.mkdir()
        artifact = work / "model"
        source = "--tiny" if args.tiny else "--random-fullsize"
        cmd = [sys.executable, str(ROOT / "build.py"), "build", source, "--output", str(artifact)]
        print(f"1. build: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        with DiskSampler(work, interval=0.05 if args.tiny else 0.5) as disk:
            subprocess.run(cmd, check=True, capture_output=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
        figures["build"] = {
            "seconds": time.perf_counter() - start,
            "peak_disk_gb": disk.peak / 1e9,
            "artifact_gb": disk_bytes(artifact) / 1e9,
        }
        print(f"   {figures['build']}", flush=True)

        print("2. generate: load_model (default config), predict vs raw diffusers", flush=True)
        figures["generate"] = worker("generate", str(artifact), str(args.size), str(args.steps), str(args.repeats))
        print(f"   {figures['generate']}", flush=True)

        print("3. load: load_model vs raw from_pretrained (fresh processes, interleaved), unshared", flush=True)
        loads: dict[str, list[dict]] = {"pyfunc": [], "raw": []}
        for _ in range(args.load_repeats):
            for kind in loads:
                loads[kind].append(worker("load", str(artifact), kind))
        figures["load"] = {kind: runs for kind, runs in loads.items()} | {
            "unshared": worker("load", str(artifact), "unshared")
        }
        print(f"   {figures['load']}", flush=True)

        print(f"4. unet: one base UNet step at {args.unet_size}², CFG batch 2, bfloat16 then float32", flush=True)
        figures["unet"] = {
            dtype: worker("unet", str(artifact), dtype, str(args.unet_size), str(args.unet_repeats))
            for dtype in ("bfloat16", "float32")
        }
        print(f"   {figures['unet']}", flush=True)
    return figures, table(figures, args)  # the artifact is gone with tmp


def table(f: dict, args: argparse.Namespace) -> list[str]:
    g, load, unet, build = f["generate"], f["load"], f["unet"], f["build"]
    med = {kind: statistics.median(r["seconds"] for r in load[kind]) for kind in ("pyfunc", "raw")}
    after = statistics.median(r["rss_gb"] for r in load["pyfunc"])
    bf16, fp32 = unet["bfloat16"]["seconds_per_step"], unet["float32"]["seconds_per_step"]
    rows = [
        ("build: peak disk / artifact bytes", f"{build['peak_disk_gb']:.2f} / {build['artifact_gb']:.2f} GB",
         build["peak_disk_gb"] / build["artifact_gb"], "<= 1.1"),
        *[(f"predict / raw diffusers, refiner={m}, {args.size}², {args.steps} steps, {g['dtype']}",
           f"{g[m]['ours_s']:.2f} / {g[m]['raw_s']:.2f} s (pixels equal: {g[m]['pixels_equal']})",
           g[m]["ours_s"] / g[m]["raw_s"], "<= 1.05") for m in ("none", "ensemble")],
        ("load_model / raw from_pretrained (median)", f"{med['pyfunc']:.1f} / {med['raw']:.1f} s",
         med["pyfunc"] / med["raw"], "<= 1.1"),
        ("after-load RSS shared / unshared", f"{after:.2f} / {load['unshared']['rss_gb']:.2f} GB",
         after / load["unshared"]["rss_gb"], "<= 0.9"),
        (f"base UNet step {args.unet_size}², CFG batch 2: bfloat16 / float32", f"{bf16:.2f} / {fp32:.2f} s",
         bf16 / fp32, "< 1"),
    ]  # fmt: skip
    lines = ["| figure | measured | ratio | goal |", "|---|---|---|---|"]
    lines += [f"| {name} | {value} | **{ratio:.3f}** | {goal} |" for name, value, ratio, goal in rows]
    peak = max(g["end"]["peak_rss_gb"], *(r["peak_rss_gb"] for r in load["pyfunc"]))
    lines += [
        "",
        f"- Peak RSS with the default config (`dtype: auto` → {g['dtype']} on {g['device']}), loading and "
        f"generating: **{peak:.1f} GB** (after load {g['after_load']['rss_gb']:.1f} GB; goal < 20 GB). "
        f"Peak of the raw loads: {max(r['peak_rss_gb'] for r in load['raw']):.1f} GB, unshared "
        f"{load['unshared']['peak_rss_gb']:.1f} GB; the float32 UNet alone: {unet['float32']['peak_rss_gb']:.1f} GB.",
        f"- Build ({'tiny' if args.tiny else 'random full-size'} weights): {build['seconds']:.0f} s; "
        f"first `load_model` {g['load_s']:.1f} s.",
    ]
    return lines


def write_results(figures: dict, lines: list[str], args: argparse.Namespace, seconds: float) -> None:
    m = figures["machine"]
    section = [
        "## Full-size SDXL 1.0 on CPU",
        "",
        f"Written by `python benchmarks/bench_fullsize_cpu.py` ({m['date']}, {seconds / 60:.0f} min): "
        f"{m['cpu']}, {m['cores']} cores, {m['ram']} RAM, CPU flags {m['flags']}, torch {m['torch']}; "
        f"load average {m['load']} at the start, {os.getloadavg()[0]:.1f} at the end. "
        "Random weights in the published SDXL 1.0 sizes (compute and memory as the real model's). "
        "Each pair measured in the same run; predict and load pairs interleaved (medians), the two "
        "UNet dtypes one after the other (both at once would need 15 GB).",
        "",
        *lines,
    ]
    path = write_section("bench_fullsize_cpu", section)
    print(f"wrote the full-size section of {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models: check the script in ~2 minutes")
    parser.add_argument("--size", type=int, default=256, help="predict vs raw: image size")
    parser.add_argument("--steps", type=int, default=4, help="predict vs raw: steps")
    parser.add_argument("--repeats", type=int, default=3, help="predict vs raw: measured pairs (after one warm-up)")
    parser.add_argument("--load-repeats", type=int, default=2, help="load_model vs raw: pairs of fresh processes")
    parser.add_argument("--unet-size", type=int, default=512)
    parser.add_argument("--unet-repeats", type=int, default=3)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        name, *rest = args.worker
        steps = {"generate": step_generate, "load": step_load, "unet": step_unet}
        typed = [int(a) if a.isdigit() else a for a in rest]
        print(json.dumps(steps[name](*typed)))
        return

    import psutil

    free = psutil.virtual_memory().available
    if not args.tiny and free < NEEDS_FREE_RAM:
        raise SystemExit(f"only {free / GIB:.1f} GiB of RAM available; the full-size run needs 20 GiB free")
    start = time.perf_counter()
    figures, lines = run(args)
    print("\n".join(lines))
    if not args.tiny:
        write_results(figures, lines, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
