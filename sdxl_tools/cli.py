"""The project's command line: ``sdxl-pyfunc COMMAND`` (also ``python build.py COMMAND``).

::

    sdxl-pyfunc build --base DIR --refiner DIR --output PATH     # real SDXL 1.0 folders
    sdxl-pyfunc build --tiny --output PATH                       # tiny random weights (demo, tests)
    sdxl-pyfunc build --tiny --log [--name sdxl]                 # log to MLFLOW_TRACKING_URI instead
    sdxl-pyfunc template                                         # re-render signature.json and the docs' tables
    sdxl-pyfunc register --tiny [--name sdxl]                    # log + register a new version
    sdxl-pyfunc promote sdxl --version 2 --to staging            # gate, then move models:/sdxl@staging
    sdxl-pyfunc promote sdxl --to production --rollback          # back to the previous holder
    sdxl-pyfunc copy sdxl --version 2 --to sdxl-prod             # copy_model_version to another name
    sdxl-pyfunc batch --model URI --input prompts.csv --output DIR   # the resumable file job
    sdxl-pyfunc verify URI                                       # every weight file against its sha256

Registry commands use MLFLOW_TRACKING_URI, else ./mlflow.db + ./mlruns.

Exit codes: 0 done; 1 the operation failed (a build error, a refused promotion, a registry error,
a weight file that differs from its recorded sha256: the message says which); 2 the arguments do not
fit together, or a batch job refused to start or could not write its output (disk full, read-only);
130 interrupted (a batch job resumes where it stopped).

Only argparse is imported up front: ``--help`` and argument errors answer at once, and each command
imports what it needs (torch, diffusers, MLflow) when it runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxl_tools import VARIANTS

if TYPE_CHECKING:
    from sdxl_tools.staging import Staged


class UsageError(Exception):
    """Arguments argparse accepts but that do not fit together (exit code 2)."""


def _config(pairs: list[str]) -> dict:
    """``key=value`` pairs (values parsed as YAML scalars: 8 → int, true → bool)."""
    import yaml

    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--config expects key=value, got {pair!r}")
        config[key] = yaml.safe_load(value)
    return config


def _loras(args: argparse.Namespace, base: str | Path, tmp: Path) -> dict[str, Path]:
    """``--lora NAME=PATH`` pairs, plus ``--tiny-lora NAME`` random adapters for the tiny base."""
    from sdxl_tools.staging import LoraError, parse_build_arg

    try:
        loras = dict(parse_build_arg(pair) for pair in args.lora)
    except LoraError as e:
        raise UsageError(str(e)) from None
    if args.tiny_lora and not args.tiny:
        raise UsageError("--tiny-lora needs --tiny")
    for i, name in enumerate(args.tiny_lora):
        from sdxl_tools.random_weights import write_tiny_lora

        loras[name] = write_tiny_lora(tmp / "tiny-loras" / name, base, seed=i + 1)
    return loras


def _controlnets(args: argparse.Namespace, base: str | Path, tmp: Path, sources: dict[str, str]) -> dict[str, Path]:
    """``--controlnet NAME=DIR`` pairs, plus ``--tiny-controlnet NAME`` random ControlNets for the tiny base
    (their provenance added to ``sources``, keyed by their folder in the artifact as the file records are)."""
    from sdxl_tools.staging import CONTROLNET_DIR, BuildError, parse_build_arg

    try:
        controlnets = dict(parse_build_arg(pair, "--controlnet") for pair in args.controlnet)
    except BuildError as e:
        raise UsageError(str(e)) from None
    if args.tiny_controlnet and not args.tiny:
        raise UsageError("--tiny-controlnet needs --tiny")
    for i, name in enumerate(args.tiny_controlnet):
        from sdxl_tools.random_weights import write_tiny_controlnet

        controlnets[name] = write_tiny_controlnet(tmp / "src" / "controlnets" / name, base, seed=i + 1)
        sources[f"{CONTROLNET_DIR}/{name}"] = f"random tiny ControlNet of the base UNet (seed {i + 1})"
    return controlnets


def _stage(args: argparse.Namespace, tmp: str) -> Staged:
    """Stage the components the source flags name (``--tiny``, ``--random-fullsize`` or ``--base``/``--refiner``)."""
    synthetic = args.tiny or args.random_fullsize
    if synthetic == bool(args.base or args.refiner) or (args.tiny and args.random_fullsize):
        raise UsageError("give one of --tiny, --random-fullsize, or both --base and --refiner")
    if not synthetic and not (args.base and args.refiner):
        raise UsageError("--base and --refiner are both required")
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
    from sdxl_tools.staging import stage_components

    loras = _loras(args, base, Path(tmp))
    staged = stage_components(
        Path(base),
        Path(refiner),
        Path(tmp) / "sdxl",
        checker,
        variant=args.variant,
        vae=args.vae,
        loras=loras,
        controlnets=_controlnets(args, base, Path(tmp), sources),
        sources=sources,
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
    from model_pkg.pipelines import ManifestKey as K
    from sdxl_tools.artifact import log_artifact, save_artifact

    if not (args.output or args.log):
        raise UsageError("give --output PATH or --log")
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
            shared = ", ".join(staged.manifest[K.SHARED]) or "none"
            print(f"saved model to {args.output}; shared components: {shared}")


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
        raise UsageError("give --version V, or --rollback (which takes no version: the previous holder comes back)")
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
        raise UsageError("give --version V or --alias ALIAS")
    registry.use_store()
    ref = args.version if args.version is not None else f"@{args.alias}"
    copied = registry.copy_version(args.name, ref, args.to)
    source = f"models:/{args.name}/{ref}" if args.version is not None else f"models:/{args.name}{ref}"
    print(f"copied {source} to models:/{args.to}/{copied.version} ({copied.tags['copied_from']})")


def cmd_verify(args: argparse.Namespace) -> None:
    import mlflow

    from sdxl_tools.scratch import scratch_dir
    from sdxl_tools.verify import verify_model

    with scratch_dir() as scratch:
        local = Path(args.uri)
        if not local.is_dir():
            from sdxl_tools import registry

            registry.use_store()
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=args.uri, dst_path=str(scratch)))
        verified = verify_model(local)
    print(
        f"verified {args.uri}: {verified.files} files ({verified.bytes / 1e6:.1f} MB) match their recorded "
        f"sha256; model hash {verified.model_hash}"
    )


def cmd_template(args: argparse.Namespace) -> None:
    from sdxl_tools import TEMPLATE
    from sdxl_tools.doc_tables import rendered_docs
    from sdxl_tools.signature import signature

    path = TEMPLATE / "signature.json"
    path.write_text(json.dumps(signature().to_dict(), indent=2) + "\n")
    print(f"wrote {path}")
    for page, text in rendered_docs(TEMPLATE.parent / "docs").items():
        page.write_text(text)
        print(f"wrote {page}")


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


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def cmd_batch(args: argparse.Namespace) -> int | None:
    """The file job: lock the folder, check the model against ``job.json`` before loading it, score."""
    import mlflow

    from model_pkg.contract import parse_params
    from sdxl_tools.batch import read_prompts, run_locked
    from sdxl_tools.identity import ModelIdentity, artifact_identity, registry_version
    from sdxl_tools.job_folder import MANIFEST, BatchError, check_job, output_lock
    from sdxl_tools.scratch import scratch_dir

    params = {"on_error": "null", **args.params}
    try:
        parse_params(params)
        read_prompts(args.input)  # fail on bad params or a bad input file before touching the model
        with output_lock(args.output), scratch_dir() as scratch:
            registered = registry_version(args.model)
            # a moved alias is refused before anything is downloaded
            early = ModelIdentity(args.model, *(registered or (None, None)), "", {})
            check_job(args.output, args.input, params, early, write=False)
            local = Path(args.model)
            if not local.is_dir():  # download once; the identity and the model come from the same files
                pinned = f"models:/{registered[0]}/{registered[1]}" if registered else args.model
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(scratch)))
            source = artifact_identity(local, args.model, registered, args.model_config)
            check_job(args.output, args.input, params, source, write=False)
            model = mlflow.pyfunc.load_model(str(local), model_config=args.model_config)
            summary = run_locked(
                model, args.input, args.output, params, args.chunk_size, args.retry_errors, not args.no_progress, source
            )
    except mlflow.exceptions.MlflowException as e:
        raise BatchError(str(e)) from e
    except OSError as e:  # e.g. the lock file of a read-only or vanished --output
        raise BatchError(f"cannot write to {args.output}: {e.strerror or e} ({e.filename or args.output})") from e
    except KeyboardInterrupt:
        print("interrupted: finished rows are in the manifest; rerun the same command to resume", file=sys.stderr)
        return 130
    print(
        f"{summary.rows} rows: {summary.images} images, {summary.errors} errors "
        f"({args.output / MANIFEST}); {summary.skipped} done earlier, {summary.scored} scored now "
        f"in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s)"
    )
    return None


def parser() -> argparse.ArgumentParser:
    """Every command and its arguments."""
    parser = argparse.ArgumentParser(
        prog="sdxl-pyfunc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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

    verify = sub.add_parser("verify", help="hash every weight file of a model against components.json")
    verify.add_argument("uri", help="model URI: a path, runs:/..., models:/NAME/VERSION, models:/NAME@alias")
    verify.set_defaults(func=cmd_verify)

    template = sub.add_parser("template", help="re-render signature.json and the docs' tables from the code")
    template.set_defaults(func=cmd_template)

    batch = sub.add_parser("batch", help="score a prompts file into image files and a manifest; rerun to resume")
    batch.add_argument("--model", required=True, help="model URI: a path, runs:/..., models:/NAME@alias")
    batch.add_argument("--input", required=True, type=Path, help="prompts file: .csv, .jsonl or .parquet")
    batch.add_argument("--output", required=True, type=Path, help="folder for images/ and manifest.jsonl")
    batch.add_argument("--params", type=_json_arg, default={}, help="request params, e.g. '{\"seed\": 42}'")
    batch.add_argument("--chunk-size", type=int, default=8, help="rows per predict call (default 8)")
    batch.add_argument("--model-config", type=_json_arg, default=None, help="model config overrides (JSON)")
    batch.add_argument("--retry-errors", action="store_true", help="score rows that failed earlier again")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.set_defaults(func=cmd_batch)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code (see the module docs)."""
    args = parser().parse_args(argv)  # --help and argument errors end here, before any heavy import
    from mlflow.exceptions import MlflowException

    from sdxl_tools.job_folder import BatchError
    from sdxl_tools.staging import BuildError

    try:
        return args.func(args) or 0
    except (UsageError, BatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BuildError as e:
        print(f"error: build failed: {e}", file=sys.stderr)
        return 1
    except MlflowException as e:  # a refused promotion carries the gate report
        print(f"error: {args.command} failed: {e.message}", file=sys.stderr)
        return 1


def run() -> None:
    """The ``sdxl-pyfunc`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
