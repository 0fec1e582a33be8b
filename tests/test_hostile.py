"""Hostile input through the real loaded model (MLflow schema enforcement included): each request gets
its documented error, nothing is fetched or unpickled, and the process keeps serving."""

from __future__ import annotations

import base64
import http.server
import io
import logging
import shutil
import struct
import threading
import zlib

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from sdxl_tools.client import b64_to_image
from testkit.helpers import FAST, frame, pixels

CHEAP = {"num_inference_steps": 2, "height": 64, "width": 64, "refiner": "none"}


def encoded(fmt: str, size=(64, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def png_bomb(width: int, height: int) -> str:
    """A valid 1-bit PNG of ``width``×``height`` zeros: a few KB on disk, gigabytes once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def truncated_png() -> str:
    raw = base64.b64decode(encoded("PNG", (64, 64)))
    return base64.b64encode(raw[: len(raw) // 2]).decode()


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []  # noqa: RUF012 - shared on purpose: the test reads it

    def do_GET(self):
        self.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(base64.b64decode(encoded("PNG")))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    """A real HTTP server on 127.0.0.1 serving a valid PNG, recording every request it gets."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.requests
    server.shutdown()
    server.server_close()


FORMATS = "(PNG, JPEG, WEBP)"
# (case id, input frame, params, the message the user gets)
CASES = [
    ("bad base64", frame({"prompt": "a", "image": "not base64!"}), {}, "Row 0: 'image': not valid base64"),
    (
        "text, not an image",
        frame({"prompt": "a", "image": base64.b64encode(b"just some text").decode()}),
        {},
        f"Row 0: 'image': not an image in an accepted format {FORMATS}",
    ),
    ("GIF", frame({"prompt": "a", "image": encoded("GIF")}), {}, f"accepted format {FORMATS}"),
    ("BMP as data URI", frame({"prompt": "a", "image": "data:image/bmp;base64," + encoded("BMP")}), {}, FORMATS),
    ("1x1 image", frame({"prompt": "a", "image": encoded("PNG", (1, 1))}), {}, "Row 0: 'image' is 1×1; at least 64×64"),
    (
        "decompression bomb 20000x20000",
        frame({"prompt": "a", "image": png_bomb(20000, 20000)}),
        {},
        "Row 0: 'image': image header claims over 16777216 pixels (max_image_pixels); refused",
    ),
    (
        "decompression bomb 5000x5000",
        frame({"prompt": "a", "image": png_bomb(5000, 5000)}),
        {},
        "Row 0: 'image': image is 5000×5000 = 25000000 pixels, over the 16777216-pixel limit (max_image_pixels)",
    ),
    ("truncated PNG", frame({"prompt": "a", "image": truncated_png()}), {}, "Row 0: 'image': image data is corrupt"),
    (
        "100k-character prompt",
        frame({"prompt": "a" * 100_000}),
        {},
        "Row 0: 'prompt' has 100000 characters, over the 4000 limit (max_prompt_chars)",
    ),
    (
        "lone surrogate in prompt",
        pd.DataFrame({"prompt": pd.Series(["a \ud800 cat"], dtype=object)}),
        {},
        "Row 0: 'prompt' is not valid Unicode text (surrogates not allowed at position 2)",
    ),
    (
        "width 10^6 param",
        frame({"prompt": "a"}),
        {"width": 10**6},
        "Invalid param 'height'/'width' 1000000×64 is over the 4194304-pixel limit (max_pixels)",
    ),
    (
        "width 10^6 column",
        frame({"prompt": "ok"}, {"prompt": "a", "width": 10**6}),
        {},
        "Row 1: 'height'/'width' 1000000×64 is over the 4194304-pixel limit (max_pixels)",
    ),
    ("height not x8", frame({"prompt": "a"}), {"height": 100}, "width and height must be multiples of 8"),
    (
        "steps 10^4",
        frame({"prompt": "a"}),
        {"num_inference_steps": 10**4},
        "Invalid param 'num_inference_steps' 10000 is over the limit of 150 (max_steps)",
    ),
    (
        "negative seed",
        frame({"prompt": "a"}),
        {"seed": -5},
        "Invalid param 'seed': Input should be greater than or equal to -1 (got -5)",
    ),
    (
        "seed 10^30 column",
        frame({"prompt": "a", "seed": 10**30}),
        {},
        "Row 0: 'seed': Input should be less than or equal to 4294967295",
    ),
    (
        "NaN guidance",
        frame({"prompt": "a"}),
        {"guidance_scale": float("nan")},
        "Invalid param 'guidance_scale': Input should be a finite number (got nan)",
    ),
    (
        "inf guidance column",
        frame({"prompt": "a", "guidance_scale": float("inf")}),
        {},
        "Row 0: 'guidance_scale': Input should be a finite number (got inf)",
    ),
    ("strength 0", frame({"prompt": "a"}), {"strength": 0.0}, "Invalid param 'strength': Input should be greater"),
    (
        "1 step with the ensemble refiner",
        frame({"prompt": "a"}),
        {"num_inference_steps": 1, "on_error": "null"},
        "Invalid param 'refiner_ratio' 0.2 with 'num_inference_steps' 1 leaves the base no denoising step",
    ),
    (
        "WebP 16384 px wide",
        frame({"prompt": "a"}),
        {"output_format": "webp", "width": 16384},
        "Invalid param 'output_format' webp cannot hold a 16384×64 image: WEBP is limited to 16383 pixels a side",
    ),
    (
        "prompt weight 1e30",
        frame({"prompt": "a (cat:1" + "0" * 30 + ")"}),
        {},
        "Row 0: 'prompt': weight 1e+30 of 'cat' is outside [-10, 10]",
    ),
    (
        "unknown scheduler",
        frame({"prompt": "a"}),
        {"scheduler": "K_MAGIC"},
        "Invalid param 'scheduler': unknown scheduler 'K_MAGIC'; valid: default, DDIM, DDPM, PNDM, K_EULER",
    ),
    (
        "string for an int param",
        frame({"prompt": "a"}),
        {"num_inference_steps": "10"},
        "Failed to validate type and shape for 'num_inference_steps'",
    ),
    (
        "string for a bool param",
        frame({"prompt": "a"}),
        {"safety_filter": "nope"},
        "Failed to validate type and shape for 'safety_filter'",
    ),
    ("int prompt column", frame({"prompt": 5}), {}, "Incompatible input types for column prompt"),
    ("int image column", frame({"prompt": "a", "image": 5}), {}, "Incompatible input types for column image"),
    (
        "text seed column",
        frame({"prompt": "a", "seed": "x"}),
        {},
        "Row 0: 'seed': Input should be a valid integer, unable to parse string as an integer (got 'x')",
    ),
    (
        "fractional steps column",
        frame({"prompt": "a", "num_inference_steps": 2.5}),
        {},
        "Row 0: 'num_inference_steps': Input should be a valid integer, got a number with a fractional part",
    ),
    ("empty DataFrame", pd.DataFrame({"prompt": pd.Series([], dtype=str)}), {}, "The request has no rows"),
    ("no columns at all", pd.DataFrame(), {}, "Model is missing inputs ['prompt']"),
    ("missing prompt column", frame({"text": "a"}), {}, "Model is missing inputs ['prompt']"),
    ("null prompt", frame({"prompt": None}), {}, "Row 0: 'prompt' is required"),
    ("blank prompt", frame({"prompt": "   "}), {}, "Row 0: 'prompt' is empty"),
    (
        "list-valued prompt",
        frame({"prompt": ["a", "b"]}),
        {},
        "Row 0: 'prompt' must be a string, got list (pass a pandas DataFrame, one row per image)",
    ),
    (
        "10001 rows",
        pd.DataFrame({"prompt": ["a"] * 10_001}),
        {},
        "The request has 10001 rows, over the limit of 10000 (max_rows)",
    ),
]


@pytest.mark.parametrize(("model_input", "params", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_gets_its_documented_error_and_the_model_keeps_serving(model, model_input, params, message):
    with pytest.raises(MlflowException) as e:
        model.predict(model_input, params=FAST | params)
    assert message in str(e.value)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 in serving, never a 500

    ok = model.predict(frame({"prompt": "a cat", "seed": 1}), params=CHEAP)
    assert b64_to_image(ok["generated_image"][0]).size == (64, 64)


def test_an_image_url_is_refused_and_never_fetched(model, image_server):
    base_url, requests = image_server
    for url in (f"{base_url}/x.png", f"  {base_url.upper()}/x.png", f"ftp://127.0.0.1:{base_url.rsplit(':', 1)[1]}/x"):
        with pytest.raises(MlflowException, match=r"^Row 0: 'image': URLs are not fetched; send the image inline"):
            model.predict(frame({"prompt": "a", "image": url}), params=FAST)
    rows = frame({"prompt": "a", "image": f"{base_url}/y.png"}, {"prompt": "a", "seed": 1})
    out = model.predict(rows, params=CHEAP | {"on_error": "null", "strength": 0.5})  # image rows: 1 step
    assert out["error"][0].startswith("'image': URLs are not fetched") and out["generated_image"][1]
    assert requests == []  # the server saw nothing


def test_unknown_params_are_dropped_by_mlflow_and_refused_by_the_model_itself(model, caplog):
    """MLflow's pyfunc layer drops params outside the ParamSchema with a warning before the model sees
    them; the model, called directly (a custom wrapper, tests), refuses them by name."""
    with caplog.at_level(logging.WARNING):
        out = model.predict(frame({"prompt": "a", "seed": 1}), params=CHEAP | {"num_images": 4})
    assert len(out) == 1
    assert "num_images" in caplog.text
    with pytest.raises(MlflowException, match=r"^Invalid param 'num_images': unknown \(got 4\)"):
        model.unwrap_python_model().predict(None, frame({"prompt": "a"}), CHEAP | {"num_images": 4})


LONG = " ".join(["a yellow cat sitting on a green park bench"] * 12)  # ~100 tokens


def test_prompts_over_77_clip_tokens_warn_once_per_row_and_field(model, caplog):
    rows = frame(
        {"prompt": LONG, "seed": 1},
        {"prompt": "a cat", "seed": 1},
        {"prompt": "a cat", "negative_prompt": LONG, "seed": 1},
        {"prompt": LONG + " and a red hat on a blue dog", "seed": 1},
    )
    with caplog.at_level(logging.WARNING, logger="model_pkg.prompts"):
        out = model.predict(rows, params=CHEAP | {"prompt_weighting": "off"})  # plain CLIP: truncates
        model.predict(rows.iloc[[0]], params=CHEAP)  # default auto: chunked embeddings, nothing cut
    warned = [r.getMessage() for r in caplog.records if r.name == "model_pkg.prompts"]
    assert [m.split(":")[0] for m in warned] == ["Row 0", "Row 2", "Row 3"]
    assert warned[0].startswith("Row 0: 'prompt' has ") and "only the first 77 are used" in warned[0]
    assert warned[1].startswith("Row 2: 'negative_prompt' has ")
    # CLIP sees the same 77 tokens, so words past the window change nothing (batch rows may differ by 1 level)
    assert np.abs(pixels(out["generated_image"][0]) - pixels(out["generated_image"][3])).max() <= 1
    assert np.abs(pixels(out["generated_image"][0]) - pixels(out["generated_image"][1])).mean() > 1


def test_a_pickled_weight_file_in_the_artifact_is_never_unpickled(artifact, tmp_path):
    """An artifact whose safetensors weights were swapped for a pickle fails to load, and the pickle's
    code never runs: loading passes use_safetensors=True."""
    tampered = tmp_path / "model"
    shutil.copytree(artifact, tampered)
    marker = tmp_path / "pwned"
    unet = tampered / "artifacts" / "sdxl" / "base" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(_Payload(str(marker)), unet / "diffusion_pytorch_model.bin")

    with pytest.raises(Exception, match=r"(?i)safetensors") as e:
        mlflow.pyfunc.load_model(str(tampered))
    assert not marker.exists(), "the pickle was executed"
    assert "diffusion_pytorch_model" in str(e.value) or "unet" in str(e.value)


class _Payload:
    """Unpickling this writes a marker file: proof of whether anyone unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
