"""Running a classifier for an explanation: what Grad-CAM (:mod:`cvlib.explain.gradcam`) and the
deletion score (:mod:`cvlib.explain.faithfulness`) both need around the model's forward, so the
two agree on inputs, targets, device, dtype and precision.

* inputs are checked once, moved to the model's device and dtype, and taken out of a caller's
  inference mode (autograd needs normal tensors);
* the caller's autocast is left for plain float32, and the forward's own precision is chosen
  here (``precision="auto"``: bf16 where the hardware has it);
* the forward tries channels-last first (faster convolutions) and falls back for models that
  ``.view()`` a conv output;
* targets are one class per image, or None for the predicted class; never truncated or
  broadcast silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from cvlib.models.precision import PRECISIONS, inference_dtype

__all__ = [
    "TargetsLike",
    "check_images",
    "check_target_range",
    "forward_any_layout",
    "forward_dtype",
    "logits_of",
    "model_device_dtype",
    "plain_fp32",
    "prepare_images",
    "resolve_targets",
]

#: One class index for all images, one per image, or ``None`` for each image's predicted class.
TargetsLike = int | Sequence[int] | np.ndarray | torch.Tensor | None


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in model.parameters():
        return t.device, (t.dtype if t.is_floating_point() else torch.float32)
    for t in model.buffers():
        return t.device, (t.dtype if t.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


@contextmanager
def plain_fp32(device: torch.device) -> Iterator[None]:
    """Leave a caller's inference mode and autocast: autograd needs normal tensors and the maps
    are meant to be float32 whatever precision the caller scores in."""
    with torch.inference_mode(False), torch.autocast(device_type=device.type, enabled=False):
        yield


def forward_dtype(precision: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of the forward, or None for the model's own. A model already in
    reduced precision runs as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if model_dtype != torch.float32:
        return None
    return inference_dtype(precision, device)


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (N, C, H, W), not {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if not images.is_floating_point():
        raise TypeError(f"images must be a normalised float tensor, got {images.dtype}")


def prepare_images(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # clone() outside inference mode turns an inference tensor into a normal one; .to() alone
    # would keep it when nothing changes.
    x = images.detach().to(device=device, dtype=dtype)
    if x.is_inference():
        x = x.clone()
    return x


def forward_any_layout(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``forward(x)`` with ``x`` in channels-last memory format, falling back to the ordinary
    layout for models that cannot take it.

    NHWC input lets oneDNN/cuDNN run every conv in channels-last without touching the model's
    own parameters (about 1.3x for a ResNet-50 forward on this CPU, fp32 or bf16). A model that
    calls ``.view()`` on a conv output (``x.view(x.size(0), -1)``, the notebook classic) fails
    on a channels-last tensor; it gets a second forward in the layout it was written for.
    """
    try:
        return forward(x.contiguous(memory_format=torch.channels_last))
    except RuntimeError as exc:
        if "view size is not compatible" not in str(exc):
            raise
    return forward(x.contiguous())


def logits_of(out: object, model: nn.Module) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return out
    logits = getattr(out, "logits", None)  # namedtuple-style outputs
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        return logits
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise ValueError(f"{type(model).__name__} must return (N, num_classes) logits, got {shape}")


def resolve_targets(targets: TargetsLike, n: int) -> torch.Tensor | None:
    """(n,) int64 tensor, or None for "the predicted class". A sequence must have exactly one
    target per image: silently truncating or broadcasting would explain the wrong class."""
    if targets is None:
        return None
    if isinstance(targets, bool):
        raise TypeError("targets must be an int, a sequence of ints or None, not a bool")
    if isinstance(targets, (int, np.integer)):
        return torch.full((n,), int(targets), dtype=torch.int64)
    if isinstance(targets, torch.Tensor):
        arr = targets.detach().cpu().numpy()
    else:
        arr = np.asarray(targets)
    if arr.ndim == 0:
        return torch.full((n,), int(arr), dtype=torch.int64)
    if arr.ndim != 1:
        raise ValueError(f"targets must be 1-D (one class per image), got shape {arr.shape}")
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.mod(arr, 1) == 0))
    )
    if arr.size and not integral:
        raise ValueError(f"targets must be integer class indices, got {arr.dtype} {arr.tolist()}")
    if len(arr) != n:
        raise ValueError(f"got {len(arr)} targets for a batch of {n} images; give exactly one per image, an int, or None")
    return torch.as_tensor(arr.astype(np.int64))


def check_target_range(t: torch.Tensor, num_classes: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"targets must be class indices in [0, {num_classes}), got {t.tolist()}")
