"""Mixed precision: which autocast dtype a device should use, and the context to use it."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

from cvlib.strict import PRECISIONS

__all__ = ["PRECISIONS", "autocast", "autocast_dtype", "cpu_supports_bf16", "inference_dtype", "needs_grad_scaler"]


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 on the CPU
    is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means fp32 (no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On the CPU, "auto" stays fp32 for training: oneDNN's bf16 weight-gradient kernels are not
    # bit-reproducible run to run, and a seeded CPU run must be. Ask for bf16 explicitly for
    # speed (about 1.3x on AVX512-BF16 CPUs); inference uses :func:`inference_dtype`.
    return None


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Like :func:`autocast_dtype`, but "auto" also picks bf16 on CPUs with native bf16: scoring
    has no reproducibility-across-runs requirement on the last bits, only on the ranking."""
    if precision == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    return autocast_dtype(precision, device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
    return dtype == torch.float16 and device.type == "cuda"
