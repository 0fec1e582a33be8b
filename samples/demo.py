#!/usr/bin/env python
"""The end-to-end demo (`make demo`): build → log → register → load by models:/ URI → score → PNGs.

Uses tiny random-weight SDXL pipelines and one tiny random ControlNet, ``edges`` (no download), and an
embedded sqlite MLflow store in the
project folder (``mlflow.db`` + ``mlruns/``): no server to start. Set MLFLOW_TRACKING_URI to use
another store. Images come out as noise-like pictures: the weights are random; the plumbing is real.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from sdxl_tools.client import (  # noqa: E402
    azure_request_to_frame,
    b64_to_image,
    to_azure_response,
)
from sdxl_tools.random_weights import write_tiny_controlnet, write_tiny_sdxl  # noqa: E402
from sdxl_tools.registry import register, use_experiment  # noqa: E402
from sdxl_tools.staging import stage_components  # noqa: E402

MODEL_NAME = "sdxl-tiny"
OUTPUT = ROOT / "demo_output"
PARAMS = {"num_inference_steps": 20, "height": 128, "width": 128, "seed": 42}


def control_map() -> str:
    """A control map for the ControlNet row (white outlines on black, as an edge map is), base64 PNG."""
    image = Image.new("RGB", (128, 128), "black")
    draw = ImageDraw.Draw(image)
    draw.ellipse((24, 20, 104, 100), outline="white", width=3)
    draw.rectangle((40, 96, 88, 120), outline="white", width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    start = time.perf_counter()
    use_experiment("sdxl-demo")  # MLFLOW_TRACKING_URI, else ./mlflow.db + ./mlruns

    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_sdxl(Path(tmp) / "src")
        edges = write_tiny_controlnet(Path(tmp) / "src" / "edges", tiny.base)
        staged = stage_components(tiny.base, tiny.refiner, Path(tmp) / "sdxl", controlnets={"edges": edges})
        version = register(staged, MODEL_NAME, tags={"build": "tiny random weights (seed 0)"}).version
    uri = f"models:/{MODEL_NAME}/{version}"
    print(f"registered {MODEL_NAME} version {version} in {mlflow.get_tracking_uri()}")

    model = mlflow.pyfunc.load_model(uri)
    azure_frame, _ = azure_request_to_frame(json.loads((ROOT / "samples" / "azure_request.json").read_text()))
    text_rows = pd.DataFrame(
        [
            {"prompt": "a cat with a hat, photo"},
            {"prompt": "a dog on a park bench, art"},
            # the base stage conditioned on the control map by the packaged ControlNet (the refiner runs as usual)
            {"prompt": "a hot air balloon, photo", "control_image": control_map(), "controlnet": "edges"},
        ]
    )
    request = pd.concat([azure_frame, text_rows], ignore_index=True)
    result = model.predict(request, params=PARAMS)

    OUTPUT.mkdir(exist_ok=True)
    table = []
    for i, row in result.iterrows():
        image = b64_to_image(row["generated_image"])
        path = OUTPUT / f"{i}_{row['seed']}.png"
        image.save(path)
        mode = "image-to-image" if isinstance(request["image"][i], str) else "text-to-image"
        if isinstance(request["control_image"][i], str):
            mode += " + ControlNet"
        table.append(
            {
                "prompt": row["prompt"][:44],
                "mode": mode,
                "seed": row["seed"],
                "nsfw": row["nsfw_content_detected"],
                "size": f"{image.width}x{image.height}",
                "file": str(path.relative_to(ROOT)),
            }
        )
    print(f"\nscored {len(result)} rows from {uri} with params {PARAMS}:\n")
    print(pd.DataFrame(table).to_string(index=False))
    azure = to_azure_response(result.iloc[:2])
    print(f"\nAzure response shape (SDXL model card): {list(azure[0])} × {len(azure)}")
    print(f"done in {time.perf_counter() - start:.1f} s; images in {OUTPUT.relative_to(ROOT)}/")
    print(f"\n{MODEL_NAME} version {version} has no alias. Next: README.md, 'Your own served model in five minutes':")
    print("  source .venv/bin/activate && sdxl-pyfunc build --tiny --output sdxl-model")


if __name__ == "__main__":
    main()
