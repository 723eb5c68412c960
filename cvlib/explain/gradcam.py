"""Class activation maps (Grad-CAM, Grad-CAM++, EigenCAM) for torchvision CNNs, batched, plus
the small helpers a report needs: colour overlays and a deletion-based faithfulness score.

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
* hooks and grad mode are restored in ``finally`` blocks, every module's train/eval flag is
  restored, and the CAM arithmetic runs in float32 even under a caller's autocast;
* the input goes in channels-last (ordinary layout for models that ``.view()`` conv outputs),
  and with ``precision="auto"`` (what reports use) the forward runs in bf16 where the hardware
  has it, while the gradient and the maps stay float32: on this CPU that is about twice as
  fast at Pearson r > 0.999 against the fp32 maps;
* vision transformers work too: a (N, 1 + s*s, D) token output is laid out on its s x s patch
  grid (:func:`tokens_to_grid`) and the default layer is the last block's first LayerNorm.

This module is part of the pure library: it imports torch, torchvision, numpy (and matplotlib
lazily, for colour maps) and nothing from Prefect or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvlib.models.factory import eval_mode
from cvlib.models.precision import PRECISIONS, autocast, inference_dtype

__all__ = [
    "METHODS",
    "CamMethod",
    "CamResult",
    "TargetsLike",
    "default_target_layer",
    "deletion_score",
    "explain_batch",
    "grad_cam",
    "heatmap_rgb",
    "overlay",
    "resolve_target_layer",
    "tokens_to_grid",
]

CamMethod = Literal["gradcam", "gradcam++", "eigencam"]
METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "eigencam")

#: One class index for all images, one per image, or ``None`` for each image's predicted class.
TargetsLike = int | Sequence[int] | np.ndarray | torch.Tensor | None

# Relative size below which a map's range counts as "flat" (numerical noise, not signal):
# a constant map upsampled bilinearly differs from itself only by rounding.
_FLAT_RTOL = 1e-6


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


# --------------------------------------------------------------------------------------------
# target layer
# --------------------------------------------------------------------------------------------

# Layers that keep a (N, C, h, w) map as it is, so they may follow the last convolution and
# still be "the last convolutional feature map" (VGG's final ReLU+MaxPool, DenseNet's norm5,
# MNASNet's trailing BN+ReLU).
_SPATIAL_TAIL = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.MaxPool2d,
    nn.AvgPool2d,
)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _last_conv_child(container: nn.Module) -> nn.Module | None:
    """The last direct child of ``container`` that holds a Conv2d, extended over the purely
    spatial layers (norm, activation, non-adaptive pooling) right after it.

    Registration order stands in for execution order, which holds for ``nn.Sequential`` and
    for torchvision's CNNs. Auxiliary heads (Inception/GoogLeNet ``aux*``) are skipped: they do
    not run in eval mode and are not the trunk.
    """
    children = [(n, m) for n, m in container.named_children() if not n.lower().startswith("aux")]
    last = None
    for i, (_, m) in enumerate(children):
        if _has_conv(m):
            last = i
    if last is None:
        return None
    while last + 1 < len(children) and isinstance(children[last + 1][1], _SPATIAL_TAIL):
        last += 1
    return children[last][1]


def _last_vit_block(model: nn.Module) -> nn.Module | None:
    """The pre-attention LayerNorm of a ViT's last encoder block, or None for other models."""
    blocks = getattr(getattr(model, "encoder", None), "layers", None)
    if blocks is None:
        blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        return None
    for name in ("ln_1", "norm1"):  # torchvision, timm
        norm = getattr(blocks[-1], name, None)
        if isinstance(norm, nn.LayerNorm):
            return norm
    return None


