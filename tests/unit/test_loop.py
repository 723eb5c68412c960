"""cvlib.inference.loop: the one inference loop of scoring, validation, screening and serving.

Eval mode during the forwards and every module's own flag back afterwards, however the loop
ends; channels-last input without touching the model; autocast in the asked dtype with fp32
logits out; payloads passed through in order; BatchNorm folding on a copy only.
"""

from __future__ import annotations

from contextlib import closing

import pytest
import torch
from torch import nn

from cvlib.inference.loop import InferenceForward, fuse_for_inference, infer_batches

CPU = torch.device("cpu")


class Probe(nn.Module):
    """A small conv net that records, per forward, what the loop set up around it."""

    def __init__(self, fail_at: int | None = None, flatten_by_view: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)
        self.fail_at, self.flatten_by_view = fail_at, flatten_by_view
        self.seen: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append({
            "training": self.training, "bn_training": self.bn.training, "inference": torch.is_inference_mode_enabled(),
            "channels_last": x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
        })  # fmt: skip
        if self.fail_at is not None and len(self.seen) > self.fail_at:
            raise RuntimeError("forward exploded")
        h = self.bn(self.conv(x))
        h = h.view(h.size(0), -1) if self.flatten_by_view else h.flatten(1)
        out = self.fc(h)
        self.seen[-1]["fc_dtype"] = out.dtype
        return out


def _mixed_mode(model: nn.Module) -> dict[str, bool]:
    """Training, except the BatchNorm (a frozen backbone's statistics): a state one ``train(flag)`` would lose."""
    model.train()
    model.bn.eval()
    return {name: m.training for name, m in model.named_modules()}


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _pairs(n: int, size: int = 2):
    torch.manual_seed(0)
    return [(i, torch.randn(size, 3, 8, 8)) for i in range(n)]


def test_eval_mode_inside_and_every_flag_restored_after():
    model = Probe()
    before = _mixed_mode(model)
    out = list(infer_batches(model, _pairs(3), CPU))
    assert [p for p, _ in out] == [0, 1, 2]
    assert all(not s["training"] and not s["bn_training"] for s in model.seen)
    assert _flags(model) == before


def test_flags_restored_when_the_forward_raises():
    model = Probe(fail_at=1)
    before = _mixed_mode(model)
    results = infer_batches(model, _pairs(3), CPU)
    assert next(results)[0] == 0
    with pytest.raises(RuntimeError, match="forward exploded"):
        next(results)
    assert _flags(model) == before


def test_flags_restored_when_the_caller_stops_early():
    model = Probe()
    before = _mixed_mode(model)
    with closing(infer_batches(model, _pairs(3), CPU)) as results:
        for payload, _ in results:
            assert _flags(model) != before  # eval mode while the caller holds the loop
            break
    assert _flags(model) == before


def test_channels_last_input_by_default_and_the_callers_layout_when_asked():
    model = Probe()
    list(infer_batches(model, _pairs(1), CPU))
    list(infer_batches(model, _pairs(1), CPU, memory_format=torch.contiguous_format))
    assert [s["channels_last"] for s in model.seen] == [True, False]


def test_a_model_that_views_a_conv_output_falls_back_to_the_contiguous_layout():
    model = Probe(flatten_by_view=True).eval()
    out = list(infer_batches(model, _pairs(2), CPU))
    # First batch: channels-last refused, retried contiguous; second batch: contiguous at once.
    assert [s["channels_last"] for s in model.seen] == [True, False, False]
    with torch.inference_mode():
        expected = model(_pairs(2)[1][1])
    assert torch.allclose(out[1][1], expected)


def _traceable() -> nn.Sequential:
    """Conv + BatchNorm that torch.fx can trace and fold, with non-trivial running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model


def test_the_model_itself_is_not_changed():
    model = _traceable()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    list(infer_batches(model, _pairs(2), CPU, fuse=True))
    assert fuse_for_inference(model.eval()) is not model  # it was folded...
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model[0].weight.is_contiguous()  # ...on a copy: no channels_last weights left behind
    assert isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize(("amp_dtype", "inner"), [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_precision_autocast_inside_inference_mode_fp32_logits_out(amp_dtype, inner):
    model = Probe()
    out = list(infer_batches(model, _pairs(2), CPU, amp_dtype=amp_dtype))
    assert all(s["inference"] and s["fc_dtype"] == inner for s in model.seen)
    assert all(logits.dtype == torch.float32 and logits.shape == (2, 3) for _, logits in out)
    assert not torch.is_inference_mode_enabled()  # nothing leaks into the caller


def test_a_batch_without_images_keeps_its_place():
    model = Probe()
    pairs = [("a", torch.randn(2, 3, 8, 8)), ("b", None), ("c", torch.randn(1, 3, 8, 8))]
    out = list(infer_batches(model, pairs, CPU))
    assert [p for p, _ in out] == ["a", "b", "c"]
    assert out[1][1] is None and out[2][1].shape == (1, 3)
    assert len(model.seen) == 2


def test_fused_forward_computes_the_same_function():
    model = _traceable().eval()
    x = torch.randn(4, 3, 8, 8)
    fused = fuse_for_inference(model)
    assert fused is not model and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert fuse_for_inference(model) is fused  # cached until the weights change
    with torch.inference_mode():
        assert torch.allclose(InferenceForward(model, CPU, fuse=True)(x), model(x), atol=1e-5)
    with torch.no_grad():
        model[0].weight.mul_(2)  # an optimizer step, say
    assert fuse_for_inference(model) is not fused


def test_evaluate_runs_in_the_loop_and_restores_the_training_models_flags():
    from torch.utils.data import DataLoader, TensorDataset

    from cvlib.training.evaluate import evaluate

    torch.manual_seed(0)
    model = Probe()
    before = _mixed_mode(model)
    images, targets = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    ev = evaluate(model, DataLoader(TensorDataset(images, targets), batch_size=4), CPU, memory_format=torch.channels_last)
    assert _flags(model) == before
    assert [s["channels_last"] for s in model.seen] == [True, True] and not any(s["training"] for s in model.seen)
    model.eval()
    with torch.inference_mode():
        logits = model(images.contiguous(memory_format=torch.channels_last))
    assert ev.n == 6 and ev.loss == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
