#!/usr/bin/env python
"""Build the SDXL pyfunc artifact.

python build.py build --base DIR --refiner DIR --output PATH     # real SDXL 1.0 folders
python build.py build --tiny --output PATH                       # tiny random weights (demo, tests)
python build.py build --tiny --log [--name sdxl]                 # log to MLFLOW_TRACKING_URI instead
python build.py template                                         # re-render MLmodel_template/signature.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from model_pkg.packaging import TEMPLATE, VARIANTS, BuildError, log_artifact, save_artifact, stage_components


def _config(pairs: list[str]) -> dict:
    """``key=value`` pairs (values parsed as YAML scalars: 8 → int, true → bool)."""
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--config expects key=value, got {pair!r}")
        config[key] = yaml.safe_load(value)
    return config


def _loras(args: argparse.Namespace, base: str | Path, tmp: Path) -> dict[str, Path]:
    """``--lora NAME=PATH`` pairs, plus ``--tiny-lora NAME`` random adapters for the tiny base."""
    from model_pkg.lora import LoraError, parse_build_arg

    try:
        loras = dict(parse_build_arg(pair) for pair in args.lora)
    except LoraError as e:
        raise SystemExit(str(e)) from None
    if args.tiny_lora and not args.tiny:
        raise SystemExit("--tiny-lora needs --tiny")
    for i, name in enumerate(args.tiny_lora):
        from model_pkg.tiny import write_tiny_lora

        loras[name] = write_tiny_lora(tmp / "tiny-loras" / name, base, seed=i + 1)
    return loras


def cmd_build(args: argparse.Namespace) -> None:
    if args.tiny == bool(args.base or args.refiner):
        raise SystemExit("give either --tiny or both --base and --refiner")
    if not args.tiny and not (args.base and args.refiner):
        raise SystemExit("--base and --refiner are both required")
    if not (args.output or args.log):
        raise SystemExit("give --output PATH or --log")
    with tempfile.TemporaryDirectory(prefix="sdxl-build-") as tmp:
        base, refiner, checker = args.base, args.refiner, args.safety_checker
        if args.tiny:
            from model_pkg.tiny import write_tiny_sdxl

            tiny = write_tiny_sdxl(Path(tmp) / "src", seed=args.seed, safety_checker=args.tiny_safety_checker)
            base, refiner, checker = tiny.base, tiny.refiner, checker or tiny.safety_checker
        loras = _loras(args, base, Path(tmp))
        staged = stage_components(
            Path(base), Path(refiner), Path(tmp) / "sdxl", checker, variant=args.variant, loras=loras
        )
        config = _config(args.config)
        if args.log:
            import mlflow

            with mlflow.start_run(run_name=args.name) as run:
                info = log_artifact(staged, name=args.name, model_config=config)
            print(f"logged run {run.info.run_id}; model URI: {info.model_uri}")
        else:
            save_artifact(staged, Path(args.output), model_config=config)
            print(f"saved model to {args.output}; shared components: {', '.join(staged.manifest['shared']) or 'none'}")


def cmd_template(args: argparse.Namespace) -> None:
    from model_pkg.contract import signature

    path = TEMPLATE / "signature.json"
    path.write_text(json.dumps(signature().to_dict(), indent=2) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="package SDXL base + refiner as an MLflow pyfunc model")
    build.add_argument("--base", help="stable-diffusion-xl-base-1.0 folder (diffusers format)")
    build.add_argument("--refiner", help="stable-diffusion-xl-refiner-1.0 folder (diffusers format)")
    build.add_argument("--tiny", action="store_true", help="build from tiny random-weight pipelines (no download)")
    build.add_argument("--seed", type=int, default=0, help="--tiny: weight seed")
    build.add_argument("--safety-checker", help="folder with a StableDiffusionSafetyChecker + CLIP image processor")
    build.add_argument(
        "--tiny-safety-checker", choices=["never", "always"], help="--tiny: add a tiny checker that never/always flags"
    )
    build.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="package a LoRA adapter (a .safetensors file, or a folder with one); repeatable",
    )
    build.add_argument("--tiny-lora", action="append", default=[], metavar="NAME", help="--tiny: a random LoRA")
    build.add_argument("--variant", choices=VARIANTS, default="all", help="which weight files to package")
    build.add_argument(
        "--config", action="append", default=[], metavar="KEY=VALUE", help="model_config (limits, device)"
    )
    build.add_argument("--output", help="model directory to write")
    build.add_argument("--log", action="store_true", help="log to the active MLflow tracking URI instead")
    build.add_argument("--name", default="sdxl", help="--log: logged model name")
    build.set_defaults(func=cmd_build)

    template = sub.add_parser("template", help="re-render MLmodel_template/signature.json from the code")
    template.set_defaults(func=cmd_template)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BuildError as e:
        sys.exit(f"build failed: {e}")


if __name__ == "__main__":
    main()
