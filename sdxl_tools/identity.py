"""Which model made a batch folder's images: :class:`ModelIdentity`, read from a model's files before
it is loaded (registry version, model hash, model config) and from the loaded model, and compared on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a folder's images; ``job.json`` keeps it and a resume must match it."""

    uri: str | None  # as given (not compared: models:/sdxl@production and models:/sdxl/3 may agree)
    name: str | None  # registered model, for models:/NAME@alias and models:/NAME/VERSION
    version: str | None  # the version the alias pointed at when the job started
    model_hash: str  # sha256 over the components' hashes, as in the images' PNG metadata
    model_config: dict[str, Any]  # the model config the model loads with (artifact's + overrides)

    def describe(self) -> str:
        where = f"version {self.version} of {self.name}" if self.version else (self.uri or "a loaded model")
        return f"{where} (model hash {(self.model_hash or '?')[:12]})"


def registry_version(uri: str) -> tuple[str, str] | None:
    """``(name, version)`` for ``models:/NAME@alias`` (resolved now) and ``models:/NAME/VERSION``."""
    if not uri.startswith("models:/"):
        return None
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    resolved = get_model_name_and_version(MlflowClient(), uri)
    if len(resolved) != 2:  # models:/<model id>: a logged model, not a registry version
        return None
    name, version = resolved
    return name, str(version)  # sqlite returns the version as an int


def artifact_identity(
    local: Path, uri: str | None, registered: tuple[str, str] | None, overrides: dict[str, Any] | None
) -> ModelIdentity:
    """The identity of a model folder, read from its files without loading the pipelines; every weight
    file is hashed first (a mismatch raises), so the model hash is the content's."""
    from mlflow.models import Model

    from model_pkg.config import load_model_config
    from sdxl_tools.verify import verify_model

    verified = verify_model(local)
    flavor = Model.load(local).flavors["python_function"]
    packaged = flavor.get("config") or {}
    # as mlflow.pyfunc.load_model(model_config=...): only keys the artifact declares are overridden
    config = packaged | {k: v for k, v in (overrides or {}).items() if k in packaged}
    name, version = registered or (None, None)
    return ModelIdentity(
        uri,
        name,
        version,
        verified.model_hash,
        load_model_config(config).model_dump(mode="json"),
    )


def loaded_identity(model: Any, source: ModelIdentity | None = None) -> ModelIdentity:
    """The identity of a loaded model: its own model hash and config, the registry version of ``source``."""
    python_model = model.unwrap_python_model()
    return ModelIdentity(
        source.uri if source else None,
        source.name if source else None,
        source.version if source else None,
        python_model.pipelines.catalog.model_hash,
        python_model.config.model_dump(mode="json"),
    )


def model_difference(recorded: dict[str, Any] | None, current: ModelIdentity) -> str | None:
    """Why ``current`` is not the model that made the folder's images, or None when it is.

    Fields ``current`` does not know yet (empty) are not compared: the CLI first compares the
    registry version, before downloading, then the model hash and config, before loading.
    """
    if not recorded:
        return "its job.json records no model"
    previous = ModelIdentity(**{f.name: recorded.get(f.name) for f in dataclasses.fields(ModelIdentity)})
    made = f"it holds images of {previous.describe()}"
    if previous.version and current.version and (previous.name, previous.version) != (current.name, current.version):
        return f"{made}; {current.uri} is version {current.version}"
    if current.model_hash and current.model_hash != previous.model_hash:
        return f"{made}; {current.uri or 'this model'} has model hash {current.model_hash[:12]}"
    if current.model_config and current.model_config != previous.model_config:
        old, new = previous.model_config, current.model_config
        changed = ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old | new) if old.get(k) != new.get(k))
        return f"the model config differs: {changed}"
    return None
