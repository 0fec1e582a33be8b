"""Azure ML online deployments, on the real ``azmlinfsrv`` (azureml-inference-server-http) at 127.0.0.1,
in a venv made as Azure makes it: the curated MLflow image's packages, then the artifact's requirements.

- with our scoring script (``deploy/azureml/score.py``), served from a folder holding only the script and
  the model (what ``deployment.yml`` uploads, with the model Azure mounts): the Azure request body as it is
  → 200 and the list of rows; an image from Azure's sample client (``base64.encodebytes``) works; a bad row → 400
  naming the row and the field; the server keeps serving;
- no-code: the steps of Azure's generic MLflow scoring script that touch the artifact
  (``azureml_generic.py``) boot and serve the same body.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests
from packaging.requirements import Requirement

from sdxl_tools.artifact import requirements, save_artifact
from sdxl_tools.client import b64_to_image
from sdxl_tools.staging import stage_components
from testkit.helpers import (
    LATE_STEPS,
    MID_RUN_ROW,
    guidance_lasting,
    guidance_outlasting_the_estimate,
    pixels,
    png_b64,
)
from testkit.platforms import AZUREML, ROOT, server_env, unmet_requirements
from testkit.processes import free_port, running

pytestmark = pytest.mark.platform(AZUREML.name)
TESTS = Path(__file__).resolve().parent
PARAMS = {"num_inference_steps": 5, "height": 64, "width": 64, "seed": 0}
IMAGE = png_b64(size=(64, 64))
# The Azure ML SDXL model card's request: rows as objects, an index, params.
BODY = {
    "input_data": {
        "columns": ["prompt", "image"],
        "data": [
            {"prompt": "Face of a yellow cat, high resolution, sitting on a park bench", "image": None},
            {"prompt": "Face of a green cat, high resolution, sitting on a park bench", "image": IMAGE},
        ],
        "index": [0, 1],
    },
    "params": PARAMS,
}


# A row with a control image (ControlNet ``edges``) and the same row without one, both seed 3.
CONTROL_ROW = {"prompt": "a cat", "seed": 3, "control_image": None, "controlnet": None}
CONTROL_BODY = {
    "input_data": {
        "columns": list(CONTROL_ROW),
        "data": [{**CONTROL_ROW, "control_image": IMAGE, "controlnet": "edges"}, CONTROL_ROW],
    },
    "params": {k: v for k, v in PARAMS.items() if k != "seed"},
}


def as_lists(body: dict) -> dict:
    """The same request with ``data`` rows as lists."""
    out = copy.deepcopy(body)
    data = out["input_data"]
    data["data"] = [[row.get(c) for c in data["columns"]] for row in data["data"]]
    return out


class Azmlinfsrv:
    def __init__(self, url: str, process: subprocess.Popen):
        self.url = url
        self.process = process  # the gunicorn master (azmlinfsrv runs gunicorn in its own process)

    def score(self, body: dict | str) -> requests.Response:
        data = body if isinstance(body, str) else json.dumps(body)
        return requests.post(f"{self.url}/score", data=data, headers={"Content-Type": "application/json"}, timeout=300)


def serve(
    venv: Path, artifact: Path, entry_script: Path, log: Path, cwd: Path | None = None, **extra: str
) -> Iterator[Azmlinfsrv]:
    """``azmlinfsrv --entry_script <absolute path>`` started outside the repository, in ``cwd`` (no
    ``AML_APP_ROOT``: the server's app root is then its working directory)."""
    port = free_port()
    env = server_env(venv, AZUREML_MODEL_DIR=str(artifact.parent), WORKER_TIMEOUT="600", **extra)
    env.pop("AML_APP_ROOT", None)
    args = [str(venv / "bin" / "python"), str(ROOT / "samples" / "azmlinfsrv_local.py")]
    args += ["--entry_script", str(entry_script), "--port", str(port)]
    with running(args, f"http://127.0.0.1:{port}/", log, env, timeout=420, cwd=cwd or log.parent) as process:
        yield Azmlinfsrv(f"http://127.0.0.1:{port}", process)


serving = contextlib.contextmanager(serve)  # one server for one test: `with serving(...) as server:`


@pytest.fixture(scope="module")
def venv(platform_venv) -> Path:
    return platform_venv(AZUREML.name)


@pytest.fixture(scope="module")
def scoring_script(venv, cn_artifact, tmp_path_factory) -> Iterator[Azmlinfsrv]:
    """score.py in a folder that holds only itself and the model (with the tiny ControlNets), started there
    (the server's app root); the platform's venv has the artifact's requirements, not this project, so the
    script can import only what the model carries. It finds the MLflow model folder under AZUREML_MODEL_DIR
    itself."""
    artifact = cn_artifact
    app = tmp_path_factory.mktemp("app")
    script, model = deployment_folder(artifact, app)
    assert sorted(str(p.relative_to(app)) for p in app.iterdir()) == ["azureml-models", "score.py"]
    log = tmp_path_factory.mktemp("az") / "log"
    yield from serve(venv, model, script, log, cwd=app)


def deployment_folder(artifact: Path, app: Path) -> tuple[Path, Path]:
    """``app`` holding score.py and the model as Azure mounts it: (script, model folder)."""
    script = Path(shutil.copy(ROOT / "deploy" / "azureml" / "score.py", app))
    return script, Path(shutil.copytree(artifact, app / "azureml-models" / "sdxl" / "1" / artifact.name))


@pytest.fixture(scope="module")
def no_code(venv, cn_artifact, tmp_path_factory) -> Iterator[Azmlinfsrv]:
    """Azure sets MLFLOW_MODEL_FOLDER for no-code deployments."""
    log = tmp_path_factory.mktemp("az") / "log"
    yield from serve(venv, cn_artifact, TESTS / "azureml_generic.py", log, MLFLOW_MODEL_FOLDER=cn_artifact.name)


def check_rows(rows: list[dict], body: dict) -> None:
    sent = body["input_data"]["data"]
    assert [row["prompt"] for row in rows] == [r["prompt"] if isinstance(r, dict) else r[0] for r in sent]
    assert [row["seed"] for row in rows] == [PARAMS["seed"] + i for i in range(len(sent))]
    for row in rows:
        assert set(row) == {"prompt", "generated_image", "nsfw_content_detected", "seed"}
        assert row["nsfw_content_detected"] is None  # no safety checker packaged
        assert b64_to_image(row["generated_image"]).size == (64, 64)  # params applied


def test_the_platform_installs_the_artifacts_requirements_over_its_own(venv, artifact):
    """What the MLmodel asks for is what this venv has: the artifact's requirements file, satisfied."""
    written = [Requirement(line) for line in (artifact / "requirements.txt").read_text().splitlines()]
    assert written == [Requirement(line) for line in requirements()]  # MLflow normalises the order of specifiers
    assert unmet_requirements(venv, requirements()) == []


def test_our_scoring_script_takes_the_azure_body_as_it_is(scoring_script):
    objects = scoring_script.score(BODY)
    assert objects.status_code == 200, objects.text[:2000]
    check_rows(objects.json(), BODY)
    lists = scoring_script.score(as_lists(BODY))
    assert lists.status_code == 200, lists.text[:2000]
    assert lists.json() == objects.json()  # same rows, same seeds → the same bytes


def test_our_scoring_script_passes_a_control_image_column(scoring_script, cn_model):
    """A ``control_image`` column (ControlNet ``edges`` per row) next to the same row without one: each equals
    in-process predict, and they differ (a control image dropped on the way would make them equal, or a 400)."""
    response = scoring_script.score(CONTROL_BODY)
    assert response.status_code == 200, response.text[:2000]
    served = [r["generated_image"] for r in response.json()]
    rows, params = CONTROL_BODY["input_data"]["data"], CONTROL_BODY["params"]
    expected = cn_model.predict(pd.DataFrame(rows), params=params)["generated_image"].tolist()
    assert served == expected
    assert (pixels(expected[0]) != pixels(expected[1])).any()


def test_our_scoring_script_reads_azures_sample_client_images(scoring_script):
    """Azure's image-to-image sample client sends ``base64.encodebytes`` text: a newline every 76 characters."""
    body = copy.deepcopy(BODY)
    wrapped = base64.encodebytes(base64.b64decode(IMAGE)).decode()
    assert "\n" in wrapped
    body["input_data"]["data"][1]["image"] = wrapped
    response = scoring_script.score(body)
    assert response.status_code == 200, response.text[:2000]
    assert response.json() == scoring_script.score(BODY).json()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {**BODY, "input_data": {"columns": ["prompt", "image"], "data": [["a cat", None], ["a dog", "!!"]]}},
            ["Row 1: 'image': not valid base64: invalid character '!' at position 0"],
        ),
        ({**BODY, "params": {**PARAMS, "num_inference_steps": "five"}}, ["num_inference_steps"]),
        ({"input_data": {"columns": ["prompt"], "data": [["a", "b"]]}}, ["not an Azure ML input_data request"]),
        ({"inputs": {"prompt": ["a cat"]}}, ["input_data"]),
        ("not json", ["not an Azure ML input_data request"]),
        ('{"input_data": {"columns": ["prompt"], "data": [["a cat"],]}}', ["not an Azure ML input_data request"]),
        (
            '{"input_data": {"columns": ["prompt"], "data": [' + "[" * 50_000 + "]" * 50_000 + "]}}",
            ["nested deeper than"],
        ),
        (
            '{"input_data": {"columns": ["prompt"], "data": [["a"]]}, "params": '
            + '{"a": ' * 50_000
            + "1"
            + "}" * 50_001,
            ["nested deeper than"],
        ),
        ({"input_data": {"columns": [{"a": 1}], "data": [["a cat"]]}}, ["'input_data.columns'", "strings"]),
        (
            {"input_data": {"columns": ["prompt", "negative_promt"], "data": [["a cat", "blurry"]]}, "params": PARAMS},
            ["'negative_promt' is unknown", "negative_prompt"],
        ),
        ({"input_data": {"data": [{"prompt": "a cat", "sed": 3}]}, "params": PARAMS}, ["'sed' is unknown"]),
    ],
    ids=[
        "bad image in row 1",
        "bad param",
        "row longer than the columns",
        "no input_data",
        "not JSON",
        "trailing comma",
        "nested arrays",
        "nested objects in params",
        "a column that is an object",
        "a typo in columns",
        "a typo in an object row",
    ],
)
def test_our_scoring_script_answers_bad_input_with_400_and_keeps_serving(scoring_script, body, expected):
    response = scoring_script.score(body)
    assert response.status_code == 400, response.text[:2000]
    for text in expected:
        assert text in response.json()["message"]
    assert requests.get(f"{scoring_script.url}/", timeout=10).status_code == 200
    assert scoring_script.score(as_lists(BODY)).status_code == 200


