"""A batch job's output folder: the manifest of finished rows, the folder lock, and ``job.json`` (the
input, params and model a folder's results belong to; a resume with anything else is refused)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from model_pkg.weights import file_sha256
from sdxl_tools.files import write_atomic
from sdxl_tools.identity import ModelIdentity, model_difference

MANIFEST = "manifest.jsonl"
JOB_FILE = "job.json"
LOCK_FILE = ".lock"
IMAGES = "images"


def _decodable(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()  # the file's structure and checksums, without decoding every pixel
    except (OSError, UnidentifiedImageError, SyntaxError):
        return False
    return True


class BatchError(ValueError):
    """The job cannot start; the message says what to fix."""


class Manifest:
    """``manifest.jsonl``: one line per finished row, appended only after the row's image is on disk."""

    def __init__(self, output: Path):
        self.output = output
        self.path = output / MANIFEST
        self.images = output / IMAGES

    def load(
        self, rows: int, retry_errors: bool = False, fmt: str = "png", seeds: list[int | None] | None = None
    ) -> dict[int, dict[str, Any]]:
        """Finished rows by row number, after dropping what a crash, ``retry_errors`` or a bad line leaves out.

        A line is kept only when it is what this job would have written for its row: ``row`` an int
        in range, either ``file`` (``images/<row:06d>.<fmt>``, present and decodable) or ``error``,
        and the row's planned seed (``seeds``). Other lines are dropped, each named in
        :attr:`dropped` by line number, and their rows are scored again.
        """
        self.images.mkdir(parents=True, exist_ok=True)
        self.dropped: list[str] = []
        for leftover in self.images.glob(".*.tmp"):  # a write cut off before its rename
            leftover.unlink()
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        entries: dict[int, dict[str, Any]] = {}
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            entry, problem = self._parse(line, rows, fmt, seeds)
            if problem is None and entry["row"] in entries:
                problem = f"row {entry['row']} again"
            if problem is not None:
                if problem:  # "": a torn last line, expected after a crash
                    self.dropped.append(f"{self.path}:{number}: {problem}; the row is scored again")
                continue
            if retry_errors and entry["error"] is not None:
                continue
            entries[entry["row"]] = entry
        kept = "".join(json.dumps(e) + "\n" for e in entries.values()).encode("utf-8")
        if kept != data:
            write_atomic(self.path, kept)
        return entries

    def _parse(
        self, line: bytes, rows: int, fmt: str, seeds: list[int | None] | None
    ) -> tuple[dict[str, Any], str | None]:
        """The line's entry, and why it cannot be kept (None: it can)."""
        if not line.endswith(b"\n"):
            return {}, ""  # torn by a crash mid-write
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return {}, f"not a JSON line ({type(e).__name__})"
        if not isinstance(entry, dict):
            return {}, "not a JSON object"
        row, file, error = entry.get("row"), entry.get("file"), entry.get("error")
        if type(row) is not int or not 0 <= row < rows:  # type(): True is an int to isinstance
            return entry, f"'row' {row!r} is not a row number below {rows}"
        if (file is None) == (error is None) or not isinstance(file or error, str):
            return entry, f"row {row}: needs a 'file' or an 'error' string, not both or neither"
        if file is not None and file != f"{IMAGES}/{row:06d}.{fmt}":
            return entry, f"row {row}: 'file' {file!r} is not {IMAGES}/{row:06d}.{fmt}"
        planned = seeds[row] if seeds is not None else None
        if planned is not None and entry.get("seed") not in ((planned,) if file else (planned, None)):
            return entry, f"row {row}: 'seed' {entry.get('seed')!r} is not its planned seed {planned}"
        if file is not None and not _decodable(self.output / file):
            return entry, f"row {row}: {file} is missing or not a readable image"  # e.g. after a power cut
        return entry, None

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Append whole lines with one write each, then flush them to disk."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for entry in entries:
                os.write(fd, (json.dumps(entry) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` (``flock`` on ``output/.lock``) until the block ends.

    Non-blocking: a second job on the folder fails at once. The lock goes with the process (also
    on a kill), so a crashed job never leaves the folder locked. ``flock`` needs a local file
    system (on NFS it may not exclude jobs on other hosts).
    """
    output.mkdir(parents=True, exist_ok=True)
    fd = os.open(output / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BatchError(
                f"{output} is in use by another batch job (pid {owner}); wait for it to end or use another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_job(output: Path) -> dict[str, Any] | None:
    job_file = output / JOB_FILE
    return json.loads(job_file.read_text()) if job_file.exists() else None


def check_job(output: Path, input_path: Path, params: dict[str, Any], model: ModelIdentity, write: bool = True) -> None:
    """Refuse to resume into a folder that holds another input's, other params' or another model's results."""
    job = {"input_sha256": file_sha256(input_path), "params": params}
    previous = read_job(output)
    if previous is None:
        if write:
            record = {"input": str(input_path.resolve()), **job, "model": dataclasses.asdict(model)}
            write_atomic(output / JOB_FILE, json.dumps(record, indent=2).encode())
        return
    if {k: previous.get(k) for k in job} != job:
        raise BatchError(
            f"{output} holds results of another input file or other params ({output / JOB_FILE}); "
            "rerun with the same --input and --params to resume, or use a new --output"
        )
    difference = model_difference(previous.get("model"), model)
    if difference:
        raise BatchError(
            f"{output} was started with another model: {difference}. Resume with the model it was started "
            "with (a models:/NAME/VERSION URI pins a version), or use a new --output"
        )
