"""Batch scoring on a real Spark standalone cluster: a master and two workers on 127.0.0.1, each its own
JVM, executors launched by the workers, one (declared) GPU per task. Started and stopped by the module.

``model_udf`` (sdxl_tools.spark) is the route for clusters; the ``spark_udf`` cases marked xfail show
what MLflow's own route does on a non-local master (model_config dropped, a copy per Python worker,
batch-relative row numbers), and fail if MLflow changes that.
"""

from __future__ import annotations

import importlib.util
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from pyspark.sql import functions as F

from sdxl_tools.spark import input_struct, model_udf, result_type
from testkit.spark_cluster import SparkCluster

ROOT = Path(__file__).resolve().parent.parent
# Python workers run with one OpenMP thread: pin torch the same on both sides; one row per pipeline call, so
# an image does not depend on which rows share its Arrow batch (which differs from run to run on a cluster).
ONE_THREAD = {"torch_threads": 1, "max_batch_size": 1}
PARAMS = {"num_inference_steps": 2, "height": 64, "width": 64, "refiner": "none"}
SCHEMA = "id long, prompt string, seed long, num_inference_steps long, height long"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SparkCluster(tmp_path_factory.mktemp("cluster"), workers=2, cores=1, gpus=1) as running:
        yield running


@pytest.fixture(scope="module")
def spark(cluster):
    exec_tmp = cluster.root / "executor-tmp"  # where spark_udf's Python workers extract their copies
    exec_tmp.mkdir()
    session = cluster.session("sdxl-cluster-tests", **{"spark.executorEnv.TMPDIR": str(exec_tmp)})
    yield session
    cluster.stop_session()


@pytest.fixture(scope="module")
def local_model(artifact):
    threads = torch.get_num_threads()
    yield mlflow.pyfunc.load_model(str(artifact), model_config=ONE_THREAD)
    torch.set_num_threads(threads)


def rows_frame(n: int, bad: dict[int, dict] | None = None) -> pd.DataFrame:
    rows = [{"id": 1000 + i, "prompt": f"a cat number {i}", "seed": 7 + i} for i in range(n)]
    for i, fields in (bad or {}).items():
        rows[i] = {"id": 1000 + i, "seed": 7 + i} | fields
    columns = [c.split()[0] for c in SCHEMA.split(",")]
    frame = pd.DataFrame(rows).reindex(columns=columns).astype(object)
    return frame.where(frame.notna(), None)


def expected_images(model, frame: pd.DataFrame, params) -> dict[int, str]:
    """Each good row alone through in-process predict."""
    out = {}
    for _, row in frame.iterrows():
        one = pd.DataFrame([row.drop("id").to_dict()]).astype(object)
        result = model.predict(one.where(one.notna(), None), params | {"on_error": "null"})
        out[row["id"]] = result["generated_image"][0]
    return out


def copies(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.rglob("MLmodel")) if folder.exists() else []


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


# ---- per-row params, error mode with stable keys ---------------------------------------------------------

BAD = {3: {"prompt": ""}, 8: {"prompt": "a cat", "num_inference_steps": 0}, 10: {"prompt": "a cat", "height": 65}}


