#!/usr/bin/env python
"""MLServer (Open Inference Protocol V2) with and without adaptive batching, next to ``mlflow models serve``.

The tiny artifact behind three real servers on 127.0.0.1, all up at once and loaded in interleaved rounds
(so that machine drift hits them alike): ``mlflow models serve``; ``mlserver start <artifact>`` (the
artifact's own model-settings.json: no batching); and MLServer with adaptive batching (``max_batch_size``,
``max_batch_time``). At 1, 4 and 8 concurrent clients, each sending one-row requests with the same params
(seed included), it measures p50 / p99 latency, req/s and errors, and counts the ``predict`` calls the
requests became: a merged call gives its rows seeds ``s, s+1, ...`` (the request-seed rule), a request
alone gets ``s``, so the calls are the rows answered with seed ``s``. The MLServer venv is the one the
tests build (testkit/platforms.py), cached.

Every server gets the same torch thread count (``--threads``, default 1): MLServer calls ``predict`` on
its event-loop (main) thread, where torch uses one OpenMP thread per core, while ``mlflow models serve``
calls it from a request thread, where torch ran on one; on a busy 2-CPU machine the main thread's
OpenMP team ran the same request 5-7× slower (spinning at its barriers), which would swamp what this
benchmark compares.

  python benchmarks/bench_mlserver.py [--requests 24] [--rounds 3] [--threads 1] [--batch-time 0.1] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore")

import requests  # noqa: E402

from sdxl_tools.artifact import save_artifact  # noqa: E402
from sdxl_tools.random_weights import write_tiny_sdxl  # noqa: E402
from sdxl_tools.staging import stage_components  # noqa: E402
from testkit.platforms import MLSERVER, server_env, venv  # noqa: E402
from testkit.processes import free_port, running  # noqa: E402
from testkit.scoring_server import ScoringServer  # noqa: E402

CLIENTS = (1, 4, 8)
SEED = 100
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## MLServer V2 with and without adaptive batching, next to mlflow models serve"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(send: Callable[[], tuple[int, int | None]], clients: int, n: int) -> dict:
    """``n`` requests from ``clients`` threads: wall seconds, latencies, errors, predict calls."""

    def one(_: int) -> tuple[float, int, int | None]:
        start = time.perf_counter()
        status, seed = send()
        return time.perf_counter() - start, status, seed

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    return {
        "wall": time.perf_counter() - start,
        "latencies": [r[0] for r in results],
        "errors": sum(r[1] != 200 for r in results),
        "calls": sum(r[2] == SEED for r in results),
        "n": n,
    }


def summary(server: str, clients: int, runs: list[dict]) -> dict:
    latencies = [x for run in runs for x in run["latencies"]]
    return {
        "server": server,
        "clients": clients,
        "p50": percentile(latencies, 0.5) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "rps": statistics.median(run["n"] / run["wall"] for run in runs),
        "errors": sum(run["errors"] for run in runs),
        "calls": sum(run["calls"] for run in runs),
        "n": sum(run["n"] for run in runs),
    }


def mlflow_sender(url: str, params: dict) -> Callable[[], tuple[int, int | None]]:
    body = {"dataframe_split": {"columns": ["prompt"], "data": [["a cat on a bench"]]}, "params": params}

    def send() -> tuple[int, int | None]:
        r = requests.post(f"{url}/invocations", json=body, timeout=300)
        return r.status_code, r.json()["predictions"][0]["seed"] if r.status_code == 200 else None

    return send


def v2_sender(url: str, params: dict) -> Callable[[], tuple[int, int | None]]:
    body = {
        "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat on a bench"]}],
        "parameters": params,
    }

    def send() -> tuple[int, int | None]:
        r = requests.post(f"{url}/v2/models/sdxl/infer", json=body, timeout=300)
        if r.status_code != 200:
            return r.status_code, None
        return 200, next(o["data"][0] for o in r.json()["outputs"] if o["name"] == "seed")

    return send


def mlserver(venv_path: Path, folder: Path, log: Path, threads: int):
    http = free_port()
    env = server_env(
        venv_path,
        OMP_NUM_THREADS=str(threads),
        MLSERVER_HOST="127.0.0.1",
        MLSERVER_HTTP_PORT=str(http),
        MLSERVER_GRPC_PORT=str(free_port()),
        MLSERVER_METRICS_PORT=str(free_port()),
    )
    url = f"http://127.0.0.1:{http}"
    return url, running(
        [str(venv_path / "bin" / "mlserver"), "start", str(folder)], f"{url}/v2/models/sdxl/ready", log, env
    )


def batching_settings(artifact: Path, folder: Path, batch_size: int, batch_time: float) -> Path:
    """A settings folder: the artifact's model-settings.json with adaptive batching, its runtime module beside."""
    own = artifact / "artifacts" / "mlserver"
    settings = json.loads((own / "model-settings.json").read_text())
    settings |= {"max_batch_size": batch_size, "max_batch_time": batch_time}
    settings["parameters"]["uri"] = str(artifact)
    folder.mkdir(parents=True)
    (folder / "model-settings.json").write_text(json.dumps(settings, indent=2))
    module = settings["implementation"].split(".")[0] + ".py"
    shutil.copy(own / module, folder / module)
    return folder


