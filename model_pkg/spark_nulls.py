"""Keep nulls in ``spark_udf`` struct results (a workaround for MLflow 3.17's struct conversion).

``mlflow.pyfunc.spark_udf`` converts a struct result column by column with ``astype(<numpy type>)``
(``mlflow.pyfunc._convert_struct_values``). A column that mixes values and nulls then comes out
wrong: ``None`` in a ``string`` field becomes the text ``"None"``, in a ``boolean`` field ``False``,
and a missing ``long`` fails the whole Arrow batch ("cannot convert NA to integer"). That is
exactly the shape of ``on_error="null"`` output (null image, null seed, null error for good rows).

:func:`preserve_struct_nulls` wraps that converter, once per process: nulls of primitive fields
are set aside, the rest converted by MLflow's own code as before, and the nulls put back, so Spark
receives real nulls. Nothing else changes; with another MLflow version whose converter does not
look the same, nothing is touched (the Spark error-mode test then shows whether it is needed).
The model calls it in ``load_context``: with ``env_manager="local"`` the model is loaded in the
Spark Python worker that converts the results, before the first batch. (With ``virtualenv``/``uv``
env managers the model runs in a separate scoring process and the fix does not reach the worker.)
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from typing import Any

import pandas as pd

_logger = logging.getLogger(__name__)
_INSTALLED = "_sdxl_null_safe_struct_values"  # the wrapper, kept in mlflow.pyfunc's namespace
# Spark primitive type name → a value its numpy cast accepts, used only as a placeholder for a null.
_PLACEHOLDERS = {
    "IntegerType": 0,
    "LongType": 0,
    "FloatType": 0.0,
    "DoubleType": 0.0,
    "BooleanType": False,
    "StringType": "",
}


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


def _trampoline(result, result_type):  # runs with mlflow.pyfunc's globals once installed
    return _sdxl_null_safe_struct_values(result, result_type)  # noqa: F821


def preserve_struct_nulls() -> bool:
    """Make ``mlflow.pyfunc._convert_struct_values`` keep nulls; True when the fix is in place.

    The function object itself is changed (its ``__code__``), not only the module attribute:
    ``spark_udf``'s closure reaches the worker through cloudpickle with its own reference to the
    function, taken before the model (and so this module) is loaded there.
    """
    import mlflow.pyfunc

    namespace = vars(mlflow.pyfunc)
    if _INSTALLED in namespace:
        return True
    convert = namespace.get("_convert_struct_values")
    code = getattr(convert, "__code__", None)
    if code is None or code.co_varnames[: code.co_argcount] != ("result", "result_type") or code.co_freevars:
        _logger.debug("mlflow.pyfunc._convert_struct_values not as expected; spark_udf struct nulls left alone")
        return False
    original = types.FunctionType(code, convert.__globals__, convert.__name__, convert.__defaults__)
    namespace[_INSTALLED] = _null_safe(original)
    convert.__code__ = _trampoline.__code__
    return True
