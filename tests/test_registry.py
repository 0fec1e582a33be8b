"""Registry lifecycle on real MLflow registries: register, gate, promote by alias, roll back, copy, serve.

Two stores run the same flow: an embedded sqlite file and a real ``mlflow server`` process (sqlite
backend, proxied local artifact store) started and stopped here. Versions are logged once per store
(logging validates the input example, seconds each): v1 and v2 are good models with different
weights, v3 is v1's weights saved with a broken signature (an output column renamed, the ``seed``
output retyped, the ``seed`` param removed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
import mlflow
import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from model_pkg import contract
from model_pkg.contract import OUTPUT_COLUMNS
from sdxl_tools import cli, registry
from sdxl_tools.client import b64_to_image
from sdxl_tools.gate import breaking_changes
from sdxl_tools.random_weights import write_tiny_sdxl
from sdxl_tools.registry import PromotionRefused, holder, promote, rollback
from sdxl_tools.scratch import scratch_dir
from sdxl_tools.signature import signature
from sdxl_tools.staging import Staged, stage_components
from testkit.helpers import FAST, frame, pixels
from testkit.processes import VENV_BIN, child_env, free_port, running

NAME = "sdxl-dev"
ROOT = Path(__file__).resolve().parent.parent
REQUEST = {"prompt": "a red bicycle", "seed": 7}


@contextmanager
def store(uri: str) -> Iterator[MlflowClient]:
    """Use ``uri`` as the CLI would (``MLFLOW_TRACKING_URI``) and as the library does; restore afterwards."""
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.delenv("MLFLOW_REGISTRY_URI", raising=False)
        registry.use_experiment("tests")
        try:
            yield MlflowClient()
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])


def broken_signature() -> ModelSignature:
    """The real signature with ``generated_image`` renamed, ``seed`` output as string, no ``seed`` param."""
    good = signature()
    renamed = {"generated_image": ColSpec("string", "images"), "seed": ColSpec("string", "seed")}
    outputs = Schema([renamed.get(spec.name, spec) for spec in good.outputs.inputs])
    params = ParamSchema([p for p in good.params.params if p.name != "seed"])
    return ModelSignature(inputs=good.inputs, outputs=outputs, params=params)


@pytest.fixture(scope="module")
def staged(tiny, tmp_path_factory) -> dict[str, Staged]:
    work = tmp_path_factory.mktemp("registry-sources")
    other = write_tiny_sdxl(work / "tiny-seed1", seed=1)
    return {
        "v1": stage_components(tiny.base, tiny.refiner, work / "v1"),
        "v2": stage_components(other.base, other.refiner, work / "v2"),
    }


def register_good_and_broken(staged: dict[str, Staged], v1: str | None = None) -> dict[str, str]:
    """v2 (other weights) and v3 (broken signature) after an existing v1, or all three."""
    if v1 is None:
        v1 = str(registry.register(staged["v1"], NAME).version)
    v2 = str(registry.register(staged["v2"], NAME).version)
    v3 = registry.register(staged["v1"], NAME, signature=broken_signature(), tags={"note": "deliberately broken"})
    return {"v1": v1, "v2": v2, "v3": str(v3.version)}


@pytest.fixture(scope="module")
def sqlite_registry(staged, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """An embedded sqlite registry; v1 registered through ``build.py register --tiny``."""
    folder = tmp_path_factory.mktemp("sqlite-registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with store(uri) as client:
        assert cli.main(["register", "--tiny", "--name", NAME, "--experiment", "tests"]) == 0
        (v1,) = [str(mv.version) for mv in client.search_model_versions(f"name = '{NAME}'")]
        return uri, register_good_and_broken(staged, v1=v1)


@pytest.fixture(scope="module")
def server_registry(staged, tmp_path_factory) -> Iterator[tuple[str, dict[str, str], Path]]:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, proxied local artifact store)."""
    folder = tmp_path_factory.mktemp("tracking-server")
    port = free_port()
    args = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}"]
    args += ["--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")]
    url = f"http://127.0.0.1:{port}"
    # The registry needs no server-side jobs: skip the job runner and its worker processes.
    env = child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with running(args, f"{url}/health", folder / "server.log", env):
        with store(url):
            versions = register_good_and_broken(staged)
        yield url, versions, folder