def reading(rows: list[dict]) -> list[str]:
    """What the table says about adaptive batching, in words."""
    by = {(r["server"], r["clients"]): r for r in rows}
    plain, batched = (name for name in dict.fromkeys(r["server"] for r in rows) if name.startswith("MLServer"))
    lines = []
    for c in CLIENTS:
        b, p, m = by[batched, c], by[plain, c], by["mlflow models serve", c]
        lines.append(
            f"{c} client(s): with batching {b['n']} requests were {b['calls']} predict calls"
            f" ({b['n'] / b['calls']:.1f} per call); req/s batching / no batching {b['rps'] / p['rps']:.2f},"
            f" MLServer / mlflow models serve {p['rps'] / m['rps']:.2f}"
        )
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["server                         clients   p50 ms   p99 ms   req/s errors  predict calls"]
    for r in rows:
        lines.append(
            f"{r['server']:<30} {r['clients']:>7} {r['p50']:>8.0f} {r['p99']:>8.0f} {r['rps']:>7.2f} {r['errors']:>6}"
            f"  {r['calls']:>3} for {r['n']} requests"
        )
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the three servers")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-time", type=float, default=0.1, help="max_batch_time, seconds")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every server (torch threads)")
    parser.add_argument("--write", action="store_true", help=f"replace the section in {RESULTS.name}")
    args = parser.parse_args(argv)
    params = {"num_inference_steps": args.steps, "height": args.size, "width": args.size, "seed": SEED}

    mlserver_venv = venv(MLSERVER)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-mlserver-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        tiny = write_tiny_sdxl(work / "tiny", seed=0)
        artifact = save_artifact(stage_components(tiny.base, tiny.refiner, work / "sdxl"), work / "model")
        batching = batching_settings(artifact, work / "batching", args.batch_size, args.batch_time)
        scoring = stack.enter_context(ScoringServer(str(artifact), env={"OMP_NUM_THREADS": str(args.threads)}))
        senders = {"mlflow models serve": mlflow_sender(scoring.url, params)}
        for name, folder in (
            ("MLServer, no batching", artifact),
            (f"MLServer, batching {args.batch_size} / {args.batch_time} s", batching),
        ):
            url, serving = mlserver(mlserver_venv, folder, work / f"{folder.name}.log", args.threads)
            stack.enter_context(serving)
            senders[name] = v2_sender(url, params)
        for send in senders.values():
            send()  # warm-up
        # all three servers up (idle ones cost nothing); rounds interleave them so drift hits all alike
        runs: dict[tuple[str, int], list[dict]] = {(name, c): [] for name in senders for c in CLIENTS}
        for _ in range(args.rounds):
            for clients in CLIENTS:
                for name, send in senders.items():
                    runs[name, clients].append(load(send, clients, args.requests))
    rows = [summary(name, clients, runs[name, clients]) for name in senders for clients in CLIENTS]

    header = f"tiny SDXL, 1 row per request, {args.size}×{args.size}, {args.steps} steps (ensemble), same params"
    header += f" (seed {SEED}) in every request; one worker each, OMP_NUM_THREADS={args.threads};"
    header += f" {args.rounds} interleaved rounds of {args.requests} requests per cell (req/s: median of rounds)"
    header += f"; {datetime.date.today()}"
    header += f"; load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at the end (2 CPUs, shared)"
    lines = [header, *table(rows), "", *reading(rows)]
    print("\n".join(lines))
    if args.write:
        write_section(lines)
    return lines


def write_section(lines: list[str]) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    before, _, after = text.partition(SECTION)
    after = after[after.find("\n## ") :] if "\n## " in after else ""
    RESULTS.write_text(f"{before.rstrip()}\n\n{SECTION}\n\n```\n" + "\n".join(lines) + f"\n```\n{after}")


if __name__ == "__main__":
    main()
