"""The contract in the MLmodel: signature, params, input example, model card."""

from __future__ import annotations

import json

from helpers import decode
from mlflow.models import Model

from model_pkg.contract import OUTPUT_COLUMNS, SPARK_RESULT_TYPE, SPARK_RESULT_TYPE_WITH_ERRORS, signature
from model_pkg.packaging import TEMPLATE, input_example
from model_pkg.params import ROW_FIELDS, GenerationParams


def test_signature_template_is_what_the_code_declares():
    """MLmodel_template/signature.json is the readable contract; `python build.py template` renders it."""
    assert json.loads((TEMPLATE / "signature.json").read_text()) == signature().to_dict()


def test_params_schema_carries_every_param_with_its_default():
    params = {p.name: p.default for p in signature().params}
    assert params == GenerationParams().model_dump()


def test_inputs_and_outputs():
    sig = signature()
    assert sig.inputs.input_names() == ["prompt", "image", *ROW_FIELDS]
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
    assert [decode(b).size for b in out["generated_image"]] == [(64, 64), (64, 64)]
