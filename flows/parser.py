"""The ``visionflow`` command line's parser: its subcommands and their flags.

One small builder per subcommand. A flag means one thing everywhere: ``--image-size`` is an image
side, ``--loader-workers`` the decoding/DataLoader processes, ``--dask-workers`` Dask's; old
names still work for one release (:func:`cvlib.arguments.add_deprecated`). The retraining flags are
declared in :mod:`cvlib.arguments`, shared with the torchrun launcher. Light imports only:
``visionflow --help`` must stay instant.
"""

from __future__ import annotations

import argparse

from cvlib.arguments import DEVICE_HELP, PRECISIONS, Flag, add_config_file, add_deprecated, add_flags, add_retrain_arguments

EXIT_USAGE = 2

# The flags that set a field of ScoreConfig (cvlib.inference.options), by its name.
SCORE_FLAGS: tuple[Flag, ...] = (
    Flag("--batch-size", "batch_size", {"type": int}),
    Flag("--top-k", "top_k", {"type": int}),
    Flag("--loader-workers", "num_workers", {"type": int, "help": "decoding worker processes per scoring process"}),
    Flag("--device", "device", {"help": DEVICE_HELP}),
    Flag("--precision", "precision", {"choices": PRECISIONS, "help": "auto: bf16 on CUDA and on CPUs with native bf16, else fp32"}),
    Flag("--compile", "compile", {"action": "store_const", "const": True, "help": "torch.compile the model"}),
    Flag("--gpu-decode", "gpu_decode", {"choices": ["auto", "on", "off"], "help": "decode JPEGs with nvJPEG on CUDA (auto: on with CUDA)"}),
    Flag("--part-size", "part_size", {"type": int, "help": "rows per Parquet part file"}),
    Flag("--engine", "engine", {"choices": ["auto", "torch", "openvino"],
         "help": "auto: the version's verified OpenVINO artifact on a CPU, PyTorch on CUDA; torch; openvino"}),
    Flag("--ov-streams", "ov_streams", {"type": int, "help": "OpenVINO inference streams (default: the throughput hint's choice)"}),
)

# The flags that set a field of ExportConfig (cvlib.inference.options).
EXPORT_FLAGS: tuple[Flag, ...] = (
    Flag("--calibration-images", "calibration_images", {"type": int, "help": "training images to calibrate on (default 300)"}),
    Flag("--min-agreement", "min_top1_agreement", {"type": float,
         "help": "least top-1 agreement with the fp32 model on the validation split (default 0.99)"}),
    Flag("--preset", "preset", {"choices": ["performance", "mixed"], "help": "NNCF quantization preset"}),
    Flag("--accuracy-control", "accuracy_control", {"action": argparse.BooleanOptionalAction,
         "help": "NNCF accuracy control: layers that cost top-1 agreement go back to floating point until it is met"}),
    Flag("--keep-stem-and-head", "keep_stem_and_head", {"action": argparse.BooleanOptionalAction,
         "help": "leave the first convolution and the classifier head unquantized"}),
)

# The flags that set a field of ReportConfig (cvlib.explain.options).
EXPLAIN_FLAGS: tuple[Flag, ...] = (
    Flag("--samples", "samples", {"type": int, "help": "how many images get a CAM"}),
    Flag("--seed", "seed", {"type": int}),
    Flag("--batch-size", "batch_size", {"type": int, "help": "images per forward, screening and CAMs (default: 64 and 16)"}),
    Flag("--device", "device", {"help": DEVICE_HELP}),
    Flag("--feature-map-layer", "feature_map_layers", {
        "action": "append", "metavar": "NAME", "help": "a layer for the feature-maps section (repeatable; implies "
        "--feature-maps), e.g. layer1.0.conv1 or features.block2; default: first conv, middle stage, last stage"}),
    Flag("--feature-map-images", "feature_map_images", {
        "type": int, "metavar": "N", "help": "how many images get feature maps (the first ones, misclassified first)"}),
    Flag("--feature-map-channels", "feature_map_channels", {
        "type": int, "metavar": "K", "help": "channels shown per layer and image (the most active)"}),
    Flag("--precision", "precision", {
        "choices": PRECISIONS, "help": "what the report's forwards run in (maps are fp32 either way); default auto: bf16 where native"}),
)  # fmt: skip


