"""The MLflow PythonModel (models-from-code): load once, then parse → plan → generate → encode."""

from __future__ import annotations

import threading
from typing import Any

import mlflow
import pandas as pd

from model_pkg.config import load_model_config
from model_pkg.contract import output_frame
from model_pkg.generation import generate
from model_pkg.image_codec import encode_image
from model_pkg.pipelines import load_pipelines
from model_pkg.request import parse_request
from model_pkg.safety import filter_images


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
        rows = parse_request(model_input, params, self.config)
        encoded: dict[int, tuple[str, bool | None]] = {}
        with self._lock:
            for batch, images in generate(self.pipelines, rows, self.config.max_batch_size):
                settings = batch[0].settings
                images, flags = filter_images(images, self.pipelines.safety_checker, settings.safety_filter)
                for row, image, flag in zip(batch, images, flags, strict=True):
                    encoded[row.index] = (encode_image(image, settings.output_format), flag)
        return output_frame(
            prompts=[r.prompt for r in rows],
            images=[encoded[r.index][0] for r in rows],
            nsfw=[encoded[r.index][1] for r in rows],
            seeds=[r.seed for r in rows],
        )


mlflow.models.set_model(SDXLModel())
