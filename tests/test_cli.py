"""The command line answers ``--help`` and argument errors before importing anything heavy."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ("build", "register", "promote", "copy", "verify", "template", "batch")
PROBE = """
import sys
from sdxl_tools import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(code, sorted(m for m in ("torch", "diffusers", "mlflow", "pandas", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in COMMANDS), ["promote"], ["batch", "--model"]])
def test_help_and_argument_errors_import_nothing_heavy(argv):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    code, heavy = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert (code, heavy) == ("0" if argv[-1] == "--help" else "2", "[]"), done.stderr[-2000:]


def test_every_command_is_listed_in_the_top_level_help():
    from sdxl_tools.cli import parser

    text = parser().format_help()
    assert all(command in text for command in COMMANDS)
