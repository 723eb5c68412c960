"""Checkpoints and model packages.

A *checkpoint* is everything needed to resume training (model, optimizer, scheduler, epoch, RNG
states, metadata), saved as plain dicts and tensors so that ``torch.load(weights_only=True)``
reads it: loading never runs pickled code. Saves are atomic (temp file, fsync, ``os.replace``),
so a crash mid-save leaves the previous checkpoint intact.

A *model package* is the deployable subset: ``model.safetensors`` plus ``visionflow.json``
(architecture, class names, preprocessing, head shape, training config, data set hash). It is
what MLflow stores and what scoring loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvlib.files.atomic import atomic_write
from cvlib.models.factory import create_model
from cvlib.models.names import PACKAGE_META, PACKAGE_WEIGHTS


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through :func:`cvlib.files.atomic.atomic_write`: a crash mid-save keeps the
    previous checkpoint."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a loadable visionflow checkpoint: {exc}") from exc


def read_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch records a ``last.pt`` holds (empty without one), read through a memory map
    so the weights and optimizer state are not loaded: what a tracker resuming a run needs to
    know which epochs are done."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("history", []))
    except Exception as exc:
        raise ValueError(f"{path} is not a loadable visionflow checkpoint: {exc}") from exc


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """The model skeleton a package's weights fit into (random init, no download)."""
    head = meta.get("head", {})
    return create_model(
        meta["arch"],
        len(meta["class_names"]),
        weights="none",
        hidden_dim=int(head.get("hidden_dim", 512)),
        dropout=float(head.get("dropout", 0.0)),
        **meta.get("model_kwargs", {}),
    )


def model_from_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    model = build_from_meta(meta)
    model.load_state_dict(ckpt["model"])
    return model.eval(), meta


def save_package(model: nn.Module, meta: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write a model package folder (safetensors weights + JSON metadata)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / PACKAGE_WEIGHTS))
    (out / PACKAGE_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return out


def load_package(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model package folder, or a checkpoint file written by training."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return model_from_checkpoint(path)
    meta_file = next(iter(sorted(path.rglob(PACKAGE_META))), None)
    if meta_file is None:
        raise FileNotFoundError(f"{path} holds no {PACKAGE_META}: not a visionflow model package")
    meta = json.loads(meta_file.read_text())
    model = build_from_meta(meta)
    model.load_state_dict(load_file(str(meta_file.parent / PACKAGE_WEIGHTS)))
    return model.eval(), meta


