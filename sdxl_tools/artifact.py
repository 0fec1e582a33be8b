"""Saving and logging the artifact: the staged ``sdxl`` folder as an MLflow model (models-from-code).

The weights are written once. :func:`save_artifact` lets MLflow save the model with the staged
folder's small files only, then puts each weight file in place itself: moved when the staged file
has no other name (a copy staging made, or a file generated for this build), copied otherwise, so the
model never shares a file with a user's source folder (which may be rewritten in place later).

The MLflow model is ``model_pkg/model.py`` with ``model_pkg/`` as its only ``code_paths`` entry (this
package is never shipped), the signature of :mod:`sdxl_tools.signature`, requirements and an input
example from ``MLmodel_template/``, and MLServer's model settings with their runtime class
(``deploy/mlserver/``, as the ``mlserver`` artifact).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME

import model_pkg
from model_pkg.catalog import STYLES_FILE, load_styles
from model_pkg.config import load_model_config
from model_pkg.pipelines import ManifestKey as K
from sdxl_tools import ROOT, TEMPLATE
from sdxl_tools.files import link_or_copy, publish_modes
from sdxl_tools.signature import signature
from sdxl_tools.staging import Staged

RUNTIME = Path(model_pkg.__file__).resolve().parent  # the artifact's only code_paths entry
MODEL_FILE = RUNTIME / "model.py"
# model-settings.json + the MLServer runtime class: copied into every artifact (artifacts/mlserver/),
# where `mlserver start <model>` and KServe's MLServer find them
MLSERVER = ROOT / "deploy" / "mlserver"


def requirements() -> list[str]:
    lines = (TEMPLATE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def input_example() -> tuple[pd.DataFrame, dict[str, Any]]:
    """The Azure row shape (``prompt``, ``image``) with small params, so validating it is cheap."""
    example = json.loads((TEMPLATE / "input_example.json").read_text())
    return pd.DataFrame(example["data"], columns=example["columns"]), example["params"]


def model_card(staged: Staged) -> dict[str, Any]:
    """MLmodel ``metadata``: the static model card plus this build's provenance."""
    card = yaml.safe_load((TEMPLATE / "model_card.yaml").read_text())
    has_checker = staged.manifest[K.SAFETY_CHECKER] is not None
    card["safety_checker"] = (
        "packaged: nsfw_content_detected is true/false; flagged images are blacked out unless safety_filter=false"
        if has_checker
        else "none: nsfw_content_detected is null (nothing is checked); use a content-safety service"
    )
    card["styles"] = {"version": styles_version(staged), "names": sorted(styles_names(staged))}
    card["loras"] = {name: entry["sha256"] for name, entry in (staged.manifest.get(K.LORAS) or {}).items()}
    card["controlnets"] = {name: e["sha256"] for name, e in (staged.manifest.get(K.CONTROLNETS) or {}).items()}
    card["components"] = {
        "shared_by_base_and_refiner": staged.manifest[K.SHARED],
        "sha256": staged.manifest[K.HASHES],
        "sources": staged.manifest[K.SOURCES],
    }
    return card


def styles_version(staged: Staged) -> str:
    return load_styles(staged.folder / STYLES_FILE).version


def styles_names(staged: Staged) -> list[str]:
    return load_styles(staged.folder / STYLES_FILE).names()


def _model_kwargs(staged: Staged, model_config: dict[str, Any] | None, folder: Path | None = None) -> dict[str, Any]:
    return dict(
        python_model=str(MODEL_FILE),
        artifacts={"sdxl": str(folder or staged.folder), "mlserver": str(MLSERVER)},
        code_paths=[str(RUNTIME)],  # the runtime package only: tools stay home
        signature=signature(),
        input_example=input_example(),
        pip_requirements=requirements(),
        # every key, defaults included: MLflow lets load_model/spark_udf(model_config=...) override
        # only keys already stored, and ignores all overrides when none is stored
        model_config=load_model_config(model_config, environ={}).model_dump(mode="json"),
        metadata=model_card(staged),
    )


WEIGHTS = ".safetensors"


def save_artifact(
    staged: Staged, output: Path, model_config: dict[str, Any] | None = None, move_weights: bool = False
) -> Path:
    """Write a model directory that ``mlflow.pyfunc.load_model(output)`` loads, writing each weight once.

    MLflow copies its artifacts; so it gets a skeleton of the staged folder (everything but the
    ``*.safetensors`` files, hard-linked) and the weights are then put in place here. ``move_weights``
    moves staged weight files that have no other name (copies staging made, files generated for this
    build whose source folder is gone): a rename when the staged folder is on the output's filesystem,
    and the staged folder is spent. Every other weight file is copied.
    """
    output = Path(output)
    output.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sdxl-skeleton-", dir=output.resolve().parent) as tmp:
        skeleton = Path(tmp) / staged.folder.name
        for path in sorted(staged.folder.rglob("*")):
            if path.is_file() and path.suffix != WEIGHTS:
                link_or_copy(path, skeleton / path.relative_to(staged.folder))
        mlflow.pyfunc.save_model(path=str(output), **_model_kwargs(staged, model_config, folder=skeleton))
    try:
        _put_weights(staged.folder, output, move_weights)
        publish_modes(output)  # MLflow and copy2 keep source modes (a 0600 weight file)
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)  # no half-written model
        raise
    return output


def _put_weights(staged: Path, output: Path, move: bool) -> None:
    """Put the staged ``*.safetensors`` files into the saved model's ``sdxl`` artifact folder."""
    model = Model.load(str(output))
    entry = model.flavors["python_function"]["artifacts"]["sdxl"]
    entry["uri"] = str(staged)  # where it was built from, not the deleted skeleton
    folder = output / entry["path"]
    weight_bytes = 0
    for path in sorted(staged.rglob(f"*{WEIGHTS}")):
        target = folder / path.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        weight_bytes += path.stat().st_size
        if move and path.stat().st_nlink == 1:
            shutil.move(path, target)  # os.rename on one filesystem: no bytes written
        else:
            shutil.copy2(path, target)  # never a link to a user's file
    model.model_size_bytes = (model.model_size_bytes or 0) + weight_bytes  # MLflow counted the skeleton
    model.save(str(output / MLMODEL_FILE_NAME))


def log_artifact(
    staged: Staged, name: str = "sdxl", model_config: dict[str, Any] | None = None, **log_kwargs: Any
) -> mlflow.models.model.ModelInfo:
    """Log to the active tracking URI (MLflow validates the input example by scoring it once).

    ``log_kwargs`` go to ``mlflow.pyfunc.log_model`` and override the defaults (e.g. ``signature``).
    """
    return mlflow.pyfunc.log_model(name=name, **(_model_kwargs(staged, model_config) | log_kwargs))
