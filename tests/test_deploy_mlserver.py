"""KServe / MLServer: ``mlserver start <artifact>`` on 127.0.0.1 serves the Open Inference Protocol V2
over REST, in a venv made as the MLServer image is (MLServer + its MLflow runtime, then the artifact's
requirements). The artifact carries its ``model-settings.json`` and runtime class (``artifacts/mlserver/``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests

from sdxl_tools.artifact import requirements, save_artifact
from sdxl_tools.client import b64_to_image
from sdxl_tools.staging import stage_components
from testkit.helpers import FAST, LATE_STEPS, guidance_outlasting_the_estimate, png_b64
from testkit.platforms import MLSERVER, server_env, unmet_requirements
from testkit.processes import free_port, running

pytestmark = pytest.mark.platform(MLSERVER.name)


def v2(*inputs: dict, **params) -> dict:
    return {"inputs": list(inputs), "parameters": params}


def column(name: str, data: list, datatype: str = "BYTES") -> dict:
    return {"name": name, "shape": [len(data)], "datatype": datatype, "data": data}


def outputs(response: requests.Response) -> dict[str, dict]:
    assert response.status_code == 200, response.text[:2000]
    return {output["name"]: output for output in response.json()["outputs"]}


class MLServer:
    def __init__(self, url: str):
        self.url = url

    def infer(self, body: dict | bytes) -> requests.Response:
        """POST ``body`` (a dict → JSON, or the raw bytes of a body)."""
        if isinstance(body, bytes):
            headers = {"Content-Type": "application/json"}
            return requests.post(f"{self.url}/v2/models/sdxl/infer", data=body, headers=headers, timeout=300)
        return requests.post(f"{self.url}/v2/models/sdxl/infer", json=body, timeout=300)


@pytest.fixture(scope="module")
def venv(platform_venv) -> Path:
    return platform_venv(MLSERVER.name)


@contextlib.contextmanager
def mlserver(venv: Path, artifact: Path, log: Path) -> Iterator[MLServer]:
    """``mlserver start <artifact>`` on 127.0.0.1 until the model is ready; stopped afterwards."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = server_env(
        venv,
        MLSERVER_HOST="127.0.0.1",
        MLSERVER_HTTP_PORT=str(http),
        MLSERVER_GRPC_PORT=str(grpc),
        MLSERVER_METRICS_PORT=str(metrics),
    )
    url = f"http://127.0.0.1:{http}"
    with running(
        [str(venv / "bin" / "mlserver"), "start", str(artifact)], f"{url}/v2/models/sdxl/ready", log, env, 420
    ):
        yield MLServer(url)


@pytest.fixture(scope="module")
def server(venv, cn_artifact, tmp_path_factory) -> Iterator[MLServer]:
    """The artifact with the tiny ControlNets packaged."""
    with mlserver(venv, cn_artifact, tmp_path_factory.mktemp("mlserver") / "log") as server:
        yield server


def test_the_image_holds_the_artifacts_requirements(venv):
    assert unmet_requirements(venv, requirements()) == []


def test_v2_rest_returns_every_output_column_with_nulls_and_applies_request_parameters(server):
    out = outputs(server.infer(v2(column("prompt", ["a cat", "a dog"]), **FAST, seed=7)))
    assert list(out) == ["prompt", "generated_image", "nsfw_content_detected", "seed"]
    assert out["prompt"]["data"] == ["a cat", "a dog"]
    assert out["nsfw_content_detected"] == {**out["nsfw_content_detected"], "datatype": "BOOL", "data": [None, None]}
    assert out["seed"]["datatype"] == "INT64" and out["seed"]["data"] == [7, 8]
    assert [b64_to_image(image).size for image in out["generated_image"]["data"]] == [
        (64, 64),
        (64, 64),
    ]  # height/width


def test_a_request_from_mlservers_own_client_codec(server):
    """What ``PandasCodec.encode_request(frame)`` writes: request and input content types, ``[n, 1]`` shapes."""
    prompt = {"name": "prompt", "shape": [2, 1], "datatype": "BYTES", "parameters": {"content_type": "str"}}
    body = {"parameters": {"content_type": "pd", **FAST, "seed": 3}, "inputs": [{**prompt, "data": ["a", "b"]}]}
    out = outputs(server.infer(body))
    assert out["seed"]["data"] == [3, 4]
    assert [b64_to_image(image).size for image in out["generated_image"]["data"]] == [(64, 64), (64, 64)]


def test_same_seed_same_bytes(server):
    body = v2(column("prompt", ["a cat"]), **FAST, seed=11)
    assert outputs(server.infer(body))["generated_image"] == outputs(server.infer(body))["generated_image"]


