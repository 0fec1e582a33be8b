#!/usr/bin/env python
"""MLServer (Open Inference Protocol V2) with and without adaptive batching, next to ``mlflow models serve``.

The tiny artifact behind three real servers on 127.0.0.1, one after the other in the same run: ``mlflow
models serve``; ``mlserver start <artifact>`` (the artifact's own model-settings.json: no batching); and
MLServer with adaptive batching (``max_batch_size``, ``max_batch_time``). At 1, 4 and 8 concurrent clients,
each sending one-row requests with the same params (seed included), it measures p50 / p99 latency, req/s
and errors, and counts the ``predict`` calls the requests became: a merged call gives its rows seeds
``s, s+1, ...`` (the request-seed rule), a request alone gets ``s``, so the calls are the rows answered
with seed ``s``. The MLServer venv is the one the tests build (tests/platforms.py), cached.

  python benchmarks/bench_mlserver.py [--requests 24] [--size 64] [--steps 10] [--batch-time 0.1] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the launchers and the platform venvs the tests use
warnings.filterwarnings("ignore")

import requests  # noqa: E402
from platforms import MLSERVER, server_env, venv  # noqa: E402
from processes import free_port, running  # noqa: E402
from scoring_server import ScoringServer  # noqa: E402

from sdxl_tools.artifact import save_artifact, stage_components  # noqa: E402
from sdxl_tools.random_weights import write_tiny_sdxl  # noqa: E402

CLIENTS = (1, 4, 8)
SEED = 100
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## MLServer V2 with and without adaptive batching, next to mlflow models serve"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(send: Callable[[], tuple[int, int | None]], clients: int, n: int) -> dict:
    """``n`` requests from ``clients`` threads: latency percentiles, req/s, errors, predict calls."""

    def one(_: int) -> tuple[float, int, int | None]:
        start = time.perf_counter()
        status, seed = send()
        return time.perf_counter() - start, status, seed

    send()  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    return {
        "clients": clients,
        "p50": percentile(latencies, 0.5) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "rps": n / wall,
        "errors": sum(r[1] != 200 for r in results),
        "calls": sum(r[2] == SEED for r in results),
        "n": n,
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


def mlserver(venv_path: Path, folder: Path, log: Path):
    http = free_port()
    env = server_env(
        venv_path,
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
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-time", type=float, default=0.1, help="max_batch_time, seconds")
    parser.add_argument("--write", action="store_true", help=f"replace the section in {RESULTS.name}")
    args = parser.parse_args(argv)
    params = {"num_inference_steps": args.steps, "height": args.size, "width": args.size, "seed": SEED}

    mlserver_venv = venv(MLSERVER)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-mlserver-") as tmp:
        work = Path(tmp)
        tiny = write_tiny_sdxl(work / "tiny", seed=0)
        artifact = save_artifact(stage_components(tiny.base, tiny.refiner, work / "sdxl"), work / "model")
        batching = batching_settings(artifact, work / "batching", args.batch_size, args.batch_time)

        with ScoringServer(str(artifact)) as server:
            send = mlflow_sender(server.url, params)
            rows += [{"server": "mlflow models serve", **load(send, c, args.requests)} for c in CLIENTS]
        for name, folder in (
            ("MLServer, no batching", artifact),
            (f"MLServer, batching {args.batch_size} / {args.batch_time} s", batching),
        ):
            url, serving = mlserver(mlserver_venv, folder, work / f"{folder.name}.log")
            with serving:
                send = v2_sender(url, params)
                rows += [{"server": name, **load(send, c, args.requests)} for c in CLIENTS]

    header = f"tiny SDXL, 1 row per request, {args.size}×{args.size}, {args.steps} steps (ensemble), same params"
    header += f" (seed {SEED}) in every request; one worker each; {datetime.date.today()}"
    lines = [header, *table(rows)]
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
