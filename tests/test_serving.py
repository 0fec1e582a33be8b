"""Real-time scoring: the artifact behind the real ``mlflow models serve``.

One server per module, serving a ``models:/<name>@<alias>`` URI from a temporary sqlite registry
(the artifact is built with ``max_rows=4`` so the too-many-rows case is cheap); it listens on a
free port of 127.0.0.1 and is stopped when the module ends.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
from PIL import Image

from model_pkg.contract import OUTPUT_COLUMNS
from sdxl_tools.artifact import log_artifact
from sdxl_tools.client import AZURE_OUTPUT_KEYS, b64_to_image
from sdxl_tools.staging import stage_components
from testkit.helpers import FAST, MID_RUN_ROW, guidance_lasting, png_b64
from testkit.scoring_server import ScoringServer

ROOT = Path(__file__).resolve().parent.parent
NAME, ALIAS = "sdxl-serving", "champion"
MAX_ROWS = 4


@pytest.fixture(scope="module")
def registry(tiny, controlnets, tmp_path_factory):
    """A sqlite registry holding the artifact (with the tiny ControlNets) as ``models:/sdxl-serving@champion``."""
    folder = tmp_path_factory.mktemp("serving-registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=str(folder / "mlruns"))
        staged = stage_components(tiny.base, tiny.refiner, folder / "sdxl", controlnets=controlnets)
        with mlflow.start_run(experiment_id=experiment):
            info = log_artifact(staged, name="sdxl", model_config={"max_rows": MAX_ROWS})
        version = mlflow.register_model(info.model_uri, NAME).version
        mlflow.MlflowClient().set_registered_model_alias(NAME, ALIAS, version)
        yield uri
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


@pytest.fixture(scope="module")
def server(registry):
    with ScoringServer(f"models:/{NAME}@{ALIAS}", env={"MLFLOW_TRACKING_URI": registry}) as s:
        yield s
    assert s.process.poll() is not None  # stopped by the fixture


@pytest.fixture(scope="module")
def served_model(registry):
    """The same registered version, loaded in-process."""
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(registry)
    mlflow.set_registry_uri(registry)
    try:
        return mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def predictions(response) -> list[dict]:
    assert response.status_code == 200, response.text[:2000]
    return response.json()["predictions"]


def test_ping_health_version(server):
    import requests

    assert requests.get(f"{server.url}/ping", timeout=30).status_code == 200
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    version = requests.get(f"{server.url}/version", timeout=30)
    assert version.status_code == 200
    assert version.text == mlflow.__version__


ROWS = [
    {"prompt": "a cat with a hat", "seed": 7},
    {"prompt": "a green cat", "image": png_b64(size=(64, 64)), "seed": 8},
]
ROWS_WITH_OWN_PARAMS = [{**row, **FAST} for row in ROWS]  # no request params: rows carry steps and size


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": json.loads(pd.DataFrame(ROWS).to_json(orient="split", index=False)), "params": FAST},
        {"dataframe_records": ROWS, "params": FAST},
        {"dataframe_records": ROWS_WITH_OWN_PARAMS},
        # instances: MLflow makes numpy columns of the rows (a null string becomes "None"): same keys, no nulls
        {"instances": [{**row, "image": png_b64(size=(64, 64))} for row in ROWS], "params": FAST},
    ],
    ids=["dataframe_split+params", "dataframe_records+params", "dataframe_records", "instances+params"],
)
def test_served_images_equal_in_process_predict(server, served_model, body):
    rows = body.get("dataframe_records") or body.get("instances") or ROWS
    expected = served_model.predict(pd.DataFrame(rows), params=body.get("params"))

    served = predictions(server.invoke(body))

    assert [list(r) for r in served] == [list(OUTPUT_COLUMNS)] * 2
    assert [r["seed"] for r in served] == [7, 8]
    assert [r["prompt"] for r in served] == ["a cat with a hat", "a green cat"]
    assert [r["nsfw_content_detected"] for r in served] == [None, None]
    assert [r["generated_image"] for r in served] == expected["generated_image"].tolist()  # byte-identical
    assert [b64_to_image(r["generated_image"]).size for r in served] == [(64, 64), (64, 64)]


def test_served_inpainting_equals_in_process_predict(server, served_model):
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (24, 16, 72, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    row = {
        "prompt": "a green cat",
        "image": png_b64(size=(96, 64)),
        "mask": base64.b64encode(buffer.getvalue()).decode(),
    }
    rows = [{**row, "seed": 1}, {"prompt": "a red hat", "seed": 2}]

    served = predictions(server.invoke({"dataframe_records": rows, "params": FAST}))

    expected = served_model.predict(pd.DataFrame(rows), params=FAST)
    assert [r["generated_image"] for r in served] == expected["generated_image"].tolist()  # byte-identical
    assert [b64_to_image(r["generated_image"]).size for r in served] == [(96, 64), (64, 64)]


def test_served_control_image_conditions_the_row_as_in_process_predict(server, served_model):
    """A ``control_image`` row next to the same row without one: each equals in-process predict byte for
    byte, and they differ (a control image dropped on the way would make them equal, or a 400)."""
    row = {"prompt": "a cat with a hat", "seed": 7}
    rows = [{**row, "control_image": png_b64(size=(64, 64)), "controlnet": "edges"}, row]

    served = predictions(server.invoke({"dataframe_records": rows, "params": FAST}))

    expected = served_model.predict(pd.DataFrame(rows), params=FAST)["generated_image"].tolist()
    assert [r["generated_image"] for r in served] == expected
    assert expected[0] != expected[1]


def test_azure_sample_round_trips_to_the_seed_001_shape(server, tmp_path):
    sample = ROOT / "samples" / "azure_request.json"
    result = subprocess.run(
        [
            *(sys.executable, str(ROOT / "samples" / "score_realtime.py"), "--azure", str(sample)),
            *("--url", server.url, "--save", str(tmp_path / "images")),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    response = json.loads(result.stdout)

    request_rows = json.loads(sample.read_text())["input_data"]["data"]
    assert isinstance(response, list) and len(response) == len(request_rows)
    for row, sent in zip(response, request_rows, strict=True):
        assert tuple(row) == AZURE_OUTPUT_KEYS  # exactly the Azure model card keys, in its order
        assert row["prompt"] == sent["prompt"]
        assert row["nsfw_content_detected"] is None  # no safety checker packaged (as Azure's card)
        assert b64_to_image(row["generated_image"]).size == b64_to_image(sent["image"]).size  # img2img keeps the size
    saved = sorted((tmp_path / "images").iterdir())
    assert len(saved) == 2 and all(p.suffix == ".png" and p.stat().st_size > 0 for p in saved)


def test_plain_azure_body_is_refused_with_a_400(server):
    body = json.loads((ROOT / "samples" / "azure_request.json").read_text())
    response = server.invoke(body)
    assert response.status_code == 400
    assert "exactly one of the input fields" in response.json()["message"]


GOOD = {"dataframe_records": [{"prompt": "a red hat", "seed": 3}], "params": FAST}


def records(row: dict, **params) -> dict:
    return {"dataframe_records": [{"prompt": "a cat", **row}], "params": {**FAST, **params}}


# (case id, body: dict → JSON or raw bytes, substrings the 400's message must contain)
HOSTILE = [
    ("bad JSON", b'{"dataframe_split": {"columns": ', ["valid JSON"]),
    ("Azure body as is", {"input_data": {"columns": ["prompt"], "data": [["a cat"]]}}, ["exactly one of the input"]),
    ("missing prompt column", {"dataframe_records": [{"seed": 1}], "params": FAST}, ["prompt"]),
    ("null prompt", records({"prompt": None}), ["Row 0", "'prompt' is required"]),
    ("empty prompt", records({"prompt": "  "}), ["Row 0", "'prompt' is empty"]),
    ("prompt is a number", records({"prompt": 5}), ["Row 0", "'prompt' must be a string, got int"]),
    (
        "seed is text in row 1",
        {"dataframe_records": [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": "x"}], "params": FAST},
        ["Row 1", "'seed'", "valid integer"],
    ),
    ("param of wrong type", records({}, num_inference_steps="ten"), ["num_inference_steps"]),
    ("steps over max_steps", records({}, num_inference_steps=100_000), ["'num_inference_steps'", "max_steps"]),
    ("size not multiple of 8", records({"height": 65}), ["Row 0", "'height'/'width'", "multiples of 8"]),
    ("strength out of range", records({"strength": 2}), ["Row 0", "'strength'", "less than or equal to 1"]),
    ("unknown scheduler", records({}, scheduler="K_MAGIC"), ["'scheduler'", "unknown scheduler 'K_MAGIC'"]),
    ("unknown refiner mode", records({}, refiner="maybe"), ["'refiner'", "'none', 'ensemble' or 'sequential'"]),
    ("bad base64 image", records({"image": "!!!not base64"}), ["Row 0", "'image'", "not valid base64"]),
    ("base64 of a non-image", records({"image": "aGVsbG8gd29ybGQ="}), ["Row 0", "'image'", "not an image"]),
    ("http:// image", records({"image": "http://169.254.169.254/cat.png"}), ["Row 0", "'image'", "not fetched"]),
    ("image too small", records({"image": png_b64(size=(32, 32))}), ["Row 0", "'image'", "at least 64×64"]),
    ("mask without image", records({"mask": png_b64(size=(64, 64))}), ["Row 0", "'mask' needs an 'image'"]),
    (
        "mask of another size",
        records({"image": png_b64(size=(64, 64)), "mask": png_b64(size=(96, 64))}),
        ["Row 0", "'mask' is 96×64 but 'image' is 64×64"],
    ),
    (
        "mask not an image",
        records({"image": png_b64(size=(64, 64)), "mask": "aGVsbG8gd29ybGQ="}),
        ["Row 0", "'mask'", "not an image"],
    ),
    (
        "NaN param",
        b'{"dataframe_records": [{"prompt": "a"}], "params": {"guidance_scale": NaN, "height": 64, "width": 64}}',
        ["'guidance_scale'", "finite number"],
    ),
    (
        "Infinity in a row",
        b'{"dataframe_records": [{"prompt": "a", "num_inference_steps": Infinity}], "params": {"height": 64}}',
        ["Row 0", "'num_inference_steps'", "finite number"],
    ),
    ("no rows", {"dataframe_split": {"columns": ["prompt"], "data": []}, "params": FAST}, ["no rows"]),
    (
        "too many rows",
        {"dataframe_records": [{"prompt": "a"}] * (MAX_ROWS + 1), "params": FAST},
        [f"{MAX_ROWS + 1} rows", f"limit of {MAX_ROWS}", "max_rows"],
    ),
    ("prompt over the length limit", records({"prompt": "a" * 5000}), ["Row 0", "'prompt' has 5000 characters"]),
    ("NUL-only prompt", records({"prompt": "\u0000"}), ["Row 0", "'prompt' is empty"]),
    ("control characters only", records({"prompt": "\u0001\t\u007f\u200b"}), ["Row 0", "'prompt' is empty"]),
    (
        "deep brackets inside a prompt string",
        records({"prompt": "[" * 100_000}),
        ["Row 0", "'prompt' has 100000 characters"],
    ),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_request_gets_a_clear_400_and_the_server_keeps_serving(server, body, expected):
    response = server.invoke(body)

    assert response.status_code == 400, response.text[:2000]
    error = response.json()
    assert error["error_code"] in {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
    for text in expected:
        assert text in error["message"]
    assert "stack_trace" not in error
    assert "Traceback" not in response.text

    assert len(predictions(server.invoke(GOOD))) == 1  # a valid request right after succeeds


@pytest.mark.parametrize(
    "body",
    [
        b'{"dataframe_records": [{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
        b'{"dataframe_records": [{"prompt": "a"}], "params": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
    ],
    ids=["nested arrays", "nested objects in params"],
)
def test_json_nested_past_pythons_recursion_limit_is_mlflows_own_500_before_the_model(server, body):
    """MLflow's scoring server parses the body before the model sees it: JSON nested ~50,000 deep makes its
    parser raise RecursionError, answered by the server itself as a plain-text 500 (docs/limits.md)."""
    response = server.invoke(body)
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert len(predictions(server.invoke(GOOD))) == 1


def test_concurrent_load_matches_sequential_twins_without_errors_or_memory_growth(server):
    """64 requests from 8 threads on loopback: no errors, same seed → same bytes, bounded RSS."""
    image = png_b64(size=(64, 64))
    params = {**FAST, "num_inference_steps": 6}
    variants = [  # 16 distinct requests across modes; each is sent 4 times concurrently
        {
            "dataframe_records": [
                {"prompt": f"a cat number {i}", "seed": 100 + i, **({"image": image} if i % 4 == 3 else {})}
            ],
            "params": {**params, "refiner": ["none", "ensemble", "sequential", "ensemble"][i % 4]},
        }
        for i in range(16)
    ]
    twins = [predictions(server.invoke(body))[0]["generated_image"] for body in variants]  # sequential + warm-up
    rss_warm = server.rss_bytes()

    jobs = [i % len(variants) for i in range(64)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {pool.submit(server.invoke, variants[i], timeout=120): i for i in jobs}
        done, not_done = wait(futures, timeout=420)
        for f in not_done:
            f.cancel()
    assert not not_done, f"{len(not_done)} requests did not finish in time"
    errors = [f.result().text[:500] for f in done if f.result().status_code != 200]
    assert errors == []
    for f in done:
        assert predictions(f.result())[0]["generated_image"] == twins[futures[f]]

    time.sleep(0.5)
    assert server.rss_bytes() <= 1.1 * rss_warm


def test_generate_dockerfile(registry, tmp_path):
    out = tmp_path / "docker"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "generate-dockerfile",
            *("-m", f"models:/{NAME}@{ALIAS}", "-d", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": registry},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dockerfile = (out / "Dockerfile").read_text()
    copied = re.search(r"^COPY (model_dir\S*) /opt/ml/model$", dockerfile, re.MULTILINE)
    assert copied, dockerfile
    assert "_install_pyfunc_deps" in dockerfile  # installs the artifact's pinned requirements
    model_dir = out / copied.group(1)
    assert (model_dir / "MLmodel").is_file()
    assert (model_dir / "code" / "model_pkg" / "model.py").is_file()  # self-contained: carries model_pkg
    assert "torch==2.13.0" in (model_dir / "requirements.txt").read_text()


def test_a_request_that_cannot_finish_within_the_servers_timeout_is_refused_up_front(registry):
    """``-t 5``: the model takes its deadline from the server's timeout and its cost calibration (measured at
    load): four 1024² rows are a 400 giving the estimate and the limit, in well under the timeout, and the
    next small request does not wait behind work nobody would read (before: 504, and the next waited)."""
    env = {"MLFLOW_TRACKING_URI": registry}
    with ScoringServer(f"models:/{NAME}@{ALIAS}", env=env, timeout_s=5) as server:
        big = {"dataframe_records": [{"prompt": "a cat"}] * 4, "params": {"height": 1024, "width": 1024}}
        refused = server.invoke({**big, "params": {**big["params"], "num_inference_steps": 8}}, timeout=30)
        assert refused.status_code == 400, refused.text[:2000]
        message = refused.json()["message"]
        assert "would take about" in message and "of its 5 s limit (request_timeout_s)" in message
        assert len(predictions(server.invoke(GOOD, timeout=30))) == 1
        assert "cost calibration at 256²" in server.log.read_text(errors="replace")


def test_sigterm_mid_request_finishes_the_request_and_the_server_exits(registry):
    """SIGTERM to the ``mlflow models serve`` process while a request generates: the CLI passes it on to
    uvicorn (MLflow starts it with ``PR_SET_PDEATHSIG``), whose graceful shutdown lets the running request
    answer 200; then every process of the server is gone (docs/serving.md, "Shutdown")."""
    server = ScoringServer(f"models:/{NAME}@{ALIAS}", env={"MLFLOW_TRACKING_URI": registry}).start()
    try:
        processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(True)]

        def timed(guidance: list[float]) -> float:
            start = time.monotonic()
            rows = [{"prompt": "a cat", "guidance_scale": g} for g in guidance]
            predictions(server.invoke({"dataframe_records": rows, "params": MID_RUN_ROW}))
            return time.monotonic() - start

        rows = [{"prompt": "a cat", "guidance_scale": g} for g in guidance_lasting(8, timed, MAX_ROWS)]
        body = {"dataframe_records": rows, "params": MID_RUN_ROW}  # about 8 s (at most 4 rows) on this machine now
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(server.invoke, body, timeout=300)
            time.sleep(2)
            assert not pending.done(), pending.result().text[:1000]  # still generating when the signal comes
            server.process.send_signal(signal.SIGTERM)
            response = pending.result(timeout=300)
        assert len(predictions(response)) == len(rows)
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert alive == [], f"still running 30 s after the answer: {alive}\n{server.log_text()}"
    finally:
        server.stop()
