"""The MLflow PythonModel (models-from-code): load once, then parse → plan → generate → encode."""

from __future__ import annotations

import threading
from typing import Any

import mlflow
import pandas as pd

from model_pkg.config import load_model_config
from model_pkg.contract import output_frame
from model_pkg.pipelines import load_pipelines
from model_pkg.prompts import truncation_warnings
from model_pkg.request import RowSpec, parse_request
from model_pkg.scoring import score


class SDXLModel(mlflow.pyfunc.PythonModel):
    """SDXL 1.0 base + refiner behind MLflow's pyfunc contract (see SPEC.md and README.md)."""

    def load_context(self, context) -> None:
        self.config = load_model_config(context.model_config)
        self.pipelines = load_pipelines(context.artifacts["sdxl"], self.config)
        # One generation at a time per process: in float16, diffusers upcasts the *shared* VAE
        # inside each call; requests still parse and validate in parallel. Scale with workers.
        self._lock = threading.Lock()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One output row per input row (SPEC §4)."""
        request = parse_request(model_input, params, self.config)
        base = self.pipelines.base
        truncation_warnings([r for r in request.rows if isinstance(r, RowSpec)], [base.tokenizer, base.tokenizer_2])
        keep_going = request.params.on_error == "null"
        with self._lock:
            results = score(self.pipelines, request.rows, self.config.max_batch_size, keep_going)
        return output_frame(results, with_errors=keep_going)


mlflow.models.set_model(SDXLModel())
