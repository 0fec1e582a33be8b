"""The file batch job (``sdxl-pyfunc batch``): formats, per-row errors, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from model_pkg.catalog import model_hash
from sdxl_tools.artifact import save_artifact
from sdxl_tools.batch import read_prompts, run
from sdxl_tools.cli import main
from sdxl_tools.job_folder import JOB_FILE, MANIFEST, BatchError
from sdxl_tools.random_weights import write_tiny_sdxl
from sdxl_tools.staging import stage_components
from testkit.helpers import png_b64

ROOT = Path(__file__).resolve().parent.parent
# Cheap enough for 100 rows: base only, 2 steps, 64×64.
CHEAP = {"num_inference_steps": 2, "height": 64, "width": 64, "refiner": "none"}
BAD_ROWS = {  # row → (its fields, the start of its error)
    7: ({"prompt": ""}, "'prompt' is empty"),
    23: ({"prompt": "a cat", "seed": "lots"}, "'seed': Input should be a valid integer"),
    41: ({"prompt": "a cat", "num_inference_steps": 0}, "'num_inference_steps': Input should be greater"),
    66: ({"prompt": "a cat", "height": 65}, "'height'/'width' 64×65: width and height must be multiples of 8"),
    # its own steps: the request's 2 steps × strength 0.3 would leave an image row no step (a request error)
    88: ({"prompt": "a cat", "image": "http://127.0.0.1/cat.png", "num_inference_steps": 10}, "'image': URLs are not"),
}


def hundred_rows_with_five_bad() -> list[dict]:
    rows = [{"prompt": f"a cat number {i}"} for i in range(100)]
    for row, (fields, _) in BAD_ROWS.items():
        rows[row] = fields
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / MANIFEST).read_text().splitlines()]


def image_files(output: Path) -> list[str]:
    return sorted(f"images/{p.name}" for p in (output / "images").iterdir())


def test_killed_job_resumes_every_row_exactly_once(model, artifact, tmp_path):
    """A real SIGKILL mid-run, then the same job again: nothing lost, nothing twice, bad rows named."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", hundred_rows_with_five_bad())
    output = tmp_path / "out"
    params = CHEAP | {"seed": 1000}
    command = [sys.executable, "-m", "sdxl_tools.cli", "batch", "--model", str(artifact), "--input", str(prompts)]
    command += ["--output", str(output), "--params", json.dumps(params), "--chunk-size", "4", "--no-progress"]
    log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (output / MANIFEST).exists() or len((output / MANIFEST).read_text().splitlines()) < 12:
            assert job.poll() is None, f"the job ended before it was killed:\n{(tmp_path / 'job.log').read_text()}"
            assert time.monotonic() < deadline, "the job wrote no manifest lines in time"
            time.sleep(0.02)
        os.kill(job.pid, signal.SIGKILL)
    finally:
        if job.poll() is None:
            job.kill()
        job.wait(timeout=30)
    assert job.returncode == -signal.SIGKILL
    before = {e["row"]: e for e in manifest(output)}
    assert 12 <= len(before) < 100  # killed mid-run
    mtimes = {e["file"]: (output / e["file"]).stat().st_mtime_ns for e in before.values() if e["file"]}

    summary = run(model, prompts, output, params, chunk_size=16, progress=False)

    entries = manifest(output)
    assert sorted(e["row"] for e in entries) == list(range(100))  # every row, exactly once
    assert summary.skipped == len(before) and summary.scored == 100 - len(before)
    assert (summary.images, summary.errors) == (95, 5)
    by_row = {e["row"]: e for e in entries}
    for row, (_, message) in BAD_ROWS.items():
        assert by_row[row]["file"] is None and by_row[row]["error"].startswith(message), by_row[row]
    # a failed row keeps the seed it was given (file-wide request seed + row); row 23's own seed is not a number
    assert {row: by_row[row]["seed"] for row in BAD_ROWS} == {7: 1007, 23: None, 41: 1041, 66: 1066, 88: 1088}
    good = [e for e in entries if e["row"] not in BAD_ROWS]
    assert all(e["error"] is None for e in good)
    assert [e["seed"] for e in good] == [1000 + e["row"] for e in good]  # file-wide seeds, not per chunk
    assert image_files(output) == sorted(e["file"] for e in good)  # one file per good row, no strays
    assert all(Image.open(output / e["file"]).size == (64, 64) for e in good)
    # rows finished before the kill were kept, not scored again
    assert {f: (output / f).stat().st_mtime_ns for f in mtimes} == mtimes

    again = run(model, prompts, output, params, progress=False)
    assert (again.scored, len(manifest(output))) == (0, 100)