def promotion_flow(client: MlflowClient, v: dict[str, str]) -> None:
    """staging → production, a refused broken candidate, promotion, rollback, load by alias."""
    assert promote(NAME, v["v1"], "staging").previous is None
    assert promote(NAME, v["v1"], "production").version == v["v1"]
    assert promote(NAME, v["v2"], "staging").previous == v["v1"]
    assert (holder(NAME, "staging"), holder(NAME, "production")) == (v["v2"], v["v1"])

    with pytest.raises(PromotionRefused) as refused:
        promote(NAME, v["v3"], "production")
    report = str(refused.value.report)
    assert f"models:/{NAME}/{v['v3']} -> @production (held by version {v['v1']}): REFUSED" in report
    for problem in (
        "output column 'generated_image' removed",
        "output column 'seed' type long -> string",
        "param 'seed' removed",
        "declared output column 'images' missing",
        "undeclared output column 'generated_image'",
        "output column 'seed' declared string, got int",
        "two runs differ in rows [0, 1] (the signature declares no 'seed' param)",
    ):
        assert problem in report
    passed = [c.name for c in refused.value.report.checks if c.ok]
    assert passed == [
        "weights match their recorded sha256",
        "loads from the registry",
        "scores its input example",
        "images are not blank, broken or seed-independent",
    ]
    assert holder(NAME, "production") == v["v1"]  # the alias did not move
    assert client.get_model_version(NAME, v["v3"]).tags["validation.production"].startswith("refused")

    assert promote(NAME, v["v2"], "production").previous == v["v1"]
    assert holder(NAME, "production") == v["v2"]
    back = rollback(NAME, "production")
    assert (back.version, back.previous) == (v["v1"], v["v2"])
    assert holder(NAME, "production") == v["v1"]
    assert client.get_model_version(NAME, v["v2"]).tags["rolled_back.production"].endswith(f"back to {v['v1']}")
    with pytest.raises(MlflowException, match="records no previous holder"):
        rollback(NAME, "production")  # v1 took production first: nothing before it

    out = mlflow.pyfunc.load_model(f"models:/{NAME}@production").predict(frame(REQUEST), params=FAST)
    assert list(out.columns) == list(OUTPUT_COLUMNS)
    assert b64_to_image(out["generated_image"][0]).size == (64, 64)
    assert out["seed"].tolist() == [7]


def test_default_store_is_an_embedded_sqlite_file_in_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        experiment_id = registry.use_experiment("sdxl", project=tmp_path)
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
        assert (tmp_path / "mlflow.db").is_file()
        assert mlflow.get_experiment(experiment_id).artifact_location == (tmp_path / "mlruns").as_uri()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
        assert registry.tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def test_breaking_changes_name_what_a_client_would_lose():
    good = signature()
    assert breaking_changes(good, good) == []
    fewer_inputs = Schema([s for s in good.inputs.inputs if s.name != "negative_prompt"] + [ColSpec("long", "steps")])
    retyped_param = ParamSchema(
        [ParamSpec("refiner", "long", 1) if p.name == "refiner" else p for p in good.params.params]
    )
    changed = ModelSignature(inputs=fewer_inputs, outputs=good.outputs, params=retyped_param)
    assert breaking_changes(good, changed) == [
        "input column 'negative_prompt' removed",
        "new required input column 'steps'",
        "param 'refiner' type string -> long",
    ]
    # Adding optional inputs, params and outputs is compatible.
    assert breaking_changes(changed, changed) == []
    assert breaking_changes(ModelSignature(inputs=good.inputs, outputs=good.outputs), good) == []


