"""Pictures of a CAM: a colour heat map and its blend over the image the model saw, both uint8
RGB so a report can embed them as PNGs. matplotlib (for the colour maps) is imported only when a
picture is drawn."""

from __future__ import annotations

import numpy as np

__all__ = ["heatmap_rgb", "overlay"]


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
