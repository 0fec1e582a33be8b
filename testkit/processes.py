"""Starting and stopping real child processes (``mlflow server``, ``mlflow models serve``) from tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent  # mlflow starts uvicorn through PATH: the venv's bin goes first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    return env | extra


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextmanager
def running(
    args: list[str], ready_url: str, log: Path, env: dict[str, str], timeout: float = 240, cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """Run ``args`` in its own process group until ``ready_url`` answers 200 (yields the child, e.g. to signal
    it); stop the group afterwards.

    Fails early with the log's tail when the child exits while we wait.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"{args[:3]} exited with {proc.returncode}:\n{_tail(log)}")
                try:
                    if requests.get(ready_url, timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{ready_url} not ready after {timeout} s:\n{_tail(log)}")
                time.sleep(0.5)
            yield proc
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's own process group (the child and the workers it started), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group (a server's workers) go with it
            os.killpg(proc.pid, signal.SIGKILL)
        break
