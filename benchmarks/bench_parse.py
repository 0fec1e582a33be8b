#!/usr/bin/env python
"""Worst-case parse time of one request at the default limits (``ModelConfig()``), on the tiny artifact's
real tokenizers: what a request can make a worker spend before the first denoising step.

Cases: the prompt budget (``max_request_prompt_chars``) filled with weighted or plain 4,000-character
prompts, ``max_rows`` short rows, and requests refused before any tokenizing (a bad last row, a budget
overrun); and a 100 MB Azure body of one prompt taken the way ``deploy/azureml/score.py`` takes it
(``azure_request_to_frame`` on the body text, then the pyfunc model's ``predict``: refused by
``max_prompt_chars``). Each is printed with its time and its ratio to a one-row request's parse, and
written to RESULTS.md (section ``bench_parse``) with the machine's load average.

  python -m benchmarks.bench_parse [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks.bench_core import write_section

warnings.filterwarnings("ignore")
AZURE_BODY_CHARS = 100_000_000


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

    from model_pkg.azure_request import azure_request_to_frame
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
    azure_body = json.dumps({"input_data": {"columns": ["prompt"], "data": [["a" * AZURE_BODY_CHARS]]}})
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_sdxl(Path(tmp) / "src")
        artifact = save_artifact(stage_components(tiny.base, tiny.refiner, Path(tmp) / "sdxl"), Path(tmp) / "m")
        model = mlflow.pyfunc.load_model(str(artifact))
        catalog = model.unwrap_python_model().pipelines.catalog
        params = {"height": 64, "width": 64, "num_inference_steps": 10}
        results = {
            name: median_s(lambda f=f: parse_request(f, params, config, catalog), args.repeats)
            for name, f in cases.items()
        }

        def score_py_run() -> None:  # what deploy/azureml/score.py's run() does with the body text
            frame, body_params = azure_request_to_frame(azure_body)
            model.predict(frame, params=body_params or None)

        try:  # time only the refusal this case is about
            score_py_run()
            raise SystemExit("the 100 MB prompt was accepted")
        except mlflow.exceptions.MlflowException as e:
            if f"'prompt' has {AZURE_BODY_CHARS} characters" not in e.message:
                raise
        azure = f"Azure body of {len(azure_body) / 1e6:.0f} MB, one prompt, as score.py takes it (refused)"
        results[azure] = median_s(score_py_run, args.repeats)
    reference = results["1 row 'a cat' (reference)"]
    load = f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(f"parse_request at the default limits (median of {args.repeats}); ratio = time / one-row parse; {load}")
    for name, seconds in results.items():
        print(f"  {name:<72} {seconds * 1000:9.1f} ms   ×{seconds / reference:8.0f}")
    worst = max(seconds for name, seconds in results.items() if name != azure)
    print(f"worst case at the default limits: {worst:.2f} s")
    write_section(
        "bench_parse",
        [
            "## Parse time of one request at the default limits",
            "",
            f"Written by `python -m benchmarks.bench_parse` ({datetime.date.today()}, {os.cpu_count()} CPUs, "
            f"{load}): `parse_request` with the tiny artifact's real CLIP tokenizers, median of {args.repeats}; "
            "the Azure case runs `azure_request_to_frame` and the pyfunc `predict`.",
            "",
            "| request | time | × one-row parse |",
            "|---|---|---|",
            *(
                f"| {name} | {seconds * 1000:.1f} ms | {seconds / reference:,.0f} |"
                for name, seconds in results.items()
            ),
            "",
            f"Worst case at the default limits (the model's own parsing): **{worst:.2f} s**.",
        ],
    )


if __name__ == "__main__":
    main()
