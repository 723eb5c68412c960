"""Faithfulness of a CAM: does the model rely on the pixels the map points at? Measured by
deletion, the share of confidence lost when the top CAM pixels are blurred away, against the
same number of random pixels (a map that points nowhere in particular loses no more than
random).

The forwards run like the CAM's own (:mod:`cvlib.explain.forward`): same targets, device,
dtype and precision rules, so the score describes the map it is given.
"""

from __future__ import annotations

import math

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
from cvlib.models.factory import eval_mode
from cvlib.models.precision import autocast

__all__ = ["DELETION_FRACTION", "deletion_score"]

#: Share of pixels blurred away to measure faithfulness (top CAM pixels vs random pixels).
DELETION_FRACTION = 0.2


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
    fraction: float = DELETION_FRACTION,
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
        images: normalised (N, C, H, W), as given to :func:`cvlib.explain.gradcam.grad_cam`.
        maps: (N, H, W) CAMs at the images' size.
        targets: as for :func:`cvlib.explain.gradcam.explain_batch` (None: the predicted class
            on the clean image).
        fraction: share of pixels deleted, in (0, 1].
        seed: seeds the random baseline, so reports are reproducible.
        blur_sigma: Gaussian sigma in pixels; default ``max(2, min(H, W) / 16)`` (14 at 224): strong
            enough to remove a small image's strokes, not only its finest texture.
        precision: the forwards' precision, as for :func:`cvlib.explain.gradcam.explain_batch`
            (probabilities are float32 either way).

    Returns:
        ``cam_drop`` and ``random_drop``: (N,) float32 arrays of p(target | clean) -
        p(target | deleted); ``cam_drop_mean`` and ``random_drop_mean``: their means (float).
    """
    check_images(images)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n, _, h, w = images.shape
    m = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    if m.shape != (n, h, w):
        raise ValueError(f"maps must be (N, H, W) = {(n, h, w)}, got {m.shape}")
    wanted = resolve_targets(targets, n)
    device, dtype = model_device_dtype(model)
    trunk_dtype = forward_dtype(precision, device, dtype)
    sigma = float(blur_sigma) if blur_sigma is not None else max(2.0, min(h, w) / 16.0)
    cam_mask, rand_mask = _deletion_masks(m, max(1, round(fraction * h * w)), seed)

    with plain_fp32(device), eval_mode(model), torch.no_grad():
        x = prepare_images(images, device, dtype)
        blurred = _blur(x, sigma)
        x_cam = torch.where(cam_mask.to(device), blurred, x)
        x_rand = torch.where(rand_mask.to(device), blurred, x)

        def forward(v: torch.Tensor) -> torch.Tensor:
            with autocast(device, trunk_dtype):
                return logits_of(model(v), model)

        probs = [torch.softmax(forward_any_layout(forward, v).float(), dim=1) for v in (x, x_cam, x_rand)]
        chosen = probs[0].argmax(dim=1) if wanted is None else wanted.to(probs[0].device)
        check_target_range(chosen, probs[0].shape[1])
        p0, p_cam, p_rand = (p.gather(1, chosen[:, None]).squeeze(1).cpu().numpy() for p in probs)

    cam_drop = (p0 - p_cam).astype(np.float32)
    random_drop = (p0 - p_rand).astype(np.float32)
    return {
        "cam_drop": cam_drop,
        "random_drop": random_drop,
        "cam_drop_mean": float(cam_drop.mean()),
        "random_drop_mean": float(random_drop.mean()),
    }


def _deletion_masks(maps: np.ndarray, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, H, W) boolean masks of the ``k`` highest pixels of each (N, H, W) map and of ``k``
    seeded random pixels per image. NaN ranks lowest: a broken map deletes nothing useful."""
    n, h, w = maps.shape
    m = np.nan_to_num(maps.astype(np.float32).reshape(n, h * w), nan=-np.inf)
    # Stable sort so ties (a flat map) resolve the same way every run.
    cam_idx = np.argsort(-m, axis=1, kind="stable")[:, :k]
    rng = np.random.default_rng(seed)
    rand_idx = np.argsort(rng.random((n, h * w)), axis=1)[:, :k]

    def mask_of(idx: np.ndarray) -> torch.Tensor:
        mask = np.zeros((n, h * w), dtype=bool)
        np.put_along_axis(mask, idx, True, axis=1)
        return torch.from_numpy(mask.reshape(n, 1, h, w))

    return mask_of(cam_idx), mask_of(rand_idx)
