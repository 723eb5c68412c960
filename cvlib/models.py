"""Model factory: torchvision backbones with visionflow's transfer head, and weight loading
that fails with a message a user can act on when pretrained weights cannot be had."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

WEIGHT_NAMES_HINT = "use --weights none for random initialisation or --weights PATH for a local file"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


def transfer_head(in_features: int, num_classes: int, *, hidden_dim: int = 512, dropout: float = 0.3) -> nn.Sequential:
    """Dropout -> Linear -> ReLU -> Dropout -> Linear, the notebook's head."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, num_classes),
    )


def _head_attr(model: nn.Module) -> tuple[nn.Module, str, int]:
    """Locate the final classifier layer: (parent module, attribute name, in_features)."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model, "fc", model.fc.in_features
    for attr in ("classifier", "heads"):
        block = getattr(model, attr, None)
        if isinstance(block, nn.Linear):
            return model, attr, block.in_features
        if isinstance(block, nn.Sequential):
            for i in range(len(block) - 1, -1, -1):
                if isinstance(block[i], nn.Linear):
                    return block, str(i), block[i].in_features
    raise ValueError(f"cannot find the classifier layer of {type(model).__name__}")


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    parent, attr, _ = _head_attr(model)
    return list(getattr(parent, attr).parameters())


def resolve_weights(arch: str, weights: str | None):
    """Return (torchvision weights enum or None, local path or None) for a ``--weights`` value."""
    if weights is None or str(weights).lower() in ("none", ""):
        return None, None
    if os.path.sep in str(weights) or Path(str(weights)).suffix in (".pt", ".pth", ".safetensors"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} does not exist; {WEIGHT_NAMES_HINT}")
        return None, path
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError as exc:
        raise ValueError(f"unknown architecture {arch!r}") from exc
    try:
        return enum[str(weights)] if str(weights) != "DEFAULT" else enum.DEFAULT, None
    except KeyError as exc:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise ValueError(f"unknown weights {weights!r} for {arch}; choose one of {names}, 'none' or a path") from exc


def load_pretrained_state(weights) -> dict[str, torch.Tensor]:
    """torchvision weights from the ``TORCH_HOME`` cache, downloading them if needed."""
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, OSError, RuntimeError from a bad hash...
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsUnavailableError(
            f"pretrained weights {weights} could not be loaded ({type(exc).__name__}: {exc}). "
            f"Put {Path(weights.url).name} in {cache.parent} (or set TORCH_HOME), or {WEIGHT_NAMES_HINT}."
        ) from exc


def create_model(
    arch: str,
    num_classes: int,
    *,
    weights: str | None = "none",
    hidden_dim: int = 512,
    dropout: float = 0.3,
    freeze_backbone: bool = False,
) -> nn.Module:
    """A torchvision classifier with its last layer replaced by the transfer head."""
    tv_weights, path = resolve_weights(arch, weights)
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError as exc:
        raise ValueError(f"unknown architecture {arch!r}; see torchvision.models.list_models()") from exc
    if tv_weights is not None:
        model.load_state_dict(load_pretrained_state(tv_weights))
    elif path is not None:
        _load_backbone_file(model, path)
    parent, attr, in_features = _head_attr(model)
    if freeze_backbone:
        for p in model.parameters():
            p.requires_grad_(False)
    setattr(parent, attr, transfer_head(in_features, num_classes, hidden_dim=hidden_dim, dropout=dropout))
    return model


def _load_backbone_file(model: nn.Module, path: Path) -> None:
    """Load a local backbone state dict (torchvision layout, or a visionflow checkpoint's
    ``model`` entry); the original classifier layer may be absent or of another size."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise WeightsUnavailableError(f"{path} holds no tensors that fit {type(model).__name__}; {WEIGHT_NAMES_HINT}")
    model.load_state_dict(usable, strict=False)


def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then Apple's MPS, then CPU; an explicit name wins."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_weights(arch: str, weights: str | None) -> str:
    """Make sure ``weights`` can be had before a long run starts; returns a description.

    Raises :class:`WeightsUnavailableError` with the remedy when they cannot.
    """
    tv_weights, path = resolve_weights(arch, weights)
    if tv_weights is None and path is None:
        return "random initialisation"
    if path is not None:
        return f"weights file {path}"
    load_pretrained_state(tv_weights)
    return f"pretrained {arch} {tv_weights}"
