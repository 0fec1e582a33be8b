"""The Model Registry lifecycle: register with provenance tags, promote by alias behind the gate, roll back, copy.

Store: ``MLFLOW_TRACKING_URI`` when set (a server, a database, ...), else an embedded sqlite file
in the project folder (``mlflow.db``, artifacts in ``mlruns/``): nothing to start.

Promotion moves an alias (``models:/NAME@staging``, ``models:/NAME@production``) after
:func:`sdxl_tools.gate.validate` passed. The registered model keeps each alias's history, the stack
of versions that held it (tag ``alias_history.<alias>``): a promotion pushes, :func:`rollback` pops,
so repeated rollbacks walk back through the holders and stop at the first one. Stages are
deprecated in MLflow: ``use_stages=True`` also moves the version to the matching stage (``staging`` →
``Staging``, ``production`` → ``Production``), archiving the version that was there, so the stage
mirrors the alias.

The registry has no transactions, so the writes are ordered for a kill at any point. A promotion
moves the alias first and only then writes what describes the move (history, ``validation.<alias>``,
``previous.<alias>``): killed before the alias write, it leaves nothing; killed after it, the alias
has moved without a history entry, and a rollback then goes back to the last recorded holder, the
right one. A rollback writes the history first and then moves the alias: killed in between, the
history already names the target, and the next rollback completes the move instead of bouncing back.
"""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, INVALID_STATE, RESOURCE_DOES_NOT_EXIST

from model_pkg.pipelines import ManifestKey as K
from sdxl_tools import ROOT
from sdxl_tools.artifact import log_artifact
from sdxl_tools.gate import GateReport, describe_params, describe_schema, validate
from sdxl_tools.staging import Staged

DEFAULT_EXPERIMENT = "sdxl"
ALIASES = ("staging", "production")
STAGES = {"staging": "Staging", "production": "Production"}  # alias -> deprecated stage (opt-in)
PREVIOUS = "previous.{alias}"  # tag on the version that took the alias: the version that held it
VALIDATED = "validation.{alias}"  # tag: the gate's verdict for that alias
ROLLED_BACK = "rolled_back.{alias}"  # tag on the version an alias was rolled back from
HISTORY = "alias_history.{alias}"  # registered-model tag: JSON list of the alias's holders, oldest first
HISTORY_LIMIT = 64  # holders kept (a registered-model tag holds 5000 characters in SQL stores)
LEASE = "lease.{alias}"  # registered-model tag: {"owner", "until"} of the one process moving the alias
LEASE_SECONDS = 120.0  # a killed promotion blocks the alias this long at most
LEASE_SETTLE = 1.0  # after writing a lease, wait this long before reading it back (see alias_lease)
LIFECYCLE_PREFIXES = ("previous.", "validation.", "rolled_back.")  # not carried over by copy_version
PACKAGES = ("diffusers", "transformers", "torch", "mlflow", "accelerate", "safetensors")


class PromotionRefused(MlflowException):
    """The gate refused the candidate; ``report`` says why. The alias did not move."""

    def __init__(self, report: GateReport):
        super().__init__(str(report), error_code=INVALID_STATE)
        self.report = report


# -- store --------------------------------------------------------------------------------------


def tracking_uri(project: Path = ROOT) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project).resolve() / 'mlflow.db'}"


