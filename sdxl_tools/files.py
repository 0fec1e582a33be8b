"""File helpers the tools share: hard-link-or-copy, writes a crash cannot tear, progress in bytes."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm  # a dependency of diffusers and huggingface_hub


def byte_bar(total: int, desc: str) -> tqdm:
    """A transient progress bar in bytes on stderr for a long step (hashing or checking gigabytes of
    weights); tqdm draws it only when stderr is a terminal, so logs and pipes stay clean."""
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False, disable=None, file=sys.stderr
    )


FILE_MODE, DIR_MODE = 0o644, 0o755  # an artifact's files: readable by a server running as another user


def make_dirs(folder: Path) -> None:
    """``mkdir -p`` whose new folders are 0755, whatever the umask."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for created in missing:
        created.chmod(DIR_MODE)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk for multi-GB weights), else copy it as 0644.

    A source that others cannot read is copied: a link shares the mode, and the user's file is left alone.
    """
    make_dirs(dst.parent)
    if Path(src).stat().st_mode & 0o444 == 0o444:
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or one without hard links
            pass
    shutil.copyfile(src, dst)
    dst.chmod(FILE_MODE)


def publish_modes(folder: Path) -> None:
    """Files 0644, folders 0755 under ``folder`` (a saved artifact: copies, never a user's files)."""
    folder.chmod(DIR_MODE)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name, flush to disk, rename: readers see all of it or nothing.

    A failed write (disk full, read-only, a file size limit) removes its temporary file and raises.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make the renames in a folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