# The flags that set a field of SweepConfig (cvlib.sweep.options); the base configuration's are retrain's.
SWEEP_FLAGS: tuple[Flag, ...] = (
    Flag("--trials", "trials", {"type": int, "metavar": "N", "help": "trials to finish, counting earlier runs of the same sweep (default 12)"}),
    Flag("--parallel", "parallel", {"type": int, "metavar": "K", "help": "trials running at once (default 1)"}),
    Flag("--processes", "runner", {"action": "store_const", "const": "processes",
                                   "help": "run parallel trials in local worker processes (Dask) instead of threads"}),
    Flag("--sampler", "sampler", {"choices": ["tpe", "random", "grid"], "help": "Optuna sampler (default tpe)"}),
    Flag("--pruner", "pruner", {"choices": ["median", "successive-halving", "none"], "help": "stops weak trials early (default median)"}),
    Flag("--objective", "objective", {"choices": ["val_top1", "val_loss"], "help": "per-epoch metric to optimise (default val_top1)"}),
    Flag("--keep-checkpoints", "keep_checkpoints", {"action": "store_const", "const": True,
                                                    "help": "keep every trial's checkpoints (default: only the best trial's)"}),
    Flag("--storage", "storage", {"metavar": "URL", "help": "Optuna storage, e.g. postgresql://... "
                                  "(default: $VISIONFLOW_SWEEP_STORAGE, else OUTPUT_DIR/optuna.db)"}),
    Flag("--study-name", "study_name", {"help": "Optuna study (default: from the output folder, so a rerun continues it)"}),
)  # fmt: skip


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (told as a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {value})")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error told in one line (``--help`` still shows the usage)."""

    def __init__(self, *args, **kwargs) -> None:
        # No abbreviations: a misspelt flag (--epoch) is an error that names it, not a guess.
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    """Every subcommand, in help order."""
    p = _Parser(prog="visionflow", description="Retrain and serve image classifiers as Prefect flows.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_config, _add_demo_data, _add_ingest, _add_retrain, _add_sweep, _add_score, _add_explain, _add_export,
                _add_demo, _add_server, _add_kernels, _add_featuremaps):  # fmt: skip
        add(sub)
    return p


def _add_config(sub) -> None:
    sub.add_parser("config", help="print the default retraining configuration as JSON")


def _add_demo_data(sub) -> None:
    s = sub.add_parser("demo-data", help="write scikit-learn's digits as an image folder")
    s.add_argument("dir")
    s.add_argument("--image-size", type=_count(8), default=64, help="side of the square images written")
    add_deprecated(s, "--size", "--image-size", type=_count(8))
    s.add_argument("--per-class", type=_count(1), default=None)


def _add_ingest(sub) -> None:
    s = sub.add_parser("ingest", help="scan and validate an image folder into a manifest")
    s.add_argument("data_dir")
    s.add_argument("--out", required=True)
    add_config_file(s)


def _add_retrain(sub) -> None:
    s = sub.add_parser("retrain", help="fine-tune on an image folder and register the model")
    s.add_argument("data_dir")
    add_retrain_arguments(s)
    s.add_argument("--output-dir", help="checkpoints, manifest and report (default: a folder per flow run under the home)")