def test_per_row_inputs_and_on_error_null(server):
    """Optional per-row columns as V2 inputs (``""``: no image); a bad row gets null image and its error."""
    body = v2(
        column("prompt", ["a cat", "a dog", "a fox"]),
        column("image", ["", png_b64(), "!!"]),
        column("seed", [5, 6, 9], "INT64"),
        **FAST,
        on_error="null",
    )
    out = outputs(server.infer(body))
    assert out["seed"]["data"] == [5, 6, 9]  # a failed row keeps its seed
    assert out["generated_image"]["data"][2] is None
    assert out["error"]["data"][:2] == [None, None]
    assert "'image': not valid base64: invalid character '!'" in out["error"]["data"][2]
    assert b64_to_image(out["generated_image"]["data"][1]).size == (96, 64)  # img2img at the input image's size


def test_a_control_image_bytes_input_conditions_its_row_as_in_process_predict(server, cn_model):
    """``control_image`` as a BYTES input (``""``: none) next to the same row without one: each equals
    in-process predict, and they differ (a control image dropped on the way would make them equal, or a 400)."""
    control = png_b64(size=(64, 64))
    body = v2(
        column("prompt", ["a cat", "a cat"]),
        column("control_image", [control, ""]),
        column("controlnet", ["edges", ""]),
        column("seed", [5, 5], "INT64"),
        **FAST,
    )
    served = outputs(server.infer(body))["generated_image"]["data"]
    rows = [
        {"prompt": "a cat", "seed": 5, "control_image": control, "controlnet": "edges"},
        {"prompt": "a cat", "seed": 5},
    ]
    expected = cn_model.predict(pd.DataFrame(rows), params=FAST)["generated_image"].tolist()
    assert served == expected
    assert expected[0] != expected[1]


def test_bad_input_is_a_400_naming_the_row_and_field_and_the_server_keeps_serving(server):
    bad_row = server.infer(v2(column("prompt", ["a cat", "a dog"]), column("image", ["", "!!"]), **FAST))
    assert bad_row.status_code == 400
    assert "Row 1: 'image': not valid base64" in bad_row.text
    bad_param = server.infer(v2(column("prompt", ["a cat"]), num_inference_steps=0))
    assert bad_param.status_code == 400 and "num_inference_steps" in bad_param.text
    assert outputs(server.infer(v2(column("prompt", ["a cat"]), **FAST)))["seed"]["data"][0] >= 0


# (case id, V2 inputs, substrings of the 400's message): each failed inside MLServer's codecs or was silently
# misread before the runtime checked the raw request
BAD_V2 = [
    ("seed past INT64", [column("prompt", ["a"]), column("seed", [2**63], "INT64")], ["'seed'", "INT64"]),
    ("seed past INT8", [column("prompt", ["a"]), column("seed", [300], "INT8")], ["'seed'", "INT8"]),
    ("float in INT64", [column("prompt", ["a"]), column("seed", [1.5], "INT64")], ["'seed'", "INT64"]),
    ("text in INT64", [column("prompt", ["a"]), column("seed", ["x"], "INT64")], ["'seed'", "INT64"]),
    ("prompt sent as INT64", [column("prompt", [5], "INT64")], ["'prompt'", "BYTES"]),
    ("2 prompts and 1 seed", [column("prompt", ["a", "b"]), column("seed", [1], "INT64")], ["'seed'", "1 row", "2"]),
    ("nested prompt", [{**column("prompt", [["a", "b"]]), "shape": [1]}], ["'prompt'", "shape [1]", "2 values"]),
    ("shape not data", [{**column("prompt", ["a"]), "shape": [3]}], ["'prompt'", "shape [3]", "1 value"]),
    ("typo in a column", [column("prompt", ["a"]), column("negative_promt", ["x"])], ["'negative_promt'", "unknown"]),
]


@pytest.mark.parametrize("inputs, expected", [c[1:] for c in BAD_V2], ids=[c[0] for c in BAD_V2])
def test_malformed_v2_inputs_are_a_400_naming_the_input_and_the_server_keeps_serving(server, inputs, expected):
    response = server.infer(v2(*inputs, **FAST))
    assert response.status_code == 400, response.text[:2000]
    for text in expected:
        assert text in response.json()["error"]
    assert outputs(server.infer(v2(column("prompt", ["a cat"]), **FAST)))["seed"]["data"][0] >= 0


