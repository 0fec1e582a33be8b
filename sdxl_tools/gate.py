"""The validation gate a model version passes before it takes a registry alias.

The candidate is downloaded from the registry and loaded like a server would load it: in a child
process (``python -m sdxl_tools.gate``), which imports only the code the candidate carries (MLflow
``code_paths``, never this process's ``model_pkg``), reports its checks as JSON, and takes the
candidate's memory with it when it ends. Before that, every weight file must match the sha256
its ``components.json`` records (:mod:`sdxl_tools.verify`). It must score its own input example
(the MLmodel's, with its small params), return the output columns and types its signature
declares, make images that are neither one colour nor the same for different seeds, give the same
bytes twice for a fixed seed, and keep the signature of the version that holds the target alias
now: no removed input columns or params, no newly required input, no changed types, no removed
output columns.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, Schema

from sdxl_tools.scratch import scratch_dir

DEFAULT_SEED = 0  # used when the input example's params carry no seed


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class GateReport:
    """What the gate checked for ``models:/NAME/VERSION`` before it may take ``@alias``."""

    name: str
    version: str
    alias: str
    holder: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, name: str, problems: list[str], ok_detail: str = "") -> bool:
        self.checks.append(Check(name, not problems, "; ".join(problems) if problems else ok_detail))
        return not problems

    def __str__(self) -> str:
        held = f"held by version {self.holder}" if self.holder else "not held yet"
        verdict = "PASSED" if self.passed else "REFUSED"
        lines = [f"validation gate for models:/{self.name}/{self.version} -> @{self.alias} ({held}): {verdict}"]
        for c in self.checks:
            lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}" + (f": {c.detail}" if c.detail else ""))
        return "\n".join(lines)


# -- signatures ---------------------------------------------------------------------------------


def _type(spec: ColSpec) -> str:
    described = spec.to_dict()
    return str(described.get("type")) if set(described) <= {"name", "type", "required"} else json.dumps(described)


def _columns(schema: Schema | None) -> dict[str, ColSpec]:
    return {spec.name: spec for spec in (schema.inputs if schema is not None else [])}


def _params(params: ParamSchema | None) -> dict[str, Any]:
    return {p.name: p for p in (params.params if params is not None else [])}


def describe_schema(schema: Schema | None) -> str:
    """``prompt:string, image:string?`` (``?`` = optional column)."""
    return ", ".join(f"{n}:{_type(s)}{'' if s.required else '?'}" for n, s in _columns(schema).items())


def describe_params(params: ParamSchema | None) -> str:
    """``refiner:string=ensemble, seed:long=-1``."""
    return ", ".join(f"{n}:{p.to_dict()['type']}={p.default}" for n, p in _params(params).items())


def breaking_changes(current: ModelSignature, candidate: ModelSignature) -> list[str]:
    """What a client of ``current`` would see break if ``candidate`` replaced it (empty: compatible)."""
    old, new = _columns(current.inputs), _columns(candidate.inputs)
    problems = _column_changes("input", old, new)
    for name, spec in new.items():
        if spec.required and name not in old:
            problems.append(f"new required input column {name!r}")
        elif spec.required and not old[name].required:
            problems.append(f"input column {name!r} became required")
    old_params, new_params = _params(current.params), _params(candidate.params)
    for name, spec in old_params.items():
        if name not in new_params:
            problems.append(f"param {name!r} removed")
        elif (spec.dtype, spec.shape) != (new_params[name].dtype, new_params[name].shape):
            old_type, new_type = spec.to_dict()["type"], new_params[name].to_dict()["type"]
            problems.append(f"param {name!r} type {old_type} -> {new_type}")
    return problems + _column_changes("output", _columns(current.outputs), _columns(candidate.outputs))


def _column_changes(kind: str, old: dict[str, ColSpec], new: dict[str, ColSpec]) -> list[str]:
    """Columns of ``old`` that ``new`` removes or retypes."""
    problems = []
    for name, spec in old.items():
        if name not in new:
            problems.append(f"{kind} column {name!r} removed")
        elif _type(spec) != _type(new[name]):
            problems.append(f"{kind} column {name!r} type {_type(spec)} -> {_type(new[name])}")
    return problems


# -- outputs ------------------------------------------------------------------------------------

_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool, np.bool_),
    "long": (int, np.integer),
    "integer": (int, np.integer),
    "double": (float, int, np.floating, np.integer),
    "float": (float, int, np.floating, np.integer),
    "binary": (bytes,),
}


def _wrong_type(values: Iterable[Any], type_name: str) -> Any:
    expected = _PYTHON_TYPES.get(type_name)
    if expected is None:  # any, datetime, arrays, objects: not checked value by value
        return None
    for value in values:
        bad_bool = isinstance(value, bool | np.bool_) and type_name not in ("boolean",)
        if not pd.isna(value) and (bad_bool or not isinstance(value, expected)):
            return value
    return None


def output_problems(frame: Any, schema: Schema | None, rows: int) -> list[str]:
    """Differences between a predict result and the declared output schema."""
    if schema is None:
        return ["the signature declares no outputs"]
    if not isinstance(frame, pd.DataFrame):
        return [f"predict returned {type(frame).__name__}, not a DataFrame"]
    declared = _columns(schema)
    problems = [] if len(frame) == rows else [f"{len(frame)} output rows for {rows} input rows"]
    problems += [f"undeclared output column {c!r}" for c in frame.columns if c not in declared]
    for name, spec in declared.items():
        if name not in frame.columns:
            if spec.required:
                problems.append(f"declared output column {name!r} missing")
            continue
        values = frame[name].tolist()
        if spec.required and any(pd.isna(v) for v in values):  # scalar types only in this schema
            problems.append(f"required output column {name!r} has nulls")
        bad = _wrong_type(values, _type(spec))
        if bad is not None:
            problems.append(f"output column {name!r} declared {_type(spec)}, got {type(bad).__name__} {bad!r:.40}")
    return problems


def _pixels(frame: pd.DataFrame) -> list[tuple[int, np.ndarray]]:
    """Each row's decoded image (``generated_image``: base64 of an image file), by row number."""
    import base64
    import io

    from PIL import Image

    images = frame["generated_image"] if isinstance(frame, pd.DataFrame) and "generated_image" in frame else []
    decoded = []
    for row, value in enumerate(images):
        if isinstance(value, str):
            with Image.open(io.BytesIO(base64.b64decode(value))) as image:
                decoded.append((row, np.asarray(image.convert("RGB"), dtype=np.float64)))
    return decoded


