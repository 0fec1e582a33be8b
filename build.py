#!/usr/bin/env python
"""Build the SDXL pyfunc artifact.

python build.py build --base DIR --refiner DIR --output PATH     # real SDXL 1.0 folders
python build.py build --tiny --output PATH                       # tiny random weights (demo, tests)
python build.py build --tiny --log [--name sdxl]                 # log to MLFLOW_TRACKING_URI instead
python build.py template                                         # re-render MLmodel_template/signature.json

python build.py register --tiny [--name sdxl]                    # log + register a new version
python build.py promote sdxl --version 2 --to staging            # gate, then move models:/sdxl@staging
python build.py promote sdxl --to production --rollback          # back to the previous holder
python build.py copy sdxl --version 2 --to sdxl-prod             # copy_model_version to another name
(registry commands use MLFLOW_TRACKING_URI, else ./mlflow.db + ./mlruns)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException

from sdxl_tools import TEMPLATE
from sdxl_tools.artifact import log_artifact, save_artifact
from sdxl_tools.staging import VARIANTS, BuildError, Staged, stage_components


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
    from sdxl_tools.staging import LoraError, parse_build_arg

    try:
        loras = dict(parse_build_arg(pair) for pair in args.lora)
    except LoraError as e:
        raise SystemExit(str(e)) from None
    if args.tiny_lora and not args.tiny:
        raise SystemExit("--tiny-lora needs --tiny")
    for i, name in enumerate(args.tiny_lora):
        from sdxl_tools.random_weights import write_tiny_lora

        loras[name] = write_tiny_lora(tmp / "tiny-loras" / name, base, seed=i + 1)
    return loras


def _controlnets(args: argparse.Namespace, base: str | Path, tmp: Path) -> dict[str, Path]:
    """``--controlnet NAME=DIR`` pairs, plus ``--tiny-controlnet NAME`` random ControlNets for the tiny base."""
    from sdxl_tools.staging import BuildError, parse_build_arg

    try:
        controlnets = dict(parse_build_arg(pair, "--controlnet") for pair in args.controlnet)
    except BuildError as e:
        raise SystemExit(str(e)) from None
    if args.tiny_controlnet and not args.tiny:
        raise SystemExit("--tiny-controlnet needs --tiny")
    for i, name in enumerate(args.tiny_controlnet):
        from sdxl_tools.random_weights import write_tiny_controlnet

        controlnets[name] = write_tiny_controlnet(tmp / "src" / "controlnets" / name, base, seed=i + 1)
    return controlnets


def _stage(args: argparse.Namespace, tmp: str) -> Staged:
    """Stage the components the source flags name (``--tiny``, ``--random-fullsize`` or ``--base``/``--refiner``)."""
    synthetic = args.tiny or args.random_fullsize
    if synthetic == bool(args.base or args.refiner) or (args.tiny and args.random_fullsize):
        raise SystemExit("give one of --tiny, --random-fullsize, or both --base and --refiner")
    if not synthetic and not (args.base and args.refiner):
        raise SystemExit("--base and --refiner are both required")
    base, refiner, checker = args.base, args.refiner, args.safety_checker
    sources: dict[str, str] = {}  # provenance of what is not a user's folder
    if args.tiny:
        from sdxl_tools.random_weights import write_tiny_sdxl

        tiny = write_tiny_sdxl(Path(tmp) / "src", seed=args.seed, safety_checker=args.tiny_safety_checker)
        base, refiner, checker = tiny.base, tiny.refiner, checker or tiny.safety_checker
        sources = {role: f"random tiny weights (seed {args.seed})" for role in ("base", "refiner")}
        if args.tiny_safety_checker and not args.safety_checker:
            sources["safety_checker"] = f"random tiny checker that flags {args.tiny_safety_checker}"
    elif args.random_fullsize:
        from sdxl_tools.random_weights import write_fullsize_sdxl

        generated = write_fullsize_sdxl(Path(tmp) / "src", seed=args.seed)
        base, refiner = generated.base, generated.refiner
        sources = {role: f"random full-size SDXL 1.0 weights (seed {args.seed})" for role in ("base", "refiner")}
    loras = _loras(args, base, Path(tmp))
    staged = stage_components(
        Path(base),
        Path(refiner),
        Path(tmp) / "sdxl",
        checker,
        variant=args.variant,
        vae=args.vae,
        loras=loras,
        sources=sources,
        controlnets=_controlnets(args, base, Path(tmp)),
    )
    # generated weights: drop their source names, so the staged files are the only copy and saving
    # moves them into the model instead of writing them again
    shutil.rmtree(Path(tmp) / "src", ignore_errors=True)
    shutil.rmtree(Path(tmp) / "tiny-loras", ignore_errors=True)
    return staged


def _work_dir(output: str | None, prefix: str) -> tempfile.TemporaryDirectory:
    """Staging folder: next to the output (one filesystem: moving a staged file is a rename), else $TMPDIR."""
    parent = Path(output).resolve().parent if output else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=parent)


def cmd_build(args: argparse.Namespace) -> None:
    if not (args.output or args.log):
        raise SystemExit("give --output PATH or --log")
    with _work_dir(None if args.log else args.output, ".sdxl-build-") as tmp:
        staged = _stage(args, tmp)
        config = _config(args.config)
        if args.log:
            import mlflow

            with mlflow.start_run(run_name=args.name) as run:
                info = log_artifact(staged, name=args.name, model_config=config)
            print(f"logged run {run.info.run_id}; model URI: {info.model_uri}")
        else:
            save_artifact(staged, Path(args.output), model_config=config, move_weights=True)
            print(f"saved model to {args.output}; shared components: {', '.join(staged.manifest['shared']) or 'none'}")


def cmd_register(args: argparse.Namespace) -> None:
    from sdxl_tools import registry

    with tempfile.TemporaryDirectory(prefix="sdxl-register-") as tmp:
        staged = _stage(args, tmp)
        registry.use_experiment(args.experiment)
        tags = {"build": f"tiny random weights (seed {args.seed})"} if args.tiny else {}
        if args.random_fullsize:
            tags = {"build": f"full-size random weights (seed {args.seed})"}
        mv = registry.register(
            staged, args.name, model_config=_config(args.config), tags=tags, description=args.description
        )
    print(f"registered {args.name} version {mv.version} in {registry.tracking_uri()}")
    print(f"model URI: models:/{args.name}/{mv.version}  (source {mv.source})")
    for key in sorted(k for k in mv.tags if k.startswith(("sha256.", "version."))):
        print(f"  {key} = {mv.tags[key]}")


def cmd_promote(args: argparse.Namespace) -> None:
    from sdxl_tools import registry

    if args.rollback == (args.version is not None):
        raise SystemExit("give --version V, or --rollback (which takes no version: the previous holder comes back)")
    registry.use_store()
    if args.rollback:
        promotion = registry.rollback(args.name, args.to, use_stages=args.use_stages)
        print(f"rolled back: {promotion}")
        return
    promotion = registry.promote(args.name, args.version, args.to, use_stages=args.use_stages, dry_run=args.dry_run)
    print(promotion.report)
    print("dry run: nothing moved" if args.dry_run else f"promoted: {promotion}")


def cmd_copy(args: argparse.Namespace) -> None:
    from sdxl_tools import registry

    if (args.version is None) == (args.alias is None):
        raise SystemExit("give --version V or --alias ALIAS")
    registry.use_store()
    ref = args.version if args.version is not None else f"@{args.alias}"
    copied = registry.copy_version(args.name, ref, args.to)
    source = f"models:/{args.name}/{ref}" if args.version is not None else f"models:/{args.name}{ref}"
    print(f"copied {source} to models:/{args.to}/{copied.version} ({copied.tags['copied_from']})")


def cmd_template(args: argparse.Namespace) -> None:
    from sdxl_tools.signature import signature

    path = TEMPLATE / "signature.json"
    path.write_text(json.dumps(signature().to_dict(), indent=2) + "\n")
    print(f"wrote {path}")


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="stable-diffusion-xl-base-1.0 folder (diffusers format)")
    parser.add_argument("--refiner", help="stable-diffusion-xl-refiner-1.0 folder (diffusers format)")
    parser.add_argument("--tiny", action="store_true", help="build from tiny random-weight pipelines (no download)")
    parser.add_argument(
        "--random-fullsize", action="store_true", help="published SDXL 1.0 sizes, random fp16 weights (GPU timing)"
    )
    parser.add_argument("--seed", type=int, default=0, help="--tiny / --random-fullsize: weight seed")
    parser.add_argument("--safety-checker", help="folder with a StableDiffusionSafetyChecker + CLIP image processor")
    parser.add_argument(
        "--tiny-safety-checker", choices=["never", "always"], help="--tiny: add a tiny checker that never/always flags"
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="package a LoRA adapter (a .safetensors file, or a folder with one); repeatable",
    )
    parser.add_argument("--tiny-lora", action="append", default=[], metavar="NAME", help="--tiny: a random LoRA")
    parser.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="package an SDXL ControlNet (a diffusers ControlNetModel folder: config + safetensors); repeatable",
    )
    parser.add_argument(
        "--tiny-controlnet", action="append", default=[], metavar="NAME", help="--tiny: a random ControlNet"
    )
    parser.add_argument("--vae", help="VAE folder replacing base's and refiner's (e.g. an fp16-fixed SDXL VAE)")
    parser.add_argument("--variant", choices=VARIANTS, default="all", help="which weight files to package")
    parser.add_argument(
        "--config", action="append", default=[], metavar="KEY=VALUE", help="model_config (limits, device)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="package SDXL base + refiner as an MLflow pyfunc model")
    _add_source_args(build)
    build.add_argument("--output", help="model directory to write")
    build.add_argument("--log", action="store_true", help="log to the active MLflow tracking URI instead")
    build.add_argument("--name", default="sdxl", help="--log: logged model name")
    build.set_defaults(func=cmd_build)

    register = sub.add_parser("register", help="log the artifact and register it as a new model version")
    _add_source_args(register)
    register.add_argument("--name", default="sdxl", help="registered model name")
    register.add_argument("--experiment", default="sdxl", help="experiment of the logging run")
    register.add_argument("--description", help="model version description")
    register.set_defaults(func=cmd_register)

    promote = sub.add_parser("promote", help="validate a version and move an alias to it, or roll the alias back")
    promote.add_argument("name", help="registered model name")
    promote.add_argument("--version", help="the candidate version")
    promote.add_argument("--to", required=True, choices=["staging", "production"], help="alias to move")
    promote.add_argument("--rollback", action="store_true", help="return the alias to its previous holder")
    promote.add_argument(
        "--use-stages", action="store_true", help="also move the deprecated stage (Staging/Production)"
    )
    promote.add_argument("--dry-run", action="store_true", help="run the validation gate only")
    promote.set_defaults(func=cmd_promote)

    copy = sub.add_parser("copy", help="copy a model version to another registered model (copy_model_version)")
    copy.add_argument("name", help="source registered model")
    copy.add_argument("--version", help="source version")
    copy.add_argument("--alias", help="source alias (instead of --version)")
    copy.add_argument("--to", required=True, help="destination registered model (created if missing)")
    copy.set_defaults(func=cmd_copy)

    template = sub.add_parser("template", help="re-render MLmodel_template/signature.json from the code")
    template.set_defaults(func=cmd_template)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BuildError as e:
        sys.exit(f"build failed: {e}")
    except MlflowException as e:  # a refused promotion carries the gate report
        sys.exit(f"{args.command} failed: {e.message}")


if __name__ == "__main__":
    main()
