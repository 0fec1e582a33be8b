"""The MLflow PythonModel (models-from-code): load once, then one request top to bottom.

A request, as :meth:`SDXLModel.predict` reads:

1. parse    the input frame and params → one validated row spec (or row error) per input row (request.py)
2. plan     rows that share their settings → batches, one pipeline call each (plan.py)
3. generate each batch (base, refiner, or both, per the rows' mode) (generation.py)
4. safety   the packaged checker flags images (and blacks them out with ``safety_filter``) (safety.py)
5. encode   each image as PNG / JPEG / WebP, base64 or a data URI (images.py), with PNG metadata (metadata.py)
6. frame    one output row per input row, in input order (contract.py)

With ``on_error="null"`` a batch that fails is retried row by row, so one bad row costs only its
own image; with ``"raise"`` the failure ends the request with the rows it concerned.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR
from PIL import Image

from model_pkg.catalog import Catalog
from model_pkg.config import load_model_config
from model_pkg.contract import RowResult, output_frame
from model_pkg.generation import calibrate, generate_batch, warm_up
from model_pkg.images import encode_output
from model_pkg.metadata import png_text
from model_pkg.pipelines import Pipelines, load_pipelines, warn_if_task_moved
from model_pkg.plan import plan_batches, stage_steps
from model_pkg.prompts import truncation_warnings
from model_pkg.request import RowError, check_whole_request, parse_request
from model_pkg.safety import filter_images
from model_pkg.spark_nulls import preserve_struct_nulls
from model_pkg.spec import RowSpec


class SDXLModel(mlflow.pyfunc.PythonModel):
    """SDXL 1.0 base + refiner behind MLflow's pyfunc contract (see README.md)."""

    def load_context(self, context) -> None:
        self.config = load_model_config(context.model_config)
        self.pipelines = load_pipelines(context.artifacts["sdxl"], self.config)
        if self.config.compile != "none" and self.config.warmup_size:
            warm_up(self.pipelines, self.config)
        # One request at a time per process: in float16 diffusers upcasts the *shared* VAE inside
        # each call, and the fast CLIP tokenizers (used while parsing and generating) are not
        # thread-safe (transformers#47085, "Already borrowed"). Scale with server workers.
        self._lock = threading.Lock()
        self.cost = calibrate(self.pipelines, self.config) if self.config.request_timeout_s else None
        preserve_struct_nulls()  # in a Spark task only: on_error="null" rows keep real nulls (see spark_nulls.py)

    def check_request(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> None:
        """Only :meth:`predict`'s request-level checks, on any number of rows (a batch job: its whole input)."""
        rows = len(model_input) if isinstance(model_input, pd.DataFrame) else 0
        limits = self.config.model_copy(update={"max_rows": max(self.config.max_rows, rows)})
        check_whole_request(model_input, params, limits, self.pipelines.catalog)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One output row per input row: ``prompt``, ``generated_image``, ``nsfw_content_detected``, ``seed``."""
        pipes = self.pipelines
        arrived = time.monotonic()  # the platform's timeout counts from here, waiting for the lock included
        warn_if_task_moved(pipes.device)
        with self._lock:
            # 1. parse: every row validated before anything runs; errors name the row and the field
            request = parse_request(model_input, params, self.config, pipes.catalog)
            keep_going = request.params.on_error == "null"
            rows = [r for r in request.rows if isinstance(r, RowSpec)]
            if request.params.prompt_weighting == "off":  # "auto" encodes long prompts whole
                truncation_warnings(rows, [pipes.base.tokenizer, pipes.base.tokenizer_2])
            errors = [e for e in request.rows if isinstance(e, RowError)]
            results = {e.row: RowResult(e.prompt, None, None, e.seed, e.reason) for e in errors}

            # 2. plan: rows that share settings are one pipeline call; refused up front if it cannot finish
            batches = plan_batches(rows, self.config.max_batch_size)
            deadline = self._deadline(batches, arrived)
            for batch in batches:
                # 3. generate (a failing batch is retried row by row with on_error="null")
                for done, outcome in _generate(pipes, batch, keep_going, deadline):
                    if isinstance(outcome, str):
                        results |= {r.index: RowResult(r.prompt, None, None, r.seed, outcome) for r in done}
                        continue
                    # 4. safety
                    images, flags = filter_images(outcome, pipes.safety_checker, request.params.safety_filter)
                    # 5. encode
                    for row, image, flag in zip(done, images, flags, strict=True):
                        results[row.index] = encode_result(row, image, flag, pipes.catalog, keep_going)

        # 6. frame: one output row per input row, in input order
        return output_frame([results[i] for i in range(len(request.rows))], with_errors=keep_going)

    def estimate(self, batches: list[list[RowSpec]]) -> float:
        """Seconds the batches take by the calibration at load: UNet steps × megapixels per row, plus per image."""
        per_step, per_image = self.cost
        total = 0.0
        for batch in batches:
            s = batch[0].settings
            steps = sum(stage_steps(s, self.pipelines.catalog.schedulers).values())
            total += len(batch) * s.width * s.height / 1e6 * (per_step * steps + per_image)
        return total

    def _deadline(self, batches: list[list[RowSpec]], arrived: float) -> float | None:
        """The monotonic time the request must end by (None: no limit); a 400 when the estimate does not fit."""
        limit = self.config.request_timeout_s
        if not limit or self.cost is None:
            return None
        estimate, left = self.estimate(batches), limit - (time.monotonic() - arrived)
        if estimate > left:
            raise MlflowException.invalid_parameter_value(
                f"The request would take about {estimate:.1f} s on this server (estimated from its calibration: "
                f"{self.cost[0]:.3f} s per UNet step per megapixel), over the {left:.1f} s left of its "
                f"{limit:g} s limit (request_timeout_s); send fewer rows, fewer steps or smaller images"
            )
        return arrived + limit


def encode_result(
    row: RowSpec, image: Image.Image, flag: bool | None, catalog: Catalog | None, keep_going: bool
) -> RowResult:
    """The output row of an image; parsing refused what the encoders cannot write, so a failure is unexpected."""
    p = row.params
    try:
        encoded = encode_output(image, p.output_format, p.output_quality, p.output_encoding, png_text(row, catalog))
        return RowResult(row.prompt, encoded, flag, row.seed)
    except Exception as e:
        message = f"encoding failed: {type(e).__name__}: {e}"
        if not keep_going:
            raise MlflowException(f"Row {row.index}: {message}", error_code=INTERNAL_ERROR) from e
        return RowResult(row.prompt, None, None, row.seed, message)


def _generate(
    pipes: Pipelines, batch: list[RowSpec], keep_going: bool, deadline: float | None = None
) -> list[tuple[list[RowSpec], list[Image.Image] | str]]:
    """(rows, images) pairs, or (rows, error message) for rows that failed alone. Past ``deadline`` the
    pipeline stops at its next step (diffusers' ``interrupt``) and the request ends with a 504."""

    def stop_late(stage: str, step: int, pipe: Any) -> None:
        if time.monotonic() > deadline:
            pipe._interrupt = True  # read by the denoising loop of every diffusers SDXL pipeline

    try:
        images = generate_batch(pipes, batch, stop_late if deadline else None)
        if deadline and time.monotonic() > deadline:
            raise MlflowException("The request passed its deadline (request_timeout_s)", DEADLINE_EXCEEDED)
        return [(batch, images)]
    except MlflowException:
        raise  # the deadline: no retry, nobody waits for these rows any more
    except Exception as e:
        if not keep_going:
            rows = ", ".join(str(r.index) for r in batch)
            raise MlflowException(
                f"Rows {rows}: generation failed: {type(e).__name__}: {e}", error_code=INTERNAL_ERROR
            ) from e
        if len(batch) == 1:
            return [(batch, f"generation failed: {type(e).__name__}: {e}")]
        return [pair for row in batch for pair in _generate(pipes, [row], keep_going, deadline)]


mlflow.models.set_model(SDXLModel())