def image_problems(frame: pd.DataFrame) -> list[str]:
    """Images a broken model makes: non-finite, one colour (NaN weights decode to black), or the same
    picture for different seeds (the noise is ignored)."""
    problems, decoded = [], _pixels(frame)
    if not decoded:
        return ["no images to look at"]
    for row, pixels in decoded:
        if not np.isfinite(pixels).all():
            problems.append(f"row {row}: non-finite pixels")
        elif pixels.std() == 0:
            problems.append(f"row {row}: one colour {tuple(int(c) for c in pixels[0, 0])} (std 0)")
    seeds = frame["seed"].tolist() if "seed" in frame else [None] * len(frame)
    for (a, pa), (b, pb) in itertools.pairwise(decoded):
        if seeds[a] != seeds[b] and pa.shape == pb.shape and np.array_equal(pa, pb):
            problems.append(f"rows {a} and {b}: the same image for seeds {seeds[a]} and {seeds[b]}")
    return problems


def _image_summary(frame: pd.DataFrame) -> str:
    return ", ".join(f"row {row}: mean {p.mean():.1f}, std {p.std():.1f}" for row, p in _pixels(frame))


def _differences(first: pd.DataFrame, second: pd.DataFrame) -> list[int]:
    columns = [c for c in ("generated_image", "seed") if c in first.columns and c in second.columns]
    if not columns:
        columns = list(first.columns)
    return [i for i in range(len(first)) if any(first[c].iloc[i] != second[c].iloc[i] for c in columns)]


# -- the gate -----------------------------------------------------------------------------------
# The checks run in two processes: this one downloads the candidate and compares signatures with the
# registry; a child loads and scores the candidate. The child must not import this project's runtime
# before the candidate's (a module already imported shadows the copy in the artifact's code/), so
# this module imports nothing of ``model_pkg`` and judges outputs with pandas alone.


def validate(name: str, version: str, alias: str, holder: str | None = None) -> GateReport:
    """Run every check on ``models:/name/version``; never raises for a bad model, reports instead."""
    report = GateReport(name, str(version), alias, str(holder) if holder is not None else None)
    # the download (gigabytes with real weights) goes when the gate ends, even when killed
    with scratch_dir() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp))
            meta = Model.load(local)
        except Exception as e:  # any load failure is a verdict, not a crash
            report.add("loads from the registry", [f"{type(e).__name__}: {e}"])
            return report
        if not _check_weights(report, local):
            return report  # what would be scored is not what was built
        loads, *scoring = _score_in_child(local, tmp)
        report.checks.append(dataclasses.replace(loads, detail=loads.detail or f"models:/{name}/{version}"))
        if loads.ok:
            _check_signature(report, meta.signature, name, report.holder, report.version)
            report.checks += scoring
    return report


