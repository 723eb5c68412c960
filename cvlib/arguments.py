"""Command-line arguments -> options records, declared once.

`visionflow retrain` and the torchrun launcher (``python -m cvlib.training.ddp``) take the same
flags and the same ``--config`` file, so both declare them here and build the configuration with
:func:`retrain_config`: a flag cannot exist in one and be forgotten in the other, and a bad value
reads the same in both. Every error is one line that names the flag or the config file, never a
pydantic report or a traceback.

Nothing heavy is imported at module level: ``visionflow --help`` must stay instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvlib.strict import PRECISIONS

DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cuda, mps, cpu"


class OptionsError(ValueError):
    """A flag or config file the user can fix; its message is one line naming it."""


class DeprecatedFlag(argparse.Action):
    """An old flag name that still works for one release, with a warning naming its successor."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is deprecated and will be removed in the next release; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden alias of the already declared ``new`` (same destination)."""
    dest = next(a.dest for a in parser._actions if new in a.option_strings)
    parser.add_argument(old, dest=dest, action=DeprecatedFlag, new=new, default=argparse.SUPPRESS, **kwargs)


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the configuration field it sets (a dotted path)."""

    name: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")


# The retraining flags, in help order. Defaults are None: an absent flag leaves the value from the
# config file or from the options records (the one home of every default) alone.
RETRAIN_FLAGS: tuple[Flag, ...] = (
    Flag("--epochs", "train.epochs", {"type": int}),
    Flag("--image-size", "augment.image_size", {"type": int, "help": "side of the square crop the model sees"}),
    Flag("--batch-size", "train.batch_size", {"type": int, "help": "per process"}),
    Flag("--arch", "train.arch", {"help": "torchvision model name, or simple_cnn"}),
    Flag("--weights", "train.weights", {"help": "DEFAULT, a torchvision weights name, none, or a file path"}),
    Flag("--lr", "train.lr", {"type": float}),
    Flag("--seed", "train.seed", {"type": int}),
    Flag("--model-name", "model_name", {"help": "registered model name in MLflow"}),
    Flag("--loader-workers", "train.num_workers", {"type": int, "help": "DataLoader worker processes (per process)"}),
    Flag("--device", "train.device", {"help": DEVICE_HELP}),
    Flag("--precision", "train.precision", {"choices": PRECISIONS}),
    Flag("--freeze-backbone", "train.freeze_backbone", {"action": "store_const", "const": True,
                                                         "help": "train only the classification head"}),
    Flag("--head-epochs", "train.head_epochs", {"type": int, "help": "epochs training the head alone first "
                                                "(default: 1 with pretrained weights, 0 with none)"}),
    Flag("--early-stopping-patience", "train.early_stopping_patience",
         {"type": int, "help": "stop after this many epochs without a better val_top1 (default: off)"}),
    Flag("--no-export", "export.enabled", {"action": "store_const", "const": False,
                                           "help": "skip the OpenVINO export after the champion gate"}),
)  # fmt: skip


def add_config_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="JSON file with any part of the configuration (`visionflow config` prints it all); flags override it")  # fmt: skip


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """Declare ``flags`` (default None: an absent flag leaves the record's default alone)."""
    for flag in flags:
        parser.add_argument(flag.name, dest=flag.dest, default=None, **flag.kwargs)


def options_from(model_cls, flags: Sequence[Flag], args: argparse.Namespace, **fixed: Any):
    """An options record from the ``flags`` given on the command line (plus ``fixed`` values);
    the defaults stay in ``model_cls``, and a bad value is one line naming its flag."""
    given = flags_given(flags, args)
    return validated(model_cls, given | fixed, flags={f.path: f.name for f in flags if f.path in given})


def flags_given(flags: Sequence[Flag], args: argparse.Namespace) -> dict[str, Any]:
    """{field path: value} for the ``flags`` given on the command line (absent ones are None)."""
    return {f.path: getattr(args, f.dest) for f in flags if getattr(args, f.dest, None) is not None}


def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and every retraining flag, plus the old names that still work for one release."""
    add_config_file(parser)
    add_flags(parser, RETRAIN_FLAGS)
    add_deprecated(parser, "--workers", "--loader-workers", type=int)


def read_config_file(path: str | None) -> dict[str, Any]:
    """The ``--config`` file as a dict (empty without one); a missing or malformed file is one line."""
    if not path:
        return {}
    p = Path(path).expanduser()
    if not p.is_file():
        raise OptionsError(f"config file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionsError(f"config file {p} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise OptionsError(f"config file {p} must hold a JSON object (see `visionflow config`), not {type(data).__name__}")
    return data


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def retrain_config(args: argparse.Namespace):
    """Defaults of :class:`cvlib.config.RetrainConfig`, then the ``--config`` file, then the flags
    given; validated as a whole. The one way command-line arguments become a RetrainConfig."""
    from cvlib.config import RetrainConfig, merge_into

    config_file = getattr(args, "config", None)
    from_file = read_config_file(config_file)
    data = merge_into(RetrainConfig().model_dump(), from_file)
    given = flags_given(RETRAIN_FLAGS, args)
    for path, value in given.items():
        _set(data, path, value)
    train_file, train = from_file.get("train"), data.get("train")
    weights_chosen = "train.weights" in given or (isinstance(train_file, dict) and "weights" in train_file)
    if not weights_chosen and isinstance(train, dict) and train.get("arch") in _custom_archs():
        train["weights"] = "none"  # no pretrained weights exist for visionflow's own models
    return validated(RetrainConfig, data, flags={f.path: f.name for f in RETRAIN_FLAGS if f.path in given},
                     config_file=config_file)  # fmt: skip


def section_config(config_file: str | None, section: str, model_cls):
    """One section of a ``--config`` file (e.g. ``data`` for ``visionflow ingest``, which reads the
    file retrain takes) as its own record: the retraining-only rules of RetrainConfig do not apply."""
    from cvlib.config import merge_into

    part = read_config_file(config_file).get(section, {})
    data = merge_into(model_cls().model_dump(), part) if isinstance(part, dict) else part
    return validated(model_cls, data, config_file=config_file, prefix=section)


def _custom_archs() -> set[str]:
    from cvlib.models.names import CUSTOM_ARCH_NAMES  # not the factory: that imports torch

    return set(CUSTOM_ARCH_NAMES)


def validated(model_cls, data: Any, *, flags: dict[str, str] | None = None, config_file: str | None = None, prefix: str = ""):
    """``model_cls.model_validate(data)``, with a failure told as one line naming the flag (when
    a flag set the value) or the config file's key."""
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise OptionsError(describe(exc, flags or {}, config_file, prefix)) from None


def describe(exc, flags: dict[str, str], config_file: str | None, prefix: str = "") -> str:
    """One line for a pydantic error: ``--epochs: must be ... (got -3)``."""
    parts = []
    for err in exc.errors():
        path = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        where = flags.get(path) or (f"config file {config_file}: {path}" if config_file else path)
        value = err.get("input")
        # A whole section (a dict) would drown the line; a scalar says what was wrong.
        got = "" if err["type"] == "missing" or isinstance(value, (dict, list)) else f" (got {value!r})"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg[0].lower()}{msg[1:]}{got}")
    return "; ".join(parts)
