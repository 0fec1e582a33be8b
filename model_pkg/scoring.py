"""Scoring validated rows: generate in batches, check safety, encode; one result per input row.

With ``on_error="null"`` a batch that fails is retried row by row, so one bad row costs only its
own image; with ``"raise"`` the failure ends the request with the rows it concerned.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from PIL import Image

from model_pkg.contract import RowResult
from model_pkg.generation import generate_batch, plan_batches
from model_pkg.outputs import encode_output
from model_pkg.pipelines import Pipelines
from model_pkg.request import RowError, RowSpec
from model_pkg.safety import filter_images


def _generate(
    pipes: Pipelines, batch: list[RowSpec], keep_going: bool
) -> list[tuple[list[RowSpec], list[Image.Image] | str]]:
    """(rows, images) pairs, or (rows, error message) for rows that failed alone."""
    try:
        return [(batch, generate_batch(pipes, batch))]
    except Exception as e:
        if not keep_going:
            rows = ", ".join(str(r.index) for r in batch)
            raise MlflowException(
                f"Rows {rows}: generation failed: {type(e).__name__}: {e}", error_code=INTERNAL_ERROR
            ) from e
        if len(batch) == 1:
            return [(batch, f"generation failed: {type(e).__name__}: {e}")]
        return [pair for row in batch for pair in _generate(pipes, [row], keep_going)]


def score(pipes: Pipelines, rows: list[RowSpec | RowError], max_batch_size: int, keep_going: bool) -> list[RowResult]:
    """One :class:`RowResult` per row, in row order."""
    results = {r.row: RowResult(r.prompt, None, None, None, r.reason) for r in rows if isinstance(r, RowError)}
    valid = [r for r in rows if isinstance(r, RowSpec)]
    for batch in plan_batches(valid, max_batch_size):
        for done, outcome in _generate(pipes, batch, keep_going):
            if isinstance(outcome, str):
                results.update({r.index: RowResult(r.prompt, None, None, r.seed, outcome) for r in done})
                continue
            settings = done[0].settings
            images, flags = filter_images(outcome, pipes.safety_checker, settings.safety_filter)
            for row, image, flag in zip(done, images, flags, strict=True):
                results[row.index] = RowResult(row.prompt, encode_output(image, row, pipes.catalog), flag, row.seed)
    return [results[i] for i in range(len(rows))]