def default_target_layer(model: nn.Module) -> nn.Module:
    """Pick the layer whose output is the last convolutional feature map, the standard Grad-CAM
    choice (coarse enough to be semantic, still spatial).

    Rules, in order:

    1. ResNet family (``layer4``): ``model.layer4[-1]``, the last bottleneck/basic block.
    2. Models with a ``features`` trunk (VGG, AlexNet, DenseNet, SqueezeNet, EfficientNet,
       MobileNet v2/v3, ConvNeXt): the last child of ``features`` that holds a convolution,
       extended over trailing norm/activation/pooling layers (VGG: the final MaxPool, DenseNet:
       ``norm5``, EfficientNet/MobileNet/ConvNeXt: the last block).
    3. Anything else (RegNet, ShuffleNet, MNASNet, Inception, a plain ``nn.Sequential``): the
       same rule applied to the model's own children.

    0. Vision transformers (torchvision's ``encoder.layers``, timm's ``blocks``): the first
       LayerNorm of the last encoder block. Its output is (N, 1 + s*s, D) tokens, turned into an
       (N, D, s, s) map by :func:`tokens_to_grid`. Not the last block's output: only the class
       token feeds the head, so after the last block the patch tokens get no gradient; before
       its attention they do (the common choice, as in pytorch-grad-cam's ViT tutorial).

    The choice is static (no probe forward), so it is cheap and deterministic. Other
    transformers (Swin) are not covered: pass ``target_layer``.

    Raises ValueError, naming the model type, when the model has no Conv2d to explain.
    """
    vit_block = _last_vit_block(model)
    if vit_block is not None:
        return vit_block
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, nn.Module):
        if isinstance(layer4, nn.Sequential) and len(layer4) > 0:
            return layer4[-1]
        return layer4
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module) and not isinstance(features, nn.Conv2d):
        found = _last_conv_child(features)
        if found is not None:
            return found
    found = _last_conv_child(model)
    if found is not None:
        if found is model:  # pragma: no cover - a container is never its own child
            raise AssertionError
        return found
    if isinstance(model, nn.Conv2d):
        return model
    raise ValueError(
        f"cannot choose a Grad-CAM target layer for {type(model).__name__}: it has no Conv2d "
        "(Grad-CAM needs a spatial feature map); pass target_layer= (a module or a dotted "
        "name such as 'layer4.2')"
    )


def resolve_target_layer(model: nn.Module, target_layer: nn.Module | str | None) -> nn.Module:
    """Turn ``None`` (default rule), a dotted module name or a module into a submodule of
    ``model``, failing early with ValueError when it is not one (a foreign module would never
    run, and the error would otherwise surface only after a full forward)."""
    if target_layer is None:
        return default_target_layer(model)
    if isinstance(target_layer, str):
        try:
            return model.get_submodule(target_layer)
        except AttributeError as exc:
            raise ValueError(
                f"{type(model).__name__} has no submodule named {target_layer!r}: {exc}"
            ) from None
    if not isinstance(target_layer, nn.Module):
        raise TypeError(f"target_layer must be an nn.Module, a dotted name or None, not {type(target_layer).__name__}")
    if not any(m is target_layer for m in model.modules()):
        raise ValueError(f"target_layer {type(target_layer).__name__} is not a submodule of {type(model).__name__}")
    return target_layer


