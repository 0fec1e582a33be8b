"""Start and stop a real ``mlflow models serve`` on 127.0.0.1 (used by the serving tests and benchmark).

The child is started with the venv's ``bin`` first on ``PATH`` (``mlflow models serve`` finds
``uvicorn`` through ``PATH``), and its exit code and log are watched while waiting for ``/ping``,
so a server that dies at start-up fails fast with its log instead of a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import requests

from testkit.processes import VENV_BIN, free_port


class ScoringServer:
    """``with ScoringServer(uri) as server: server.invoke(body)``; stopped (whole process group) on exit."""

    def __init__(self, model_uri: str, env: dict[str, str] | None = None, workers: int = 1, timeout_s: int = 300):
        self.model_uri = model_uri
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.timeout_s = timeout_s
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.log = Path(tempfile.mkstemp(prefix="mlflow-serve-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def start(self, ready_within_s: float = 240) -> ScoringServer:
        cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", self.model_uri, "--env-manager", "local"]
        cmd += ["-h", "127.0.0.1", "-p", str(self.port), "-w", str(self.workers), "-t", str(self.timeout_s)]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + ready_within_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready in {ready_within_s} s:\n{self.log_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: mlflow + uvicorn workers only
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def invoke(self, body: Any, timeout: float = 300, **kwargs: Any) -> requests.Response:
        """POST ``body`` (a dict → JSON, or raw bytes) to ``/invocations``."""
        headers = {"Content-Type": kwargs.pop("content_type", "application/json")}
        data = body if isinstance(body, (bytes, str)) else None
        return requests.post(
            f"{self.url}/invocations",
            json=None if data is not None else body,
            data=data,
            headers=headers,
            timeout=timeout,
            **kwargs,
        )

    def rss_bytes(self) -> int:
        """Resident memory of the whole server process tree (mlflow CLI + uvicorn + workers)."""
        root = psutil.Process(self.process.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def worker_rss_bytes(self) -> list[int]:
        """RSS of each process that loaded the model (the uvicorn process, or its worker children)."""
        root = psutil.Process(self.process.pid)
        procs = [p for p in root.children(recursive=True) if not p.children()]
        return [p.memory_info().rss for p in procs]

    def __enter__(self) -> ScoringServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
