"""An ``azmlinfsrv`` entry script that does what Azure ML's generic MLflow scoring script (its no-code
deployments) does with a model, reduced to the steps that touch the artifact; written for the tests
(Azure's script is not redistributed here; see README "Deploy").

At import, as Azure's script does:

1. the sample input: the saved input example read back with ``pandas.read_json`` on a *literal* JSON
   string, orient ``split`` when the file has top-level ``columns`` and ``values`` otherwise (pandas 3
   reads a literal string as a file name and fails here);
2. if that fails, a sample built from the signature with ``Schema.pandas_types()``, which raises for
   this artifact's ``any`` columns: then the import fails and the server's worker does not boot;
3. ``inference_schema`` parameter types from the samples, which turn the request's ``input_data`` into a
   DataFrame (rows as lists or objects) and its ``params`` into a dict;

and per request ``predict(input_data, params=params)``, answered as a JSON list of records.
"""

import json
import logging
import os

import mlflow
import pandas as pd
from inference_schema.parameter_types.pandas_parameter_type import PandasParameterType
from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
from inference_schema.schema_decorators import input_schema
from mlflow.pyfunc.scoring_server import _get_jsonable_obj

logger = logging.getLogger("azureml_generic")
path = os.path.join(os.environ["AZUREML_MODEL_DIR"], os.environ["MLFLOW_MODEL_FOLDER"])
meta = mlflow.models.Model.load(path)

try:
    with open(os.path.join(path, meta.saved_input_example_info["artifact_path"])) as f:
        loaded = json.load(f)
    orient = "split" if "columns" in loaded else "values"
    sample = pd.read_json(json.dumps(loaded), orient=orient, dtype=False)
except Exception as e:
    logger.warning("the input example cannot be read (%s): building a sample from the signature", e)
    names, types = meta.signature.inputs.input_names(), meta.signature.inputs.pandas_types()  # raises for `any`
    sample = pd.DataFrame(columns=names).astype(dict(zip(names, types, strict=True)))
params_sample = {param.name: param.default for param in meta.signature.params.params}
model = mlflow.pyfunc.load_model(path)


def init():
    pass


@input_schema("input_data", PandasParameterType(sample, enforce_shape=False, orient="split"))
@input_schema("params", StandardPythonParameterType(params_sample), optional=True)
def run(input_data, params=None):
    return _get_jsonable_obj(model.predict(input_data, params=params), pandas_orient="records")
