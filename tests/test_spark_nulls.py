"""The spark_udf null fix (``model_pkg/spark_nulls.py``) on its own: installing it twice, declining
with a warning, and staying out of MLflow where the model is not scored by Spark. That it does its
job inside Spark is checked end to end by the error-mode test in ``test_batch_spark.py``."""

from __future__ import annotations

import logging
import types

import mlflow
import mlflow.pyfunc
import pandas as pd
import pytest
from pyspark.sql.types import BooleanType, LongType, StringType, StructField, StructType

from model_pkg import spark_nulls

RESULT_TYPE = StructType(
    [StructField("image", StringType()), StructField("nsfw", BooleanType()), StructField("seed", LongType())]
)


def rows_with_nulls() -> pd.DataFrame:
    """What ``predict`` returns with ``on_error="null"``: a good row and a failed one."""
    return pd.DataFrame({"image": ["abc", None], "nsfw": [True, None], "seed": pd.Series([7, None], dtype=object)})


def mlflow_converter() -> types.FunctionType:
    """A copy of MLflow's converter function to install on (this process's own must stay untouched)."""
    convert = mlflow.pyfunc._convert_struct_values
    return types.FunctionType(convert.__code__, convert.__globals__, convert.__name__, convert.__defaults__)


def test_mlflow_alone_turns_nulls_into_text_and_fails_on_a_null_long():
    """Why the fix exists (when MLflow converts nulls itself, this fails and the fix can go)."""
    convert = mlflow_converter()
    strings = StructType([StructField("image", StringType())])
    text = convert(rows_with_nulls()[["image"]], strings)["image"].tolist()[1]
    assert text in ("None", "nan")  # a text where the model returned a null (which text: by pandas version)
    with pytest.raises((TypeError, ValueError)):
        convert(rows_with_nulls(), RESULT_TYPE)


def test_installing_twice_is_a_no_op_and_keeps_real_nulls():
    convert = mlflow_converter()
    assert spark_nulls.install(convert)
    assert spark_nulls.install(convert)  # sees its own mark on the function: no wrapper around the wrapper
    out = convert(rows_with_nulls(), RESULT_TYPE)
    assert out["image"].tolist() == ["abc", None]
    assert out["nsfw"].tolist() == [True, None]
    assert out["seed"].tolist() == [7, None]


def test_declines_with_one_warning_when_mlflow_changed_the_function(caplog):
    def _convert_struct_values(result, result_type, strict=False):  # another MLflow's signature
        return "mlflow's own"

    with caplog.at_level(logging.WARNING, logger=spark_nulls.__name__):
        assert not spark_nulls.install(_convert_struct_values)
        assert not spark_nulls.install(_convert_struct_values)
    assert _convert_struct_values(None, None) == "mlflow's own"  # left as it was
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"MLflow {mlflow.__version__}" in warning.getMessage() and "left unchanged" in warning.getMessage()


def test_loading_the_model_outside_spark_leaves_mlflow_untouched(artifact):
    """A REST server, a batch job or a Spark driver loads the model: MLflow's converter stays MLflow's."""
    import pyspark.taskcontext  # noqa: F401  pyspark imported, as on a Spark driver, but no Spark task

    convert = mlflow.pyfunc._convert_struct_values
    code = convert.__code__
    mlflow.pyfunc.load_model(str(artifact))
    assert convert.__code__ is code and code.co_name == "_convert_struct_values"
    assert not hasattr(convert, spark_nulls.MARKER)