def test_an_optional_input_that_became_required_and_lost_or_retyped_outputs_are_breaking():
    good = signature()
    optional = next(spec for spec in good.inputs.inputs if not spec.required)
    required = Schema([ColSpec(s.type, s.name, required=True) if s is optional else s for s in good.inputs.inputs])
    stricter = ModelSignature(inputs=required, outputs=good.outputs, params=good.params)
    assert breaking_changes(good, stricter) == [f"input column {optional.name!r} became required"]
    assert breaking_changes(stricter, good) == []  # required -> optional: old clients still fit

    outputs = [s for s in good.outputs.inputs if s.name != "nsfw_content_detected"]
    outputs = [ColSpec("string", "seed") if s.name == "seed" else s for s in outputs]
    fewer = ModelSignature(inputs=good.inputs, outputs=Schema(outputs), params=good.params)
    assert breaking_changes(good, fewer) == [
        "output column 'nsfw_content_detected' removed",
        "output column 'seed' type long -> string",
    ]


def test_registered_versions_carry_what_a_reviewer_needs(sqlite_registry, staged):
    uri, v = sqlite_registry
    with store(uri) as client:
        first, second = (client.get_model_version(NAME, v[k]).tags for k in ("v1", "v2"))
    assert first["build"] == "tiny random weights (seed 0)"  # registered through the CLI
    hashes = staged["v2"].manifest["hashes"]
    assert {k: second[f"sha256.{k}"] for k in hashes} == hashes
    assert first["sha256.base/unet"] != second["sha256.base/unet"]  # other weights, other hash
    assert second["source.base"] == str(Path(staged["v2"].manifest["sources"]["base"]))
    assert second["components.shared"] == "text_encoder_2, tokenizer_2, vae"
    assert second["safety_checker"] == "none"
    assert second["version.diffusers"] == diffusers.__version__
    assert second["version.mlflow"] == mlflow.__version__
    assert second["signature.outputs"] == (
        "prompt:string, generated_image:string, nsfw_content_detected:boolean?, seed:long, error:string?"
    )
    assert second["signature.inputs"].startswith(
        "prompt:string, image:string?, mask:string?, control_image:string?, negative_prompt:any?"
    )
    assert "seed:long=-1" in second["signature.params"]


def test_promotion_flow_on_embedded_sqlite_and_serving_production(sqlite_registry, tmp_path):
    uri, v = sqlite_registry
    with store(uri) as client:
        promotion_flow(client, v)
        expected = {
            key: mlflow.pyfunc.load_model(f"models:/{NAME}/{v[key]}").predict(frame(REQUEST), params=FAST)
            for key in ("v1", "v2")
        }

    # A server started now serves the rolled-back holder of @production (v1), not v2.
    port = free_port()
    args = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@production"]
    args += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-t", "120"]
    with running(args, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", child_env(MLFLOW_TRACKING_URI=uri)):
        response = requests.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_records": [REQUEST], "params": FAST},
            timeout=120,
        )
    assert response.status_code == 200, response.text
    (served,) = response.json()["predictions"]
    assert served["seed"] == 7
    image = pixels(served["generated_image"])
    assert np.abs(image - pixels(expected["v1"]["generated_image"][0])).max() <= 2
    assert np.abs(image - pixels(expected["v2"]["generated_image"][0])).max() > 20


def test_promotion_and_rollback_on_a_tracking_server(server_registry):
    """The same code over HTTP: the gate downloads through the server's artifact proxy, tags and aliases
    go through its REST API (the whole flow, refusals included, runs on sqlite above)."""
    url, v, folder = server_registry
    with store(url) as client:
        assert client.get_model_version_download_uri(NAME, v["v1"]).startswith("mlflow-artifacts:")
        assert promote(NAME, v["v1"], "production").previous is None
        assert promote(NAME, v["v2"], "production").previous == v["v1"]
        assert client.get_model_version(NAME, v["v2"]).tags["validation.production"].startswith("passed")
        assert (rollback(NAME, "production").version, holder(NAME, "production")) == (v["v1"], v["v1"])
        out = mlflow.pyfunc.load_model(f"models:/{NAME}@production").predict(frame(REQUEST), params=FAST)
        assert out["seed"].tolist() == [7]
    assert list((folder / "artifacts").rglob("MLmodel"))  # artifacts went through the server to its store