def _add_sweep(sub) -> None:
    s = sub.add_parser(
        "sweep", help="search retraining options with Optuna; register the best trial's model",
        description="Run N fine-tuning trials, K at a time, each an MLflow child run of the sweep's run; prune weak "
        "trials; register the best trial's model and put it through the champion gate. The retraining flags and "
        "--config are the base configuration the trials vary. Rerunning into the same --output-dir continues the sweep.",
    )  # fmt: skip
    s.add_argument("data_dir")
    s.add_argument("--space", metavar="FILE", help="search space, YAML or JSON (default: lr, weight decay, label smoothing)")
    add_flags(s, SWEEP_FLAGS)
    s.add_argument("--dask-address", help="run trials on an existing Dask cluster, tcp://HOST:PORT (default: threads here)")
    add_retrain_arguments(s)
    s.add_argument("--output-dir", help="the sweep's folder: study, trials' checkpoints, figures (default: one per data folder under the home)")


def _add_score(sub) -> None:
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
    s.add_argument("--dask-workers", type=_count(1), help="Dask worker processes on a local cluster (default 1: in this process)")
    add_deprecated(s, "--workers", "--dask-workers", type=_count(1))
    s.add_argument("--dask-address", help="an existing Dask scheduler, tcp://HOST:PORT (instead of a local cluster)")
    s.add_argument("--shards", type=_count(1), help="file-list shards (default: one per Dask worker)")
    add_flags(s, SCORE_FLAGS)


def _add_explain(sub) -> None:
    s = sub.add_parser("explain", help="Grad-CAM HTML report for a folder")
    s.add_argument("input")
    s.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint file or package folder")
    s.add_argument("--out", required=True)
    s.add_argument("--feature-maps", action="store_true",
                   help="add a 'Feature maps' section: the most active channels of a few layers for the first images")
    add_flags(s, EXPLAIN_FLAGS)


def _add_demo(sub) -> None:
    s = sub.add_parser("demo", help="run the whole pipeline on the bundled digits")
    s.add_argument("--epochs", type=_count(1), default=4)
    s.add_argument("--image-size", type=_count(16), default=64)
    add_deprecated(s, "--size", "--image-size", type=_count(16))
    s.add_argument("--loader-workers", type=_count(0), default=1, help="DataLoader/decoding worker processes")
    add_deprecated(s, "--workers", "--loader-workers", type=_count(0))
    s.add_argument("--model-name", default="visionflow-demo")


def _add_server(sub) -> None:
    s = sub.add_parser("server", help="the local Prefect server that visionflow keeps running")
    s.add_argument("action", choices=["start", "status", "stop"])


def _add_kernels(sub) -> None:
    s = sub.add_parser("kernels", help="render the classic convolution kernels on an image")
    s.add_argument("image")
    s.add_argument("--out", required=True)


def _add_featuremaps(sub) -> None:
    s = sub.add_parser("featuremaps", help="render one layer's feature maps for an image")
    s.add_argument("image")
    s.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint file or package folder")
    s.add_argument("--layer", required=True, help="module name, e.g. features.block1.relu or layer1.0.conv1 (a wrong name lists them)")
    s.add_argument("--out", required=True)
    s.add_argument("--max-maps", type=_count(1), default=32)


def _add_export(sub) -> None:
    s = sub.add_parser(
        "export", help="export a model to OpenVINO IR (int8 when it agrees with fp32 on the validation split)",
        description="Convert to OpenVINO IR, quantize to int8 with NNCF calibrated on training images, and measure "
        "top-1/top-5 agreement with the fp32 model on the validation split. A registered version gets the files "
        "as artifacts and the figures as tags; `score --engine auto` uses a verified artifact on CPUs.",
    )  # fmt: skip
    s.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a package folder")
    s.add_argument("--data", help="the image folder to calibrate and validate on (default: the version's training data)")
    s.add_argument("--out", help="where the OpenVINO files go for a checkpoint file (default: the package's openvino/)")
    s.add_argument("--int8", action="store_true", help="also quantize to int8 with NNCF (used when it agrees; else the fp32/bf16 IR)")
    add_flags(s, EXPORT_FLAGS)
