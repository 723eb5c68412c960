"""cvlib.config: the single home of every default.

The same objects are Prefect flow parameters, CLI options and (flattened) MLflow params, so the
tests pin the defaults people rely on, the strictness that catches typos in deployments, the
bounds, and the dotted-key shape MLflow receives.
"""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from cvlib.config import RetrainConfig, flatten
from cvlib.data.options import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, DataConfig
from cvlib.explain.options import ReportConfig
from cvlib.inference.options import ScoreConfig
from cvlib.training.options import TrainConfig

# --------------------------------------------------------------------------- defaults


def test_train_defaults_are_the_documented_recipe():
    """ResNet-50, pretrained, warm-up + cosine: what DESIGN.md promises when nothing is set."""
    t = TrainConfig()
    assert t.arch == "resnet50"
    assert t.weights == "DEFAULT"
    assert t.epochs == 10
    assert t.batch_size == 32
    assert t.lr == pytest.approx(1e-3)
    assert t.weight_decay == pytest.approx(0.05)
    assert t.warmup_epochs == pytest.approx(1.0)
    assert t.min_lr_ratio == pytest.approx(0.01)
    assert t.label_smoothing == pytest.approx(0.1)
    assert t.grad_clip == pytest.approx(1.0)
    assert t.freeze_backbone is False
    assert t.device == "auto"


def test_augment_defaults_use_imagenet_statistics():
    """Pretrained torchvision backbones expect ImageNet normalisation and a 224 crop from 256."""
    a = AugmentConfig()
    assert a.image_size == 224
    assert a.resize_ratio == pytest.approx(256 / 224)
    assert tuple(a.mean) == IMAGENET_MEAN
    assert tuple(a.std) == IMAGENET_STD


def test_data_defaults():
    d = DataConfig()
    assert d.val_fraction == pytest.approx(0.2)
    assert d.test_fraction == 0.0
    assert d.max_image_pixels == 89_478_485  # Pillow's own limit: never None, never raised silently
    assert d.split_salt == "visionflow"


def test_retrain_config_nests_fresh_defaults():
    """Nested sections come from default factories: two configs never share a mutable section."""
    a, b = RetrainConfig(), RetrainConfig()
    assert a == b
    assert a.train is not b.train
    a.train.epochs = 3
    assert b.train.epochs == 10
    assert isinstance(a.data, DataConfig) and isinstance(a.report, ReportConfig)
    assert ScoreConfig().top_k == 5


def test_json_round_trip():
    """A Prefect parameter goes through JSON; it must come back equal."""
    cfg = RetrainConfig(train=TrainConfig(arch="resnet18", epochs=2, grad_clip=None), augment=AugmentConfig(image_size=32))
    again = RetrainConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    assert again.train.grad_clip is None


# --------------------------------------------------------------------------- strictness


@pytest.mark.parametrize(
    "make",
    [
        lambda: TrainConfig(epochz=3),
        lambda: AugmentConfig(imagesize=32),
        lambda: DataConfig(val_fracton=0.1),
        lambda: ScoreConfig(topk=3),
        lambda: RetrainConfig(modelname="x"),
        lambda: RetrainConfig.model_validate({"train": {"learning_rate": 0.1}}),
    ],
    ids=["train", "augment", "data", "score", "retrain", "nested"],
)
def test_unknown_keys_are_rejected(make):
    """A typo in a deployment's parameters must fail, not be silently ignored."""
    with pytest.raises(ValidationError) as info:
        make()
    assert "extra" in str(info.value).lower()


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (TrainConfig, "epochs", 0),
        (TrainConfig, "batch_size", 0),
        (TrainConfig, "lr", 0.0),
        (TrainConfig, "weight_decay", -0.1),
        (TrainConfig, "min_lr_ratio", 1.5),
        (TrainConfig, "label_smoothing", 1.0),
        (TrainConfig, "grad_clip", 0.0),
        (TrainConfig, "dropout", 1.0),
        (TrainConfig, "num_workers", -1),
        (DataConfig, "val_fraction", 1.0),
        (DataConfig, "test_fraction", -0.1),
        (DataConfig, "min_images_per_class", 0),
        (DataConfig, "max_image_pixels", 0),
        (AugmentConfig, "image_size", 8),
        (AugmentConfig, "resize_ratio", 0.9),
        (AugmentConfig, "scale_min", 0.0),
        (AugmentConfig, "hflip", 1.5),
        (AugmentConfig, "rotation", 181.0),
        (ScoreConfig, "top_k", 0),
        (ReportConfig, "samples", 0),
    ],
)
def test_out_of_range_values_are_rejected(cls, field, value):
    with pytest.raises(ValidationError) as info:
        cls(**{field: value})
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (TrainConfig, "epochs", 1),
        (TrainConfig, "min_lr_ratio", 1.0),
        (TrainConfig, "min_lr_ratio", 0.0),
        (TrainConfig, "warmup_epochs", 0.5),
        (TrainConfig, "grad_clip", None),
        (DataConfig, "val_fraction", 0.0),
        (AugmentConfig, "image_size", 16),
        (AugmentConfig, "resize_ratio", 1.0),
        (AugmentConfig, "hflip", 1.0),
    ],
)
def test_boundary_values_are_accepted(cls, field, value):
    """The edges of each range are legal: ``grad_clip=None`` disables clipping, 16 px is the
    smallest crop the tests (and a ResNet) can use."""
    assert getattr(cls(**{field: value}), field) == value


