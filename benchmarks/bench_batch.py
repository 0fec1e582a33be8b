#!/usr/bin/env python
"""Batch throughput, one run, tiny models: the same rows scored three ways, in images/s.

1. a plain loop of single-row ``predict`` calls (the baseline a user would write first);
2. the file batch job (``sdxl_tools.batch.run``: chunks of ``--chunk-size`` rows, files + manifest);
3. ``spark_udf`` on a local Spark session (``--partitions`` tasks), after one warm-up call that
   starts the Python workers (its ~20 s are not counted; each call still loads the model per task).

1 and 2 alternate ``--repeats`` times and the fastest of each is reported (a shared machine's
bursts of load hit single runs hard); Spark likewise over ``--repeats`` calls. Spark's workers
run torch with one thread each (OMP_NUM_THREADS=1), the in-process model with ``--torch-threads``
(0: torch's default). Absolute figures of random tiny models mean little; compare them.

  python benchmarks/bench_batch.py [--rows 64] [--size 64] [--steps 10] [--chunk-size 8] [--partitions 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from sdxl_tools import batch  # noqa: E402
from sdxl_tools.artifact import save_artifact  # noqa: E402
from sdxl_tools.random_weights import write_tiny_sdxl  # noqa: E402
from sdxl_tools.staging import stage_components  # noqa: E402


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:6.2f} images/s  ({seconds:6.2f} s for {rows} rows)"


def spark_rate(model_dir: Path, rows: pd.DataFrame, params: dict, partitions: int, repeats: int) -> float:
    from pyspark.sql import SparkSession

    from sdxl_tools.spark import input_struct, result_type

    spark = (
        SparkSession.builder.master(f"local[{partitions}]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", str(partitions))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        udf = mlflow.pyfunc.spark_udf(
            spark, str(model_dir), result_type=result_type(params), params=params, env_manager="local"
        )
        sdf = spark.createDataFrame(rows).repartition(partitions)
        sdf.cache().count()

        def score() -> float:
            start = time.perf_counter()
            n = sdf.select(udf(input_struct(sdf)).alias("r")).where("r.generated_image is not null").count()
            assert n == len(rows), n
            return time.perf_counter() - start

        score()  # warm-up: starts the Python workers
        return min(score() for _ in range(repeats))
    finally:
        spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args()

    params = {"num_inference_steps": args.steps, "height": args.size, "width": args.size}  # ensemble
    rows = pd.DataFrame({"prompt": [f"a cat number {i}" for i in range(args.rows)], "seed": range(args.rows)})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = write_tiny_sdxl(tmp / "src")
        model_dir = save_artifact(stage_components(tiny.base, tiny.refiner, tmp / "sdxl"), tmp / "model")
        model = mlflow.pyfunc.load_model(str(model_dir), model_config={"torch_threads": args.torch_threads})
        model.predict(rows.iloc[[0]], params=params)  # warm-up
        print(
            f"{args.rows} rows, {args.size}x{args.size}, {args.steps} steps, refiner ensemble; "
            f"torch threads {torch.get_num_threads()} in process, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at start; best of {args.repeats}\n"
        )
        (tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows.to_dict("records")))
        loop, job = [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            for row in range(len(rows)):
                model.predict(rows.iloc[[row]], params=params)
            loop.append(time.perf_counter() - start)
            summary = batch.run(model, tmp / "prompts.jsonl", tmp / f"out{i}", params, args.chunk_size, progress=False)
            assert summary.images == len(rows), summary
            job.append(summary.seconds)
        single, files = min(loop), min(job)
        print(f"single-row predict loop       {rate(len(rows), single)}")
        chunks = f"file batch job (chunks of {args.chunk_size})"
        print(f"{chunks:<30}{rate(len(rows), files)}   x{single / files:.2f} vs the loop")

        seconds = spark_rate(model_dir, rows, params, args.partitions, args.repeats)
        print(
            f"spark_udf, local[{args.partitions}]           {rate(len(rows), seconds)}   "
            f"x{single / seconds:.2f} vs the loop (model loaded per task, included)"
        )
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
