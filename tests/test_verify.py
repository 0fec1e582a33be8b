"""Verified content: every weight file against the sha256 components.json records (``sdxl-pyfunc verify``,
the batch job's start), and the cheap check at load (sizes + safetensors headers, or every byte when asked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from sdxl_tools import cli
from testkit.helpers import FAST, flip_mantissa_bits, overwrite_tensor

UNET = Path("artifacts/sdxl/base/unet")
UNET_FILE = "diffusion_pytorch_model.safetensors"


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "model"))


def nan_conv_out(model: Path) -> None:
    overwrite_tensor(model / UNET / UNET_FILE, "conv_out.weight", 0xFF)


def flipped_bits(model: Path) -> None:
    flip_mantissa_bits(model / UNET / UNET_FILE, "conv_out.weight", 64)


def wrong_hash(model: Path) -> None:
    manifest = model / "artifacts/sdxl/components.json"
    recorded = json.loads(manifest.read_text())
    recorded["hashes"]["base/unet"] = "0" * 64
    manifest.write_text(json.dumps(recorded))


CORRUPTIONS = {"nan conv_out": nan_conv_out, "64 flipped bits": flipped_bits, "wrong hash": wrong_hash}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_verify_refuses_corrupted_weights_naming_component_and_file(artifact, tmp_path, capsys, corrupt):
    model = copy_of(artifact, tmp_path)
    assert cli.main(["verify", str(model)]) == 0
    assert "match their recorded sha256" in capsys.readouterr().out
    corrupt(model)
    assert cli.main(["verify", str(model)]) == 1
    error = capsys.readouterr().err
    assert "component base/unet" in error
    if corrupt is not wrong_hash:
        assert f"file {UNET_FILE}: sha256" in error


def test_the_load_check_catches_a_truncated_file_and_full_hashing_catches_flipped_bits(artifact, tmp_path):
    model = copy_of(artifact, tmp_path)
    flipped_bits(model)
    # the default check reads sizes and headers only: flipped bits load (the gate and verify hash them)
    mlflow.pyfunc.load_model(str(model))
    with pytest.raises(MlflowException, match=f"component base/unet, file {UNET_FILE}: sha256"):
        mlflow.pyfunc.load_model(str(model), model_config={"verify_weights": "full"})
    weights = model / UNET / UNET_FILE
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 4)
    with pytest.raises(MlflowException, match=f"component base/unet, file {UNET_FILE}: .* bytes, recorded"):
        mlflow.pyfunc.load_model(str(model))


def test_a_truncated_file_whose_record_was_edited_fails_the_header_check(artifact, tmp_path):
    model = copy_of(artifact, tmp_path)
    weights = model / UNET / UNET_FILE
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 4)
    manifest = model / "artifacts/sdxl/components.json"
    recorded = json.loads(manifest.read_text())
    recorded["files"]["base/unet"][UNET_FILE]["size"] = weights.stat().st_size
    manifest.write_text(json.dumps(recorded))
    with pytest.raises(MlflowException, match=f"file {UNET_FILE}: tensors end at byte"):
        mlflow.pyfunc.load_model(str(model))


def test_the_batch_job_refuses_to_start_or_resume_with_corrupted_weights(artifact, tmp_path, capsys):
    model = copy_of(artifact, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a cat {i}"}) + "\n" for i in range(2)))
    args = ["batch", "--model", str(model), "--input", str(prompts), "--output", str(tmp_path / "out")]
    args += ["--params", json.dumps(FAST | {"seed": 3}), "--no-progress"]
    assert cli.main(args) == 0
    flipped_bits(model)
    assert cli.main(args) == 2  # a resume with other bytes under the same recorded hash
    assert f"component base/unet, file {UNET_FILE}: sha256" in capsys.readouterr().err

    fresh = [*args[:6], str(tmp_path / "fresh"), *args[7:]]
    assert cli.main(fresh) == 2
    assert not (tmp_path / "fresh" / "manifest.jsonl").exists()


def test_the_model_hash_is_computed_from_the_verified_files(artifact, model):
    from model_pkg.catalog import model_hash
    from sdxl_tools.verify import verify_model

    hashes = json.loads((artifact / "artifacts/sdxl/components.json").read_text())["hashes"]
    assert (
        verify_model(artifact).model_hash
        == model_hash(hashes)
        == model.unwrap_python_model().pipelines.catalog.model_hash
    )


def on_a_terminal(monkeypatch, run) -> str:
    """What ``run()`` draws on stderr when stderr is a terminal (a real pseudo-terminal, read meanwhile)."""
    import fcntl
    import os
    import select
    import struct
    import sys
    import termios
    import threading

    main, side = os.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80×24, as a terminal window
    chunks: list[bytes] = []
    done = threading.Event()

    def read() -> None:  # drain while run() writes, so a full terminal buffer never blocks it
        while not done.is_set() or select.select([main], [], [], 0)[0]:
            if select.select([main], [], [], 0.05)[0]:
                chunks.append(os.read(main, 65536))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with open(side, "w", buffering=1) as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        run()
        terminal.flush()
        done.set()
        reader.join(timeout=5)
    os.close(main)
    return b"".join(chunks).decode(errors="replace")


def test_long_steps_draw_progress_bars_on_a_terminal_only(tiny, artifact, tmp_path, monkeypatch, capfd):
    """Hashing at build and checking every byte at verify show bytes bars on a terminal; a pipe gets none."""
    from sdxl_tools.staging import stage_components
    from sdxl_tools.verify import verify_model

    drawn = on_a_terminal(monkeypatch, lambda: stage_components(tiny.base, tiny.refiner, tmp_path / "staged"))
    assert "hashing base/unet" in drawn and "hashing refiner/unet" in drawn
    drawn = on_a_terminal(monkeypatch, lambda: verify_model(artifact))
    assert "verifying sha256" in drawn
    monkeypatch.undo()
    verify_model(artifact)
    assert "verifying" not in capfd.readouterr().err
