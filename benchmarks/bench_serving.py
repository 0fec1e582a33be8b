#!/usr/bin/env python
"""Real-time serving benchmark: the tiny artifact behind the real ``mlflow models serve``.

1. REST round trip / in-process ``predict`` for the same one-row request (median of ``--repeats``,
   interleaved so that machine drift hits both sides alike).
2. Latency p50 / p99 and throughput at 1, 4 and 8 concurrent clients (``--requests`` per level).
3. Resident memory of each server worker after warm-up (each ``--workers`` process loads its own model).

Tiny random-weight models: absolute times say little about real SDXL; the ratio and the shape of
the concurrency curve do (the model serializes generation per process; scale with workers).

  python benchmarks/bench_serving.py [--repeats 9] [--requests 32] [--workers 1] [--size 64] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from sdxl_tools.artifact import save_artifact  # noqa: E402
from sdxl_tools.random_weights import write_tiny_sdxl  # noqa: E402
from sdxl_tools.staging import stage_components  # noqa: E402
from testkit.scoring_server import ScoringServer  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ok(response) -> None:
    if response.status_code != 200:
        raise RuntimeError(response.text[:500])


def load(server: ScoringServer, body: dict, clients: int, requests: int) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, non-200 count) of ``requests`` sent by ``clients`` threads."""

    def one(_: int) -> tuple[float, int]:
        start = time.perf_counter()
        response = server.invoke(body, timeout=300)
        if response.status_code != 200:
            print(f"request failed: HTTP {response.status_code}: {response.text[:800]}", flush=True)
        return time.perf_counter() - start, response.status_code

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(requests)))
    return time.perf_counter() - start, [r[0] for r in results], sum(r[1] != 200 for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    params = {"num_inference_steps": args.steps, "height": args.size, "width": args.size, "seed": 1}
    rows = [{"prompt": "a cat with a hat, photo"}]
    body = {"dataframe_records": rows, "params": params}

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tiny = write_tiny_sdxl(Path(tmp) / "src")
        model_dir = save_artifact(stage_components(tiny.base, tiny.refiner, Path(tmp) / "sdxl"), Path(tmp) / "model")
        model = mlflow.pyfunc.load_model(str(model_dir))
        frame = pd.DataFrame(rows)

        with ScoringServer(str(model_dir), workers=args.workers) as server:
            for _ in range(2):  # warm-up both sides
                model.predict(frame, params=params)
                ok(server.invoke(body))
            local, rest = [], []
            for _ in range(args.repeats):
                local.append(timed(lambda: model.predict(frame, params=params)))
                rest.append(timed(lambda: ok(server.invoke(body))))
            worker_rss = server.worker_rss_bytes()
            tree_rss = server.rss_bytes()

            print(f"tiny SDXL, 1 row, {args.size}×{args.size}, {args.steps} steps (ensemble), workers={args.workers}")
            print(
                f"in-process predict {statistics.median(local) * 1e3:.0f} ms · REST round trip "
                f"{statistics.median(rest) * 1e3:.0f} ms · REST / in-process = "
                f"{statistics.median(rest) / statistics.median(local):.3f} (median of {args.repeats})"
            )
            print(
                "RSS after warm-up: per worker "
                + ", ".join(f"{r / 2**20:.0f} MiB" for r in worker_rss)
                + f"; whole server tree {tree_rss / 2**20:.0f} MiB"
            )
            print(f"\n{'clients':>7} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'errors':>6}")
            for clients in (1, 4, 8):
                wall, latencies, errors = load(server, body, clients, args.requests)
                print(
                    f"{clients:>7} {args.requests:>8} {percentile(latencies, 0.5) * 1e3:>8.0f} "
                    f"{percentile(latencies, 0.99) * 1e3:>8.0f} {args.requests / wall:>7.2f} {errors:>6}"
                )


if __name__ == "__main__":
    main()
