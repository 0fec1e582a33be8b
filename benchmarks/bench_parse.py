#!/usr/bin/env python
"""Worst-case parse time of one request at the default limits (``ModelConfig()``), on the tiny artifact's
real tokenizers: what a request can make a worker spend before the first denoising step.

Cases: the prompt budget (``max_request_prompt_chars``) filled with weighted or plain 4,000-character
prompts, ``max_rows`` short rows, and requests refused before any tokenizing (a bad last row, a budget
overrun). Each is printed with its time and its ratio to a one-row request's parse.

  python -m benchmarks.bench_parse [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.suppress(Exception):  # the refused cases: what is timed is how long the refusal takes
            fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import mlflow
    import pandas as pd

    from model_pkg.config import ModelConfig
    from model_pkg.request import parse_request
    from sdxl_tools.artifact import save_artifact
    from sdxl_tools.random_weights import write_tiny_sdxl
    from sdxl_tools.staging import stage_components

    config = ModelConfig()
    budget, longest = config.max_request_prompt_chars, config.max_prompt_chars
    weighted, plain = "(cat:1.1) " * (longest // 10), "cat " * (longest // 4)
    n = budget // longest
    cases = {
        "1 row 'a cat' (reference)": pd.DataFrame({"prompt": ["a cat"]}),
        f"{n} weighted {longest}-char prompts (the budget)": pd.DataFrame({"prompt": [weighted] * n}),
        f"{n} plain {longest}-char prompts (the budget)": pd.DataFrame({"prompt": [plain] * n}),
        f"{config.max_rows} rows of 10 chars (max_rows, the budget)": pd.DataFrame(
            {"prompt": ["a cat hat "] * config.max_rows}
        ),
        "9,999 weighted rows + an empty last row (refused)": pd.DataFrame({"prompt": [weighted] * 9_999 + [""]}),
        "10,000 weighted 4,000-char rows (refused: budget)": pd.DataFrame({"prompt": [weighted] * 10_000}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_sdxl(Path(tmp) / "src")
        artifact = save_artifact(stage_components(tiny.base, tiny.refiner, Path(tmp) / "sdxl"), Path(tmp) / "m")
        catalog = mlflow.pyfunc.load_model(str(artifact)).unwrap_python_model().pipelines.catalog
        params = {"height": 64, "width": 64, "num_inference_steps": 10}
        results = {
            name: median_s(lambda f=f: parse_request(f, params, config, catalog), args.repeats)
            for name, f in cases.items()
        }
    reference = results["1 row 'a cat' (reference)"]
    print(f"parse_request at the default limits (median of {args.repeats}); ratio = time / one-row parse")
    for name, seconds in results.items():
        print(f"  {name:<58} {seconds * 1000:9.1f} ms   ×{seconds / reference:8.0f}")
    print(f"worst case: {max(results.values()):.2f} s")


if __name__ == "__main__":
    main()
