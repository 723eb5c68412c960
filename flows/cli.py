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

EXIT_USAGE = 2


class CliError(Exception):
    """An error the user can fix; printed without a stack trace."""


def build_retrain_config(args: argparse.Namespace):
    """Defaults of :class:`cvlib.config.RetrainConfig`, then ``--config FILE`` (JSON, any subset
    of the fields), then the individual options; validated as a whole."""
    from cvlib.config import RetrainConfig, merge_into
    from cvlib.models.factory import CUSTOM_ARCHS

    data = RetrainConfig().model_dump()
    if args.config:
        try:
            merge_into(data, json.loads(Path(_existing(args.config, "config file")).read_text()))
        except json.JSONDecodeError as exc:
            raise CliError(f"config file {args.config} is not valid JSON: {exc}") from exc
    train = {"epochs": args.epochs, "batch_size": args.batch_size, "arch": args.arch, "weights": args.weights,
             "lr": args.lr, "seed": args.seed, "num_workers": args.workers, "device": args.device,
             "precision": args.precision, "head_epochs": getattr(args, "head_epochs", None),
             "early_stopping_patience": getattr(args, "early_stopping_patience", None)}
    if args.freeze_backbone:
        train["freeze_backbone"] = True
    data["train"].update({k: v for k, v in train.items() if v is not None})
    if args.arch in CUSTOM_ARCHS and args.weights is None and not args.config:
        data["train"]["weights"] = "none"  # no pretrained weights exist for visionflow's own models
    if args.image_size is not None:
        data["augment"]["image_size"] = args.image_size
    if args.model_name:
        data["model_name"] = args.model_name
    return RetrainConfig.model_validate(data)


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

    counts = write_digits(args.dir, size=args.size, per_class=args.per_class)
    print(f"wrote {sum(counts.values())} digit images in {len(counts)} classes to {Path(args.dir).resolve()}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from cvlib.data.ingest import build_manifest, dataset_hash, summarize, write_manifest
    from cvlib.data.options import DataConfig

    t0 = time.perf_counter()
    data_dir = _existing(args.data_dir, "data folder", folder=True)
    # Re-ingesting into the same manifest reads only new or changed files.
    manifest, skipped = build_manifest(data_dir, DataConfig(), previous=args.out)
    write_manifest(manifest, args.out, metadata={"visionflow.dataset_hash": dataset_hash(manifest)})
    summary = summarize(manifest) | {"skipped": skipped}
    print(json.dumps({k: summary[k] for k in ("files", "ok", "duplicates", "quarantined", "classes", "reasons", "skipped")}, indent=2))
    print(f"manifest: {Path(args.out).resolve()} ({time.perf_counter() - t0:.1f}s)")
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


def _model_ref(uri: str) -> str:
    return uri if uri.startswith("models:/") else _existing(uri, "model checkpoint")


def cmd_retrain(args: argparse.Namespace) -> int:
    data_dir = _existing(args.data_dir, "data folder", folder=True)
    config = build_retrain_config(args)
    print(f"weights: {_preflight_weights(config)}")
    _use_prefect()
    from flows.retrain import retrain

    result = retrain(data_dir=data_dir, config=config, output_dir=args.output_dir)
    _print_retrain(result)
    return 0


def _print_retrain(result: dict) -> None:
    metrics = result["metrics"]
    _print_paths(
        "retraining finished",
        {
            "model": f"{result['model_uri']} ({'champion' if result['promoted'] else 'challenger'})",
            "val top-1": f"{metrics.get('val_top1', float('nan')):.4f}",
            "val top-5": f"{metrics.get('val_top5', float('nan')):.4f}",
            "MLflow store": result["mlflow_tracking_uri"],
            "MLflow run": result["run_id"],
            "report": result["report"],
            "manifest": result["manifest"],
            "checkpoint": result["checkpoint"],
        },
    )


def _score_input(spec: str, root: str | None) -> str:
    """A folder, a glob, a list of paths or a manifest: resolved now, so a typo costs a second."""
    from cvlib.inference.inputs import InputSpecError, is_glob, resolve_inputs

    p = Path(spec).expanduser()
    if not p.exists() and not is_glob(spec):
        raise CliError(f"input {p} does not exist (a folder, a glob, a text file of paths or a manifest .parquet)")
    try:
        inputs = resolve_inputs(spec, root=root)
    except (InputSpecError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    if not inputs.paths:
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
    if args.workers is not None and args.workers < 1:
        raise CliError("--workers must be at least 1")
    _use_prefect()
    from flows.score import score

    given = {"batch_size": args.batch_size, "num_workers": args.loader_workers, "device": args.device, "precision": args.precision,
             "top_k": args.top_k, "compile": args.compile or None, "gpu_decode": args.gpu_decode, "part_size": args.part_size}
    cfg = ScoreConfig(**{k: v for k, v in given.items() if v is not None})
    result = score(
        input_dir=input_spec, model_uri=model_uri, out=str(Path(args.out).expanduser().absolute()), config=cfg, weights=weights,
        workers=args.workers or 1, dask_address=args.dask_address, shards=args.shards,
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
    given = {"samples": args.samples, "seed": args.seed, "feature_map_layers": args.feature_map_layer,
             "feature_map_images": args.feature_map_images, "feature_map_channels": args.feature_map_channels,
             "precision": args.precision}
    config = ReportConfig(**{k: v for k, v in given.items() if v is not None},
                          feature_maps=bool(args.feature_maps or args.feature_map_layer))
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
    counts = write_digits(data_dir, size=args.size)
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
        augment=AugmentConfig(image_size=args.size, resize_ratio=1.0, scale_min=0.7, hflip=0.0, rotation=10.0, color_jitter=0.1),
        train=TrainConfig(epochs=args.epochs, batch_size=64, lr=2e-3 if weights == "none" else 1e-3, weights=weights,
                          warmup_epochs=0.5, label_smoothing=0.05, num_workers=args.workers),
    )
    _use_prefect()
    from flows.retrain import retrain
    from flows.score import score

    result = retrain(data_dir=str(data_dir), config=config, output_dir=str(home / "demo" / "run"))
    _print_retrain(result)
    predictions = home / "demo" / "predictions.parquet"
    scored = score(input_dir=str(data_dir), model_uri=result["model_uri"], out=str(predictions), config=ScoreConfig(num_workers=args.workers))
    _print_paths(
        "demo finished",
        {
            "MLflow store": mlflow_tracking_uri(),
            "MLflow UI": "make ui  (then open http://127.0.0.1:5000)",
            "model": result["model_uri"],
            "val top-1": f"{result['metrics']['val_top1']:.4f}",
            "predictions": f"{scored.output} ({scored.files} rows, {scored.errors} errors)",
            "report": result["report"],
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
    image, model_ref = _existing(args.image, "image"), _model_ref(args.model)
    from cvlib.data.imageio import ImageReadError, load_rgb
    from cvlib.data.transforms import eval_preset_from
    from cvlib.explain.featuremaps import feature_maps, render_feature_maps
    from cvlib.training.checkpoint import load_package

    if model_ref.startswith("models:/"):
        from tasks.registry import resolve_model

        model_ref, _ = resolve_model(model_ref)
    model, meta = load_package(model_ref)
    try:
        x = eval_preset_from(meta["preprocessing"])(load_rgb(image)).unsqueeze(0)
        maps = feature_maps(model, x, args.layer)
        title = f"{meta['arch']} {args.layer}: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]} ({Path(image).name})"
        out = render_feature_maps(maps, args.out, max_maps=args.max_maps, title=title)
    except (ImageReadError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    _print_paths("feature maps written", {"png": out.resolve(), "layer": args.layer, "maps": f"{min(maps.shape[0], args.max_maps)} of {maps.shape[0]}"})
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionflow", description="Retrain and serve image classifiers as Prefect flows.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("config", help="print the default retraining configuration as JSON")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("demo-data", help="write scikit-learn's digits as an image folder")
    s.add_argument("dir")
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--per-class", type=int, default=None)
    s.set_defaults(func=cmd_demo_data)

    s = sub.add_parser("ingest", help="scan and validate an image folder into a manifest")
    s.add_argument("data_dir")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("retrain", help="fine-tune on an image folder and register the model")
    s.add_argument("data_dir")
    s.add_argument("--config", help="JSON file with any part of the configuration (see cvlib/config.py); options override it")
    s.add_argument("--epochs", type=int)
    s.add_argument("--image-size", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--arch")
    s.add_argument("--weights", help="DEFAULT, a torchvision weights name, none, or a file path")
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--model-name")
    s.add_argument("--workers", type=int, help="DataLoader worker processes")
    s.add_argument("--device", help="auto (CUDA, then MPS, then CPU), cuda, mps, cpu")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    s.add_argument("--freeze-backbone", action="store_true")
    s.add_argument("--head-epochs", type=int, help="epochs training the head alone first (default: 1 with pretrained weights, 0 with none)")
    s.add_argument("--early-stopping-patience", type=int, help="stop after this many epochs without a better val_top1 (default: off)")
    s.add_argument("--output-dir")
    s.set_defaults(func=cmd_retrain)

    s = sub.add_parser(
        "score", help="top-5 predictions for every image (folder, glob, list, manifest) to Parquet",
        description="Score images to Parquet, one row per file (unreadable files get a row with an error). "
        "OUT ending in .parquet is one file written at the end; any other OUT is a dataset folder of part "
        "files. Rerunning into the same OUT resumes: files already scored by the same model version are skipped.",
    )  # fmt: skip
    s.add_argument("input", help="a folder (recursive), a glob ('photos/**/*.jpg'), a text file of paths, or a manifest .parquet")
    s.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint or package, or torchvision/ARCH (ImageNet)")
    s.add_argument("--weights", help="for torchvision/ARCH: DEFAULT (default), a weights name, a file, or none (random, for benchmarks)")
    s.add_argument("--out", required=True, help="OUT.parquet (one file) or a folder (Parquet dataset of part files)")
    s.add_argument("--root", help="where a list's or manifest's relative paths start")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--top-k", type=int)
    s.add_argument("--workers", type=int, help="Dask worker processes on a local cluster (default 1: in this process)")
    s.add_argument("--dask-address", help="an existing Dask scheduler, tcp://HOST:PORT (instead of a local cluster)")
    s.add_argument("--shards", type=int, help="file-list shards (default: one per worker)")
    s.add_argument("--loader-workers", type=int, help="decoding worker processes per scoring process")
    s.add_argument("--device", help="auto (CUDA, then MPS, then CPU), cuda, mps, cpu")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--gpu-decode", choices=["auto", "on", "off"], help="decode JPEGs with nvJPEG on CUDA (auto: on with CUDA)")
    s.add_argument("--part-size", type=int, help="rows per Parquet part file")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("explain", help="Grad-CAM HTML report for a folder")
    s.add_argument("input")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--samples", type=int, help="how many images get a CAM")
    s.add_argument("--seed", type=int)
    s.add_argument("--feature-maps", action="store_true",
                   help="add a 'Feature maps' section: the most active channels of a few layers for the first images")
    s.add_argument("--feature-map-layer", action="append", metavar="NAME",
                   help="a layer for that section (repeatable; implies --feature-maps), e.g. layer1.0.conv1 or "
                   "features.block2; default: first conv, middle stage, last stage")
    s.add_argument("--feature-map-images", type=int, metavar="N", help="how many images get feature maps (the first ones, misclassified first)")
    s.add_argument("--feature-map-channels", type=int, metavar="K", help="channels shown per layer and image (the most active)")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="what the report's forwards run in (maps are fp32 either way); default auto: bf16 where native")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("demo", help="run the whole pipeline on the bundled digits")
    s.add_argument("--epochs", type=int, default=4)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--model-name", default="visionflow-demo")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("server", help="the local Prefect server that visionflow keeps running")
    s.add_argument("action", choices=["start", "status", "stop"])
    s.set_defaults(func=cmd_server)

    s = sub.add_parser("kernels", help="render the classic convolution kernels on an image")
    s.add_argument("image")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_kernels)

    s = sub.add_parser("featuremaps", help="render one layer's feature maps for an image")
    s.add_argument("image")
    s.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint file or package folder")
    s.add_argument("--layer", required=True, help="module name, e.g. features.block1.relu or layer1.0.conv1 (a wrong name lists them)")
    s.add_argument("--out", required=True)
    s.add_argument("--max-maps", type=int, default=32)
    s.set_defaults(func=cmd_featuremaps)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from tasks.environment import quiet_defaults

    quiet_defaults()
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # known user-facing failures read as one line, not a traceback
        from pydantic import ValidationError

        from cvlib.data.ingest import DataSetError
        from cvlib.explain.featuremaps import UnknownLayerError
        from cvlib.models.factory import WeightsUnavailableError

        if isinstance(exc, (DataSetError, UnknownLayerError, WeightsUnavailableError, FileNotFoundError, ValidationError)):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
