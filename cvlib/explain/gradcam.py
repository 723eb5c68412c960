"""Class activation maps (Grad-CAM, Grad-CAM++, EigenCAM) for torchvision CNNs and ViTs, batched:
one forward, one partial backward, the maps and the softmax probabilities of that forward.

Around it, by stage: the layer a CAM reads (:mod:`cvlib.explain.target_layer`), the forward's
inputs, targets and precision (:mod:`cvlib.explain.forward`), the methods' arithmetic
(:mod:`cvlib.explain.methods`), pictures of a map (:mod:`cvlib.explain.heatmap`) and its
deletion faithfulness score (:mod:`cvlib.explain.faithfulness`).

Why not just use pytorch-grad-cam? It runs a full ``.backward()`` through the whole network,
which computes (and accumulates into ``.grad``) the gradient of every parameter and of every
activation before the target layer, none of which a CAM needs. Here:

* the forward runs under ``torch.no_grad()`` up to the target layer; a forward hook on that
  layer turns grad mode on and swaps its output for a detached leaf, so autograd records only
  layer -> head (for a ResNet-50 that is the pooling and the classifier);
* the gradient is taken with ``torch.autograd.grad(score, [activation])``, so the engine only
  walks the path to the activation: parameter gradients are never computed and ``.grad`` is
  never touched, and a frozen backbone (``requires_grad=False`` everywhere) works;
* no module backward hooks (they are fragile with in-place ops and re-entrant modules);
* the same forward yields the softmax probabilities (:func:`explain_batch`), so a report does
  not need a second pass;
* the hook and what it caught are held in one object (:class:`_TargetLayerCapture`, as
  pytorch-grad-cam's ``ActivationsAndGradients``) that removes the hook and restores grad mode
  on the way out, exception or not; every module's train/eval flag is restored, and the CAM
  arithmetic runs in float32 even under a caller's autocast;
* the input goes in channels-last (ordinary layout for models that ``.view()`` conv outputs),
  and with ``precision="auto"`` (what reports use) the forward runs in bf16 where the hardware
  has it, while the gradient and the maps stay float32: on this CPU that is about twice as
  fast at Pearson r > 0.999 against the fp32 maps;
* vision transformers work too: a (N, 1 + s*s, D) token output is laid out on its s x s patch
  grid (:func:`~cvlib.explain.target_layer.tokens_to_grid`) and the default layer is the last
  block's first LayerNorm.

This module is part of the pure library: it imports torch, torchvision, numpy (and matplotlib
lazily, for colour maps, in its neighbours) and nothing from Prefect or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cvlib.explain.forward import (
    TargetsLike,
    check_images,
    check_target_range,
    forward_any_layout,
    forward_dtype,
    logits_of,
    model_device_dtype,
    plain_fp32,
    prepare_images,
    resolve_targets,
)
from cvlib.explain.methods import METHODS, CamMethod, class_activation_maps, normalise_maps
from cvlib.explain.target_layer import resolve_target_layer, tokens_to_grid
from cvlib.models.factory import eval_mode
from cvlib.models.precision import autocast

__all__ = ["CamResult", "explain_batch", "grad_cam"]


@dataclass(frozen=True)
class CamResult:
    """What one forward (+ one partial backward) gives: the maps and what the model predicted.

    maps:    (N, H, W) float32 in [0, 1], at the input's spatial size.
    probs:   (N, K) float32 softmax probabilities from the same forward.
    targets: (N,) int64 class index each map explains.
    """

    maps: np.ndarray
    probs: np.ndarray
    targets: np.ndarray


class _TargetLayerCapture:
    """The forward hook on the target layer and the activation it caught, held in one object so
    that one ``with`` releases everything: on the way out, exception or not, the hook is removed,
    the activation dropped and grad mode restored (the hook turns it on mid-forward).

    The hook swaps the layer's output for a detached leaf in the model's dtype and, when a
    gradient is wanted, turns grad mode on there: autograd then records target layer -> logits
    and nothing before it.
    """

    def __init__(self, layer: nn.Module, dtype: torch.dtype, *, needs_grad: bool) -> None:
        self.layer, self.dtype, self.needs_grad = layer, dtype, needs_grad
        self.activations: list[torch.Tensor] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._grad_was = True  # the caller's grad mode, read on entry

    def __enter__(self) -> _TargetLayerCapture:
        self._grad_was = torch.is_grad_enabled()
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        torch.set_grad_enabled(self._grad_was)
        self.activations.clear()

    @property
    def activation(self) -> torch.Tensor:
        return self.activations[0]

    def logits(self, model: nn.Module, x: torch.Tensor, device: torch.device, trunk_dtype: torch.dtype | None) -> torch.Tensor:
        """The model's (N, K) logits for ``x``: the trunk without autograd, under autocast to
        ``trunk_dtype``, channels-last first (:func:`~cvlib.explain.forward.forward_any_layout`).
        Raises RuntimeError when the target layer did not run."""

        def forward(v: torch.Tensor) -> torch.Tensor:
            self.activations.clear()  # a retried forward starts afresh
            torch.set_grad_enabled(False)  # no autograd before the target layer
            with autocast(device, trunk_dtype):
                return logits_of(model(v), model)

        logits = forward_any_layout(forward, x)
        if not self.activations:
            raise RuntimeError(f"target layer {type(self.layer).__name__} did not run in {type(model).__name__}'s forward")
        return logits

    def _hook(self, module: nn.Module, args: object, output: object) -> torch.Tensor:
        if self.activations:
            raise RuntimeError(
                f"target layer {type(module).__name__} ran more than once in one forward; "
                "choose a layer that runs once (e.g. a block, not a shared activation)"
            )
        if not isinstance(output, torch.Tensor) or output.dim() not in (3, 4):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"target layer {type(module).__name__} must output (N, C, h, w) or (N, tokens, D), got {shape}"
            )
        if output.dim() == 3:
            tokens_to_grid(output[:1].detach())  # fail now, before the backward, if it has no grid
        # The leaf is in the model's dtype (fp32) whatever the trunk ran in, so the gradient
        # w.r.t. it and the map are fp32. The rest of the forward stays under the same
        # autocast: a target layer inside a block has siblings (a ResNet's downsample branch)
        # that still receive bf16 tensors from the trunk, which fp32 ops would refuse.
        act = output.detach().to(self.dtype)
        if self.needs_grad:
            act.requires_grad_(True)
            # From here to the logits, record a graph: the only part we differentiate.
            torch.set_grad_enabled(True)
        self.activations.append(act)
        # A copy goes downstream so in-place ops after the layer (DenseNet's relu_, a
        # residual +=) cannot modify the leaf we differentiate against.
        return act.clone() if self.needs_grad else act

def explain_batch(
    model: nn.Module,
    images: torch.Tensor,
    targets: TargetsLike = None,
    method: CamMethod = "gradcam",
    target_layer: nn.Module | str | None = None,
    *,
    precision: str = "fp32",
) -> CamResult:
    """CAMs for a batch, one target class per image, plus the softmax probabilities from the
    same forward (a report shows both; a second forward would double the cost).

    Args:
        model: a classifier returning (N, K) logits. Left as found: train/eval flags, hooks,
            parameters and their ``.grad`` are all unchanged afterwards.
        images: normalised float tensor (N, C, H, W); moved to the model's device and dtype.
        targets: ``None`` (each image's predicted class), one int for all images, or exactly
            one class index per image (a length mismatch raises ValueError).
        method: "gradcam", "gradcam++" or "eigencam" (gradient-free; ``targets`` then only
            decide the returned ``targets`` array).
        target_layer: a submodule, a dotted name ("layer4.2"), or None for
            :func:`~cvlib.explain.target_layer.default_target_layer`. Its output must be
            (N, C, h, w), or (N, tokens, D) for a vision transformer (see
            :func:`~cvlib.explain.target_layer.tokens_to_grid`), and it must run exactly once
            per forward.
        precision: what the forward computes in (autocast): "fp32", "bf16", "fp16", or "auto"
            (bf16 on CUDA and on CPUs with native bf16, else fp32;
            :func:`cvlib.models.precision.inference_dtype`). The target layer's activation is taken
            as a leaf in the model's own dtype (float32), so its gradient and the CAM
            arithmetic are float32; the activation and the head carry the reduced precision's
            rounding (Pearson r > 0.999 against fp32 maps on ResNet-50). On an AVX512-BF16 CPU
            "auto" roughly halves the cost (see ``benchmarks/gradcam.py``).

    Only the target layer -> head part of the network is differentiated, so the cost is about
    one inference forward. Works with frozen backbones, inside ``torch.no_grad()`` /
    ``torch.inference_mode()`` and under autocast (the CAM itself is computed in float32).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_images(images)
    layer = resolve_target_layer(model, target_layer)
    wanted = resolve_targets(targets, images.shape[0])
    device, dtype = model_device_dtype(model)
    trunk_dtype = forward_dtype(precision, device, dtype)
    with plain_fp32(device), eval_mode(model):
        x = prepare_images(images, device, dtype)
        with _TargetLayerCapture(layer, dtype, needs_grad=method != "eigencam") as capture:
            logits = capture.logits(model, x, device, trunk_dtype)
            chosen = _chosen_classes(logits, wanted)
            act = capture.activation
            grads = _target_gradient(model, logits, chosen, act) if capture.needs_grad else None
            torch.set_grad_enabled(False)
            probs = torch.softmax(logits.detach().float(), dim=1)
            maps = normalise_maps(class_activation_maps(method, act, grads), (images.shape[2], images.shape[3]))
    return CamResult(
        maps=maps,
        probs=probs.cpu().numpy().astype(np.float32, copy=False),
        targets=chosen.cpu().numpy().astype(np.int64, copy=False),
    )


def _chosen_classes(logits: torch.Tensor, wanted: torch.Tensor | None) -> torch.Tensor:
    """The class each map explains: the caller's, checked against the logits' width, or the
    predicted one."""
    if wanted is None:
        return logits.detach().argmax(dim=1)
    chosen = wanted.to(logits.device)
    check_target_range(chosen, logits.shape[1])
    return chosen


def _target_gradient(model: nn.Module, logits: torch.Tensor, chosen: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """d(sum of the chosen logits) / d(activation). ``inputs=[act]`` only: autograd walks
    act -> logits and nothing else, so no parameter gradient is ever computed and no ``.grad``
    is written."""
    score = logits.gather(1, chosen[:, None]).sum()
    if not score.requires_grad:
        raise RuntimeError(f"{type(model).__name__}'s output does not depend on the target layer's output")
    (grads,) = torch.autograd.grad(score, [act], allow_unused=True)
    return torch.zeros_like(act) if grads is None else grads


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: nn.Module | str | None = None,
    targets: TargetsLike = None,
    method: CamMethod = "gradcam",
    *,
    precision: str = "fp32",
) -> np.ndarray:
    """(N, H, W) float32 maps in [0, 1] at the input's size; see :func:`explain_batch`, of
    which this is the thin wrapper for callers that want only the maps."""
    return explain_batch(
        model, images, targets=targets, method=method, target_layer=target_layer, precision=precision
    ).maps
