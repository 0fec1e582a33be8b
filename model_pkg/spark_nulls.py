"""Keep nulls in ``spark_udf`` struct results (a workaround for MLflow 3.17's struct conversion).

``mlflow.pyfunc.spark_udf`` converts a struct result column by column with ``astype(<numpy type>)``
(``mlflow.pyfunc._convert_struct_values``): in a column that mixes values and nulls, ``None`` in a
``string`` field becomes a text (``"None"``), in a ``boolean`` field ``False``, and a missing ``long``
fails the Arrow batch: the shape of ``on_error="null"`` output. No supported route avoids it in
MLflow 3.17.2 (nested struct, array and map fields keep nulls but change the output's shape; pandas'
nullable dtypes come out as ``"<NA>"`` or fail the cast). ``sdxl_tools.spark.model_udf`` does not
go through this converter and needs no fix.

:func:`preserve_struct_nulls` (called by ``load_context``) wraps the converter only inside a Spark
task (the Python worker of ``spark_udf(..., env_manager="local")``); a REST server, a batch job or a
driver leaves MLflow untouched. Nulls of primitive fields are set aside, the rest converted by
MLflow's own code, and the nulls put back. Installing twice is a no-op; a converter that does not
look like MLflow 3.17's is left unchanged, with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import pandas as pd

_logger = logging.getLogger(__name__)
MARKER = "_sdxl_struct_nulls"  # attribute on the converter function: "installed" or "declined"
# Spark primitive type name → a value its numpy cast accepts, used only as a placeholder for a null.
_PLACEHOLDERS = {"IntegerType": 0, "LongType": 0, "FloatType": 0.0, "DoubleType": 0.0, "BooleanType": False}
_PLACEHOLDERS["StringType"] = ""


def _null_safe(convert: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    @functools.wraps(convert)
    def wrapper(result: Any, result_type: Any) -> Any:
        if not isinstance(result, pd.DataFrame) or not hasattr(result_type, "fields"):
            return convert(result, result_type)
        holes: dict[str, pd.Series] = {}
        filled = result.copy(deep=False)
        for field in result_type.fields:
            placeholder = _PLACEHOLDERS.get(type(field.dataType).__name__)
            if placeholder is None or field.name not in filled.columns:
                continue
            missing = filled[field.name].isna()
            if missing.any() and not missing.all():  # all-null columns MLflow already leaves alone
                holes[field.name] = missing
                filled[field.name] = filled[field.name].astype(object).mask(missing, placeholder)
        converted = convert(filled, result_type)
        for name, missing in holes.items():
            column = converted[name].astype(object)
            column[missing.to_numpy()] = None
            converted[name] = column
        return converted

    return wrapper


def _trampoline(result, result_type, _null_safe_convert=None):  # the converter's new code
    return _null_safe_convert(result, result_type)


def _in_spark_task() -> bool:
    """True inside a Spark task (a Python worker running a UDF). Reads ``sys.modules`` only: the
    runtime never imports pyspark, and where pyspark is not loaded there is no Spark task."""
    taskcontext = sys.modules.get("pyspark.taskcontext")
    return taskcontext is not None and taskcontext.TaskContext.get() is not None


def _as_expected(convert: Any) -> bool:
    if not isinstance(convert, types.FunctionType) or convert.__name__ != "_convert_struct_values":
        return False
    code = convert.__code__
    plain = not (code.co_freevars or code.co_kwonlyargcount or convert.__defaults__)
    return plain and code.co_varnames[: code.co_argcount] == ("result", "result_type")


def install(convert: Any) -> bool:
    """Make the converter function ``convert`` keep nulls; True when the fix is in place.

    The function object itself is changed (its ``__code__`` and ``__defaults__``), not a module
    attribute: ``spark_udf``'s closure reaches the worker through cloudpickle with its own reference
    to the function, taken before the model (and so this module) is loaded there.
    """
    state = getattr(convert, MARKER, None)
    if state is not None:  # installed, or declined with a warning already
        return state == "installed"
    if not _as_expected(convert):
        import mlflow

        _logger.warning(
            "spark_udf struct nulls: mlflow.pyfunc._convert_struct_values of MLflow %s is not the function "
            "this fix was written for (MLflow 3.17); left unchanged, so rows with on_error='null' may reach "
            "Spark with a text ('None', 'nan') for a null or fail their batch",
            mlflow.__version__,
        )
        with contextlib.suppress(AttributeError, TypeError):
            setattr(convert, MARKER, "declined")
        return False
    original = types.FunctionType(convert.__code__, convert.__globals__, convert.__name__)
    convert.__defaults__ = (_null_safe(original),)
    convert.__code__ = _trampoline.__code__
    setattr(convert, MARKER, "installed")
    return True


def preserve_struct_nulls() -> bool:
    """Install the fix on MLflow's converter when running in a Spark task; True when it is in place."""
    if not _in_spark_task():
        return False
    import mlflow.pyfunc

    return install(getattr(mlflow.pyfunc, "_convert_struct_values", None))
