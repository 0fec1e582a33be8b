"""Every weight file of a saved model against the sha256 its ``components.json`` records: the gate, the
batch job's start and ``sdxl-pyfunc verify URI`` run this before they trust a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.models import Model

from model_pkg.catalog import model_hash
from model_pkg.pipelines import MANIFEST
from model_pkg.pipelines import ManifestKey as K
from model_pkg.weights import verify_weights
from sdxl_tools.files import byte_bar


@dataclass(frozen=True)
class Verified:
    model_hash: str  # computed from the verified files' digests
    files: int
    bytes: int


def verify_model(local: str | Path) -> Verified:
    """Hash every file of the model directory ``local``; raises naming the component and file that differ."""
    local = Path(local)
    folder = local / Model.load(str(local)).flavors["python_function"]["artifacts"]["sdxl"]["path"]
    manifest = json.loads((folder / MANIFEST).read_text())
    files, hashes = manifest.get(K.FILES), manifest.get(K.HASHES) or {}
    records = [r for component in (files or {}).values() for r in component.values()]
    total = sum(r["size"] for r in records)
    with byte_bar(total, "verifying sha256") as bar:
        verify_weights(folder, files, hashes, full=True, done=bar.update)
    return Verified(model_hash(hashes), len(records), total)
