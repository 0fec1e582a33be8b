"""Params and per-row overrides: defaults, sentinels, aspect ratios, schedulers, and the errors users see."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from model_pkg.config import ModelConfig, load_model_config
from model_pkg.contract import ASPECT_RATIOS, GenerationParams, resolve_strength
from model_pkg.request import RowError, parse_request
from model_pkg.schedulers import SCHEDULERS, canonical_scheduler, scheduler_names
from testkit.helpers import FAST, frame, png_b64

LIMITS = ModelConfig()


def parse(*rows: dict, **params):
    return parse_request(frame(*rows), params, LIMITS).rows


def test_defaults_follow_diffusers_and_the_spec():
    p = GenerationParams()
    assert (p.refiner, p.refiner_ratio, p.num_inference_steps, p.guidance_scale) == ("ensemble", 0.2, 50, 5.0)
    assert (p.height, p.width, p.strength, p.output_format, p.safety_filter) == (1024, 1024, -1, "png", True)
    assert (resolve_strength(p.strength, inpainting=False), resolve_strength(p.strength, inpainting=True)) == (0.3, 1)
    [row] = parse({"prompt": "a cat"})
    s = row.settings
    assert s.mode == "ensemble" and (s.height, s.width) == (1024, 1024)
    assert s.num_inference_steps_refiner == 50 and s.guidance_scale_refiner == 5.0  # -1 inherits
    assert 0 <= row.seed < 2**32


def test_aspect_ratio_uses_the_sdxl_resolutions_and_overrides_height_width():
    [row] = parse({"prompt": "a"}, aspect_ratio="16:9", height=512, width=512)
    assert (row.settings.width, row.settings.height) == ASPECT_RATIOS["16:9"] == (1344, 768)


def test_row_size_beats_request_aspect_ratio_and_row_aspect_ratio_beats_row_size():
    a, b = parse(
        {"prompt": "a", "height": 512, "width": 768},
        {"prompt": "b", "height": 512, "width": 768, "aspect_ratio": "21:9"},
        aspect_ratio="1:1",
    )
    assert (a.settings.width, a.settings.height) == (768, 512)
    assert (b.settings.width, b.settings.height) == (1536, 640)


def test_per_row_overrides_are_typed_by_the_model_and_missing_values_fall_back():
    rows = parse(
        {"prompt": "a", "seed": 5.0, "num_inference_steps": 12.0, "guidance_scale": 7},
        {"prompt": "b", "seed": float("nan"), "num_inference_steps": None},  # JSON null / Spark null
        seed=100,
        num_inference_steps=20,
    )
    assert [r.seed for r in rows] == [5, 101]
    assert [r.settings.num_inference_steps for r in rows] == [12, 20]
    assert rows[0].settings.guidance_scale == 7.0


def test_image_rows_are_img2img_at_the_input_size_floored_to_multiples_of_8():
    [row] = parse({"prompt": "a", "image": png_b64(size=(100, 70))}, refiner="none", aspect_ratio="16:9")
    assert row.settings.mode == "img2img"
    assert (row.settings.width, row.settings.height) == (96, 64)


@pytest.mark.parametrize("name", ["K_EULER", "k_euler", "EulerA", "HeunDiscrete", "KarrasDPM", "DPMSolverMultistep"])
def test_scheduler_names_of_the_seed_services_are_accepted(name):
    [row] = parse({"prompt": "a"}, scheduler=name)
    assert row.settings.scheduler in SCHEDULERS
    assert canonical_scheduler(name) == row.settings.scheduler


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"refiner": "both"}, "Invalid param 'refiner': Input should be 'none', 'ensemble' or 'sequential'"),
        ({"scheduler": "K_MAGIC"}, "Invalid param 'scheduler': unknown scheduler 'K_MAGIC'; valid: default, DDIM"),
        ({"seed": -2}, "Invalid param 'seed': Input should be greater than or equal to -1"),
        ({"seed": 2**32}, "Invalid param 'seed': Input should be less than or equal to 4294967295"),
        ({"guidance_scale": float("nan")}, "Invalid param 'guidance_scale': Input should be a finite number"),
        ({"strength": 0.0}, "Invalid param 'strength': Input should be greater than 0"),
        ({"refiner_ratio": 1.0}, "Invalid param 'refiner_ratio': Input should be less than 1"),
        ({"aspect_ratio": "5:4"}, "Invalid param 'aspect_ratio': Input should be '', '1:1'"),
        ({"output_format": "gif"}, "Invalid param 'output_format': Input should be 'png', 'jpeg' or 'webp'"),
        ({"timestep_spacing": "log"}, "Invalid param 'timestep_spacing'"),
        ({"num_images": 2}, "Invalid param 'num_images': unknown"),
        (
            {"num_inference_steps_refiner": 500},
            "Invalid param 'num_inference_steps_refiner' 500 is over the limit of 150",
        ),
        ({"height": 1020}, "Invalid param 'height'/'width' 1024×1020: width and height must be multiples of 8"),
    ],
)
def test_bad_params_name_the_param(params, message):
    with pytest.raises(MlflowException, match="^" + message.replace("(", r"\(").replace("'", "'")) as e:
        parse({"prompt": "a"}, **params)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize(
    ("row", "params", "message"),
    [
        ({"prompt": ""}, {}, "Row 1: 'prompt' is empty"),
        ({"prompt": None}, {}, "Row 1: 'prompt' is required"),
        ({"prompt": ["a", "b"]}, {}, "Row 1: 'prompt' must be a string, got list (pass a pandas DataFrame"),
        ({"prompt": "a", "seed": "x"}, {}, "Row 1: 'seed': Input should be a valid integer"),
        ({"prompt": "a", "seed": 1.5}, {}, "Row 1: 'seed': Input should be a valid integer, got a number with"),
        ({"prompt": "a", "seed": True}, {}, "Row 1: 'seed': must be a number, not a boolean (got True)"),
        ({"prompt": "a", "guidance_scale": False}, {}, "Row 1: 'guidance_scale': must be a number, not a boolean"),
        ({"prompt": "a", "height": 1020}, {}, "Row 1: 'height'/'width' 1024×1020: width and height must be multiples"),
        ({"prompt": "a", "height": 4096, "width": 4096}, {}, "Row 1: 'height'/'width' 4096×4096 is over the"),
        ({"prompt": "a", "num_inference_steps": 151}, {}, "Row 1: 'num_inference_steps' 151 is over the limit of 150"),
        (
            {"prompt": "a", "num_inference_steps": 1},
            {},
            "Row 1: 'refiner_ratio' 0.2 with 'num_inference_steps' 1 leaves the base no denoising step",
        ),
        (
            {"prompt": "a", "image": png_b64(), "num_inference_steps": 3},
            {},
            "Row 1: 'strength' 0.3 × 'num_inference_steps' 3 leaves no denoising step",
        ),
        ({"prompt": "a", "image": "not base64!"}, {}, "Row 1: 'image': not valid base64"),
        ({"prompt": "a", "image": "aGVsbG8="}, {}, "Row 1: 'image': not an image in an accepted format"),
        ({"prompt": "a", "image": "http://127.0.0.1/x.png"}, {}, "Row 1: 'image': URLs are not fetched"),
        ({"prompt": "a", "image": png_b64(size=(32, 32))}, {}, "Row 1: 'image' is 32×32; at least 64×64 is needed"),
        ({"prompt": "a"}, {"seed": 2**32 - 1}, "Row 1: request 'seed' 4294967295 + row 1 is over 4294967295"),
    ],
)
def test_bad_rows_name_the_row_and_field(row, params, message):
    with pytest.raises(RowError) as e:
        parse({"prompt": "fine"}, row, **params)
    assert str(e.value).startswith(message), str(e.value)
    assert e.value.row == 1 and e.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize(
    ("model_input", "message"),
    [
        (frame({"text": "a"}), "Missing required column 'prompt'"),
        (frame().assign(prompt=[]), "The request has no rows"),
        (frame(*[{"prompt": "a"}] * 3), "The request has 3 rows, over the limit of 2 (max_rows)"),
        ("a cat", "Expected a DataFrame with a 'prompt' column, got str"),
    ],
)
def test_bad_requests_are_refused_whole(model_input, message):
    with pytest.raises(MlflowException) as e:
        parse_request(model_input, FAST, ModelConfig(max_rows=2))
    assert str(e.value).startswith(message)


def test_model_config_validates_and_env_overrides_device_and_dtype():
    config = load_model_config({"max_steps": 20}, environ={"SDXL_DEVICE": "cpu", "SDXL_DTYPE": "bfloat16"})
    assert (config.max_steps, config.device, config.dtype) == (20, "cpu", "bfloat16")
    with pytest.raises(MlflowException, match="Invalid model_config 'dtype'"):
        load_model_config({"dtype": "int8"}, environ={})
    with pytest.raises(MlflowException, match="Invalid model_config 'max_stepz'"):
        load_model_config({"max_stepz": 1}, environ={})


def test_every_scheduler_name_is_listed_in_errors():
    assert set(scheduler_names()) >= {"default", "DDIM", "K_EULER", "K_EULER_ANCESTRAL", "K_DPMPP_2M", "PNDM"}


def test_enum_params_accept_any_case_everywhere():
    """Every choice param is matched case-insensitively (as scheduler names are) and stored canonical."""
    mixed = {
        "refiner": "None",
        "timestep_spacing": "Leading",
        "output_format": "WebP",
        "output_encoding": "DATA_URI",
        "on_error": "NULL",
        "prompt_weighting": "Off",
        "scheduler": "k_euler",
    }
    p = GenerationParams.model_validate(mixed)
    assert p.model_dump(include=set(mixed)) == {
        "refiner": "none",
        "timestep_spacing": "leading",
        "output_format": "webp",
        "output_encoding": "data_uri",
        "on_error": "null",
        "prompt_weighting": "off",
        "scheduler": "K_EULER",
    }
    [row] = parse({"prompt": "a"}, **mixed)
    assert (row.settings.mode, row.settings.timestep_spacing, row.params.output_encoding) == (
        "none",
        "leading",
        "data_uri",
    )
    with pytest.raises(MlflowException, match=r"^Invalid param 'refiner': Input should be 'none', 'ensemble' or"):
        parse({"prompt": "a"}, refiner="both")
    from sdxl_tools.spark import result_type

    assert "error" in result_type({"on_error": "NULL"}).fieldNames()  # the model returns the column
