"""ControlNet overhead and cost, measured side by side in one run on the tiny artifact with a tiny ControlNet.

1. pyfunc ``predict`` of a ControlNet row / raw diffusers SDXL ControlNet pipeline + PNG encoding, identical
   work (same weights, seed, control image, steps), for a text row (refiner ``none`` and ``ensemble``) and
   an image-to-image row (goal ≤ 1.05). Ours also parses the request, decodes the base64 control image,
   resizes it (a no-op at the output size), builds the ControlNet pipeline over the loaded modules and
   writes PNG metadata; raw diffusers gets the decoded PIL image and loads its pipelines once.
2. the cost of a ControlNet row / a plain row of the same size and steps, both through ``predict``.

Runs are interleaved (ours, reference, ours, ...) and medians compared (see bench_core); the pixels of
each pair are compared once. The table replaces the ControlNet section of ``benchmarks/RESULTS.md``
(``--no-write``: print only).

  python -m benchmarks.bench_controlnet [--repeats 7] [--size 128] [--steps 20] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from benchmarks.bench_core import Ratio, environment, interleaved, model_dtype, write_section  # noqa: E402

PROMPT, SEED, GUIDANCE = "a cat with a hat", 1, 5.0  # 5.0: the artifact's default guidance_scale


def png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def run(repeats: int = 7, size: int = 128, steps: int = 20) -> tuple[list[Ratio], dict[str, bool]]:
    """The figures, and for each predict / raw pair whether both made the same pixels."""
    import mlflow
    import numpy as np
    import pandas as pd
    import torch
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )
    from PIL import Image

    from model_pkg.images import encode_image
    from sdxl_tools.artifact import save_artifact
    from sdxl_tools.client import b64_to_image
    from sdxl_tools.random_weights import write_tiny_controlnet, write_tiny_sdxl
    from sdxl_tools.staging import stage_components

    control = Image.new("RGB", (size, size), (0, 0, 0))  # a white box on black: a simple control map
    control.paste((250, 250, 250), (size // 8, size // 4, 5 * size // 8, 7 * size // 8))
    start = Image.new("RGB", (size, size), (30, 90, 160))
    start.paste((200, 40, 40), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    results: list[Ratio] = []
    same: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_sdxl(Path(tmp) / "src")
        net_dir = write_tiny_controlnet(Path(tmp) / "src" / "edges", tiny.base)
        staged = stage_components(tiny.base, tiny.refiner, Path(tmp) / "sdxl", controlnets={"edges": net_dir})
        model = mlflow.pyfunc.load_model(str(save_artifact(staged, Path(tmp) / "m")))

        dtype = model_dtype()
        net = ControlNetModel.from_pretrained(net_dir, dtype=dtype)
        text = StableDiffusionXLControlNetPipeline.from_pretrained(tiny.base, controlnet=net, dtype=dtype)
        # the same modules; from_pipe casts them to its dtype (float32 unless told): give it theirs
        img2img = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(text, dtype=dtype)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            tiny.refiner, text_encoder_2=text.text_encoder_2, vae=text.vae, dtype=dtype
        )
        for pipe in (text, img2img, refiner):
            pipe.set_progress_bar_config(disable=True)
        assert {text.unet.dtype, text.vae.dtype, net.dtype, refiner.unet.dtype} == {dtype}

        args = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE)

        def raw(kind: str) -> str:
            g = torch.Generator().manual_seed(SEED)
            if kind == "img2img":
                out = img2img(
                    **args, image=start, control_image=control, controlnet_conditioning_scale=1.0, strength=0.3,
                    generator=g,
                ).images  # fmt: skip
            elif kind == "none":
                out = text(**args, image=control, generator=g).images
            else:  # ensemble: control on the base stage, the refiner as without ControlNet
                latents = text(**args, image=control, denoising_end=0.8, output_type="latent", generator=g).images
                out = refiner(**args, image=latents, denoising_start=0.8, generator=g).images
            return encode_image(out[0])

        plain = pd.DataFrame({"prompt": [PROMPT], "seed": [SEED]})
        controlled = plain.assign(control_image=[png(control)])
        rows = {"none": controlled, "ensemble": controlled, "img2img": controlled.assign(image=[png(start)])}
        base = {"num_inference_steps": steps, "height": size, "width": size}
        for kind, frame in rows.items():
            params = base | {"refiner": "ensemble" if kind == "ensemble" else "none", "controlnet": "edges"}
            ours = model.predict(frame, params=params)["generated_image"][0]
            same[kind] = bool(
                np.array_equal(np.asarray(b64_to_image(ours)), np.asarray(b64_to_image(raw(kind))))
            )  # fmt: skip
            o, r = interleaved(lambda f=frame, p=params: model.predict(f, params=p), lambda k=kind: raw(k), repeats)
            label = "image-to-image" if kind == "img2img" else f"text, {kind}"
            results.append(Ratio(f"1. ControlNet predict / raw + PNG, {label}", o, r, "ms", "<= 1.05"))

        for mode in ("none", "ensemble"):
            params = base | {"refiner": mode}
            o, r = interleaved(
                lambda p=params: model.predict(controlled, params=p | {"controlnet": "edges"}),
                lambda p=params: model.predict(plain, params=p),
                repeats,
            )
            results.append(Ratio(f"2. ControlNet row / plain row, refiner={mode}", o, r, "ms", "none (a cost)"))
    return results, same


def table(results: list[Ratio], same: dict[str, bool], repeats: int, size: int, steps: int) -> list[str]:
    lines = [
        f"tiny SDXL + 1 tiny ControlNet, 1 row, {size}×{size}, {steps} steps; medians of {repeats} interleaved pairs",
        *(r.line() for r in results),
        "pixels equal to raw diffusers: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--torch-threads", type=int, default=0, help="pin torch's threads (0: its default)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    results, same = run(args.repeats, args.size, args.steps)
    lines = table(results, same, args.repeats, args.size, args.steps)
    print("\n".join(lines))
    if not args.no_write:
        body = [
            "## ControlNet: pyfunc predict vs raw diffusers SDXL ControlNet, and a ControlNet row vs a plain row",
            "",
            f"Written by `python -m benchmarks.bench_controlnet` ({environment()}).",
            "",
            "```",
            *lines,
            "```",
        ]
        print(f"wrote the ControlNet section of {write_section('bench_controlnet', body)}")


if __name__ == "__main__":
    main()
