"""The ``visionflow`` command line.

Imports are deferred to the command that needs them: ``visionflow --help`` and the small commands
must not pay for importing torch, Prefect and MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.records import RetrainResult

from cvlib.arguments import OptionsError, options_from, retrain_config, section_config
from flows.parser import EXIT_USAGE, EXPLAIN_FLAGS, EXPORT_FLAGS, SCORE_FLAGS, SWEEP_FLAGS, make_parser


class CliError(Exception):
    """An error the user can fix; printed without a stack trace."""


def _print_paths(title: str, paths: dict[str, object]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k in paths)
    for key, value in paths.items():
        print(f"  {key:<{width}}  {value}")


def cmd_config(args: argparse.Namespace) -> int:
    """Print the default retraining configuration: a starting point for ``retrain --config``."""
    from cvlib.config import RetrainConfig

    print(json.dumps(RetrainConfig().model_dump(mode="json"), indent=2))
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from cvlib.data.demo import write_digits

    counts = write_digits(args.dir, size=args.image_size, per_class=args.per_class)
    print(f"wrote {sum(counts.values())} digit images in {len(counts)} classes to {Path(args.dir).resolve()}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from cvlib.data.ingest import refresh_manifest
    from cvlib.data.options import DataConfig

    t0 = time.perf_counter()
    data_dir = _existing(args.data_dir, "data folder", folder=True)
    data_config = section_config(args.config, "data", DataConfig)  # the file retrain takes: its `data` part
    # Re-ingesting into the same manifest reads only new or changed files, and leaves an
    # unchanged folder's manifest as it is.
    refreshed = refresh_manifest(data_dir, args.out, data_config)
    summary = refreshed.summary | {"skipped": refreshed.skipped}
    print(summary["layout"]["note"])
    keys = ("files", "ok", "duplicates", "quarantined", "classes", "splits", "reasons", "skipped", "leakage")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    state = f"{refreshed.read} files read" if refreshed.changed else "unchanged, not rewritten"
    print(f"manifest: {Path(args.out).resolve()} ({state}, {time.perf_counter() - t0:.1f}s)")
    return 0


def _preflight_weights(config) -> str:
    from cvlib.models.factory import WeightsUnavailableError, check_weights

    try:
        return check_weights(config.train.arch, config.train.weights)
    except WeightsUnavailableError as exc:
        raise CliError(str(exc)) from exc


def _use_prefect() -> None:
    """Point Prefect at its API before any flow module is imported (see flows.local_server)."""
    from flows.local_server import configure_api

    api = configure_api()
    print(f"Prefect API: {api}", flush=True)


def _existing(path: str, what: str, *, folder: bool = False) -> str:
    """Check inputs before Prefect starts, so a typo costs a second and reads as one line."""
    p = Path(path).expanduser()
    if not (p.is_dir() if folder else p.exists()):
        raise CliError(f"{what} {p} does not exist" + (" or is not a folder" if folder else ""))
    return str(p.resolve())


def _model_ref(uri: str, flag: str = "--model") -> str:
    """A model reference checked before Prefect starts; returned as given (a flow records it)."""
    local = _local_model(uri, flag)
    return uri if uri.startswith("models:/") else local


def _local_model(uri: str, flag: str = "--model") -> str:
    """The model's local package or checkpoint: a registered version or alias that exists
    (fetched into the home's cache, where the flow finds it), or a file or folder that is a
    visionflow checkpoint or package."""
    if not uri.startswith("models:/"):
        from cvlib.models.names import check_model_path

        path = _existing(uri, f"{flag} checkpoint")
        try:
            check_model_path(path)
        except ValueError as exc:
            raise CliError(f"{flag} {exc}") from exc
        return path
    import logging

    from mlflow.exceptions import MlflowException

    from tasks.environment import mlflow_tracking_uri
    from tasks.registry import resolve_model

    # A fresh embedded store announces its table creation at INFO: not news to a user here.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        return resolve_model(uri)[0]
    except MlflowException as exc:
        message = str(exc.message).splitlines()[0] if exc.message else type(exc).__name__
        raise CliError(
            f"{flag} {uri}: {message} in the MLflow registry at {mlflow_tracking_uri()} "
            "(set MLFLOW_TRACKING_URI for another server, or give a checkpoint path)"
        ) from exc
    except ValueError as exc:  # not models:/NAME@ALIAS or models:/NAME/VERSION
        raise CliError(f"{flag} {exc}") from exc


def cmd_retrain(args: argparse.Namespace) -> int:
    data_dir = _existing(args.data_dir, "data folder", folder=True)
    config = retrain_config(args)  # before Prefect starts: a bad flag costs a second
    print(f"weights: {_preflight_weights(config)}")
    _use_prefect()
    from flows.retrain import retrain

    result = retrain(data_dir=data_dir, config=config, output_dir=args.output_dir)
    _print_retrain(result)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cvlib.models.factory import WeightsUnavailableError, check_weights
    from cvlib.sweep.options import SweepConfig
    from cvlib.sweep.space import SpaceError, load_space, trial_config

    data_dir = _existing(args.data_dir, "data folder", folder=True)
    config = retrain_config(args)  # the base configuration, read as retrain reads it
    options = options_from(SweepConfig, SWEEP_FLAGS, args)
    try:
        space = load_space(args.space)  # a wrong key or value fails here, before any work
        if options.sampler == "grid":
            space.grid()
        archs = space.archs() or [config.train.arch]
        for arch in archs:  # every architecture a trial may train has its weights
            check_weights(arch, trial_config(config, {"arch": arch}).train.weights)
    except (SpaceError, WeightsUnavailableError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    _use_prefect()
    from flows.sweep import sweep

    result = sweep(data_dir=data_dir, config=config, space=space, options=options, output_dir=args.output_dir,
                   dask_address=args.dask_address)  # fmt: skip
    _print_paths(
        "sweep finished",
        {"best trial": f"{result.best_trial} ({options.objective} {result.best_value:.4f})", "best params": result.best_params,
         "model": f"{result.model_uri} ({'champion' if result.promoted else 'challenger'})", "trials": result.trials,
         "MLflow store": result.mlflow_tracking_uri, "MLflow parent run": result.parent_run_id,
         "study": f"{result.study_name} in {result.storage}", "sweep folder": result.output_dir},
    )  # fmt: skip
    return 0


def _print_retrain(result: RetrainResult) -> None:
    metrics = result.metrics
    _print_paths(
        "retraining finished",
        {
            "model": f"{result.model_uri} ({'champion' if result.promoted else 'challenger'})",
            "val top-1": f"{metrics.get('val_top1', float('nan')):.4f}",
            "val top-5": f"{metrics.get('val_top5', float('nan')):.4f}",
            "MLflow store": result.mlflow_tracking_uri,
            "MLflow run": result.run_id,
            "report": result.report,
            "manifest": result.manifest,
            "checkpoint": result.checkpoint,
        },
    )


def _score_input(spec: str, root: str | None) -> str:
    """A folder, a glob, a list of paths or a manifest: checked now, so a typo costs a second. A
    folder is only probed (the flow lists it: listing a 100k-file folder twice cost seconds)."""
    from cvlib.inference.inputs import InputSpecError, holds_input_files, is_glob, resolve_inputs

    p = Path(spec).expanduser()
    if not p.exists() and not is_glob(spec):
        raise CliError(f"input {p} does not exist (a folder, a glob, a text file of paths or a manifest .parquet)")
    if p.is_dir():
        empty = not holds_input_files(p)
    else:
        try:
            empty = not resolve_inputs(spec, root=root).paths
        except (InputSpecError, FileNotFoundError) as exc:
            raise CliError(str(exc)) from exc
    if empty:
        print(f"note: {spec} holds no image files; the output will have no rows")
    return str(p.resolve()) if p.exists() else spec


def _score_model(uri: str, weights: str | None) -> tuple[str, str]:
    """(model URI, weights); a torchvision model's weights are checked before Prefect starts."""
    from cvlib.models.zoo import is_zoo_uri, zoo_arch

    if not is_zoo_uri(uri):
        if weights is not None:
            raise CliError("--weights applies to torchvision/ARCH models only; a registered model or checkpoint has its own")
        return _model_ref(uri), "DEFAULT"
    from cvlib.models.factory import WeightsUnavailableError, check_weights
    from cvlib.models.zoo import zoo_version

    weights = weights or "DEFAULT"
    try:
        zoo_version(zoo_arch(uri), weights)  # the architecture and the weights name exist
        how = check_weights(zoo_arch(uri), weights)
    except WeightsUnavailableError as exc:
        raise CliError(str(exc)) from exc
    except ValueError as exc:  # unknown architecture or weights name
        raise CliError(str(exc)) from exc
    print(f"weights: {how}")
    return uri, weights


def cmd_score(args: argparse.Namespace) -> int:
    from cvlib.inference.options import ScoreConfig

    input_spec = _score_input(args.input, args.root)
    model_uri, weights = _score_model(args.model, args.weights)
    cfg = options_from(ScoreConfig, SCORE_FLAGS, args)  # before Prefect starts: a bad flag costs a second
    _use_prefect()
    from flows.score import score

    result = score(
        input_dir=input_spec, model_uri=model_uri, out=str(Path(args.out).expanduser().absolute()), config=cfg, weights=weights,
        dask_workers=args.dask_workers or 1, dask_address=args.dask_address, shards=args.shards,
        root=str(Path(args.root).expanduser().resolve()) if args.root else None,
    )
    _print_paths(
        "scoring finished",
        {"predictions": f"{result.output} ({result.layout})", "files": result.files, "errors": result.errors,
         "resumed": f"{result.skipped} already scored, skipped", "images/s": f"{result.images_per_s:.1f}",
         "model": f"{result.model_uri} (version {result.model_version})"},
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cvlib.explain.options import ReportConfig

    input_dir, model_uri = _existing(args.input, "input"), _model_ref(args.model)
    # Only the options given: the defaults live in ReportConfig. Naming a layer asks for the section.
    config = options_from(ReportConfig, EXPLAIN_FLAGS, args, feature_maps=bool(args.feature_maps or args.feature_map_layer))
    _use_prefect()
    from flows.explain import explain

    report = explain(input_dir=input_dir, model_uri=model_uri, out=str(Path(args.out).resolve()), config=config)
    _print_paths("report written", {"report": report})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the bundled digits: data, retrain, score, explain."""
    from cvlib.config import RetrainConfig
    from cvlib.data.demo import write_digits
    from cvlib.data.options import AugmentConfig
    from cvlib.inference.options import ScoreConfig
    from cvlib.models.factory import WeightsUnavailableError, check_weights
    from cvlib.training.options import TrainConfig
    from tasks.environment import mlflow_tracking_uri, visionflow_home

    home = visionflow_home()
    data_dir = home / "demo" / "digits"
    counts = write_digits(data_dir, size=args.image_size)
    print(f"demo data: {sum(counts.values())} handwritten digits (scikit-learn) in {data_dir}")
    weights = "DEFAULT"
    try:
        how = check_weights("resnet50", weights)
        print(f"weights: {how}")
    except WeightsUnavailableError:
        weights = "none"
        print("weights: pretrained ImageNet weights are not available offline; training from random initialisation")
    # Digits are not mirror-symmetric: no horizontal flips; they fill the frame: mild crops.
    config = RetrainConfig(
        model_name=args.model_name,
        augment=AugmentConfig(image_size=args.image_size, resize_ratio=1.0, scale_min=0.7, hflip=0.0, rotation=10.0, color_jitter=0.1),
        train=TrainConfig(epochs=args.epochs, batch_size=64, lr=2e-3 if weights == "none" else 1e-3, weights=weights,
                          warmup_epochs=0.5, label_smoothing=0.05, num_workers=args.loader_workers),
    )
    _use_prefect()
    from flows.retrain import retrain
    from flows.score import score

    result = retrain(data_dir=str(data_dir), config=config, output_dir=str(home / "demo" / "run"))
    _print_retrain(result)
    predictions = home / "demo" / "predictions.parquet"
    scored = score(input_dir=str(data_dir), model_uri=result.model_uri, out=str(predictions), config=ScoreConfig(num_workers=args.loader_workers))
    _print_paths(
        "demo finished",
        {
            "MLflow store": mlflow_tracking_uri(),
            "MLflow UI": "make ui  (then open http://127.0.0.1:5000)",
            "model": result.model_uri,
            "val top-1": f"{result.metrics['val_top1']:.4f}",
            "predictions": f"{scored.output} ({scored.files} rows, {scored.errors} errors)",
            "report": result.report,
        },
    )
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from flows import local_server

    if args.action == "stop":
        print("stopped" if local_server.stop() else "no server was running")
        return 0
    info = local_server.start() if args.action == "start" else local_server.status()
    if info is None:
        print("no server is running (one starts with the first flow run)")
        return 1
    _print_paths("Prefect server", {"API": info["api_url"], "UI": info["ui_url"], "log": info["log"], "pid": info["pid"]})
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from cvlib.toolkit.kernels import render_gallery

    out = render_gallery(args.image, args.out)
    print(f"kernel gallery: {Path(out).resolve()}")
    return 0


def cmd_featuremaps(args: argparse.Namespace) -> int:
    """One layer's feature maps for one image, as a PNG grid. No Prefect flow: a quick look
    should start in a second, and only a models:/ URI pays for importing MLflow."""
    image, local = _existing(args.image, "image"), _local_model(args.model)
    from cvlib.data.imageio import ImageReadError, load_rgb
    from cvlib.data.transforms import eval_preset_from
    from cvlib.explain.featuremaps import feature_maps, render_feature_maps
    from cvlib.training.checkpoint import load_package

    model, meta = load_package(local)
    try:
        x = eval_preset_from(meta["preprocessing"])(load_rgb(image)).unsqueeze(0)
        maps = feature_maps(model, x, args.layer)
        title = f"{meta['arch']} {args.layer}: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]} ({Path(image).name})"
        out = render_feature_maps(maps, args.out, max_maps=args.max_maps, title=title)
    except (ImageReadError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    _print_paths("feature maps written", {"png": out.resolve(), "layer": args.layer, "maps": f"{min(maps.shape[0], args.max_maps)} of {maps.shape[0]}"})
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """OpenVINO export of a registered version (through Prefect, logged to MLflow) or of a local
    package (written into it)."""
    from cvlib.inference.options import ExportConfig

    cfg = options_from(ExportConfig, EXPORT_FLAGS, args, int8=bool(args.int8))
    data_dir = _existing(args.data, "--data folder", folder=True) if args.data else None
    if not args.model.startswith("models:/"):
        from tasks.export import export_local

        if data_dir is None:
            raise CliError("--data DIR is needed to export a local package (calibration and validation images)")
        record = export_local(_local_model(args.model), data_dir, cfg, args.out)
        _print_paths("export finished", {"status": record["status"], "precision": record["precision"], "reason": record["reason"]})
        return 0
    _local_model(args.model)
    _use_prefect()
    from flows.export import export

    result = export(model_uri=args.model, config=cfg, data_dir=data_dir)
    _print_paths("export finished", {"model": result.model_uri, "status": result.status, "precision": result.precision,
                                     "reason": result.reason})  # fmt: skip
    return 0


COMMANDS = {
    "config": cmd_config,
    "demo-data": cmd_demo_data,
    "ingest": cmd_ingest,
    "retrain": cmd_retrain,
    "sweep": cmd_sweep,
    "score": cmd_score,
    "explain": cmd_explain,
    "demo": cmd_demo,
    "server": cmd_server,
    "kernels": cmd_kernels,
    "featuremaps": cmd_featuremaps,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from tasks.environment import quiet_defaults

    quiet_defaults()
    try:
        return int(COMMANDS[args.command](args) or 0)
    except (CliError, OptionsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # known user-facing failures read as one line, not a traceback
        from pydantic import ValidationError

        from cvlib.data.verdicts import DataSetError
        from cvlib.explain.featuremaps import UnknownLayerError
        from cvlib.models.factory import WeightsUnavailableError

        if isinstance(exc, (DataSetError, UnknownLayerError, WeightsUnavailableError, FileNotFoundError, ValidationError)):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
