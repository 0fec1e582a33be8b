"""Serving platforms' virtualenvs for the deploy tests and benchmark, built as the platforms build them.

Each gets the platform's server packages first (``deploy/azureml/server-packages.txt``: what Azure ML's
curated MLflow inference image holds; ``deploy/kserve/server-packages.txt``: the MLServer image for
KServe), then the artifact's requirements on top (what Azure ML's dynamic install and ``mlserver
build`` do). ``torch`` comes first and exact, so that the machine's CPU wheel is used (a resolver left
alone pulls a multi-GB CUDA build).

A venv takes minutes to build (2.2 GB; pip's HTTP cache does not fill behind some proxies), so each is
built once per machine under ``~/.cache/sdxl-pyfunc/venvs/<platform>-<hash>``, the hash covering the
Python version and every layer's requirement files (change one and a new venv is built; delete the
folder to reclaim the space). A file lock makes concurrent test sessions share one build, and a marker
written last means a build that died half-way is started again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
REQUIREMENTS = ROOT / "MLmodel_template" / "requirements.txt"
CACHE = Path(os.environ.get("SDXL_PYFUNC_VENV_CACHE", Path.home() / ".cache" / "sdxl-pyfunc" / "venvs"))
BUILD_TIMEOUT_S = 1500
DONE = ".complete"


def torch_pin() -> str:
    """The artifact's exact torch requirement (installed first, alone)."""
    return next(line for line in REQUIREMENTS.read_text().split() if line.startswith("torch=="))


@dataclass(frozen=True)
class Platform:
    name: str
    server_packages: Path  # a pip requirements file: the platform's own packages, installed before the model's
    smoke: str  # Python that must run in the finished venv (the server imports)

    def layers(self) -> list[list[str]]:
        """``pip install`` arguments, one install per layer, in order."""
        return [[torch_pin()], ["-r", str(self.server_packages)], ["-r", str(REQUIREMENTS)]]

    def key(self) -> str:
        digest = hashlib.sha256(f"{sys.version_info[:3]}".encode())
        for layer in self.layers():
            for arg in layer:
                digest.update(Path(arg).read_bytes() if arg.endswith(".txt") else arg.encode())
        return f"{self.name}-{digest.hexdigest()[:16]}"


AZUREML = Platform(
    "azureml",
    DEPLOY / "azureml" / "server-packages.txt",
    "import azureml_inference_server_http.server.appinsights_client, inference_schema, mlflow, pandas",
)
MLSERVER = Platform("mlserver", DEPLOY / "kserve" / "server-packages.txt", "import mlserver.cli, mlserver_mlflow")
PLATFORMS = (AZUREML, MLSERVER)


def venv(platform: Platform) -> Path:
    """The platform's venv, built now if this machine has none for the current requirement files."""
    path = CACHE / platform.key()
    if (path / DONE).exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{platform.key()}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it: wait, then use its build
        if not (path / DONE).exists():
            _build(platform, path)
    return path


def _build(platform: Platform, path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a build that died half-way
    log = path.with_suffix(".log")
    start = time.monotonic()
    with log.open("w") as out:
        commands = [[sys.executable, "-m", "venv", str(path)]]
        # --no-compile: pip's byte-compiling of every module is most of the install time (torch: 55 s of
        # 64 s); Python compiles the modules a server imports when it first imports them
        pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        pip += ["--no-compile"]
        commands += [pip + layer for layer in platform.layers()]
        commands += [[str(path / "bin" / "python"), "-c", platform.smoke]]
        for command in commands:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
            if result.returncode != 0:
                raise RuntimeError(f"building the {platform.name} venv failed; see {log}:\n{log.read_text()[-3000:]}")
        out.write(f"built in {time.monotonic() - start:.0f} s\n")
    (path / DONE).write_text(f"{time.monotonic() - start:.0f} s\n")


def server_env(venv_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a platform's server: its venv first on PATH, nothing of this checkout on the
    Python path (the artifact brings its own code), no weights downloaded."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["PATH"] = f"{venv_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | extra


def unmet_requirements(venv_path: Path, requirements: list[str]) -> list[str]:
    """The requirements that the venv's installed versions do not satisfy (``==2.13.0`` takes ``2.13.0+cpu``)."""
    check = (
        "import json, sys; from importlib.metadata import version; from packaging.requirements import Requirement\n"
        "unmet = [r for r in map(Requirement, sys.argv[1:]) if not r.specifier.contains(version(r.name))]\n"
        "print(json.dumps([str(r) for r in unmet]))"
    )
    result = subprocess.run(
        [str(venv_path / "bin" / "python"), "-c", check, *requirements], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)
