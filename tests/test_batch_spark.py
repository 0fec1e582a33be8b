"""Spark batch scoring on a real local[2] session: spark_udf struct output, per-row params, error mode."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sdxl_tools.client import b64_to_image
from sdxl_tools.spark import input_struct, result_type
from testkit.helpers import pixels, png_b64

ROOT = Path(__file__).resolve().parent.parent
# Spark's Python workers run with OMP_NUM_THREADS=1; pin torch to one thread on both sides so the
# images are the same bytes (torch rounds differently with another thread count).
ONE_THREAD = {"torch_threads": 1}


@pytest.fixture(scope="module")  # module: the cluster tests start their own driver
def spark(tmp_path_factory):
    previous = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable  # workers need the venv's packages
    session = (
        SparkSession.builder.master("local[2]")
        .appName("sdxl-pyfunc-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("warehouse")))
        .getOrCreate()
    )
    yield session
    session.stop()
    if previous is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = previous


@pytest.fixture(scope="module")
def one_thread_model(cn_artifact):
    threads = torch.get_num_threads()
    yield mlflow.pyfunc.load_model(str(cn_artifact), model_config=ONE_THREAD)
    torch.set_num_threads(threads)  # the model pinned the whole test process; give it back


INPUT_DDL = (
    "id long, prompt string, seed long, height long, width long, num_inference_steps long, "
    "negative_prompt string, image string, mask string, control_image string, controlnet string"
)


def mask_b64(size: tuple[int, int]) -> str:
    mask = Image.new("L", size, 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def nine_rows() -> pd.DataFrame:
    """Text-to-image rows with their own seeds, sizes, steps and negative prompt, an image row, an
    inpainting row (image + mask) and the first row again with a control image (ControlNet ``edges``)."""
    rows = [
        {"prompt": "a cat with a hat", "seed": 11},
        {"prompt": "a dog on a bench", "seed": 12},
        {"prompt": "a red hat", "seed": 13, "height": 96},
        {"prompt": "a tall tree", "seed": 14, "width": 96, "height": 64},
        {"prompt": "a blue house", "seed": 15, "negative_prompt": "blurry"},
        {"prompt": "a small boat", "seed": 16, "num_inference_steps": 6},
        {"prompt": "a green cat", "seed": 17, "image": png_b64(size=(96, 64))},
        {"prompt": "a red cat", "seed": 18, "image": png_b64(size=(100, 72)), "mask": mask_b64((100, 72))},
        {"prompt": "a cat with a hat", "seed": 11, "control_image": png_b64(size=(64, 64)), "controlnet": "edges"},
    ]
    columns = [c.split()[0] for c in INPUT_DDL.split(",")]
    return pd.DataFrame([{"id": i} | r for i, r in enumerate(rows)]).reindex(columns=columns).astype(object)


def test_spark_udf_struct_equals_pandas_predict_byte_for_byte(spark, cn_artifact, one_thread_model):
    params = {"num_inference_steps": 4, "height": 64, "width": 64}  # ensemble: base + refiner
    rows = nine_rows()
    # two partitions, so two tasks and two Arrow batches (each one predict call)
    sdf = spark.createDataFrame(rows.where(rows.notna(), None), INPUT_DDL).repartition(2, "id")
    udf = mlflow.pyfunc.spark_udf(
        spark, str(cn_artifact), result_type=result_type(params), params=params, env_manager="local",
        model_config=ONE_THREAD,
    )  # fmt: skip

    out = sdf.select("id", F.spark_partition_id().alias("part"), udf(input_struct(sdf)).alias("out"))
    scored = out.select("id", "part", "out.*").toPandas()  # in partition order, each in its batch order

    assert list(scored.columns) == ["id", "part", "prompt", "generated_image", "nsfw_content_detected", "seed"]
    parts = scored.groupby("part", sort=False)["id"].apply(list)
    assert len(parts) == 2
    scored = scored.sort_values("id").reset_index(drop=True)
    # the same rows in the same groups through pandas predict, with torch pinned to one thread too
    assert one_thread_model.unwrap_python_model().config.torch_threads == 1
    expected = pd.concat(
        [one_thread_model.predict(rows.loc[ids].drop(columns="id").reset_index(drop=True), params) for ids in parts]
    ).set_axis([i for ids in parts for i in ids])
    expected = expected.sort_index()

    assert scored["prompt"].tolist() == expected["prompt"].tolist() == rows["prompt"].tolist()
    assert scored["seed"].tolist() == expected["seed"].tolist() == [*range(11, 19), 11]
    assert scored["nsfw_content_detected"].isna().all()  # no safety checker packaged
    assert scored["generated_image"].tolist() == expected["generated_image"].tolist()  # byte for byte
    sizes = [b64_to_image(b).size for b in scored["generated_image"]]
    assert sizes == [(64, 64), (64, 64), (64, 96), (96, 64), (64, 64), (64, 64), (96, 64), (100, 72), (64, 64)]
    assert scored["generated_image"].nunique() == 9
    assert (pixels(scored["generated_image"][8]) != pixels(scored["generated_image"][0])).any()  # conditioned


def load_sample():
    spec = importlib.util.spec_from_file_location("batch_spark_sample", ROOT / "samples" / "batch_spark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BAD_ROWS = {  # row → (its fields, the start of its error)
    7: ({"prompt": ""}, "'prompt' is empty"),
    23: ({"prompt": "a cat", "num_inference_steps": 0}, "'num_inference_steps': Input should be greater"),
    41: ({"prompt": "a cat", "height": 65}, "'height'/'width' 64×65: width and height must be multiples of 8"),
    66: ({"prompt": "a cat", "image": "http://127.0.0.1/cat.png"}, "'image': URLs are not fetched"),
    88: ({"prompt": "a cat", "image": "not base64 !!"}, "'image': not valid base64"),
}


def test_sample_scores_100_rows_with_5_bad_into_a_table_and_files(spark, artifact, tmp_path):
    rows = [{"prompt": f"a cat number {i}"} for i in range(100)]
    rows[3]["seed"] = 9  # its own seed; the others get --seed + row
    for row, (fields, _) in BAD_ROWS.items():
        rows[row] = fields
    schema = "prompt string, seed long, num_inference_steps long, height long, image string"
    frame = pd.DataFrame(rows).reindex(columns=[c.split()[0] for c in schema.split(",")]).astype(object)
    spark.createDataFrame(frame.where(frame.notna(), None), schema).write.parquet(str(tmp_path / "prompts.parquet"))
    params = {"num_inference_steps": 2, "height": 64, "width": 64, "refiner": "none"}  # cheap; on_error=null default
    params["strength"] = 0.5  # image rows run 2 × 0.5 = 1 step (with 0.3, none: a request error)

    table = load_sample().score_file(
        spark, str(artifact), str(tmp_path / "prompts.parquet"), str(tmp_path / "table"), str(tmp_path / "images"),
        params, seed=500, cache_dir=str(tmp_path / "cache"),
    ).toPandas().sort_values("row").reset_index(drop=True)  # fmt: skip

    assert list(table.columns) == ["row", "prompt", "seed", "image", "nsfw", "error"]
    assert table["row"].tolist() == list(range(100))
    has_image = table["image"].notna()
    assert table.index[~has_image].tolist() == sorted(BAD_ROWS)  # exactly the 95 good rows have images
    assert table["error"][has_image].isna().all()
    for row, (_, message) in BAD_ROWS.items():
        assert table["error"][row].startswith(f"Row {row}: {message}"), table["error"][row]
    good = table[has_image]
    assert good["seed"].tolist() == [9 if r == 3 else 500 + r for r in good["row"]]
    assert table["nsfw"].isna().all()
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert files == [f"{r:06d}.png" for r in good["row"]]  # one file per good row
    assert b64_to_image(good["image"].iloc[0]).size == (64, 64)
