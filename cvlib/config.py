"""Configuration models: the single home of every default.

The same objects are the Prefect flow parameters (the UI renders a form from them), the CLI's
options and the MLflow params (through :func:`flatten`), so a value is defined once and reads the
same everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Config(BaseModel):
    # Unknown keys are errors: a typo in a deployment's parameters must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=False)


class DataConfig(_Config):
    """How an image folder becomes a manifest and splits."""

    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of each class held out for validation.")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of each class held out for testing.")
    min_images_per_class: int = Field(2, ge=1, description="Fewer images than this in a class is an error.")
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="Decompression-bomb limit (Pillow's default); larger images are quarantined."
    )
    split_salt: str = Field("visionflow", description="Salt for the hash-based split; change it to reshuffle.")
    near_duplicates: bool = Field(True, description="Group re-encoded/resized copies (perceptual hash) so they share a split.")
    near_duplicate_distance: int = Field(
        4, ge=0, le=16, description="Largest pHash Hamming distance (of 64 bits) treated as a near-duplicate."
    )


class AugmentConfig(_Config):
    """Training-time augmentation and the evaluation preprocessing derived from it."""

    image_size: int = Field(224, ge=16, description="Side of the square crop the model sees.")
    resize_ratio: float = Field(
        256 / 224, ge=1.0, description="Eval resize side = image_size * resize_ratio, then a centre crop."
    )
    scale_min: float = Field(0.5, gt=0.0, le=1.0, description="RandomResizedCrop's smallest area fraction.")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip.")
    rotation: float = Field(15.0, ge=0.0, le=180.0, description="Largest random rotation in degrees.")
    color_jitter: float = Field(0.2, ge=0.0, le=1.0, description="Brightness/contrast/saturation jitter strength.")
    trivial_augment: bool = Field(
        False, description="TrivialAugmentWide (one random op of random strength per image), torchvision's recipe."
    )
    random_erase: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability of erasing a random rectangle (RandomErasing); 0 disables it."
    )
    mixup_alpha: float = Field(
        0.0, ge=0.0, description="MixUp Beta(alpha, alpha) on training batches (e.g. 0.2); 0 disables it."
    )
    cutmix_alpha: float = Field(
        0.0, ge=0.0, description="CutMix Beta(alpha, alpha) on training batches (e.g. 1.0); 0 disables it. "
        "With both alphas set, each batch gets one of the two at random."
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class TrainConfig(_Config):
    """Fine-tuning hyper-parameters."""

    arch: str = Field("resnet50", description="torchvision model name.")
    weights: str = Field(
        "DEFAULT", description="'DEFAULT' or a torchvision weights name, 'none' for random init, or a file path."
    )
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0, description="Linear warm-up length; may be fractional.")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="Cosine floor as a fraction of lr.")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max gradient norm; None disables clipping.")
    freeze_backbone: bool = Field(False, description="Train only the classification head.")
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    hidden_dim: int = Field(512, ge=1, description="Width of the transfer head's hidden layer.")
    head_epochs: int | None = Field(
        None, ge=0, description="Epochs that train the head alone (backbone frozen, its BatchNorm statistics too) "
        "before the whole network trains. None: 1 with pretrained weights (when epochs > 1), 0 with weights 'none'."
    )
    backbone_lr_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="Backbone learning rate as a fraction of lr (the head trains at lr). "
        "None: 0.1 with pretrained weights, 1.0 with weights 'none'."
    )
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="Keep an exponential moving average of the weights, updated every step "
        "with this decay (e.g. 0.999; warmed up over the first steps); it is what is validated and saved as best. "
        "None: off."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without improvement of early_stopping_monitor. None: off."
    )
    early_stopping_monitor: Literal["val_top1", "val_loss"] = Field(
        "val_top1", description="Validation metric early stopping watches (top-1 higher is better, loss lower)."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0.0, description="Smallest change of the monitored metric that counts as an improvement."
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (kept alive across epochs).")
    prefetch_factor: int = Field(2, ge=1, description="Batches each DataLoader worker prepares ahead.")
    device: str = Field("auto", description="'auto', 'cuda', 'mps', 'cpu' or a torch device string.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA (fp16 + grad scaler without bf16), fp32 on CPU (reproducible); bf16 on request."
    )
    channels_last: bool = Field(True, description="NHWC memory format: faster convolutions on GPUs and oneDNN CPUs.")
    seed: int = 0
    progress: bool = Field(True, description="Show a progress bar.")


class ScoreConfig(_Config):
    """Batch scoring."""

    batch_size: int = Field(64, ge=1)
    top_k: int = Field(5, ge=1)
    num_workers: int = Field(2, ge=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA and on CPUs with native bf16, else fp32."
    )


class ReportConfig(_Config):
    """Grad-CAM report."""

    samples: int = Field(24, ge=1, description="How many images the report explains.")
    seed: int = 0
    feature_maps: bool = Field(
        False, description="Add a 'Feature maps' section: what a few layers respond to in the first explained images. "
        "Off by default: it costs one more forward over those images and adds a PNG per image and layer to the page."
    )
    feature_map_layers: list[str] = Field(
        default_factory=list, description="Dotted module names (model.named_modules(), e.g. layer1.0.conv1 or "
        "features.block2); a name the model lacks fails before any image is explained. Empty: the first conv, the "
        "middle stage and the last conv-bearing stage, chosen from the model."
    )
    feature_map_images: int = Field(
        2, ge=1, description="How many explained images get feature maps (the first ones: misclassified first)."
    )
    feature_map_channels: int = Field(
        16, ge=1, le=256, description="Channels drawn per layer and image: those with the highest mean activation."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="What the report's forwards run in (the explained activation, its gradient and the "
        "maps are always fp32). auto: bf16 on CUDA and on CPUs with native bf16 (about twice as fast, maps within "
        "Pearson r 0.999 of fp32), else fp32."
    )

    @field_validator("feature_map_layers")
    @classmethod
    def _layer_names(cls, layers: list[str]) -> list[str]:
        names = [name.strip() for name in layers]
        if any(not name for name in names):
            raise ValueError("layer names must not be empty")
        return list(dict.fromkeys(names))


class GateConfig(_Config):
    """When a new version may replace the champion."""

    metric: str = Field("val_top1", description="Validation metric compared (higher is better).")
    margin: float = Field(0.0, ge=0.0, description="The challenger must beat the champion by more than this.")
    promote_on_class_change: bool = Field(
        False, description="Promote when the class list changed (the champion cannot be scored on the new labels)."
    )


class RetrainConfig(_Config):
    """Everything one retraining run needs beyond the data folder."""

    model_name: str = Field("visionflow", description="Registered model name in MLflow.")
    experiment: str = Field("visionflow", description="MLflow experiment name.")
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    log_system_metrics: bool = Field(True, description="Record CPU/GPU/memory use in the MLflow run while training.")


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten nested config into dotted keys, the shape MLflow params want."""
    out: dict[str, Any] = {}
    for key, value in config.model_dump().items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value


def merge_into(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge a partial configuration (e.g. a ``--config`` JSON file) into a full one."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_into(base[key], value)
        else:
            base[key] = value
    return base
