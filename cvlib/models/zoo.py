"""ImageNet classifiers from torchvision's model zoo, as (model, meta) pairs that score like a
visionflow model package: the class names come from the weights' metadata
(``weights.meta["categories"]``) and the preprocessing from the weights' own eval transform.

Weights: ``DEFAULT`` or a torchvision weights name (downloaded into, or read from, the
``TORCH_HOME`` cache), a local state-dict file (``.pth``/``.pt``/``.safetensors``), or ``none``:
random initialisation from a fixed seed, so every process (and every Dask worker) builds the
same model, and the ``version`` says it is random. Offline, ``DEFAULT`` fails with
:class:`cvlib.models.factory.WeightsUnavailableError` naming ``--weights none``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from cvlib.models.factory import (
    WEIGHT_NAMES_HINT,
    WeightsUnavailableError,
    _read_state_file,
    load_pretrained_state,
)

ZOO_PREFIX = "torchvision/"
RANDOM_SEED = 0


def is_zoo_uri(uri: str) -> bool:
    return str(uri).startswith(ZOO_PREFIX)


def zoo_arch(uri: str) -> str:
    arch = str(uri).removeprefix(ZOO_PREFIX).strip("/")
    if not arch:
        raise ValueError(f"model URI {uri!r} names no architecture: use torchvision/ARCH, e.g. torchvision/resnet50")
    return arch


def _weights_enum(arch: str):
    try:
        return torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"torchvision has no ImageNet classifier {arch!r}; see torchvision.models.list_models()") from exc


def _is_path(weights: str) -> bool:
    return "/" in weights or Path(weights).suffix in (".pt", ".pth", ".safetensors")


def _named(enum, arch: str, weights: str):
    if weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError as exc:
        names = ", ".join(["DEFAULT", *(n for n in enum.__members__ if n != "DEFAULT")])
        raise ValueError(f"unknown weights {weights!r} for {arch}; choose one of {names}, 'none' or a file path") from exc


def zoo_version(arch: str, weights: str | None) -> str:
    """The version string predictions carry: the weights' name, ``random-seed0`` for random
    weights, or ``file-<sha256 prefix>`` for a local file (content, not name, so a replaced file
    is a new version)."""
    enum = _weights_enum(arch)  # an unknown architecture fails here, before any work starts
    w = "none" if weights is None else str(weights)
    if w.lower() in ("none", ""):
        return f"random-seed{RANDOM_SEED}"
    if _is_path(w):
        path = Path(w).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} does not exist; {WEIGHT_NAMES_HINT}")
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return f"file-{h.hexdigest()[:12]}"
    return _named(enum, arch, w).name


def imagenet_model(arch: str, weights: str | None = "DEFAULT") -> tuple[nn.Module, dict[str, Any]]:
    """A torchvision ImageNet classifier in eval mode and its scoring metadata."""
    enum = _weights_enum(arch)
    w = "none" if weights is None else str(weights)
    random = w.lower() in ("none", "")
    named = None if random or _is_path(w) else _named(enum, arch, w)
    described = named or enum.DEFAULT  # class names and preprocessing: the default weights' own
    builder = torchvision.models.get_model_builder(arch)
    if random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = builder(weights=None)
    else:
        model = builder(weights=None)
        state = load_pretrained_state(named) if named is not None else _read_state_file(Path(w).expanduser())
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsUnavailableError(f"{w} does not fit torchvision {arch}: {exc}; {WEIGHT_NAMES_HINT}") from exc
    tf = described.transforms()
    meta = {
        "arch": arch,
        "source": "torchvision",
        "weights": "none" if random else (named.name if named is not None else str(w)),
        "version": zoo_version(arch, w),
        "class_names": list(described.meta["categories"]),
        "preprocessing": {
            "image_size": int(tf.crop_size[0]),
            "resize_size": int(tf.resize_size[0]),
            "mean": [float(x) for x in tf.mean],
            "std": [float(x) for x in tf.std],
        },
    }
    return model.eval(), meta