def test_cli_copies_to_another_name_and_promotes_with_stages(sqlite_registry, capsys):
    uri, v = sqlite_registry
    with store(uri) as client:
        for key in ("v1", "v2", "v3"):
            assert cli.main(["copy", NAME, "--version", v[key], "--to", "sdxl-prod"]) == 0
        assert f"copied models:/{NAME}/{v['v3']} to models:/sdxl-prod/3" in capsys.readouterr().out
        copies = {str(mv.version): mv for mv in client.search_model_versions("name = 'sdxl-prod'")}
        assert {k: mv.tags["copied_from"] for k, mv in copies.items()} == {
            "1": f"models:/{NAME}/{v['v1']}",
            "2": f"models:/{NAME}/{v['v2']}",
            "3": f"models:/{NAME}/{v['v3']}",
        }
        assert copies["1"].tags["sha256.base/unet"] == client.get_model_version(NAME, v["v1"]).tags["sha256.base/unet"]
        assert not [k for mv in copies.values() for k in mv.tags if k.startswith(registry.LIFECYCLE_PREFIXES)]

        assert cli.main(["promote", "sdxl-prod", "--version", "1", "--to", "production", "--use-stages"]) == 0
        assert "promoted: models:/sdxl-prod@production -> version 1 (was unset); stage Production" in (
            capsys.readouterr().out
        )
        assert cli.main(["promote", "sdxl-prod", "--version", "3", "--to", "production", "--dry-run"]) == 1
        refused = capsys.readouterr().err
        assert "promote failed: validation gate for models:/sdxl-prod/3" in refused
        assert "output column 'generated_image' removed" in refused
        assert "validation.production" not in client.get_model_version("sdxl-prod", "3").tags  # dry run
        assert cli.main(["promote", "sdxl-prod", "--version", "2", "--to", "production", "--use-stages"]) == 0
        assert [str(client.get_model_version("sdxl-prod", n).current_stage) for n in "123"] == [
            "Archived",
            "Production",
            "None",
        ]
        assert cli.main(["promote", "sdxl-prod", "--to", "production", "--rollback", "--use-stages"]) == 0
        assert "rolled back: models:/sdxl-prod@production -> version 1 (was version 2)" in capsys.readouterr().out
        assert holder("sdxl-prod", "production") == "1"
        assert [client.get_model_version("sdxl-prod", n).current_stage for n in "12"] == ["Production", "Archived"]

        assert cli.main(["copy", "sdxl-prod", "--alias", "production", "--to", "sdxl-live"]) == 0
        assert "copied models:/sdxl-prod@production to models:/sdxl-live/1 (models:/sdxl-prod/1)" in (
            capsys.readouterr().out
        )
        assert holder("sdxl-live", "production") is None  # a copy holds no alias until promoted there