# --------------------------------------------------------------------------------------------
# model state helpers
# --------------------------------------------------------------------------------------------


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in model.parameters():
        return t.device, (t.dtype if t.is_floating_point() else torch.float32)
    for t in model.buffers():
        return t.device, (t.dtype if t.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32




@contextmanager
def _plain_fp32_context(device: torch.device) -> Iterator[None]:
    """Leave a caller's inference mode and autocast: autograd needs normal tensors and the maps
    are meant to be float32 whatever precision the caller scores in."""
    with torch.inference_mode(False), torch.autocast(device_type=device.type, enabled=False):
        yield


def _forward_dtype(precision: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of the forward, or None for the model's own. A model already in
    reduced precision runs as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if model_dtype != torch.float32:
        return None
    return inference_dtype(precision, device)


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(N, T, D) transformer tokens -> (N, D, s, s) feature map, the "reshape transform" a ViT
    needs for Grad-CAM: with T = 1 + s*s the first token is the class token and is dropped
    (torchvision's ViT, timm's), with T = s*s every token is a patch.

    Raises ValueError when neither T nor T - 1 is a square: there is no grid to map back to.
    """
    n, t, d = tokens.shape
    for skip in (1, 0):
        s = math.isqrt(t - skip) if t - skip > 0 else 0
        if s > 0 and s * s == t - skip:
            return tokens[:, skip:, :].reshape(n, s, s, d).permute(0, 3, 1, 2)
    raise ValueError(
        f"cannot lay {t} tokens out on a square grid (neither {t} nor {t - 1} is a square); "
        "pick a layer with a spatial (N, C, h, w) output"
    )


def _spatial(act: torch.Tensor) -> torch.Tensor:
    return tokens_to_grid(act) if act.dim() == 3 else act


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (N, C, H, W), not {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if not images.is_floating_point():
        raise TypeError(f"images must be a normalised float tensor, got {images.dtype}")


def _prepare_images(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # clone() outside inference mode turns an inference tensor into a normal one; .to() alone
    # would keep it when nothing changes.
    x = images.detach().to(device=device, dtype=dtype)
    if x.is_inference():
        x = x.clone()
    return x


def _forward_any_layout(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
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


def _logits(out: object, model: nn.Module) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return out
    logits = getattr(out, "logits", None)  # namedtuple-style outputs
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        return logits
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise ValueError(f"{type(model).__name__} must return (N, num_classes) logits, got {shape}")


def _resolve_targets(targets: TargetsLike, n: int) -> torch.Tensor | None:
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


def _check_target_range(t: torch.Tensor, num_classes: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"targets must be class indices in [0, {num_classes}), got {t.tolist()}")


# --------------------------------------------------------------------------------------------
# CAM arithmetic (float32, batched)
# --------------------------------------------------------------------------------------------


def _gradcam_weights(grads: torch.Tensor) -> torch.Tensor:
    # Selvaraju et al. 2017: channel weight = spatially averaged gradient.
    return grads.mean(dim=(2, 3))


def _gradcampp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    # Chattopadhyay et al. 2018, eq. 19 with the exp(score) trick, as pytorch-grad-cam does:
    # alpha = g^2 / (2 g^2 + sum(A) g^3), weights = sum(alpha * relu(g)).
    g2 = grads * grads
    g3 = g2 * grads
    sum_a = acts.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (F.relu(grads) * alpha).sum(dim=(2, 3))


def _eigencam(acts: torch.Tensor) -> torch.Tensor:
    """Projection of each pixel's (centred) activation vector on the first principal component
    (Muhammad & Yeasin 2020). Gradient-free, hence class-agnostic.

    The SVD's sign is arbitrary; it is fixed so the map correlates positively with the total
    activation (the component points where the network "fires"), otherwise half the maps would
    come out inverted and then be clipped away by the ReLU.
    """
    n, c, h, w = acts.shape
    x = acts.reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
    x = x - x.mean(dim=1, keepdim=True)
    if h * w == 1:
        return torch.zeros(n, h, w, dtype=acts.dtype, device=acts.device)
    x64 = x.double()  # 49x2048-ish per image: float64 costs nothing and avoids sign flips on ties
    _, _, vh = torch.linalg.svd(x64, full_matrices=False)
    proj = (x64 @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)  # (N, hw)
    energy = acts.sum(dim=1).reshape(n, h * w).double()
    energy = energy - energy.mean(dim=1, keepdim=True)
    sign = torch.where((proj * energy).sum(dim=1) < 0, -1.0, 1.0).to(proj.dtype)
    proj = proj * sign[:, None]
    return proj.reshape(n, h, w).to(acts.dtype)


def _normalise_maps(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """ReLU'd (N, h, w) maps -> (N, H, W) float32 in [0, 1]: bilinear upsampling first, then a
    per-image min-max so every map spans exactly [0, 1]. Flat maps (all zero, constant, or
    non-finite) become zeros: dividing by a zero range would give NaN, and "no evidence" is the
    honest reading of a flat map."""
    cam = torch.nan_to_num(cam.float(), nan=0.0, posinf=0.0, neginf=0.0)
    up = F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = up.reshape(up.shape[0], -1)
    lo = flat.min(dim=1).values
    hi = flat.max(dim=1).values
    rng = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    ok = rng > _FLAT_RTOL * scale
    ok &= rng > 0
    denom = torch.where(ok, rng, torch.ones_like(rng))
    out = (up - lo[:, None, None]) / denom[:, None, None]
    out = torch.where(ok[:, None, None], out, torch.zeros_like(out)).clamp_(0.0, 1.0)
    return out.cpu().numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


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
            :func:`default_target_layer`. Its output must be (N, C, h, w), or (N, tokens, D)
            for a vision transformer (see :func:`tokens_to_grid`), and it must run exactly
            once per forward.
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
    _check_images(images)
    layer = resolve_target_layer(model, target_layer)
    n = images.shape[0]
    wanted = _resolve_targets(targets, n)
    device, dtype = _model_device_dtype(model)
    needs_grad = method != "eigencam"

    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: object, output: object) -> torch.Tensor:
        if captured:
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
        act = output.detach().to(dtype)
        if needs_grad:
            act.requires_grad_(True)
            # From here to the logits, record a graph: the only part we differentiate.
            torch.set_grad_enabled(True)
        captured.append(act)
        # A copy goes downstream so in-place ops after the layer (DenseNet's relu_, a
        # residual +=) cannot modify the leaf we differentiate against.
        return act.clone() if needs_grad else act

    forward_dtype = _forward_dtype(precision, device, dtype)
    grad_was = torch.is_grad_enabled()
    with _plain_fp32_context(device), eval_mode(model):
        x = _prepare_images(images, device, dtype)
        handle = layer.register_forward_hook(hook)
        try:

            def forward(v: torch.Tensor) -> torch.Tensor:
                captured.clear()  # a retried forward starts afresh
                torch.set_grad_enabled(False)  # no autograd before the target layer
                with autocast(device, forward_dtype):
                    return _logits(model(v), model)

            logits = _forward_any_layout(forward, x)
            if not captured:
                raise RuntimeError(f"target layer {type(layer).__name__} did not run in {type(model).__name__}'s forward")
            num_classes = logits.shape[1]
            if wanted is None:
                chosen = logits.detach().argmax(dim=1)
            else:
                chosen = wanted.to(logits.device)
                _check_target_range(chosen, num_classes)
            act = captured[0]
            if needs_grad:
                score = logits.gather(1, chosen[:, None]).sum()
                if not score.requires_grad:
                    raise RuntimeError(f"{type(model).__name__}'s output does not depend on the target layer's output")
                # inputs=[act] only: autograd walks act -> logits and nothing else, so no
                # parameter gradient is ever computed and no .grad is written.
                (grads,) = torch.autograd.grad(score, [act], allow_unused=True)
                if grads is None:
                    grads = torch.zeros_like(act)
            torch.set_grad_enabled(False)
            probs = torch.softmax(logits.detach().float(), dim=1)
            a = _spatial(act.detach().float())
            if method == "eigencam":
                cam = _eigencam(a)
            else:
                g = _spatial(grads.detach().float())
                w = _gradcam_weights(g) if method == "gradcam" else _gradcampp_weights(a, g)
                cam = (w[:, :, None, None] * a).sum(dim=1)
            cam = F.relu(cam)
            maps = _normalise_maps(cam, (images.shape[2], images.shape[3]))
        finally:
            handle.remove()
            torch.set_grad_enabled(grad_was)
            captured.clear()
    return CamResult(
        maps=maps,
        probs=probs.cpu().numpy().astype(np.float32, copy=False),
        targets=chosen.cpu().numpy().astype(np.int64, copy=False),
    )


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


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------


def heatmap_rgb(cam: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H, W) map in [0, 1] -> (H, W, 3) uint8 RGB through a matplotlib colour map.

    Values are clipped to [0, 1] and NaN shows as 0, so a bad map still renders."""
    import matplotlib  # lazy: only reports need it

    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be (H, W), got shape {cam.shape}")
    cam = np.clip(np.nan_to_num(cam, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](cam)  # (H, W, 4) float in [0, 1]
    return np.round(rgba[..., :3] * 255.0).astype(np.uint8)


def overlay(image_rgb_uint8: np.ndarray, cam: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map over an RGB image: ``(1 - alpha) * image + alpha * heatmap``, uint8.

    The cam must already be at the image's size (maps from :func:`grad_cam` are at the input
    tensor's size; resize the photo, not the map, so no detail is invented)."""
    img = np.asarray(image_rgb_uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {img.dtype}")
    cam = np.asarray(cam)
    if cam.shape != img.shape[:2]:
        raise ValueError(f"cam shape {cam.shape} does not match image size {img.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = heatmap_rgb(cam, cmap=cmap).astype(np.float32)
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * heat
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# faithfulness
# --------------------------------------------------------------------------------------------


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    h, w = images.shape[-2:]
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, min(h, w) - 1)  # reflect padding needs radius < size
    k = 2 * radius + 1
    return gaussian_blur(images, kernel_size=[k, k], sigma=[sigma, sigma])


def deletion_score(
    model: nn.Module,
    images: torch.Tensor,
    maps: np.ndarray | torch.Tensor,
    targets: TargetsLike,
    fraction: float = 0.2,
    seed: int = 0,
    blur_sigma: float | None = None,
    *,
    precision: str = "fp32",
) -> dict[str, np.ndarray | float]:
    """How much the target-class probability drops when the top ``fraction`` of CAM pixels is
    blurred away, against blurring the same number of random pixels.

    A faithful map points at pixels the model relies on, so its drop should beat the random
    one. Blur (not black) is the deletion: a constant patch is itself a strong out-of-
    distribution cue. Blurring the normalised tensor equals normalising the blurred photo (the
    normalisation is per-channel affine and the kernel sums to one).

    Args:
        images: normalised (N, C, H, W), as given to :func:`grad_cam`.
        maps: (N, H, W) CAMs at the images' size.
        targets: as for :func:`explain_batch` (None: the predicted class on the clean image).
        fraction: share of pixels deleted, in (0, 1].
        seed: seeds the random baseline, so reports are reproducible.
        blur_sigma: Gaussian sigma in pixels; default ``max(2, min(H, W) / 16)`` (14 at 224): strong
            enough to remove a small image's strokes, not only its finest texture.
        precision: the forwards' precision, as for :func:`explain_batch` (probabilities are
            float32 either way).

    Returns:
        ``cam_drop`` and ``random_drop``: (N,) float32 arrays of p(target | clean) -
        p(target | deleted); ``cam_drop_mean`` and ``random_drop_mean``: their means (float).
    """
    _check_images(images)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n, _, h, w = images.shape
    m = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    if m.shape != (n, h, w):
        raise ValueError(f"maps must be (N, H, W) = {(n, h, w)}, got {m.shape}")
    wanted = _resolve_targets(targets, n)
    device, dtype = _model_device_dtype(model)
    forward_dtype = _forward_dtype(precision, device, dtype)
    sigma = float(blur_sigma) if blur_sigma is not None else max(2.0, min(h, w) / 16.0)
    k = max(1, round(fraction * h * w))

    m = np.nan_to_num(m.astype(np.float32).reshape(n, h * w), nan=-np.inf)
    # Stable sort so ties (a flat map) resolve the same way every run.
    cam_idx = np.argsort(-m, axis=1, kind="stable")[:, :k]
    rng = np.random.default_rng(seed)
    rand_idx = np.argsort(rng.random((n, h * w)), axis=1)[:, :k]

    def mask_of(idx: np.ndarray) -> torch.Tensor:
        mask = np.zeros((n, h * w), dtype=bool)
        np.put_along_axis(mask, idx, True, axis=1)
        return torch.from_numpy(mask.reshape(n, 1, h, w)).to(device)

    with _plain_fp32_context(device), eval_mode(model), torch.no_grad():
        x = _prepare_images(images, device, dtype)
        blurred = _blur(x, sigma)
        x_cam = torch.where(mask_of(cam_idx), blurred, x)
        x_rand = torch.where(mask_of(rand_idx), blurred, x)

        def forward(v: torch.Tensor) -> torch.Tensor:
            with autocast(device, forward_dtype):
                return _logits(model(v), model)

        probs = [torch.softmax(_forward_any_layout(forward, v).float(), dim=1) for v in (x, x_cam, x_rand)]
        chosen = probs[0].argmax(dim=1) if wanted is None else wanted.to(probs[0].device)
        _check_target_range(chosen, probs[0].shape[1])
        p0, p_cam, p_rand = (p.gather(1, chosen[:, None]).squeeze(1).cpu().numpy() for p in probs)

    cam_drop = (p0 - p_cam).astype(np.float32)
    random_drop = (p0 - p_rand).astype(np.float32)
    return {
        "cam_drop": cam_drop,
        "random_drop": random_drop,
        "cam_drop_mean": float(cam_drop.mean()),
        "random_drop_mean": float(random_drop.mean()),
    }
