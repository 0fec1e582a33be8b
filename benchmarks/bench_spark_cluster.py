#!/usr/bin/env python
"""Spark standalone cluster on 127.0.0.1 (testkit.spark_cluster), tiny model: 1 worker vs 2 workers,
``spark_udf`` vs ``model_udf``, side by side in one run.

Per cluster size and route: time to first row (a fresh UDF scoring one row: ship/download + load +
one image; spark_udf runs first, so its figure also holds the Python workers' start), then rows/s
over ``--rows`` rows in as many partitions as workers (warm: the Python workers loaded the model
during the first row), and what reached the executors: bytes fetched per
executor (spark_udf's zip) or downloaded per node (model_udf's cache), copies on disk.

  python -m benchmarks.bench_spark_cluster [--rows 16] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDXL_DTYPE", "float32")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from sdxl_tools.artifact import save_artifact  # noqa: E402
from sdxl_tools.random_weights import write_tiny_sdxl  # noqa: E402
from sdxl_tools.spark import input_struct, model_udf, result_type  # noqa: E402
from sdxl_tools.staging import stage_components  # noqa: E402
from testkit.spark_cluster import SparkCluster  # noqa: E402


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def copies(folder: Path) -> int:
    return len(list(folder.rglob("MLmodel"))) if folder.exists() else 0


def measure(workers: int, artifact: Path, work: Path, rows: int, params: dict) -> list[dict]:
    results = []
    with SparkCluster(work / f"cluster{workers}", workers=workers) as cluster:
        exec_tmp = cluster.root / "executor-tmp"
        exec_tmp.mkdir()
        spark = cluster.session("bench", **{"spark.executorEnv.TMPDIR": str(exec_tmp)})
        spark.sparkContext.setLogLevel("ERROR")
        frame = pd.DataFrame({"id": range(rows), "prompt": [f"a cat {i}" for i in range(rows)], "seed": range(rows)})
        sdf = spark.createDataFrame(frame).repartition(workers, "id").cache()
        sdf.count()
        cache = cluster.root / "model-cache"
        routes = {
            "spark_udf": lambda: mlflow.pyfunc.spark_udf(
                spark, str(artifact), result_type=result_type(params), params=params, env_manager="local"
            ),
            "model_udf": lambda: model_udf(spark, str(artifact), params, cache_dir=cache, key="id"),
        }
        for name, make in routes.items():
            key = "id" if name == "model_udf" else None
            start = time.perf_counter()
            udf = make()
            sdf.limit(1).select(udf(input_struct(sdf.limit(1), key=key)).alias("r")).select("r.seed").collect()
            first = time.perf_counter() - start
            udf = make()
            start = time.perf_counter()
            sdf.select(udf(input_struct(sdf, key=key)).alias("r")).select("r.seed").collect()
            seconds = time.perf_counter() - start
            zips = list(cluster.root.glob("worker*/app-*/*/*.zip"))
            results.append({
                "workers": workers, "route": name, "first_row_s": first, "rows_s": rows / seconds,
                "zips": len(zips), "zip_bytes": sum(p.stat().st_size for p in zips),
                "extracted": copies(exec_tmp), "extracted_bytes": du(exec_tmp),
                "cached": copies(cache), "cached_bytes": du(cache),
            })  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    params = {"num_inference_steps": args.steps, "height": args.size, "width": args.size, "on_error": "null"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = write_tiny_sdxl(work / "tiny", seed=0)
        artifact = save_artifact(stage_components(tiny.base, tiny.refiner, work / "sdxl"), work / "model")
        results = [r for workers in (1, 2) for r in measure(workers, artifact, work, args.rows, params)]
        size = du(artifact)
    print(f"tiny SDXL artifact {size / 2**20:.1f} MiB; {args.rows} rows, {args.size}², {args.steps} steps, "
          f"1 core per worker; load average {os.getloadavg()[0]:.1f} (2 CPUs, shared)")  # fmt: skip
    print(
        f"{'workers':>7} {'route':<10} {'first row s':>11} {'rows/s':>7}  shipped / on disk after 2 UDFs (cumulative)"
    )
    for r in results:
        mib = {k: r[k] / 2**20 for k in ("zip_bytes", "extracted_bytes", "cached_bytes")}
        shipped = (
            f"{r['zips']} zips {mib['zip_bytes']:.1f} MiB, {r['extracted']} extracted {mib['extracted_bytes']:.1f} MiB"
            if r["route"] == "spark_udf"
            else f"{r['cached']} cached copy {mib['cached_bytes']:.1f} MiB"
        )
        print(f"{r['workers']:>7} {r['route']:<10} {r['first_row_s']:>11.1f} {r['rows_s']:>7.2f}  {shipped}")
    by = {(r["workers"], r["route"]): r for r in results}
    for route in ("spark_udf", "model_udf"):
        print(f"{route}: rows/s 2 workers / 1 worker {by[2, route]['rows_s'] / by[1, route]['rows_s']:.2f}")
    for workers in (1, 2):
        a, b = by[workers, "model_udf"], by[workers, "spark_udf"]
        print(f"{workers} worker(s): model_udf / spark_udf rows/s {a['rows_s'] / b['rows_s']:.2f}, "
              f"first row {a['first_row_s'] / b['first_row_s']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
