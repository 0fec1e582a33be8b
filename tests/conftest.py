"""Shared fixtures: tiny real SDXL pipelines, the artifact built from them, and a sqlite MLflow store.

Everything is built once per test session from the real diffusers/transformers classes; nothing is
downloaded and nothing is mocked.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mlflow
import pytest

from sdxl_tools.artifact import save_artifact, stage_components
from sdxl_tools.random_weights import TinySDXL, write_tiny_sdxl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# float32 everywhere (this process, servers and Spark workers it starts), whatever the CPU: the exact
# comparisons (pyfunc vs raw diffusers, batched vs alone, Spark vs pandas) hold in float32 on every
# machine, while `dtype: auto` would pick bfloat16 on some. tests/test_dtype.py covers auto and bfloat16.
os.environ.setdefault("SDXL_DTYPE", "float32")
warnings.filterwarnings("ignore", message=".*torchvision.*")


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
