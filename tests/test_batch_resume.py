"""Resume trusts no manifest line it would not have written itself; a full or read-only output folder
ends the job with a clear message and no temporary files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxl_tools.batch import run
from sdxl_tools.job_folder import MANIFEST

CHEAP = {"num_inference_steps": 2, "height": 64, "width": 64, "refiner": "none", "seed": 20}
ROWS = 4


def lines(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / MANIFEST).read_text().splitlines()]


def set_line(output: Path, index: int, line: bytes) -> None:
    raw = (output / MANIFEST).read_bytes().splitlines(keepends=True)
    raw[index] = line + b"\n"
    (output / MANIFEST).write_bytes(b"".join(raw))


def edited(entry: dict, **changes) -> bytes:
    return json.dumps(entry | changes).encode()


TAMPERED = {  # manifest line 2 (row 1) replaced; the problem named
    "row is a bool": (lambda e: edited(e, row=True), "'row' True is not a row number"),
    "row out of range": (lambda e: edited(e, row=ROWS), f"'row' {ROWS} is not a row number"),
    "neither file nor error": (lambda e: edited(e, file=None, error=None), "needs a 'file' or an 'error'"),
    "file and error": (lambda e: edited(e, error="boom"), "needs a 'file' or an 'error'"),
    "another row's file": (lambda e: edited(e, file="images/000003.png"), "'file' 'images/000003.png' is not"),
    "wrong seed": (lambda e: edited(e, seed=e["seed"] + 1), "is not its planned seed 21"),
    "undecodable byte": (lambda e: edited(e)[:-1] + b"\xff}", "not a JSON line (UnicodeDecodeError)"),
    "unreadable image": (None, "images/000001.png is missing or not a readable image"),
}


@pytest.fixture(scope="module")
def finished(model, tmp_path_factory) -> Path:
    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a fox {i}"}) + "\n" for i in range(ROWS)))
    output = prompts.parent / "out"
    run(model, prompts, output, CHEAP, chunk_size=1, progress=False)
    return output


@pytest.mark.parametrize("case", TAMPERED.values(), ids=TAMPERED.keys())
def test_resume_drops_a_bad_line_by_number_and_redoes_its_row(model, finished, tmp_path, capsys, case):
    import shutil

    output = Path(shutil.copytree(finished, tmp_path / "out"))
    tamper, problem = case
    original = lines(output)
    good = (output / original[1]["file"]).read_bytes()
    if tamper is None:
        (output / original[1]["file"]).write_bytes(good[: len(good) // 2])
    else:
        set_line(output, 1, tamper(original[1]))

    summary = run(model, finished.parent / "p.jsonl", output, CHEAP, chunk_size=1, progress=False)

    assert summary.scored == 1  # row 1 again, nothing else
    warning = capsys.readouterr().err
    assert f"{output / MANIFEST}:2: " in warning and problem in warning
    assert sorted(e["row"] for e in lines(output)) == list(range(ROWS))
    assert (output / "images/000001.png").read_bytes() == good  # its planned seed: the same image


def job(artifact: Path, tmp_path: Path, output: Path, rows: int) -> list[str]:
    prompts = tmp_path / "full.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a fox {i}"}) + "\n" for i in range(rows)))
    params = json.dumps(CHEAP)
    return ["batch", "--model", str(artifact), "--input", str(prompts), "--output", str(output), "--params", params]


def assert_consistent(output: Path) -> None:
    """No temporary file; every manifest line's image is there."""
    assert not list(output.rglob("*.tmp"))
    if (output / MANIFEST).exists():
        assert all((output / e["file"]).is_file() for e in lines(output) if e["file"])


def test_a_file_size_limit_ends_the_job_with_a_message_and_no_temporary_file(artifact, tmp_path):
    """A real limit (RLIMIT_FSIZE in a child process): every write past 8 KiB fails with EFBIG, as a full disk would."""
    import subprocess
    import sys

    output = tmp_path / "out"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # else the kernel kills the process
        "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
        "from sdxl_tools.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [*job(artifact, tmp_path, output, 3), "--no-progress"]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: cannot write the job's output: File too large" in done.stderr
    assert "Traceback" not in done.stderr
    assert_consistent(output)


@pytest.fixture
def small_disk(tmp_path):
    """A real 96 KiB tmpfs (needs mount privileges; skipped without them)."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_or_read_only_disk_ends_the_job_with_a_message_and_no_temporary_file(
    artifact, tmp_path, small_disk, capsys
):
    import subprocess

    from sdxl_tools import cli

    output = small_disk / "out"
    assert cli.main([*job(artifact, tmp_path, output, 12), "--no-progress", "--chunk-size", "1"]) == 2
    error = capsys.readouterr().err
    assert "error: cannot write the job's output: No space left on device" in error
    assert_consistent(output)
    finished = len(lines(output))
    assert 0 < finished < 12

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert cli.main([*job(artifact, tmp_path, output, 12), "--no-progress"]) == 2
    assert "Read-only file system" in capsys.readouterr().err
    assert len(lines(output)) == finished
