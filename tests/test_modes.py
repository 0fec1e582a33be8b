"""Built artifacts are readable by a server running as another user: files 0644, folders 0755."""

from __future__ import annotations

import shutil
import stat

from sdxl_tools.artifact import save_artifact
from sdxl_tools.staging import stage_components


def modes(folder) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


def test_built_files_are_0644_and_folders_0755_whatever_the_source_modes(tiny, tmp_path):
    source = tmp_path / "private"
    shutil.copytree(tiny.base.parent, source)
    for path in [source, *source.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    before = modes(source)

    staged = stage_components(source / "base", source / "refiner", tmp_path / "sdxl")
    assert modes(staged.folder) == {("dir", 0o755), ("file", 0o644)}
    out = save_artifact(staged, tmp_path / "model")
    assert modes(out) == {("dir", 0o755), ("file", 0o644)}
    assert modes(source) == before  # the user's files keep their modes (copied, not linked and changed)
