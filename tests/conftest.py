"""Shared fixtures: tiny real SDXL pipelines, tiny ControlNets, the artifacts built from them, a sqlite
MLflow store, and the serving platforms' virtualenvs (``platforms.py``, built once per machine).

Everything is built once per test session from the real diffusers/transformers classes; nothing is
downloaded and nothing is mocked.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest

from sdxl_tools.artifact import save_artifact
from sdxl_tools.random_weights import TinySDXL, write_tiny_controlnet, write_tiny_sdxl
from sdxl_tools.staging import stage_components
from testkit import platforms

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# float32 everywhere (this process, servers and Spark workers it starts), whatever the CPU: the exact
# comparisons (pyfunc vs raw diffusers, batched vs alone, Spark vs pandas) hold in float32 on every
# machine, while `dtype: auto` would pick bfloat16 on some. tests/test_dtype.py covers auto and bfloat16.
os.environ.setdefault("SDXL_DTYPE", "float32")
warnings.filterwarnings("ignore", message=".*torchvision.*")
PLATFORM_VENVS = pytest.StashKey[dict[str, Future]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``platform(NAME)`` run last, and the venvs of their platforms are built meanwhile in
    the background (minutes, the first time on a machine; see platforms.py)."""
    items.sort(key=lambda item: item.get_closest_marker("platform") is not None)  # stable: order kept otherwise
    wanted = {marker.args[0] for item in items for marker in item.iter_markers("platform")}
    if config.option.collectonly:  # nothing will run: nothing to build
        wanted = set()
    pool = ThreadPoolExecutor(max(1, len(wanted)), thread_name_prefix="platform-venv")
    config.stash[PLATFORM_VENVS] = {
        p.name: pool.submit(platforms.venv, p) for p in platforms.PLATFORMS if p.name in wanted
    }
    pool.shutdown(wait=False)


@pytest.fixture(scope="session")
def platform_venv(pytestconfig):
    """``platform_venv("azureml")``: the path of that platform's venv, once built."""

    def get(name: str) -> Path:
        return pytestconfig.stash[PLATFORM_VENVS][name].result()

    return get


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinySDXL:
    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def artifact(tiny, tmp_path_factory) -> Path:
    """A saved model directory (``mlflow.pyfunc.load_model(path)`` loads it)."""
    work = tmp_path_factory.mktemp("artifact")
    staged = stage_components(tiny.base, tiny.refiner, work / "sdxl")
    return save_artifact(staged, work / "model")


@pytest.fixture(scope="session")
def model(artifact) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(str(artifact))


@pytest.fixture(scope="session")
def controlnets(tiny, tmp_path_factory) -> dict[str, Path]:
    """Two tiny random ControlNets of the tiny base UNet: name → diffusers ControlNetModel folder."""
    work = tmp_path_factory.mktemp("controlnets")
    return {
        name: write_tiny_controlnet(work / name, tiny.base, seed=i + 1) for i, name in enumerate(("edges", "depth"))
    }


@pytest.fixture(scope="session")
def cn_artifact(tiny, controlnets, tmp_path_factory) -> Path:
    """The artifact with both ControlNets packaged."""
    work = tmp_path_factory.mktemp("cn-artifact")
    staged = stage_components(tiny.base, tiny.refiner, work / "sdxl", controlnets=controlnets)
    return save_artifact(staged, work / "model")


@pytest.fixture(scope="session")
def cn_model(cn_artifact) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(str(cn_artifact))


@pytest.fixture
def sqlite_tracking(tmp_path):
    """An embedded sqlite tracking + registry store with its own artifact folder."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("tests", artifact_location=str(tmp_path / "mlruns"))
    mlflow.set_experiment(experiment_id=experiment)
    yield tmp_path
    mlflow.set_tracking_uri(previous)
    mlflow.set_registry_uri(previous)
