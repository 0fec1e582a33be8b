"""Device choice: ``auto`` inside a Spark task loads onto the task's own GPU (the pure decision, every case)."""

from __future__ import annotations

import pytest

from model_pkg.pipelines import decide_device, task_gpus

CASES = [
    # setting, CUDA devices, task GPUs, CUDA_VISIBLE_DEVICES → device, start of the reason
    ("cpu", 4, ["2"], None, "cpu", "configured"),
    ("cuda:3", 4, ["1"], None, "cuda:3", "configured"),
    ("auto", 0, [], None, "cpu", "no CUDA device"),
    ("auto", 0, ["1"], None, "cpu", "no CUDA device (the Spark task was assigned GPU 1)"),
    ("auto", 2, [], None, "cuda", "CUDA available"),  # outside Spark: the current device, as before
    ("auto", 4, ["0"], None, "cuda:0", "Spark task GPU 0"),
    ("auto", 4, ["3"], None, "cuda:3", "Spark task GPU 3"),
    ("auto", 4, ["2", "3"], None, "cuda:2", "Spark task GPU 2"),  # two GPUs per task: the first
    ("auto", 2, ["6"], "4,6", "cuda:1", "Spark task GPU 6 (position in CUDA_VISIBLE_DEVICES=4,6)"),
    ("auto", 2, ["4"], " 4, 6", "cuda:0", "Spark task GPU 4 (position"),
    ("auto", 1, ["GPU-ab12"], "GPU-ab12", "cuda:0", "Spark task GPU GPU-ab12 (position"),  # UUIDs
    ("auto", 2, ["5"], "4,6", "cuda", "Spark task GPU 5 is not one of the 2 visible CUDA devices"),
    ("auto", 2, ["GPU-ab12"], None, "cuda", "Spark task GPU GPU-ab12 is not one of"),
    ("auto", 2, ["3"], None, "cuda", "Spark task GPU 3 is not one of the 2"),
]


@pytest.mark.parametrize(("setting", "count", "gpus", "visible", "device", "why"), CASES)
def test_decide_device(setting, count, gpus, visible, device, why):
    chosen, reason = decide_device(setting, count, gpus, visible)
    assert chosen == device
    assert reason.startswith(why), reason


def test_no_spark_task_no_gpus():
    assert task_gpus() == []  # pyspark may be imported by other tests: still no task in this process