def use_store(project: Path = ROOT) -> str:
    """Point MLflow tracking and registry at the store (the registry at ``MLFLOW_REGISTRY_URI`` if set)."""
    uri = tracking_uri(project)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def _artifact_location(uri: str, project: Path) -> str | None:
    """sqlite: ``mlruns/`` beside the database file (MLflow's default is ``./mlruns`` of the cwd).
    Servers and other stores: their own default."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///").split("?")[0])
    folder = db.parent if db.is_absolute() else Path(project) / db.parent
    return (folder.resolve() / "mlruns").as_uri()


def use_experiment(name: str = DEFAULT_EXPERIMENT, project: Path = ROOT) -> str:
    """:func:`use_store`, then make ``name`` the active experiment (created if missing); returns its id."""
    uri = use_store(project)
    experiment = mlflow.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else mlflow.create_experiment(name, artifact_location=_artifact_location(uri, project))
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# -- register -----------------------------------------------------------------------------------


def provenance_tags(staged: Staged, signature: mlflow.models.ModelSignature | None) -> dict[str, str]:
    """Tags a reviewer needs to know what a version is: component hashes, sources, versions, contract."""
    manifest = staged.manifest
    tags = {f"sha256.{component}": digest for component, digest in manifest[K.HASHES].items()}
    tags["components.shared"] = ", ".join(manifest[K.SHARED]) or "none"
    tags["safety_checker"] = "packaged" if manifest[K.SAFETY_CHECKER] else "none"
    tags |= {f"source.{role}": path for role, path in manifest[K.SOURCES].items()}
    tags |= {f"version.{package}": installed_version(package) for package in PACKAGES}
    tags["version.python"] = platform.python_version()
    if signature is not None:
        tags["signature.inputs"] = describe_schema(signature.inputs)
        tags["signature.outputs"] = describe_schema(signature.outputs)
        tags["signature.params"] = describe_params(signature.params)
    return tags


def register(
    staged: Staged,
    name: str,
    *,
    model_config: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    description: str | None = None,
    **log_kwargs: Any,
) -> ModelVersion:
    """Log the artifact in a new run of the active experiment and register it as a new version of ``name``."""
    with mlflow.start_run(run_name=f"register-{name}"):
        info = log_artifact(staged, name="sdxl", model_config=model_config, **log_kwargs)
        version_tags = provenance_tags(staged, info.signature) | (tags or {})
        if model_config:
            version_tags["model_config"] = ", ".join(f"{k}={v}" for k, v in model_config.items())
        mlflow.set_tags({"registered_model": name})
    registered = mlflow.register_model(info.model_uri, name, tags=version_tags)
    if description:
        registered = MlflowClient().update_model_version(name, registered.version, description)
    return registered


# -- promote and roll back ----------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """An alias move: ``alias`` of ``name`` now points at ``version``; ``previous`` held it before."""

    name: str
    alias: str
    version: str
    previous: str | None
    report: GateReport | None = None
    stage: str | None = None
    skipped: tuple[str, ...] = ()  # a rollback: deleted versions passed over on the way back

    def __str__(self) -> str:
        moved = f"models:/{self.name}@{self.alias} -> version {self.version}"
        before = f" (was version {self.previous})" if self.previous else " (was unset)"
        stage = f"; stage {self.stage}" if self.stage else ""
        skipped = "".join(f"; skipped deleted version {v}" for v in self.skipped)
        return moved + before + stage + skipped


def holder(name: str, alias: str, client: MlflowClient | None = None) -> str | None:
    """The version holding ``models:/name@alias``, as a string (sqlite returns an int), or None."""
    client = client or MlflowClient()
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _check_alias(alias: str, use_stages: bool) -> None:
    if use_stages and alias not in STAGES:
        raise MlflowException(
            f"--use-stages maps only {', '.join(STAGES)} to stages, not {alias!r}", INVALID_PARAMETER_VALUE
        )
    if use_stages and not hasattr(MlflowClient, "transition_model_version_stage"):
        raise MlflowException(
            f"MLflow {mlflow.__version__} has no model stages; use aliases (drop --use-stages)", INVALID_PARAMETER_VALUE
        )


def _transition(client: MlflowClient, name: str, version: str, alias: str) -> str:
    stage = STAGES[alias]
    with warnings.catch_warnings():  # stages are deprecated: every call warns; the user opted in
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, version, stage, archive_existing_versions=True)
    return stage


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def alias_history(name: str, alias: str, client: MlflowClient | None = None) -> list[dict[str, str]]:
    """The versions that held ``alias`` as this module moved it, oldest first: ``[{"version", "at"}, ...]``."""
    client = client or MlflowClient()
    recorded = client.get_registered_model(name).tags.get(HISTORY.format(alias=alias))
    return json.loads(recorded) if recorded else []


def _write_history(client: MlflowClient, name: str, alias: str, history: list[dict[str, str]]) -> None:
    client.set_registered_model_tag(name, HISTORY.format(alias=alias), json.dumps(history[-HISTORY_LIMIT:]))


def _lease(client: MlflowClient, name: str, key: str) -> dict[str, Any] | None:
    recorded = client.get_registered_model(name).tags.get(key)
    return json.loads(recorded) if recorded else None


@contextmanager
def alias_lease(name: str, alias: str, client: MlflowClient, wait: float = LEASE_SECONDS + 10) -> Iterator[None]:
    """Hold the lease on ``name@alias`` (tag ``lease.<alias>``) while the block moves the alias.

    MLflow has no compare-and-set on aliases or tags, so this writes its lease, waits
    :data:`LEASE_SETTLE` and reads it back: of two processes that both saw the lease free, the later
    write wins and the earlier one sees it lost and waits. Waits up to ``wait`` seconds for a held
    lease; one older than :data:`LEASE_SECONDS` (its holder was killed) is taken over.
    """
    key = LEASE.format(alias=alias)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    while True:
        held = _lease(client, name, key)
        if held is None or held["until"] < time.time():
            lease = {"owner": owner, "until": time.time() + LEASE_SECONDS}
            client.set_registered_model_tag(name, key, json.dumps(lease))
            time.sleep(LEASE_SETTLE)  # a rival that read "free" at the same moment writes within this
            held = _lease(client, name, key)
            if held is not None and held["owner"] == owner:
                break
        if time.monotonic() > deadline:
            raise MlflowException(
                f"models:/{name}@{alias} is being moved by {held and held['owner']}; nothing changed, try again",
                INVALID_STATE,
            )
        time.sleep(0.2 + random.random() / 2)
    try:
        yield
    finally:
        held = _lease(client, name, key)
        if held is not None and held["owner"] == owner:
            client.delete_registered_model_tag(name, key)


def _still(client: MlflowClient, name: str, alias: str, expected: str | None, why: str) -> None:
    """Refuse when the alias no longer points where this move started from (another process moved it)."""
    now = holder(name, alias, client)
    if now != expected:
        raise MlflowException(
            f"models:/{name}@{alias} was moved to version {now} by someone else {why} (expected {expected}); "
            "this process changed nothing: rerun it to act on the new holder",
            INVALID_STATE,
        )


def promote(
    name: str,
    version: str | int,
    alias: str,
    *,
    use_stages: bool = False,
    dry_run: bool = False,
    client: MlflowClient | None = None,
) -> Promotion:
    """Validate ``models:/name/version`` and point ``alias`` at it.

    Raises :class:`PromotionRefused` (the alias does not move) when a gate check fails.
    ``dry_run`` runs the gate and moves nothing.
    """
    client = client or MlflowClient()
    version = str(version)
    _check_alias(alias, use_stages)
    client.get_model_version(name, version)  # a clear RESOURCE_DOES_NOT_EXIST if there is no such version
    current = holder(name, alias, client)
    report = validate(name, version, alias, holder=current)
    if not report.passed:
        if not dry_run:
            refused = "refused: " + "; ".join(c.name for c in report.failures)
            client.set_model_version_tag(name, version, VALIDATED.format(alias=alias), f"{refused} ({_now()})"[:4000])
        raise PromotionRefused(report)
    if dry_run:
        return Promotion(name, alias, version, current, report)
    with alias_lease(name, alias, client):
        # the gate compared with ``current``: a rival that moved the alias meanwhile voids the verdict
        _still(client, name, alias, current, "while the gate ran")
        return _move(client, name, version, alias, current, report, use_stages)


def _move(
    client: MlflowClient,
    name: str,
    version: str,
    alias: str,
    current: str | None,
    report: GateReport,
    use_stages: bool,
) -> Promotion:
    # the alias first: everything written after it describes a move that happened (see the module docs)
    client.set_registered_model_alias(name, alias, version)
    _still(client, name, alias, version, "as this promotion wrote it")  # a writer that ignores the lease
    history = alias_history(name, alias, client)
    if current is not None and current != version and (not history or history[-1]["version"] != current):
        history.append({"version": current, "at": "unknown"})  # the alias was moved without this module
    if not history or history[-1]["version"] != version:
        history.append({"version": version, "at": _now()})
    _write_history(client, name, alias, history)
    client.set_model_version_tag(name, version, VALIDATED.format(alias=alias), f"passed ({_now()})")
    if current is not None and current != version:
        client.set_model_version_tag(name, version, PREVIOUS.format(alias=alias), current)
    stage = _transition(client, name, version, alias) if use_stages else None
    return Promotion(name, alias, version, current, report, stage)


def rollback(name: str, alias: str, *, use_stages: bool = False, client: MlflowClient | None = None) -> Promotion:
    """Point ``alias`` back at the version that held it before its current holder took it."""
    client = client or MlflowClient()
    _check_alias(alias, use_stages)
    with alias_lease(name, alias, client):
        return _roll_back(client, name, alias, use_stages)


def _roll_back(client: MlflowClient, name: str, alias: str, use_stages: bool) -> Promotion:
    current = holder(name, alias, client)
    if current is None:
        raise MlflowException(f"models:/{name}@{alias} is not set: nothing to roll back", RESOURCE_DOES_NOT_EXIST)
    history = alias_history(name, alias, client)
    if history and history[-1]["version"] == current:
        history.pop()
    # else the current holder took the alias without a history entry (moved by hand, or a promote
    # killed after its alias write, or a rollback killed before it): the last recorded holder is the target
    skipped = []
    while history and not _exists(client, name, history[-1]["version"]):
        skipped.append(history.pop()["version"])  # deleted since it held the alias
    if not history:
        gone = f" (deleted: versions {', '.join(skipped)})" if skipped else ""
        raise MlflowException(
            f"version {current} of {name} is the first holder of @{alias} on record (tag "
            f"{HISTORY.format(alias=alias)!r}): it records no previous holder to roll back to{gone}",
            INVALID_STATE,
        )
    previous = history[-1]["version"]
    _write_history(client, name, alias, history)  # the history first (see the module docs)
    client.set_registered_model_alias(name, alias, previous)
    client.set_model_version_tag(name, current, ROLLED_BACK.format(alias=alias), f"{_now()}, back to {previous}")
    stage = _transition(client, name, previous, alias) if use_stages else None
    return Promotion(name, alias, previous, current, None, stage, tuple(skipped))


def _exists(client: MlflowClient, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


# -- copy ---------------------------------------------------------------------------------------


def copy_version(src_name: str, ref: str | int, dst_name: str, client: MlflowClient | None = None) -> ModelVersion:
    """Copy ``models:/src_name/ref`` (``ref`` a version, or ``@alias``) to a new version of ``dst_name``.

    MLflow's ``copy_model_version`` keeps the source's tags; the lifecycle tags (previous holders,
    gate verdicts, rollbacks) describe the source model's aliases, so the copy drops them and records
    ``copied_from`` instead. The copy holds no alias: promote it in the destination model.
    """
    client = client or MlflowClient()
    ref = str(ref)
    src_version = holder(src_name, ref[1:], client) if ref.startswith("@") else ref
    if src_version is None:
        raise MlflowException(f"models:/{src_name}{ref} is not set", RESOURCE_DOES_NOT_EXIST)
    copied = client.copy_model_version(f"models:/{src_name}/{src_version}", dst_name)
    for key in copied.tags:
        if key.startswith(LIFECYCLE_PREFIXES):
            client.delete_model_version_tag(dst_name, copied.version, key)
    client.set_model_version_tag(dst_name, copied.version, "copied_from", f"models:/{src_name}/{src_version}")
    return client.get_model_version(dst_name, copied.version)
