#!/usr/bin/env python
"""The request cost estimate against real runs: the model's calibration (measured at load when
``request_timeout_s`` is set: seconds per UNet step per megapixel, plus per image) predicts each case,
which is then run; printed side by side with the ratio estimate / real, and written to RESULTS.md
(section ``bench_deadline``) with the machine's load average.

  python -m benchmarks.bench_deadline [--sizes 128,256,512] [--steps 4,16] [--rows 1,4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks.bench_core import write_section

warnings.filterwarnings("ignore")


def seconds(model, frame, params: dict) -> float:
    start = time.perf_counter()
    model.predict(frame, params=params)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="128,256,512")
    parser.add_argument("--steps", default="4,16")
    parser.add_argument("--rows", default="1,4")
    parser.add_argument("--repeats", type=int, default=3, help="real runs per case (median)")
    args = parser.parse_args()

    import mlflow
    import pandas as pd

    from model_pkg.plan import plan_batches
    from model_pkg.request import parse_request
    from sdxl_tools.artifact import save_artifact
    from sdxl_tools.random_weights import write_tiny_sdxl
    from sdxl_tools.staging import stage_components

    load_start = os.getloadavg()
    table = ["| case | estimate s | real s | estimate / real |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_sdxl(Path(tmp) / "src")
        artifact = save_artifact(stage_components(tiny.base, tiny.refiner, Path(tmp) / "sdxl"), Path(tmp) / "m")
        model = mlflow.pyfunc.load_model(str(artifact), model_config={"request_timeout_s": 3600})
        python_model = model.unwrap_python_model()
        per_step, per_image = python_model.cost
        calibration = f"{per_step:.3f} s per UNet step per megapixel, {per_image:.3f} s per image per megapixel"
        print(f"calibration: {calibration}")
        print(f"{'case':<34} {'estimate s':>11} {'real s':>9} {'estimate/real':>14}")
        for size in map(int, args.sizes.split(",")):
            for steps in map(int, args.steps.split(",")):
                for rows in map(int, args.rows.split(",")):
                    params = {"height": size, "width": size, "num_inference_steps": steps, "seed": 1}
                    frame = pd.DataFrame({"prompt": ["a cat on a bench"] * rows})
                    rows_ = parse_request(frame, params, python_model.config, python_model.pipelines.catalog).rows
                    planned = plan_batches(rows_, python_model.config.max_batch_size)
                    estimate = python_model.estimate(planned)
                    real = statistics.median(seconds(model, frame, params) for _ in range(args.repeats))
                    case = f"{rows} × {size}² ensemble, {steps} steps"
                    print(f"{case:<34} {estimate:11.3f} {real:9.3f} {estimate / real:14.2f}")
                    table.append(f"| {case} | {estimate:.3f} | {real:.3f} | **{estimate / real:.2f}** |")
    load = f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(load)
    write_section(
        "bench_deadline",
        [
            "## Request cost estimate vs real runs (deadlines)",
            "",
            f"Written by `python -m benchmarks.bench_deadline` ({datetime.date.today()}, {os.cpu_count()} CPUs, "
            f"{load}); tiny artifact, real = median of {args.repeats} runs, calibration at load: {calibration}.",
            "",
            *table,
        ],
    )


if __name__ == "__main__":
    main()