def test_no_code_the_generic_mlflow_script_boots_and_serves_the_azure_body(no_code, scoring_script):
    for body in (BODY, as_lists(BODY)):
        response = no_code.score(body)
        assert response.status_code == 200, response.text[:2000]
        check_rows(response.json(), body)
        assert response.json() == scoring_script.score(body).json()
    # the control image too (the scoring script's answer equals in-process predict: test above)
    controlled = no_code.score(CONTROL_BODY)
    assert controlled.status_code == 200, controlled.text[:2000]
    assert controlled.json() == scoring_script.score(CONTROL_BODY).json()


def test_no_code_needs_pandas_before_3_to_read_the_input_example(venv):
    """Azure's generic script reads the input example with ``pandas.read_json(<literal JSON>)``; pandas 3 reads
    it as a file name. The artifact's requirements (``pandas<3``) keep pandas 2 in the platform's venv."""
    probe = 'import pandas as pd; pd.read_json(\'{"columns": ["a"], "data": [[1]]}\', orient=\'split\')'
    result = subprocess.run([str(venv / "bin" / "python"), "-W", "ignore", "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def mid_run(server: Azmlinfsrv, seconds: float) -> dict:
    """A request of about ``seconds`` on this server now (see ``guidance_lasting``)."""

    def body(guidance: list[float]) -> dict:
        rows = [["a cat", g] for g in guidance]
        return {"input_data": {"columns": ["prompt", "guidance_scale"], "data": rows}, "params": MID_RUN_ROW}

    def timed(guidance: list[float]) -> float:
        start = time.monotonic()
        assert server.score(body(guidance)).status_code == 200
        return time.monotonic() - start

    return body(guidance_lasting(seconds, timed))


def sigterm_during(server: Azmlinfsrv, body: dict, after_s: float = 2) -> requests.Response | requests.ConnectionError:
    """SIGTERM to the gunicorn master ``after_s`` into ``body``'s request, which must still be running then:
    the response, or the connection error the client got instead."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.score, body)
        time.sleep(after_s)
        assert not pending.done(), f"the request ended before the signal: {pending.result().text[:2000]}"
        server.process.send_signal(signal.SIGTERM)
        try:
            return pending.result(timeout=300)
        except requests.ConnectionError as e:
            return e


def test_sigterm_mid_request_inside_gunicorns_graceful_timeout_answers_200_and_the_server_exits(
    venv, artifact, tmp_path
):
    """A request of about 8 s (well inside gunicorn's default 30 s graceful timeout), SIGTERM 2 s in."""
    script, model = deployment_folder(artifact, tmp_path)
    with serving(venv, model, script, tmp_path / "log", cwd=tmp_path) as server:
        body = mid_run(server, 8)
        response = sigterm_during(server, body)
        assert isinstance(response, requests.Response), response
        assert response.status_code == 200, response.text[:2000]
        assert len(response.json()) == len(body["input_data"]["data"])
        assert server.process.wait(timeout=30) is not None  # then gunicorn exits


def test_a_request_longer_than_gunicorns_graceful_timeout_is_dropped_at_sigterm(venv, artifact, tmp_path):
    """What a deployment without a deadline gets: gunicorn kills the worker when its graceful timeout ends,
    and the client gets no HTTP answer. ``GUNICORN_CMD_ARGS="--graceful-timeout 2"`` (azmlinfsrv does not
    set it, so gunicorn takes it from the environment) makes that window 2 s instead of 30 s."""
    script, model = deployment_folder(artifact, tmp_path)
    with serving(
        venv, model, script, tmp_path / "log", cwd=tmp_path, GUNICORN_CMD_ARGS="--graceful-timeout 2"
    ) as server:
        dropped = sigterm_during(server, mid_run(server, 10))  # SIGTERM 2 s in, the window ends at 4 s
        assert isinstance(dropped, requests.ConnectionError), dropped.text[:2000]
        assert server.process.wait(timeout=30) is not None


def test_request_timeout_s_inside_the_graceful_timeout_answers_every_request_at_sigterm(venv, tiny, tmp_path):
    """The remedy docs/deploy-azureml.md states: ``request_timeout_s`` (8 s, model config) below gunicorn's
    graceful timeout (15 s here): what cannot finish is a 400 up front giving the estimate and the limit; a
    request that outlasts its estimate (64² rows at 150 steps, see ``guidance_outlasting_the_estimate``)
    stops at its deadline with a 504 while SIGTERM waits for it, and the server exits; no dropped connection."""
    staged = stage_components(tiny.base, tiny.refiner, tmp_path / "sdxl")
    with_deadline = save_artifact(staged, tmp_path / "built" / "model", model_config={"request_timeout_s": 8})
    app = tmp_path / "app"
    app.mkdir()
    script, model = deployment_folder(with_deadline, app)
    graceful = {"GUNICORN_CMD_ARGS": "--graceful-timeout 15"}
    with serving(venv, model, script, tmp_path / "log", cwd=app, **graceful) as server:
        too_big = {"input_data": {"columns": ["prompt"], "data": [["a cat"]] * 4}}
        refused = server.score({**too_big, "params": {"num_inference_steps": 8, "height": 1024, "width": 1024}})
        assert refused.status_code == 400, refused.text[:2000]
        assert "would take about" in refused.json()["message"]
        assert "of its 8 s limit (request_timeout_s)" in refused.json()["message"]

        rows = [["a cat", g] for g in guidance_outlasting_the_estimate(tmp_path / "log", 8)]
        slow = {"input_data": {"columns": ["prompt", "guidance_scale"], "data": rows}}
        late = sigterm_during(
            server, {**slow, "params": {"num_inference_steps": LATE_STEPS, "height": 64, "width": 64}}
        )
        assert isinstance(late, requests.Response), late
        assert late.status_code == 504, late.text[:2000]
        assert late.json() == {
            "message": "The request passed its deadline (request_timeout_s)",
            "error_code": "DEADLINE_EXCEEDED",
        }
        assert server.process.wait(timeout=30) is not None
