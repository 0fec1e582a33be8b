"""The gate looks at the candidate's images: a model whose weights are intact but NaN (recorded hashes
match, every check on shapes and types passes) makes one-colour images and is refused."""

from __future__ import annotations

import shutil

from sdxl_tools.artifact import save_artifact
from sdxl_tools.gate import check_candidate
from sdxl_tools.staging import stage_components
from testkit.helpers import overwrite_tensor


def test_a_nan_unet_built_with_matching_hashes_is_refused_for_its_black_images(tiny, artifact, tmp_path):
    source = tmp_path / "nan"
    shutil.copytree(tiny.base.parent, source)
    overwrite_tensor(source / "base/unet/diffusion_pytorch_model.safetensors", "conv_out.weight", 0xFF)
    broken = save_artifact(stage_components(source / "base", source / "refiner", tmp_path / "sdxl"), tmp_path / "m")

    checks = {c.name: c for c in check_candidate(str(broken))}
    looked = checks["images are not blank, broken or seed-independent"]
    assert not looked.ok
    assert "row 0: one colour (0, 0, 0) (std 0)" in looked.detail
    assert checks["output matches the declared schema"].ok  # shapes and types alone would pass it

    good = {c.name: c for c in check_candidate(str(artifact))}
    assert good["images are not blank, broken or seed-independent"].ok
    assert "row 0: mean" in good["images are not blank, broken or seed-independent"].detail