def _check_weights(report: GateReport, local: str) -> bool:
    from sdxl_tools.verify import verify_model  # imports model_pkg: never in the child (see above)

    try:
        verified = verify_model(local)
    except Exception as e:
        return report.add("weights match their recorded sha256", [f"{type(e).__name__}: {e}"])
    detail = f"{verified.files} files, {verified.bytes / 1e6:.1f} MB, model hash {verified.model_hash[:12]}"
    return report.add("weights match their recorded sha256", [], detail)


def _score_in_child(local: str, tmp: Path) -> list[Check]:
    """The candidate's checks from a child process: "loads", then the scoring checks it reached."""
    out = tmp / "checks.json"
    command = [sys.executable, "-m", "sdxl_tools.gate", str(local), str(out)]
    # cwd: not the repository, whose model_pkg would come first on the child's sys.path
    done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout)[-2000:].strip()
        return [Check("loads from the registry", False, f"the scoring process exited with {done.returncode}: {tail}")]
    return [Check(**check) for check in json.loads(out.read_text())]


def check_candidate(local: str) -> list[Check]:
    """What the child runs: load the candidate as a server would, score its example twice."""
    report = GateReport("", "", "", None)
    try:
        meta = Model.load(local)
        example = meta.load_input_example(local)
        params = dict(meta.load_input_example_params(local) or {})
        model = mlflow.pyfunc.load_model(local)
    except Exception as e:
        report.add("loads from the registry", [f"{type(e).__name__}: {e}"])
        return report.checks
    report.add("loads from the registry", [])
    if example is None:
        report.add("scores its input example", ["the model has no input example"])
        return report.checks
    example = example if isinstance(example, pd.DataFrame) else pd.DataFrame(example)
    params.setdefault("seed", DEFAULT_SEED)
    try:
        start = time.perf_counter()
        first = model.predict(example, params=params)
        took = time.perf_counter() - start
    except Exception as e:
        report.add("scores its input example", [f"{type(e).__name__}: {e}"])
        return report.checks
    report.add("scores its input example", [], f"{len(example)} rows, params {params}, {took:.1f} s")
    outputs = meta.signature.outputs if meta.signature is not None else None
    report.add("output matches the declared schema", output_problems(first, outputs, len(example)))
    report.add("images are not blank, broken or seed-independent", image_problems(first), _image_summary(first))
    _check_determinism(report, model, example, params, first, meta.signature)
    return report.checks


def _check_signature(
    report: GateReport, signature: ModelSignature | None, name: str, holder: str | None, version: str
) -> None:
    check = f"signature compatible with version {holder} (@{report.alias})"
    if signature is None:
        report.add("signature compatible", ["the model has no signature"])
    elif holder is None or str(holder) == str(version):
        report.add("signature compatible", [], f"nothing to compare: @{report.alias} is not held by another version")
    else:
        current = mlflow.models.get_model_info(f"models:/{name}/{holder}").signature
        if current is None:
            report.add(check, [], f"version {holder} has no signature to compare with")
        else:
            report.add(check, breaking_changes(current, signature))


def _check_determinism(
    report: GateReport,
    model: mlflow.pyfunc.PyFuncModel,
    example: pd.DataFrame,
    params: dict[str, Any],
    first: pd.DataFrame,
    signature: ModelSignature | None,
) -> None:
    check = f"deterministic for seed {params['seed']}"
    try:
        second = model.predict(example, params=params)
    except Exception as e:
        report.add(check, [f"second run failed: {type(e).__name__}: {e}"])
        return
    if not isinstance(first, pd.DataFrame) or not isinstance(second, pd.DataFrame) or len(first) != len(second):
        report.add(check, ["the two runs returned different shapes"])
        return
    rows = _differences(first, second)
    if not rows:
        report.add(check, [], "two runs, identical outputs")
        return
    declared = signature is not None and "seed" in _params(signature.params)
    hint = "" if declared else " (the signature declares no 'seed' param)"
    report.add(check, [f"two runs differ in rows {rows}{hint}"])


if __name__ == "__main__":  # the child of validate(): python -m sdxl_tools.gate LOCAL_MODEL OUT_JSON
    checks = check_candidate(sys.argv[1])
    Path(sys.argv[2]).write_text(json.dumps([dataclasses.asdict(c) for c in checks]))
