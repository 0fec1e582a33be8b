"""The contract in the MLmodel: signature, params, input example, model card."""

from __future__ import annotations

import json

from mlflow.models import Model

from model_pkg.config import ModelConfig
from model_pkg.contract import OUTPUT_COLUMNS, ROW_FIELDS, GenerationParams
from sdxl_tools import TEMPLATE, doc_tables
from sdxl_tools.artifact import input_example
from sdxl_tools.client import b64_to_image
from sdxl_tools.doc_tables import rendered_docs
from sdxl_tools.signature import signature
from sdxl_tools.spark import SPARK_RESULT_TYPE, SPARK_RESULT_TYPE_WITH_ERRORS


def test_signature_template_is_what_the_code_declares():
    """MLmodel_template/signature.json is the readable contract; `python build.py template` renders it."""
    assert json.loads((TEMPLATE / "signature.json").read_text()) == signature().to_dict()


def test_params_schema_carries_every_param_with_its_default():
    params = {p.name: p.default for p in signature().params}
    assert params == GenerationParams().model_dump()


def test_inputs_and_outputs():
    sig = signature()
    assert sig.inputs.input_names() == ["prompt", "image", "mask", "control_image", *ROW_FIELDS]
    assert sig.inputs.required_input_names() == ["prompt"]
    assert sig.outputs.input_names() == [*OUTPUT_COLUMNS, "error"]
    assert sig.outputs.required_input_names() == ["prompt", "generated_image", "seed"]
    assert [f.split()[0] for f in SPARK_RESULT_TYPE.split(", ")] == list(OUTPUT_COLUMNS)
    assert [f.split()[0] for f in SPARK_RESULT_TYPE_WITH_ERRORS.split(", ")] == [*OUTPUT_COLUMNS, "error"]


def test_artifact_mlmodel_has_signature_example_and_card(artifact, model):
    mlmodel = Model.load(str(artifact))
    assert mlmodel.signature == signature()
    assert mlmodel.metadata["license"] == "CreativeML Open RAIL++-M"
    assert mlmodel.metadata["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert mlmodel.metadata["safety_checker"].startswith("none: nsfw_content_detected is null")
    example = json.loads((artifact / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["prompt", "image"]

    df, params = input_example()
    out = model.predict(df, params=params)  # the artifact scores its own example
    assert [b64_to_image(b).size for b in out["generated_image"]] == [(64, 64), (64, 64)]


# -- the params are declared once (GenerationParams); everything else must follow -----------------

# Settings fields that are not params of the same name: what parsing resolves them into.
DERIVED_SETTINGS = {
    "mode": "refiner, or img2img for image rows",
    "prompt_chunks": "prompt_weighting",
    "inpaint": "rows with a mask",
    "refiner_strength": "strength, for the sequential refiner's pass",
    "control_guidance": "control_guidance_start, control_guidance_end",
}
# Params that are not Settings fields: kept per row or only decide how the request is handled.
NOT_SETTINGS = {
    "refiner": "Settings.mode",
    "negative_prompt": "RowSpec.negative_prompt",
    "seed": "RowSpec.seed",
    "style": "RowSpec.style (applied to the prompt text)",
    "aspect_ratio": "Settings.height/width",
    "lora_scale": "the weights in Settings.lora",
    "prompt_weighting": "Settings.prompt_chunks",
    "on_error": "how failures are reported",
    "safety_filter": "request-wide: read from the request's params",
    "output_format": "RowSpec.params (the encoder reads them)",
    "output_quality": "RowSpec.params",
    "output_encoding": "RowSpec.params",
    "png_metadata": "RowSpec.params",
    "mask_source": "RowSpec.mask (made at parse time)",
    "control_preprocess": "RowSpec.control_image (the map is made at parse time)",
    "canny_low_threshold": "RowSpec.control_image",
    "canny_high_threshold": "RowSpec.control_image",
    "controlnet_conditioning_scale": "the scales in Settings.controlnet",
    "control_guidance_start": "Settings.control_guidance",
    "control_guidance_end": "Settings.control_guidance",
}


def test_settings_follow_the_params():
    """A new param must become a Settings field (part of the batching key) or be listed above."""
    from dataclasses import fields

    from model_pkg.spec import Settings

    params, settings = set(GenerationParams.model_fields), {f.name for f in fields(Settings)}
    assert params - settings == set(NOT_SETTINGS)
    assert settings - params == set(DERIVED_SETTINGS)


def test_reproduction_request_records_every_param(model):
    """The PNG metadata's request carries every param except the ones it says it leaves out."""
    from model_pkg.contract import NOT_REPRODUCED
    from sdxl_tools.client import read_metadata
    from testkit.helpers import FAST, frame

    out = model.predict(frame({"prompt": "a cat"}), params=FAST | {"seed": 3})
    recorded = set(read_metadata(out["generated_image"][0])["request"]["params"])
    assert recorded == set(GenerationParams.model_fields) - set(NOT_REPRODUCED)


def test_docs_tables_are_what_the_code_declares():
    """docs/contract.md's params and docs/limits.md's model-config tables are rendered from the pydantic
    declarations (`sdxl-pyfunc template`): a param or key added, renamed or re-defaulted in code fails here."""
    pages = rendered_docs(TEMPLATE.parent / "docs")
    assert {p.name for p in pages} == {"contract.md", "limits.md"}
    for page, text in pages.items():
        assert page.read_text() == text, f"{page.name} lags behind the code: run `sdxl-pyfunc template`"


def test_docs_tables_carry_each_field_with_its_default_and_bounds():
    lines = doc_tables.table(GenerationParams, "param").splitlines()[2:]
    rows = {line.split(" | ")[0].strip("| `"): line for line in lines}
    assert list(rows) == list(GenerationParams.model_fields)
    assert "| `seed` | integer | `-1` | [-1, 4294967295] |" in rows["seed"]
    assert "| `refiner_ratio` | number | `0.2` | (0, 1) |" in rows["refiner_ratio"]
    assert "`K_DPMPP_2M`" in rows["scheduler"] and "`16:9` 1344×768" in rows["aspect_ratio"]
    config = doc_tables.table(ModelConfig, "key")
    assert "| `request_timeout_s` | number or null | null | ≥ 0 |" in config
    assert "| `image_formats` | list of string | PNG, JPEG, WEBP |" in config
