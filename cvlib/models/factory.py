"""Model factory: torchvision backbones with visionflow's transfer head, and weight loading
that fails with a message a user can act on when pretrained weights cannot be had."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

import torch
import torchvision
from torch import nn

from cvlib.models.heads import transfer_head
from cvlib.models.simple_cnn import build_simple_cnn

WEIGHT_NAMES_HINT = "use --weights none for random initialisation or --weights PATH for a local file"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


class NoPretrainedWeightsError(WeightsUnavailableError, ValueError):
    """Named weights were asked for an architecture that has none (a ValueError: the request is
    wrong, not the machine; a WeightsUnavailableError: the CLI's preflight prints it as one line)."""


# Architectures visionflow builds itself, checked before torchvision's registry. A builder takes
# (num_classes, **model_kwargs) and returns a model whose last layer is a Linear that
# ``_head_attr`` finds; create_model puts the transfer head there, as for torchvision models.
CUSTOM_ARCHS = {"simple_cnn": build_simple_cnn}


def _first_linear(block: nn.Sequential) -> nn.Linear:
    return next(m for m in block if isinstance(m, nn.Linear))


def _head_attr(model: nn.Module) -> tuple[nn.Module, str, int]:
    """Locate the final classifier layer: (parent module, attribute name, in_features)."""
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return model, "fc", fc.in_features
    if isinstance(fc, nn.Sequential) and getattr(fc, "is_transfer_head", False):
        return model, "fc", _first_linear(fc).in_features
    for attr in ("classifier", "heads"):
        block = getattr(model, attr, None)
        if isinstance(block, nn.Linear):
            return model, attr, block.in_features
        if isinstance(block, nn.Sequential) and getattr(block, "is_transfer_head", False):
            return model, attr, _first_linear(block).in_features
        if isinstance(block, nn.Sequential):
            # By child name, not index: ViT's ``heads`` names its Linear "head", and setting
            # attribute "0" would append a second head instead of replacing it.
            for name, child in reversed(list(block.named_children())):
                if isinstance(child, nn.Linear):
                    return block, name, child.in_features
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
    if arch in CUSTOM_ARCHS:
        raise NoPretrainedWeightsError(
            f"no pretrained weights exist for {arch} (it trains from scratch), so {weights!r} cannot be had; "
            f"{WEIGHT_NAMES_HINT}"
        )
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
    """torchvision weights from the ``TORCH_HOME`` cache, downloading them if needed.

    torch.hub writes ``Downloading: "URL" to PATH`` to stdout before it tries. Offline that
    line would come before the failure and read as a download under way, so while a download
    runs stdout is held back (process-wide, for that call only) and written out once it
    succeeded; a failure is one :class:`WeightsUnavailableError` with the remedy and prints
    nothing. The download's progress bar is drawn only on a terminal."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    held = io.StringIO()
    try:
        with nullcontext() if cache.is_file() else redirect_stdout(held):
            state = weights.get_state_dict(progress=_stderr_is_terminal(), check_hash=True)
    except Exception as exc:  # URLError, HTTPError, OSError, RuntimeError from a bad hash...
        raise WeightsUnavailableError(
            f"pretrained weights {weights} could not be loaded ({type(exc).__name__}: {exc}). "
            f"Put {cache.name} in {cache.parent} (or set TORCH_HOME), or {WEIGHT_NAMES_HINT}."
        ) from exc
    sys.stdout.write(held.getvalue())
    return state


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def create_model(
    arch: str,
    num_classes: int,
    *,
    weights: str | None = "none",
    hidden_dim: int = 512,
    dropout: float = 0.3,
    freeze_backbone: bool = False,
    **model_kwargs,
) -> nn.Module:
    """A classifier (one of :data:`CUSTOM_ARCHS`, else torchvision's registry) with its last
    layer replaced by the transfer head.

    ``model_kwargs`` go to the architecture's constructor (``image_size=32`` for a small ViT,
    ``width=16`` for simple_cnn); a model package records none, so a model trained with them
    must be rebuilt with the same ones.
    """
    tv_weights, path = resolve_weights(arch, weights)
    if arch in CUSTOM_ARCHS:
        model = CUSTOM_ARCHS[arch](num_classes, **model_kwargs)
    else:
        try:
            builder = torchvision.models.get_model_builder(arch)
        except ValueError as exc:
            raise ValueError(
                f"unknown architecture {arch!r}; choose one of {', '.join(CUSTOM_ARCHS)} or see "
                "torchvision.models.list_models()"
            ) from exc
        model = builder(weights=None, **model_kwargs)  # a bad kwarg's own error is not "unknown arch"
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


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle refused by weights_only, wrong format...
        raise WeightsUnavailableError(f"{path} is not a loadable weights file ({type(exc).__name__}: {exc}); {WEIGHT_NAMES_HINT}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a visionflow checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path} does not hold a state dict of tensors; {WEIGHT_NAMES_HINT}")
    return state


def _load_backbone_file(model: nn.Module, path: Path) -> None:
    """Load a local backbone state dict (torchvision layout, or a visionflow checkpoint's
    ``model`` entry). Every backbone tensor must be there with the right shape: a file from
    another architecture that happens to share a few shapes must not half-load silently. Only
    the classifier layer, which the transfer head replaces, may be absent or differ."""
    state = _read_state_file(path)
    parent, attr, _ = _head_attr(model)
    head_prefix = f"{attr}." if parent is model else None
    own = model.state_dict()
    backbone = {k: v for k, v in own.items() if head_prefix is None or not k.startswith(head_prefix)}
    if head_prefix is None:  # head inside a block (classifier.N): skip that block's last Linear
        head_module = getattr(parent, attr)
        head_names = {n for n, m in model.named_modules() if m is head_module}
        backbone = {k: v for k, v in backbone.items() if not any(k.startswith(h + ".") for h in head_names)}
    missing = [k for k in backbone if k not in state]
    wrong = [k for k in backbone if k in state and state[k].shape != backbone[k].shape]
    if not [k for k in backbone if k in state] and not missing:
        missing = list(backbone)
    if missing or wrong:
        detail = f"{len(missing)} missing (e.g. {missing[:3]}), {len(wrong)} of the wrong shape (e.g. {wrong[:3]})"
        if len(missing) == len(backbone):
            detail = "no tensors that fit"
        raise WeightsUnavailableError(f"{path} does not fit {type(model).__name__}: {detail}; {WEIGHT_NAMES_HINT}")
    model.load_state_dict({k: state[k] for k in backbone}, strict=False)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every module's own flag back (not one ``train(flag)``
    for all, which would lose a deliberately mixed state such as frozen BatchNorm in training)."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


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
        _read_state_file(path)  # fails now, with the remedy, rather than after ingestion
        return f"weights file {path}"
    load_pretrained_state(tv_weights)
    return f"pretrained {arch} {tv_weights}"
