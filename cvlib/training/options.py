"""Options of the training stage: the fine-tuning hyper-parameters.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cvlib.strict import Precision, StrictModel


class TrainConfig(StrictModel):
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
    precision: Precision = Field(
        "auto", description="auto: bf16 on CUDA (fp16 + grad scaler without bf16), fp32 on CPU (reproducible); bf16 on request."
    )
    channels_last: bool = Field(True, description="NHWC memory format: faster convolutions on GPUs and oneDNN CPUs.")
    seed: int = 0
    progress: bool = Field(True, description="Show a progress bar.")
