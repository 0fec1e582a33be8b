"""``mask_source``: where an inpainting row's mask comes from (the mask either way round, or the image's alpha)."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image, ImageOps

from sdxl_tools.client import b64_to_image, read_metadata
from testkit.helpers import FAST, frame, png_b64
from tests.test_inpaint import BOX, b64, far_from, input_pixels, mask_b64

PARAMS = FAST | {"refiner": "none", "mask_blur": 0}


def rgba_b64(size=(64, 64), box=BOX) -> tuple[str, str]:
    """An RGBA image transparent inside ``box`` (its RGB kept), and its RGB image alone."""
    rgb = b64_to_image(png_b64(size=size)).convert("RGB")
    alpha = Image.new("L", size, 255)
    alpha.paste(0, box)
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    return b64(rgba), b64(rgb)


def out_pixels(out) -> np.ndarray:
    return np.asarray(b64_to_image(out["generated_image"][0]).convert("RGB"), dtype=np.int16)


def test_mask_black_repaints_the_black_area_as_mask_white_repaints_the_white(model):
    image = png_b64(size=(64, 64))
    white = mask_b64((64, 64))
    black = b64(ImageOps.invert(b64_to_image(white).convert("L")))  # black box on white
    row = {"prompt": "a yellow cat", "image": image, "seed": 3}
    as_white = out_pixels(model.predict(frame(row | {"mask": white}), params=PARAMS))
    as_black = out_pixels(model.predict(frame(row | {"mask": black}), params=PARAMS | {"mask_source": "mask_black"}))
    np.testing.assert_array_equal(as_black, as_white)
    far = far_from(BOX, (64, 64), margin=0)
    np.testing.assert_array_equal(as_black[far], input_pixels(image)[far])  # the rest kept exactly
    assert (as_black[~far] != input_pixels(image)[~far]).any()  # the black box repainted


def test_image_alpha_repaints_the_transparent_pixels(model):
    rgba, rgb = rgba_b64()
    out = model.predict(
        frame({"prompt": "a yellow cat", "image": rgba, "seed": 3}), params=PARAMS | {"mask_source": "image_alpha"}
    )
    masked = model.predict(
        frame({"prompt": "a yellow cat", "image": rgb, "mask": mask_b64((64, 64)), "seed": 3}), params=PARAMS
    )
    np.testing.assert_array_equal(out_pixels(out), out_pixels(masked))
    far = far_from(BOX, (64, 64), margin=0)
    np.testing.assert_array_equal(out_pixels(out)[far], input_pixels(rgb)[far])
    meta = read_metadata(out["generated_image"][0])
    assert meta["mode"] == "inpainting"
    assert meta["request"]["params"]["mask_source"] == "image_alpha"
    assert "mask" not in meta["request"]["dataframe_records"][0]  # the mask is the image's alpha


def test_image_alpha_needs_an_alpha_channel(model):
    with pytest.raises(MlflowException, match=r"Row 0: 'image' has no alpha channel.*mask_source"):
        model.predict(
            frame({"prompt": "x", "image": png_b64(size=(64, 64))}), params=PARAMS | {"mask_source": "image_alpha"}
        )


def test_image_alpha_with_a_mask_column_is_refused(model):
    rgba, _ = rgba_b64()
    with pytest.raises(MlflowException, match=r"Row 0: 'mask'.*image_alpha"):
        model.predict(
            frame({"prompt": "x", "image": rgba, "mask": mask_b64((64, 64))}),
            params=PARAMS | {"mask_source": "image_alpha"},
        )


def test_an_opaque_alpha_channel_leaves_nothing_to_repaint(model):
    rgb = b64_to_image(png_b64(size=(64, 64))).convert("RGBA")
    with pytest.raises(MlflowException, match=r"Row 0: 'image' is opaque everywhere"):
        model.predict(frame({"prompt": "x", "image": b64(rgb)}), params=PARAMS | {"mask_source": "image_alpha"})
