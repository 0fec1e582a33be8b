"""Scratch folders for downloaded artifacts that do not outlive their process.

A downloaded SDXL artifact is gigabytes. The gate and the batch job download into
``<tempdir>/sdxl-scratch-<pid>-<random>`` (:func:`scratch_dir`), which is removed when the block
ends, also on an exception and on SIGTERM (turned into ``SystemExit`` while the block runs, where
the caller is the main thread and has no SIGTERM handler of its own). A process killed with SIGKILL
cannot clean up: the next :func:`scratch_dir` of any process removes the folders whose process is
gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = "sdxl-scratch-"
_OWNER = re.compile(re.escape(PREFIX) + r"(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(root: Path) -> list[Path]:
    """Remove the scratch folders under ``root`` whose process no longer runs; returns them."""
    removed = []
    for folder in root.glob(PREFIX + "*"):
        owner = _OWNER.match(folder.name)
        if owner and folder.is_dir() and not _alive(int(owner.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit`` so ``finally`` clauses run."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield  # not ours to change: another thread, or the caller handles SIGTERM itself
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def scratch_dir(root: str | Path | None = None) -> Iterator[Path]:
    """A fresh folder under ``root`` (default: the temp folder), removed when the block ends."""
    root = Path(root or tempfile.gettempdir())
    remove_stale(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
    try:
        with _sigterm_as_exit():
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