def test_brackets_nested_100000_deep_inside_a_prompt_string_are_the_models_400(server):
    response = server.infer(v2(column("prompt", ["[" * 100_000]), **FAST))
    assert response.status_code == 400, response.text[:2000]
    assert "Row 0: 'prompt' has 100000 characters, over the 4000 limit" in response.json()["error"]
    assert outputs(server.infer(v2(column("prompt", ["a cat"]), **FAST)))["seed"]["data"][0] >= 0


PROMPT = b'{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": '


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [' + PROMPT + b"[" * 50_000 + b'"a"' + b"]" * 50_000 + b"}]}",
        b'{"inputs": [' + PROMPT + b'["a"]}], "parameters": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
    ],
    ids=["nested arrays in data", "nested objects in parameters"],
)
def test_json_nested_50000_deep_is_mlservers_own_422_before_the_runtime(server, body):
    """MLServer parses the body (with orjson, which has a depth limit) before any runtime code runs: FastAPI
    answers the parse error itself with a 422, not a 500 (docs/limits.md); the server keeps serving."""
    response = server.infer(body)
    assert response.status_code == 422, response.text[:2000]
    detail = response.json()["detail"][0]
    assert (detail["type"], detail["msg"], detail["ctx"]) == (
        "json_invalid",
        "JSON decode error",
        {"error": "depth limit exceeded"},
    )
    assert outputs(server.infer(v2(column("prompt", ["a cat"]), **FAST)))["seed"]["data"][0] >= 0


def test_a_datatype_v2_does_not_have_is_mlservers_own_422_before_the_runtime(server):
    """MLServer validates the body's types (pydantic) before any runtime code runs (docs/deploy-mlserver.md)."""
    response = server.infer(v2(column("prompt", ["a"], "STRING"), **FAST))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "inputs", 0, "datatype"]


def test_sigterm_mid_request_with_parallel_workers_0_finishes_the_request_and_exits(venv, artifact, tmp_path):
    """What ``deploy/kserve/serving-runtime.yaml`` sets (``MLSERVER_PARALLEL_WORKERS=0``): SIGTERM while a
    request runs → that request answers 200, then the server exits (docs/deploy-mlserver.md)."""
    http = free_port()
    env = server_env(
        venv,
        MLSERVER_HOST="127.0.0.1",
        MLSERVER_HTTP_PORT=str(http),
        MLSERVER_GRPC_PORT=str(free_port()),
        MLSERVER_METRICS_PORT=str(free_port()),
        MLSERVER_PARALLEL_WORKERS="0",
    )
    url = f"http://127.0.0.1:{http}"
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "mlserver"), "start", str(artifact)], stdout=out, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/v2/models/sdxl/ready", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        body = v2(column("prompt", ["a cat"] * 4), num_inference_steps=40, height=512, width=512)  # > 2 s on any CPU
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(requests.post, f"{url}/v2/models/sdxl/infer", json=body, timeout=300)
            time.sleep(2)
            assert not pending.done()  # still generating when the signal comes
            proc.send_signal(signal.SIGTERM)
            response = pending.result(timeout=300)
        assert response.status_code == 200, response.text[:2000]
        assert proc.wait(timeout=60) is not None  # and the server exits after it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_request_timeout_s_refuses_up_front_with_a_400_and_stops_a_late_request_with_a_504(venv, tiny, tmp_path):
    """``request_timeout_s`` (model config, 8 s) with MLServer's default parallel worker: 4 × 1024² is a 400
    giving the estimate and the limit; a request that outlasts its estimate (64² rows at 150 steps, see
    ``guidance_outlasting_the_estimate``) stops at its deadline with a 504 naming it, not a 500; the server
    keeps serving."""
    staged = stage_components(tiny.base, tiny.refiner, tmp_path / "sdxl")
    with_deadline = save_artifact(staged, tmp_path / "model", model_config={"request_timeout_s": 8})
    with mlserver(venv, with_deadline, tmp_path / "log") as server:
        refused = server.infer(v2(column("prompt", ["a cat"] * 4), num_inference_steps=8, height=1024, width=1024))
        assert refused.status_code == 400, refused.text[:2000]
        assert "would take about" in refused.json()["error"]
        assert "of its 8 s limit (request_timeout_s)" in refused.json()["error"]
        guidance = guidance_outlasting_the_estimate(tmp_path / "log", 8)
        prompts, scales = column("prompt", ["a cat"] * len(guidance)), column("guidance_scale", guidance, "FP64")
        late = server.infer(v2(prompts, scales, num_inference_steps=LATE_STEPS, height=64, width=64))
        assert late.status_code == 504, late.text[:2000]
        assert "The request passed its deadline (request_timeout_s)" in late.json()["error"]
        assert outputs(server.infer(v2(column("prompt", ["a cat"]), **FAST)))["seed"]["data"][0] >= 0
