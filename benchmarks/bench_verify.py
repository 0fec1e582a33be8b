#!/usr/bin/env python
"""What checking the weights costs: the load-time check (sizes + safetensors headers) vs full sha256.

1. The tiny artifact: both checks, and their share of a ``mlflow.pyfunc.load_model`` of it.
2. Full size, estimated: a synthetic safetensors file of ``--mb`` MB (one float16 tensor, as SDXL's
   files are) is checked both ways; seconds per GB are scaled to SDXL 1.0 base + refiner fp16
   (about 6.9 GB of weights: UNets 5.1 + 4.5 GB fp32 halves, text encoders, VAE).

  python -m benchmarks.bench_verify [--mb 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SDXL_FP16_GB = 6.9  # base + refiner weights stored once (shared text_encoder_2 / vae), fp16


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiny(repeats: int) -> None:
    import mlflow

    from model_pkg.pipelines import MANIFEST
    from model_pkg.weights import verify_weights
    from sdxl_tools.artifact import save_artifact
    from sdxl_tools.random_weights import write_tiny_sdxl
    from sdxl_tools.staging import stage_components

    with tempfile.TemporaryDirectory() as tmp:
        source = write_tiny_sdxl(Path(tmp) / "tiny")
        model = save_artifact(stage_components(source.base, source.refiner, Path(tmp) / "sdxl"), Path(tmp) / "m")
        folder = model / "artifacts" / "sdxl"
        manifest = json.loads((folder / MANIFEST).read_text())
        size = sum(r["size"] for c in manifest["files"].values() for r in c.values())
        headers = median_seconds(lambda: verify_weights(folder, manifest["files"], manifest["hashes"], False), repeats)
        full = median_seconds(lambda: verify_weights(folder, manifest["files"], manifest["hashes"], True), repeats)
        load = median_seconds(lambda: mlflow.pyfunc.load_model(str(model)), max(1, repeats // 2))
    print(f"tiny artifact ({size / 1e6:.1f} MB of files):")
    print(f"  headers {headers * 1e3:.2f} ms, full {full * 1e3:.2f} ms, load_model {load:.2f} s")
    print(
        f"  headers / load = {headers / load:.4f}, full / load = {full / load:.4f}, "
        f"full / headers = {full / headers:.1f}"
    )


def full_size(mb: int, repeats: int) -> None:
    from model_pkg.weights import _header_problem, file_sha256

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        nbytes = mb * 2**20
        header = json.dumps({"w": {"dtype": "F16", "shape": [nbytes // 2], "data_offsets": [0, nbytes]}}).encode()
        with path.open("wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            chunk = bytes(range(256)) * 4096
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)
        size = path.stat().st_size
        headers = median_seconds(lambda: _header_problem(path, size), repeats)
        full = median_seconds(lambda: file_sha256(path), repeats)  # page-cached: the hash's own speed
    gb = size / 1e9
    print(f"synthetic {gb:.2f} GB safetensors file (page-cached):")
    print(f"  headers {headers * 1e3:.3f} ms (per file, independent of its size); full {full / gb:.2f} s/GB")
    print(
        f"  SDXL 1.0 fp16 (~{SDXL_FP16_GB} GB, ~20 weight files): headers ~{20 * headers * 1e3:.1f} ms, "
        f"full ~{full / gb * SDXL_FP16_GB:.1f} s (more from a cold disk: its read speed bounds it)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tiny(args.repeats)
    full_size(args.mb, args.repeats)


if __name__ == "__main__":
    main()