def test_crash_leftovers_are_repaired_on_resume(model, tmp_path):
    """A torn last line, an image without its line, a line without its image, a temp file."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"a dog {i}", "seed": 50 + i} for i in range(6)])
    output = tmp_path / "out"
    # one row per call in both runs: a row's bytes can differ by batch company (by 1 level, see test_core)
    run(model, prompts, output, CHEAP, chunk_size=1, progress=False)
    original = {e["row"]: (output / e["file"]).read_bytes() for e in manifest(output)}
    lines = (output / MANIFEST).read_text().splitlines(keepends=True)

    # crash states: row 1's image lost after its line was written (power cut), row 2's line never
    # written after its image, row 5's line torn mid-write, a temp file from a cut-off image write
    (output / "images" / "000001.png").unlink()
    kept = [line for i, line in enumerate(lines) if i != 2]
    (output / MANIFEST).write_text("".join(kept[:-1]) + kept[-1][:20])
    (output / "images" / ".000004.png.tmp").write_bytes(b"half an image")

    summary = run(model, prompts, output, CHEAP, chunk_size=1, progress=False)

    assert summary.scored == 3  # rows 1, 2 and 5
    entries = manifest(output)
    assert sorted(e["row"] for e in entries) == list(range(6))
    assert image_files(output) == [f"images/{i:06d}.png" for i in range(6)]
    assert {e["row"]: (output / e["file"]).read_bytes() for e in entries} == original  # same seeds, same bytes


def test_csv_jsonl_and_parquet_inputs_give_the_same_images(model, tmp_path):
    image = png_b64(size=(64, 64))
    records = [
        {"prompt": "NA", "seed": 1, "height": 64},  # "NA" is a prompt, not a missing value
        {"prompt": "a red hat", "seed": 2, "height": 96},
        {"prompt": "a green cat", "seed": 3, "image": image},
    ]
    write_jsonl(tmp_path / "p.jsonl", records)
    rows = pd.DataFrame(
        {
            "prompt": [r["prompt"] for r in records],
            "seed": [1, 2, 3],
            "height": pd.array([64, 96, None], dtype="Int64"),
            "image": [None, None, image],
        }
    )
    rows.to_csv(tmp_path / "p.csv", index=False)
    rows.to_parquet(tmp_path / "p.parquet")

    results = {}
    for suffix in ("csv", "jsonl", "parquet"):
        output = tmp_path / f"out-{suffix}"
        run(model, tmp_path / f"p.{suffix}", output, CHEAP | {"num_inference_steps": 4}, progress=False)
        entries = manifest(output)
        assert [e["error"] for e in entries] == [None, None, None], suffix
        results[suffix] = [(e, (output / e["file"]).read_bytes()) for e in entries]

    assert results["csv"] == results["jsonl"] == results["parquet"]
    entries = [e for e, _ in results["csv"]]
    assert [e["prompt"] for e in entries] == ["NA", "a red hat", "a green cat"]
    assert [Image.open(tmp_path / "out-csv" / e["file"]).size for e in entries] == [(64, 64), (64, 96), (64, 64)]


def test_refuses_to_mix_jobs_and_bad_inputs(model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat", "seed": 1}])
    run(model, prompts, tmp_path / "out", CHEAP, progress=False)
    with pytest.raises(BatchError, match="holds results of another input file or other params"):
        run(model, prompts, tmp_path / "out", CHEAP | {"num_inference_steps": 6}, progress=False)

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": \n')
    with pytest.raises(BatchError, match=r"bad.jsonl:2: not valid JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    pd.DataFrame({"text": ["a cat"]}).to_csv(tmp_path / "noprompt.csv", index=False)
    assert (
        main(["batch", "--model", "unused", "--input", str(tmp_path / "noprompt.csv"), "--output", str(tmp_path / "x")])
        == 2
    )
    assert "no 'prompt' column" in capsys.readouterr().err


@pytest.fixture(scope="module")
def other_artifact(tmp_path_factory) -> Path:
    """The same architecture with other random weights: another model, another model hash."""
    work = tmp_path_factory.mktemp("other-artifact")
    tiny = write_tiny_sdxl(work / "tiny", seed=1)
    return save_artifact(stage_components(tiny.base, tiny.refiner, work / "sdxl"), work / "model")


def hash_of(artifact: Path) -> str:
    return model_hash(json.loads((artifact / "artifacts" / "sdxl" / "components.json").read_text())["hashes"])


def cut_after(output: Path, rows: int) -> None:
    """The state a kill leaves after ``rows`` finished rows: later rows have no line and no image."""
    lines = (output / MANIFEST).read_text().splitlines(keepends=True)
    (output / MANIFEST).write_text("".join(lines[:rows]))
    for line in lines[rows:]:
        (output / json.loads(line)["file"]).unlink()


def folder_state(output: Path) -> tuple[str, dict[str, bytes]]:
    return (output / MANIFEST).read_text(), {p.name: p.read_bytes() for p in (output / "images").iterdir()}


def job_args(model: str, prompts: Path, output: Path, *extra: str) -> list[str]:
    args = ["--model", model, "--input", str(prompts), "--output", str(output), "--params", json.dumps(CHEAP)]
    args = ["batch", *args]
    return [*args, "--chunk-size", "1", "--no-progress", *extra]


def test_resuming_after_a_promotion_is_refused_and_keeps_one_model(
    artifact, other_artifact, sqlite_tracking, tmp_path, capsys
):
    """models:/NAME@production moves to another version between two runs: the second run is refused
    (exit 2) before it loads anything, and the folder keeps the images of the first model only."""
    client = MlflowClient()
    client.create_registered_model("sdxl")
    v1 = str(client.create_model_version("sdxl", source=str(artifact)).version)
    v2 = str(client.create_model_version("sdxl", source=str(other_artifact)).version)
    client.set_registered_model_alias("sdxl", "production", v1)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"a cat {i}", "seed": i} for i in range(4)])
    output = tmp_path / "out"
    args = job_args("models:/sdxl@production", prompts, output)

    assert main(args) == 0
    recorded = json.loads((output / JOB_FILE).read_text())["model"]
    assert (recorded["uri"], recorded["name"], recorded["version"]) == ("models:/sdxl@production", "sdxl", v1)
    assert recorded["model_hash"] == hash_of(artifact) != hash_of(other_artifact)
    assert recorded["model_config"]["torch_threads"] == 0  # the config the model loaded with
    complete = folder_state(output)
    cut_after(output, 2)
    killed = folder_state(output)

    client.set_registered_model_alias("sdxl", "production", v2)
    capsys.readouterr()
    assert main(args) == 2
    message = capsys.readouterr().err
    assert f"models:/sdxl@production is version {v2}" in message and f"version {v1} of sdxl" in message, message
    assert folder_state(output) == killed  # nothing scored with version 2

    # the version the folder was started with finishes the job: the same images as an uncut run
    assert main(job_args(f"models:/sdxl/{v1}", prompts, output)) == 0
    assert folder_state(output) == complete


def test_resuming_with_other_weights_or_model_config_is_refused(artifact, other_artifact, model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"a dog {i}", "seed": i} for i in range(3)])
    output = tmp_path / "out"
    assert main(job_args(str(artifact), prompts, output)) == 0
    cut_after(output, 1)
    killed = folder_state(output)
    capsys.readouterr()

    assert main(job_args(str(other_artifact), prompts, output)) == 2  # a folder, not a registry version
    assert f"model hash {hash_of(other_artifact)[:12]}" in capsys.readouterr().err
    assert main(job_args(str(artifact), prompts, output, "--model-config", '{"torch_threads": 1}')) == 2
    assert "model config differs: torch_threads 0 -> 1" in capsys.readouterr().err
    assert folder_state(output) == killed
    with pytest.raises(BatchError, match="model hash"):
        run(mlflow_model_of(other_artifact), prompts, output, CHEAP, chunk_size=1, progress=False)

    # the same model loaded in Python resumes the folder the CLI started
    assert run(model, prompts, output, CHEAP, chunk_size=1, progress=False).scored == 2


def mlflow_model_of(path: Path):
    import mlflow

    return mlflow.pyfunc.load_model(str(path))


def test_a_second_job_on_the_same_folder_is_refused_at_once(artifact, tmp_path):
    """Two real processes: the second finds the folder locked and exits 2 while the first keeps going."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"a cat number {i}"} for i in range(2000)])
    output = tmp_path / "out"
    command = [sys.executable, "-m", "sdxl_tools.cli", *job_args(str(artifact), prompts, output)]
    command[command.index("--chunk-size") + 1] = "4"
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (output / MANIFEST).exists() or not (output / MANIFEST).read_text():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the first job wrote no manifest line in time"
            time.sleep(0.05)
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first job ended before the second one started: make it longer"
    finally:
        first.kill()
        first.wait(timeout=30)
    assert second.returncode == 2, second.stderr
    assert f"{output} is in use by another batch job (pid {first.pid})" in second.stderr
    rows = [e["row"] for e in manifest(output)]
    assert len(rows) == len(set(rows))  # every row once: only the first job wrote


def test_a_request_level_error_fails_the_job_before_anything_is_written(model, tmp_path):
    """steps=1 with the default ensemble leaves the refiner no step: that is the request's error, not
    every row's, so the job refuses to start and binds no folder to those params."""
    prompts = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": ["a cat", "a dog"]}).to_csv(prompts, index=False)
    out = tmp_path / "out"
    with pytest.raises(MlflowException, match=r"^Invalid param 'refiner_ratio' 0.2 with 'num_inference_steps' 1"):
        run(model, prompts, out, {"num_inference_steps": 1}, progress=False)
    assert not (out / JOB_FILE).exists() and not (out / MANIFEST).exists()