def test_model_udf_per_row_params_keys_in_errors_and_bytes_equal_in_process(spark, artifact, local_model, tmp_path):
    frame = rows_frame(12, BAD)
    frame.loc[5, "num_inference_steps"] = 3  # a per-row setting
    sdf = spark.createDataFrame(frame, SCHEMA).repartition(2, "id")
    params = PARAMS | {"on_error": "null"}
    udf = model_udf(spark, str(artifact), params, model_config=ONE_THREAD, cache_dir=tmp_path / "cache", key="id")
    scored = sdf.select("id", udf(input_struct(sdf, key="id")).alias("r")).select("id", "r.*").toPandas()
    scored = scored.sort_values("id").set_index("id")

    assert list(scored.columns) == ["prompt", "generated_image", "nsfw_content_detected", "seed", "error"]
    assert sorted(scored.index) == list(frame["id"])
    failed = scored["error"].notna()
    assert sorted(scored.index[failed]) == [1000 + i for i in BAD]
    assert scored["error"][1003].startswith("Row 1003: 'prompt' is empty"), scored["error"][1003]
    assert scored["error"][1008].startswith("Row 1008: 'num_inference_steps'"), scored["error"][1008]
    assert scored["error"][1010].startswith("Row 1010: 'height'/'width'"), scored["error"][1010]
    assert scored["generated_image"][failed].isna().all() and scored["generated_image"][~failed].notna().all()
    assert scored["seed"].tolist() == [7 + i for i in range(12)]  # real longs, bad rows included
    good = frame[~frame["id"].isin(scored.index[failed])]
    expected = expected_images(local_model, good, PARAMS)
    assert {i: scored["generated_image"][i] for i in good["id"]} == expected  # byte for byte


def raise_message(spark, udf, sdf) -> str:
    with pytest.raises(Exception) as failure:
        sdf.select(udf(input_struct(sdf, key="id") if udf.__name__ == "score" else input_struct(sdf))).collect()
    return str(failure.value)


def test_model_udf_raise_names_the_row_key(spark, artifact, tmp_path):
    sdf = spark.createDataFrame(rows_frame(6, {4: {"prompt": ""}}), SCHEMA).repartition(2, "id")
    udf = model_udf(spark, str(artifact), PARAMS | {"on_error": "raise"}, ONE_THREAD, tmp_path / "cache", key="id")
    assert "Row 1004: 'prompt' is empty" in raise_message(spark, udf, sdf)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="spark_udf numbers rows within each Arrow batch: 'Row 0/1/..', not the key",
)
def test_spark_udf_raise_names_the_row_key(spark, artifact):
    sdf = spark.createDataFrame(rows_frame(6, {4: {"prompt": ""}}), SCHEMA).repartition(2, "id")
    params = PARAMS | {"on_error": "raise"}
    udf = mlflow.pyfunc.spark_udf(spark, str(artifact), result_type=result_type(params), params=params,
                                  env_manager="local")  # fmt: skip
    assert "Row 1004" in raise_message(spark, udf, sdf)


# ---- model_config reaches the executors ------------------------------------------------------------------


def four_step_row(spark):
    frame = rows_frame(1)
    frame["num_inference_steps"] = [4]
    return spark.createDataFrame(frame, SCHEMA)


def test_model_udf_honours_model_config(spark, artifact, tmp_path):
    sdf = four_step_row(spark)
    udf = model_udf(spark, str(artifact), PARAMS | {"on_error": "null"}, {"max_steps": 3}, tmp_path / "cache", "id")
    row = sdf.select(udf(input_struct(sdf, key="id")).alias("r")).select("r.*").collect()[0]
    assert row["generated_image"] is None
    assert row["error"].startswith("Row 1000: ") and "3" in row["error"], row["error"]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="MLflow's SparkModelCache loads without model_config on a non-local master",
)
def test_spark_udf_honours_model_config(spark, artifact):
    sdf = four_step_row(spark)
    params = PARAMS | {"on_error": "null"}
    udf = mlflow.pyfunc.spark_udf(spark, str(artifact), result_type=result_type(params), params=params,
                                  env_manager="local", model_config={"max_steps": 3})  # fmt: skip
    row = sdf.select(udf(input_struct(sdf)).alias("r")).select("r.*").collect()[0]
    assert row["generated_image"] is None, "a 4-step row scored past max_steps=3"


# ---- the model shipped once per node, loaded once per Python worker, cleaned up --------------------------


