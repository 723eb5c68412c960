"""Command-line arguments -> RetrainConfig: one declaration and one builder for `visionflow
retrain` and the torchrun launcher, and one line per bad value."""

from __future__ import annotations

import argparse
import json

import pytest

from cvlib.arguments import RETRAIN_FLAGS, OptionsError, add_retrain_arguments, retrain_config
from cvlib.config import RetrainConfig
from cvlib.training.ddp import build_config
from cvlib.training.ddp import make_parser as ddp_parser


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_retrain_arguments(p)
    return p.parse_args(list(argv))


def test_no_flags_give_the_defaults():
    assert retrain_config(parse()) == RetrainConfig()


def test_every_flag_reaches_its_field():
    args = parse("--epochs", "3", "--image-size", "48", "--batch-size", "5", "--arch", "resnet18", "--weights", "none",
                 "--lr", "0.01", "--seed", "7", "--model-name", "m", "--loader-workers", "0", "--device", "cpu",
                 "--precision", "bf16", "--freeze-backbone", "--head-epochs", "2", "--early-stopping-patience", "4", "--no-export")  # fmt: skip
    c = retrain_config(args)
    assert (c.train.epochs, c.augment.image_size, c.train.batch_size, c.train.arch, c.train.weights) == (3, 48, 5, "resnet18", "none")
    assert (c.train.lr, c.train.seed, c.model_name, c.train.num_workers, c.train.device) == (0.01, 7, "m", 0, "cpu")
    assert (c.train.precision, c.train.freeze_backbone, c.train.head_epochs, c.train.early_stopping_patience) == ("bf16", True, 2, 4)
    assert c.export.enabled is False
    assert len(RETRAIN_FLAGS) == 15  # a new flag gets a line above


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"epochs": 9, "lr": 0.5}, "data": {"val_fraction": 0.3}}))
    c = retrain_config(parse("--config", str(cfg), "--epochs", "2"))
    assert (c.train.epochs, c.train.lr, c.data.val_fraction) == (2, 0.5, 0.3)
    assert c.train.batch_size == RetrainConfig().train.batch_size


def test_own_architectures_default_to_random_weights_unless_asked(tmp_path):
    assert retrain_config(parse("--arch", "simple_cnn")).train.weights == "none"
    assert retrain_config(parse("--arch", "simple_cnn", "--weights", "x.pt")).train.weights == "x.pt"
    assert retrain_config(parse("--arch", "resnet18")).train.weights == "DEFAULT"


def test_old_flag_name_still_works_and_says_so(capsys):
    c = retrain_config(parse("--workers", "3"))
    assert c.train.num_workers == 3
    assert "--workers is deprecated" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "file", "expected"),
    [
        (["--epochs", "-3"], None, "--epochs: input should be greater than or equal to 1 (got -3)"),
        (["--lr", "0"], None, "--lr: input should be greater than 0 (got 0.0)"),
        ([], {"train": {"epochs": 0}}, "c.json: train.epochs: input should be greater than or equal to 1 (got 0)"),
        ([], {"train": {"epoch": 3}}, "c.json: train.epoch: extra inputs are not permitted"),
        ([], [1, 2], "must hold a JSON object"),
        ([], {"train": 5}, "c.json: train: input should be a valid dictionary"),
        ([], {"data": {"val_fraction": 0}}, "c.json: data: val_fraction must be above 0 for retraining"),
        ([], "{not json", "is not valid JSON"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag_or_the_file(tmp_path, argv, file, expected):
    if file is not None:
        cfg = tmp_path / "c.json"
        cfg.write_text(file if isinstance(file, str) else json.dumps(file))
        argv = [*argv, "--config", str(cfg)]
    with pytest.raises(OptionsError) as info:
        retrain_config(parse(*argv))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(OptionsError, match="nope.json does not exist"):
        retrain_config(parse("--config", str(tmp_path / "nope.json")))


def test_the_launcher_takes_the_same_flags_and_builds_the_same_config(tmp_path):
    """`python -m cvlib.training.ddp` and `visionflow retrain`: one path, not two."""
    from flows.cli import make_parser

    argv = ["--epochs", "2", "--image-size", "40", "--loader-workers", "1", "--head-epochs", "0", "--precision", "fp32"]
    cli = make_parser().parse_args(["retrain", "data", *argv])
    ddp = ddp_parser().parse_args(["data", "--out", str(tmp_path), *argv])
    assert build_config(ddp) == retrain_config(cli)
    cli_flags = {o for a in make_parser()._subparsers._group_actions[0].choices["retrain"]._actions for o in a.option_strings}
    ddp_flags = {o for a in ddp_parser()._actions for o in a.option_strings}
    assert cli_flags - ddp_flags == {"--output-dir"}
    assert ddp_flags - cli_flags == {"--out", "--manifest", "--backend"}


def test_the_launcher_exits_with_one_line_on_a_bad_flag(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --epochs: "):
        build_config(ddp_parser().parse_args(["data", "--out", str(tmp_path), "--epochs", "0"]))


def test_the_torch_free_name_list_matches_the_factory():
    from cvlib.models.factory import CUSTOM_ARCHS
    from cvlib.models.names import CUSTOM_ARCH_NAMES

    assert set(CUSTOM_ARCH_NAMES) == set(CUSTOM_ARCHS)


def test_bad_flags_fail_without_importing_torch():
    """A typo must cost a fraction of a second, not a torch import."""
    import subprocess
    import sys

    code = ("import sys; from flows.cli import main; rc = main(['retrain', '.', '--epochs', '0']); "
            "print(rc, 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "False"]


def test_ingest_reads_the_data_section_alone(tmp_path):
    """`visionflow ingest --config` takes retrain's file but only its data part: a data set without
    a validation split may be ingested, and a typo is named with its section."""
    from cvlib.arguments import section_config
    from cvlib.data.options import DataConfig

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"data": {"val_fraction": 0.0, "min_images_per_class": 3}, "train": {"epochs": 2}}))
    data = section_config(str(cfg), "data", DataConfig)
    assert (data.val_fraction, data.min_images_per_class) == (0.0, 3)
    assert section_config(None, "data", DataConfig) == DataConfig()
    cfg.write_text(json.dumps({"data": {"val_fractoin": 0.3}}))
    with pytest.raises(OptionsError, match=r"c.json: data.val_fractoin: extra inputs are not permitted"):
        section_config(str(cfg), "data", DataConfig)
    cfg.write_text(json.dumps({"data": 5}))
    with pytest.raises(OptionsError, match=r"c.json: data: input should be a valid dictionary"):
        section_config(str(cfg), "data", DataConfig)


def test_export_flags_set_the_quantization_options_and_absent_ones_keep_the_defaults():
    from cvlib.arguments import options_from
    from cvlib.inference.options import ExportConfig
    from flows.parser import EXPORT_FLAGS, make_parser

    parser = make_parser()
    args = parser.parse_args(["export", "models:/m/1", "--int8", "--accuracy-control", "--keep-stem-and-head"])
    cfg = options_from(ExportConfig, EXPORT_FLAGS, args, int8=True)
    assert cfg.accuracy_control and cfg.keep_stem_and_head
    args = parser.parse_args(["export", "models:/m/1", "--no-accuracy-control"])
    cfg = options_from(ExportConfig, EXPORT_FLAGS, args, int8=False)
    assert cfg.accuracy_control is False
    assert cfg.keep_stem_and_head == ExportConfig().keep_stem_and_head
