"""Model configuration: the limits and runtime choices fixed when the artifact is built.

Stored as MLflow ``model_config`` in the MLmodel file (``build.py build --config key=value``),
read back in ``load_context``; ``load_model(uri, model_config={...})`` and ``spark_udf(...,
model_config={...})`` override single keys at load time. Device and dtype can also be chosen by the
environment of the serving process (``SDXL_DEVICE``, ``SDXL_DTYPE``), which wins over the file.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ModelConfig(BaseModel):
    """Safe defaults for a shared endpoint; raise them for a trusted batch job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: float16 on CUDA, bfloat16 on a CPU with native bfloat16, float32 elsewhere"
    )
    torch_threads: int = Field(
        0, ge=0, description="CPU threads for torch; 0 leaves torch's default. Pin it for bit-identical CPU output"
    )
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, description="largest width × height of a generated image")
    max_steps: int = Field(150, ge=1, description="largest num_inference_steps / num_inference_steps_refiner")
    max_rows: int = Field(10_000, ge=1, description="largest number of rows in one predict call")
    max_batch_size: int = Field(8, ge=1, description="most rows sent to the pipeline in one call")
    max_prompt_chars: int = Field(4_000, ge=1, description="longest prompt / negative_prompt, in characters")
    max_request_prompt_chars: int = Field(
        100_000,
        ge=1,
        description="characters of all prompts and negative prompts of one request: bounds its parsing time "
        "(tokenizing, prompt weighting) to about a second",
    )
    max_image_bytes: int = Field(16 * 2**20, ge=1024, description="largest decoded (not base64) input image file")
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, description="largest input image, checked before decoding")
    max_request_image_pixels: int = Field(
        16 * 2048 * 2048,
        ge=64 * 64,
        description="decoded pixels of all input images of one request, held until it ends (~256 MiB as RGB)",
    )
    image_formats: tuple[str, ...] = Field(
        ("PNG", "JPEG", "WEBP"), min_length=1, description="accepted input image formats (Pillow format names)"
    )

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        """Upper-case Pillow names; an unknown name would make every image fail to open."""
        from PIL import Image

        Image.init()
        formats = tuple(f.upper() for f in formats)
        unknown = [f for f in formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image format(s) {unknown}; Pillow opens {sorted(Image.OPEN)}")
        return formats

    request_timeout_s: float | None = Field(
        None,
        ge=0,
        description="how long one request may take, from its arrival: a request estimated to take longer is "
        "refused up front (400), one running past it stops between denoising steps (504); 0: no deadline; "
        "null (default): the serving platform's MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT where it is set, else none",
    )
    verify_weights: Literal["headers", "full"] = Field(
        "headers", description="at load: file sizes + safetensors headers (ms), or full: every file's sha256"
    )
    # Speed and memory (applied once at load: pipelines.apply_options); the defaults are plain diffusers.
    attention: Literal["sdpa", "classic"] = Field("sdpa", description="PyTorch scaled_dot_product_attention or not")
    channels_last: bool = Field(False, description="UNets and VAE in channels_last memory format")
    compile: Literal["none", "unet", "unet+vae"] = Field("none", description="torch.compile these at load")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field("default", description="torch.compile")
    warmup_size: int = Field(
        1024, ge=0, description="with compile: one warm-up generation at this square size at load; 0 skips it"
    )
    vae_slicing: bool = Field(False, description="decode a batch one image at a time (less memory)")
    vae_tiling: bool = Field(False, description="decode large images in tiles (less memory)")
    cpu_offload: Literal["none", "model"] = Field(
        "none", description="model: keep modules on the CPU and move each to the device while it runs (small GPUs)"
    )


def load_model_config(raw: dict[str, Any] | None, environ: dict[str, str] | None = None) -> ModelConfig:
    """Validate the MLflow ``model_config`` dict (plus ``SDXL_DEVICE``/``SDXL_DTYPE`` overrides)."""
    environ = os.environ if environ is None else environ
    values = dict(raw or {})
    for key in ("device", "dtype"):
        if environ.get(f"SDXL_{key.upper()}"):
            values[key] = environ[f"SDXL_{key.upper()}"]
    if values.get("request_timeout_s") is None and environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"):
        values["request_timeout_s"] = environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"]  # `mlflow models serve -t`
    try:
        return ModelConfig.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "model_config"
        raise MlflowException.invalid_parameter_value(f"Invalid model_config '{field}': {first['msg']}") from e