def probe(spark, partitions: int = 2) -> list[tuple[int, int, int]]:
    """(pid, most model_udf loads of one (URI, config), spark_udf models) of the Python worker of each of
    ``partitions`` tasks."""
    import os

    from pyspark.sql.functions import pandas_udf

    def count(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        from mlflow.pyfunc.spark_model_cache import SparkModelCache

        from sdxl_tools import spark as route

        for batch in batches:
            loads = max(route.LOADS.values(), default=0)
            yield pd.Series([f"{os.getpid()} {loads} {len(SparkModelCache._models)}"] * len(batch))

    udf = pandas_udf(count, returnType="string")
    df = spark.range(partitions).repartition(partitions)
    return sorted({tuple(map(int, r[0].split())) for r in df.select(udf(F.col("id"))).collect()})


def score_two_jobs(spark, make_udf, key: str | None) -> None:
    sdf = spark.createDataFrame(rows_frame(4), SCHEMA).repartition(2, "id")
    for _ in range(2):  # two UDFs of the same model, one job each
        udf = make_udf()
        sdf.select(udf(input_struct(sdf, key=key)).alias("r")).select("r.seed").collect()


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="spark_udf extracts a copy per Python worker and call")
def test_spark_udf_one_copy_per_node(spark, cluster, artifact):
    """What MLflow's route costs on a cluster (printed; docs/batch-spark.md has the figures)."""
    before = copies(cluster.root / "executor-tmp")
    params = PARAMS | {"on_error": "null"}

    def make():
        return mlflow.pyfunc.spark_udf(spark, str(artifact), result_type=result_type(params), params=params,
                                       env_manager="local")  # fmt: skip

    score_two_jobs(spark, make, key=None)
    extracted = [c for c in copies(cluster.root / "executor-tmp") if c not in before]
    zips = [p for p in cluster.root.glob("worker*/app-*/*/*.zip")]
    print(f"spark_udf: {len(extracted)} extracted copies ({du(cluster.root / 'executor-tmp')} B), "
          f"{len(zips)} zips fetched by executors ({sum(p.stat().st_size for p in zips)} B), "
          f"artifact {du(artifact)} B; workers {probe(spark)}")  # fmt: skip
    assert len(extracted) <= 1, f"{len(extracted)} extracted copies on one node"  # one per worker and call


def test_model_udf_one_copy_per_node_one_load_per_worker_and_cleanup(spark, cluster, artifact, tmp_path):
    cache = tmp_path / "cache"
    before_tmp, before_zips = copies(cluster.root / "executor-tmp"), set(cluster.root.glob("worker*/app-*/*/*.zip"))

    # a config no earlier test used: a Python worker keeps the models it loaded, keyed by URI and config
    config = ONE_THREAD | {"max_rows": 9_999}

    def make():
        return model_udf(spark, str(artifact), PARAMS | {"on_error": "null"}, config, cache, key="id")

    score_two_jobs(spark, make, key="id")
    assert copies(cache) == [cache / c.name for c in copies(cache)] and len(copies(cache)) == 1  # both executors
    assert copies(cluster.root / "executor-tmp") == before_tmp  # nothing extracted per worker
    assert set(cluster.root.glob("worker*/app-*/*/*.zip")) == before_zips  # nothing shipped through the driver
    after = probe(spark)
    print(f"model_udf: cache {du(cache)} B (artifact {du(artifact)} B); workers {after}")
    # a worker loads a model once for both jobs, whichever worker the probe lands on (a worker that ran
    # earlier tests holds other models, counted per (URI, config))
    assert all(loads <= 1 for _, loads, _ in after), after

    # three other models (copies of the artifact elsewhere): the cache keeps the newest two
    others = []
    for i in range(3):
        other = tmp_path / f"model{i}"
        shutil.copytree(artifact, other)
        others.append(other)
        udf = model_udf(spark, str(other), PARAMS | {"on_error": "null"}, ONE_THREAD, cache, key="id")
        sdf = spark.createDataFrame(rows_frame(1), SCHEMA)
        sdf.select(udf(input_struct(sdf, key="id")).alias("r")).select("r.seed").collect()
    kept = sorted((c / ".uri").read_text() for c in copies(cache))
    assert kept == sorted(str(o) for o in others[1:]), kept


