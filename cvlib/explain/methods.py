"""The CAM methods: from a target layer's activation (and, for Grad-CAM and Grad-CAM++, its
gradient) to one map per image in [0, 1] at the input's size.

All arithmetic is float32 (float64 inside EigenCAM's SVD) whatever precision the forward ran
in, batched over images. A transformer's (N, tokens, D) activation is laid out on its patch
grid first (:func:`cvlib.explain.target_layer.tokens_to_grid`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from cvlib.explain.target_layer import tokens_to_grid

__all__ = ["METHODS", "CamMethod", "class_activation_maps", "normalise_maps"]

CamMethod = Literal["gradcam", "gradcam++", "eigencam"]
METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "eigencam")

# Relative size below which a map's range counts as "flat" (numerical noise, not signal):
# a constant map upsampled bilinearly differs from itself only by rounding.
_FLAT_RTOL = 1e-6


def _spatial(act: torch.Tensor) -> torch.Tensor:
    return tokens_to_grid(act) if act.dim() == 3 else act


def class_activation_maps(method: CamMethod, acts: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    """ReLU'd (N, h, w) maps at the layer's resolution. ``grads`` (the gradient of the target
    scores w.r.t. ``acts``) is unused by EigenCAM, which is gradient-free."""
    a = _spatial(acts.detach().float())
    if method == "eigencam":
        cam = _eigencam(a)
    else:
        g = _spatial(grads.detach().float())
        w = _gradcam_weights(g) if method == "gradcam" else _gradcampp_weights(a, g)
        cam = (w[:, :, None, None] * a).sum(dim=1)
    return F.relu(cam)


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


def normalise_maps(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
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
