"""The README's quick start runs as written (in a fresh folder with this checkout's .venv and samples)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess

from sdxl_tools import ROOT
from testkit.processes import free_port


def quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quick-start.*?-->\n```bash\n(.*?)```\n<!-- /quick-start -->", readme, re.S)
    assert block, "README.md has no quick-start block"
    return block.group(1)


def test_the_readme_quick_start_runs_as_written(tmp_path):
    for name in (".venv", "samples"):
        (tmp_path / name).symlink_to(ROOT / name)
    script = quick_start().replace("5001", str(free_port()))  # the README's port may be taken here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV"))}
    # the default store is ./mlflow.db of the checkout the tools run from; the test keeps its own
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "quick-start.log"
    with log.open("w") as out:  # a file, not a pipe: a server the block leaves behind cannot hold the test
        block = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = block.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(block.pid, signal.SIGKILL)  # the block's server, if it ended before `kill %1`
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert '{"predictions": [{"prompt": "a cat with a hat, photo"' in text
    assert "promoted: models:/sdxl@production -> version 1" in text
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "sdxl-model" / "MLmodel").is_file()
