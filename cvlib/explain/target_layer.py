"""Which layer a CAM reads: the default rule per architecture family, the caller's choice
(a module or a dotted name) checked against the model, and the token-to-grid rule that lets a
vision transformer's (N, tokens, D) output stand in for a (N, C, h, w) feature map.

The choice is static (no probe forward), so it is cheap and deterministic, and a wrong choice
fails before any image runs through the model. Feature maps (:mod:`cvlib.explain.featuremaps`)
share :func:`tokens_to_grid` so both views lay a ViT's tokens out the same way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["default_target_layer", "resolve_target_layer", "tokens_to_grid"]

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