# ---- the sample job uses the cluster, restartable ---------------------------------------------------------


def load_sample():
    spec = importlib.util.spec_from_file_location("batch_spark_sample", ROOT / "samples" / "batch_spark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_job_spreads_rows_over_executors_and_restarts(spark, artifact, tmp_path):
    prompts = str(tmp_path / "prompts.parquet")
    spark.createDataFrame(rows_frame(8).drop(columns="id"), SCHEMA.split(", ", 1)[1]).coalesce(1).write.parquet(prompts)
    sample, table_dir, images = load_sample(), tmp_path / "table", tmp_path / "images"
    run = dict(images=str(images), params=PARAMS, seed=None, model_config=ONE_THREAD, cache_dir=str(tmp_path / "c"))

    table = sample.score_file(spark, str(artifact), prompts, str(table_dir), **run).toPandas()
    assert sorted(table["row"]) == list(range(8)) and table["error"].isna().all()
    parts = sorted(table_dir.glob("part-*.parquet"))
    assert len(parts) == spark.sparkContext.defaultParallelism == 2  # one task per executor core, not one
    assert sorted(p.name for p in images.iterdir()) == [f"{r:06d}.png" for r in range(8)]

    again = sample.score_file(spark, str(artifact), prompts, str(table_dir), **run).toPandas()
    assert sorted(again["row"]) == list(range(8))  # nothing scored twice
    assert set(parts) <= set(table_dir.glob("part-*.parquet"))  # appended to, not rewritten


# ---- an executor killed mid-job ---------------------------------------------------------------------------


def stage_running(tracker, tasks: int) -> int | None:
    """An active stage running at least ``tasks`` tasks at this moment."""
    for stage in tracker.getActiveStageIds():
        info = tracker.getStageInfo(stage)
        if info is not None and info.numActiveTasks >= tasks:
            return stage
    return None


def test_executor_killed_mid_job_every_row_once_and_bytes_equal(spark, cluster, artifact, local_model, tmp_path):
    frame = rows_frame(16)
    sdf = spark.createDataFrame(frame, SCHEMA).repartition(4, "id")
    params = PARAMS | {"num_inference_steps": 4, "on_error": "null"}
    udf = model_udf(spark, str(artifact), params, ONE_THREAD, tmp_path / "cache", key="id")
    out = tmp_path / "out"
    job = threading.Thread(
        target=lambda: sdf.select("id", udf(input_struct(sdf, key="id")).alias("r"))
        .select("id", "r.*").write.parquet(str(out))
    )  # fmt: skip
    executors = cluster.executor_pids()
    tracker = spark.sparkContext.statusTracker()
    job.start()
    # Wait until both executors (one core each) run a scoring task: the killed one is then mid-task. The
    # cache folder cannot tell: Python workers that loaded the model for an earlier test reuse it.
    deadline, busy = time.monotonic() + 120, None
    while busy is None and time.monotonic() < deadline:
        busy = stage_running(tracker, tasks=2)
        time.sleep(0.1)
    assert busy is not None and job.is_alive(), "the job never ran two tasks at once"
    victim = executors[0]
    psutil.Process(victim).kill()
    job.join(timeout=400)
    assert not job.is_alive()
    assert tracker.getStageInfo(busy).numFailedTasks >= 1  # the kill cost a running task, which ran again
    scored = pd.read_parquet(out)
    assert sorted(scored["id"]) == list(frame["id"])  # every row exactly once
    assert scored["error"].isna().all()
    expected = expected_images(local_model, frame, params)
    assert dict(zip(scored["id"], scored["generated_image"], strict=True)) == expected
    cluster.wait_executors(2)  # the worker started a new executor for the application
    assert victim not in cluster.executor_pids()