def test_the_gate_runs_the_code_the_candidate_carries(sqlite_registry, staged, tmp_path):
    """A candidate whose packaged ``model_pkg`` renames an output column is refused, although this
    process's ``model_pkg`` (which would shadow it in a plain in-process load) is fine."""
    code = tmp_path / "model_pkg"
    shutil.copytree(Path(contract.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
    with (code / "contract.py").open("a") as f:
        f.write(
            "\n\n_output_frame = output_frame\n\n\ndef output_frame(results, with_errors):\n"
            "    return _output_frame(results, with_errors).rename(columns={'seed': 'seed_used'})\n"
        )
    uri, _ = sqlite_registry
    with store(uri):
        candidate = registry.register(staged["v1"], "sdxl-code", code_paths=[str(code)])
        with pytest.raises(PromotionRefused) as refused:
            promote("sdxl-code", candidate.version, "staging")
        assert holder("sdxl-code", "staging") is None
    assert "undeclared output column 'seed_used'; declared output column 'seed' missing" in str(refused.value.report)
    assert sys.modules["model_pkg.contract"] is contract  # this process's modules are back


def test_rollbacks_walk_back_the_alias_history_and_stop_at_the_first_holder(sqlite_registry):
    """1 -> 2 -> 1, then rollbacks: 2, 1, and then nothing before the first holder (no 2, 1, 2, ... loop)."""
    uri, v = sqlite_registry
    with store(uri) as client:
        for version in (v["v1"], v["v2"], v["v1"]):
            promote(NAME, version, "canary")
        assert [rollback(NAME, "canary").version for _ in range(2)] == [v["v2"], v["v1"]]
        with pytest.raises(MlflowException, match="first holder of @canary on record"):
            rollback(NAME, "canary")
        assert holder(NAME, "canary") == v["v1"]
        history = registry.alias_history(NAME, "canary", client)
        assert [entry["version"] for entry in history] == [v["v1"]]


def killed_at(method: str, calls_before: int = 0) -> MlflowClient:
    """The real registry client, stopped as a kill would stop it when it reaches ``method`` after
    ``calls_before`` calls of it went through: that write and everything after it never happen."""
    client = MlflowClient()
    real = getattr(client, method)
    calls = []

    def killed(*args, **kwargs):
        calls.append(args)
        if len(calls) <= calls_before:
            return real(*args, **kwargs)
        raise SystemExit(f"killed before {method}")

    setattr(client, method, killed)
    return client


def test_a_killed_promote_leaves_no_misleading_tags(sqlite_registry):
    uri, v = sqlite_registry
    with store(uri) as client:
        promote(NAME, v["v1"], "killed")
        # killed before the alias write: the candidate carries no verdict or previous holder for it
        with pytest.raises(SystemExit):
            promote(NAME, v["v2"], "killed", client=killed_at("set_registered_model_alias"))
        assert holder(NAME, "killed") == v["v1"]
        assert not [key for key in client.get_model_version(NAME, v["v2"]).tags if key.endswith(".killed")]
        # killed right after the alias write (the one tag before it is the lease), before the history
        # and tags: a rollback still goes back to v1
        with pytest.raises(SystemExit):
            promote(NAME, v["v2"], "killed", client=killed_at("set_registered_model_tag", calls_before=1))
        assert holder(NAME, "killed") == v["v2"]
        assert rollback(NAME, "killed").version == v["v1"]
        with pytest.raises(MlflowException, match="first holder"):
            rollback(NAME, "killed")


def test_a_killed_gate_leaves_no_copy_of_the_artifact(sqlite_registry, tmp_path):
    """SIGTERM: the gate removes its download itself. SIGKILL: the next gate (or batch job) removes it."""
    uri, v = sqlite_registry
    temp = tmp_path / "tmp"
    temp.mkdir()
    command = [
        sys.executable,
        str(ROOT / "build.py"),
        "promote",
        NAME,
        "--version",
        v["v1"],
        "--to",
        "staging",
        "--dry-run",
    ]
    env = child_env(MLFLOW_TRACKING_URI=uri, TMPDIR=str(temp))

    def copies() -> list[Path]:
        return list(temp.rglob("components.json"))

    for sig in (signal.SIGTERM, signal.SIGKILL):
        with (tmp_path / f"gate-{sig.name}.log").open("w") as log:
            gate = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not copies():
                assert gate.poll() is None, (tmp_path / f"gate-{sig.name}.log").read_text()
                assert time.monotonic() < deadline, "the gate downloaded nothing in time"
                time.sleep(0.02)
            time.sleep(0.3)  # the download is complete; the gate loads the candidate
            os.kill(gate.pid, sig)
            gate.wait(timeout=60)
        finally:
            if gate.poll() is None:
                gate.kill()
                gate.wait()
        if sig == signal.SIGTERM:
            assert (gate.returncode, copies()) == (128 + signal.SIGTERM, [])
        else:
            assert gate.returncode == -signal.SIGKILL and len(copies()) == 1  # nothing runs after a SIGKILL
            with scratch_dir(temp) as mine:
                assert copies() == []  # removed: its process is gone
                with scratch_dir(temp):
                    assert mine.is_dir()  # a running process's folder stays
            assert not mine.exists()


def test_rollback_skips_deleted_holders_and_says_which(sqlite_registry):
    uri, v = sqlite_registry
    with store(uri) as client:
        doomed = str(registry.copy_version(NAME, v["v1"], NAME).version)  # a version to delete
        history = [{"version": version, "at": "test"} for version in (v["v1"], doomed, v["v2"])]
        client.set_registered_model_tag(NAME, registry.HISTORY.format(alias="skip"), json.dumps(history))
        client.set_registered_model_alias(NAME, "skip", v["v2"])
        client.delete_model_version(NAME, doomed)

        back = rollback(NAME, "skip")
        assert (back.version, back.previous, back.skipped) == (v["v1"], v["v2"], (doomed,))
        assert f"skipped deleted version {doomed}" in str(back)
        assert holder(NAME, "skip") == v["v1"]
        assert [entry["version"] for entry in registry.alias_history(NAME, "skip", client)] == [v["v1"]]


@pytest.mark.parametrize("corrupt", ["nan", "bits"])
def test_the_gate_refuses_weights_that_differ_from_their_recorded_sha256(sqlite_registry, staged, corrupt):
    from urllib.parse import urlparse

    from testkit.helpers import flip_mantissa_bits, overwrite_tensor

    uri, _ = sqlite_registry
    with store(uri) as client:
        candidate = str(registry.register(staged["v1"], "sdxl-corrupt").version)
        stored = Path(urlparse(client.get_model_version_download_uri("sdxl-corrupt", candidate)).path)
        (weights,) = stored.rglob("base/unet/diffusion_pytorch_model.safetensors")
        if corrupt == "nan":
            overwrite_tensor(weights, "conv_out.weight", 0xFF)
        else:
            flip_mantissa_bits(weights, "conv_out.weight", 64)
        with pytest.raises(PromotionRefused) as refused:
            promote("sdxl-corrupt", candidate, "production")
        assert holder("sdxl-corrupt", "production") is None
    (failed,) = refused.value.report.failures
    assert failed.name == "weights match their recorded sha256"
    assert "component base/unet, file diffusion_pytorch_model.safetensors: sha256" in failed.detail


def test_two_promotions_at_once_one_wins_and_the_other_says_so(server_registry, tmp_path):
    """Two real processes promote different versions to the same alias at the same moment, through a
    tracking server (where several clients meet; the lease is the same code on every store)."""
    uri, v = server_registry[:2]
    race = "sdxl-race"  # its own model: the CLI moves staging / production only
    with store(uri) as client:
        first, second, third = (str(registry.copy_version(NAME, v[k], race).version) for k in ("v1", "v2", "v1"))
        promote(race, first, "staging")
        before = registry.alias_history(race, "staging", client)
    env = child_env(MLFLOW_TRACKING_URI=uri)
    command = [sys.executable, str(ROOT / "build.py"), "promote", race, "--to", "staging", "--version"]
    logs = {version: (tmp_path / f"{version}.out", tmp_path / f"{version}.err") for version in (second, third)}
    racers = {
        version: subprocess.Popen([*command, version], cwd=ROOT, env=env, stdout=out.open("w"), stderr=err.open("w"))
        for version, (out, err) in logs.items()
    }
    results = {
        version: (p.wait(timeout=600), logs[version][0].read_text(), logs[version][1].read_text())
        for version, p in racers.items()
    }
    winners = [version for version, (code, _, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    (winner,), (loser,) = winners, [version for version in results if version not in winners]
    assert f"-> version {winner} (was version {first})" in results[winner][1]
    assert results[loser][0] == 1
    assert f"was moved to version {winner} by someone else" in results[loser][2]
    with store(uri) as client:
        assert holder(race, "staging") == winner
        history = registry.alias_history(race, "staging", client)
        assert [e["version"] for e in history] == [e["version"] for e in before] + [winner]  # no phantom entry
        assert "lease.staging" not in client.get_registered_model(race).tags
        assert "validation.staging" not in client.get_model_version(race, loser).tags