def test_mean_must_have_three_channels():
    with pytest.raises(ValidationError):
        AugmentConfig(mean=(0.5, 0.5))


def test_strings_are_coerced_like_a_form_would_send_them():
    """The Prefect UI and the CLI hand over strings; numbers in strings must validate."""
    t = TrainConfig.model_validate({"epochs": "3", "lr": "0.01"})
    assert t.epochs == 3 and t.lr == pytest.approx(0.01)
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"epochs": "three"})


# --------------------------------------------------------------------------- flatten


def test_flatten_gives_dotted_keys_for_every_leaf():
    cfg = RetrainConfig(train=TrainConfig(arch="resnet18", lr=0.005), augment=AugmentConfig(image_size=32))
    flat = flatten(cfg)
    assert flat["model_name"] == "visionflow"
    assert flat["train.arch"] == "resnet18"
    assert flat["train.lr"] == pytest.approx(0.005)
    assert flat["augment.image_size"] == 32
    assert flat["data.val_fraction"] == pytest.approx(0.2)
    assert flat["report.samples"] == 24
    # Every leaf of every section is there, and nothing nested is left.
    sections = [k for k, v in type(cfg).model_fields.items() if isinstance(getattr(cfg, k), BaseModel)]
    expected = {k for k in type(cfg).model_fields if k not in sections}
    for section in sections:
        expected |= {f"{section}.{k}" for k in type(getattr(cfg, section)).model_fields}
    assert set(flat) == expected
    assert not any(isinstance(v, dict) for v in flat.values())


def test_flatten_prefix_and_values_are_loggable():
    """MLflow params are strings; every flattened value must be representable as one."""
    flat = flatten(TrainConfig(), prefix="cfg.")
    assert set(flat) == {f"cfg.{k}" for k in TrainConfig.model_fields}
    for value in flatten(RetrainConfig()).values():
        json.dumps(value)  # scalars, tuples/lists of scalars, or None


def test_retraining_needs_a_validation_split():
    """The gate compares validation metrics: a retrain config without a validation split is refused
    up front, while ingestion alone (DataConfig) may skip it."""
    from pydantic import ValidationError

    from cvlib.data.options import DataConfig

    assert DataConfig(val_fraction=0.0).val_fraction == 0.0
    with pytest.raises(ValidationError, match="val_fraction must be above 0"):
        RetrainConfig(data=DataConfig(val_fraction=0.0))


@pytest.mark.parametrize("name", ["it's", "two words", "a/b", "", "-leading", "x" * 201])
def test_model_names_that_would_break_a_registry_filter_are_refused(name):
    with pytest.raises(ValidationError, match="model_name"):
        RetrainConfig(model_name=name)


@pytest.mark.parametrize("name", ["visionflow", "ants-bees_v2.1", "A" * 200])
def test_plain_model_names_are_accepted(name):
    assert RetrainConfig(model_name=name).model_name == name
