"""The MLflow PythonModel (models-from-code): load once, then parse → plan → generate → encode."""

from __future__ import annotations

import threading
from typing import Any

import mlflow
import pandas as pd

from model_pkg.config import load_model_config
from model_pkg.contract import output_frame
from model_pkg.generation import warm_up
from model_pkg.pipelines import load_pipelines
from model_pkg.request import RowSpec, parse_request
from model_pkg.scoring import score
from model_pkg.spark_nulls import preserve_struct_nulls
from model_pkg.truncation import truncation_warnings


class SDXLModel(mlflow.pyfunc.PythonModel):
    """SDXL 1.0 base + refiner behind MLflow's pyfunc contract (see SPEC.md and README.md)."""

    def load_context(self, context) -> None:
        self.config = load_model_config(context.model_config)
        self.pipelines = load_pipelines(context.artifacts["sdxl"], self.config)
        if self.config.compile != "none" and self.config.warmup_size:
            warm_up(self.pipelines, self.config)
        # One request at a time per process: in float16 diffusers upcasts the *shared* VAE inside
        # each call, and the fast CLIP tokenizers (used while parsing and generating) are not
        # thread-safe (transformers#47085, "Already borrowed"). Scale with server workers.
        self._lock = threading.Lock()
        preserve_struct_nulls()  # on_error="null" rows keep real nulls through spark_udf (see spark_nulls.py)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One output row per input row (SPEC §4)."""
        with self._lock:
            request = parse_request(model_input, params, self.config, self.pipelines.catalog)
            if request.params.prompt_weighting == "off":  # "auto" encodes long prompts whole
                base = self.pipelines.base
                rows = [r for r in request.rows if isinstance(r, RowSpec)]
                truncation_warnings(rows, [base.tokenizer, base.tokenizer_2])
            keep_going = request.params.on_error == "null"
            results = score(self.pipelines, request.rows, self.config.max_batch_size, keep_going)
        return output_frame(results, with_errors=keep_going)


mlflow.models.set_model(SDXLModel())
