"""Mixed precision choices, and a training step under each on the devices present."""

from __future__ import annotations

import pytest
import torch

from cvlib.models.precision import autocast, autocast_dtype, inference_dtype, needs_grad_scaler
from cvlib.training.options import TrainConfig

CPU = torch.device("cpu")


def test_explicit_choices():
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp16", CPU) is torch.float16


def test_auto_training_on_cpu_is_fp32_for_reproducibility():
    assert autocast_dtype("auto", CPU) is None


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="fp8"):
        autocast_dtype("fp8", CPU)
    with pytest.raises(ValueError):
        TrainConfig(precision="fp8")


def test_grad_scaler_only_for_fp16_on_cuda():
    assert needs_grad_scaler(torch.device("cuda"), torch.float16)
    assert not needs_grad_scaler(torch.device("cuda"), torch.bfloat16)
    assert not needs_grad_scaler(CPU, torch.float16)


def test_inference_auto_on_cpu_follows_native_bf16():
    from cvlib.models.precision import cpu_supports_bf16

    assert inference_dtype("auto", CPU) == (torch.bfloat16 if cpu_supports_bf16() else None)


def test_bf16_autocast_step_on_cpu_learns():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))
    losses = []
    for _ in range(5):
        with autocast(CPU, torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_uses_bf16_or_fp16_with_scaler():
    dev = torch.device("cuda")
    dtype = autocast_dtype("auto", dev)
    assert dtype in (torch.bfloat16, torch.float16)
    assert needs_grad_scaler(dev, dtype) == (dtype == torch.float16)
    model = torch.nn.Linear(4, 2).to(dev)
    with autocast(dev, dtype):
        assert model(torch.randn(3, 4, device=dev)).dtype == dtype
