"""A real Spark standalone cluster on 127.0.0.1: one master and N workers, each its own JVM.

Started with pyspark's own ``bin/spark-class`` (the pip wheel ships the jars and launcher scripts),
so executors are separate JVMs launched by the workers and their Python workers separate
processes, as on a real cluster. GPUs are declared to the workers through Spark's resource
discovery (a script printing the addresses), so tasks get ``TaskContext.resources()["gpu"]``
addresses on a CPU-only machine too. Everything is stopped (process groups, SIGTERM then SIGKILL)
by :meth:`SparkCluster.stop`, also when starting fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyspark
import requests

from testkit.processes import free_port

SPARK_HOME = Path(pyspark.__file__).resolve().parent
EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"


class SparkCluster:
    """``with SparkCluster(tmp, workers=2) as cluster: spark = cluster.session("app")``."""

    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "2g", gpus: int = 1) -> None:
        self.root, self.workers, self.cores, self.memory, self.gpus = Path(root), workers, cores, memory, gpus
        self.port, self.ui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self._procs: list[subprocess.Popen] = []
        self._session = None

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [str(SPARK_HOME / "bin" / "spark-class"), *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        self._procs.append(proc)
        return proc

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
        env.pop("PYSPARK_GATEWAY_PORT", None)
        return env | {"SPARK_DAEMON_MEMORY": "512m"} | extra

    def worker_dir(self, i: int) -> Path:
        return self.root / f"worker{i}"

    def start(self, timeout: float = 120) -> SparkCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self._spawn(
            "master",
            ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.port),
             "--webui-port", str(self.ui_port)],
            self._env(),
        )  # fmt: skip
        for i in range(self.workers):
            gpus = [str(i * self.gpus + g) for g in range(self.gpus)]  # worker i owns GPUs i*g .. : distinct
            script = self.root / f"gpus{i}.sh"
            script.write_text(f"#!/bin/sh\necho '{json.dumps({'name': 'gpu', 'addresses': gpus})}'\n")
            script.chmod(0o755)
            opts = (
                f"-Dspark.worker.resource.gpu.amount={self.gpus} -Dspark.worker.resource.gpu.discoveryScript={script}"
            )
            self.worker_dir(i).mkdir(exist_ok=True)
            self._spawn(
                f"worker{i}",
                ["org.apache.spark.deploy.worker.Worker", self.url, "--host", "127.0.0.1", "--cores",
                 str(self.cores), "--memory", self.memory, "--webui-port", "0", "--work-dir", str(self.worker_dir(i))],
                self._env(SPARK_WORKER_OPTS=opts),
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while self.alive_workers() < self.workers:
            dead = [p for p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = {p.name: p.read_text(errors="replace")[-2000:] for p in self.root.glob("*.log")}
                self.stop()
                raise AssertionError(f"Spark cluster not up after {timeout} s (exited: {len(dead)}): {logs}")
            time.sleep(0.5)
        return self

    def alive_workers(self) -> int:
        try:
            return int(requests.get(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2).json()["aliveworkers"])
        except (requests.RequestException, ValueError, KeyError):
            return 0

    def session(self, app: str, **conf: str):
        """A driver (this process) on the cluster: one GPU per task, float32 executors."""
        from pyspark.sql import SparkSession

        os.environ["PYSPARK_PYTHON"] = sys.executable
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = (
            SparkSession.builder.master(self.url)
            .appName(app)
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.executor.memory", "1g")
            .config("spark.executor.cores", str(self.cores))
            .config("spark.executor.resource.gpu.amount", str(self.gpus))
            .config("spark.task.resource.gpu.amount", "1")
            .config("spark.pyspark.python", sys.executable)
            .config("spark.executorEnv.SDXL_DTYPE", os.environ.get("SDXL_DTYPE", "float32"))
            .config("spark.executorEnv.HF_HUB_OFFLINE", "1")
            .config("spark.sql.shuffle.partitions", str(self.workers * self.cores))
            .config("spark.sql.execution.arrow.maxRecordsPerBatch", "4")
            .config("spark.task.maxFailures", "4")
            .config("spark.sql.warehouse.dir", str(self.root / "warehouse"))
        )
        for key, value in conf.items():
            builder = builder.config(key, value)
        self._session = builder.getOrCreate()
        self.wait_executors(self.workers)
        return self._session

    def wait_executors(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        sc = self._session.sparkContext
        while sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < n:  # minus the driver
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} executors after {timeout} s")
            time.sleep(0.5)

    def executor_pids(self) -> list[int]:
        """The executor JVMs the workers launched (one per worker and application)."""
        found = []
        for proc in self._procs[1:]:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if EXECUTOR_CLASS in " ".join(child.cmdline()):
                            found.append(child.pid)
        return found

    def stop_session(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.stop()
            self._session = None

    def stop(self) -> None:
        self.stop_session()
        # workers first, the master last; a worker's executors and Python workers are in its process group
        for proc in reversed(self._procs):
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._procs.clear()

    def __enter__(self) -> SparkCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
