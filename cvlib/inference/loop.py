"""The inference loop: batches of images in, float32 logits out. Scoring, validation during
training (:func:`cvlib.training.evaluate.evaluate`), the report's screening pass
(:func:`cvlib.explain.screening.screen_files`) and served requests all run their forwards here;
each keeps its own output (rows, loss and accuracy, probabilities).

The caller hands :func:`infer_batches` ``(payload, images)`` pairs and gets ``(payload, logits)``
back, in order; the payload is whatever it needs beside the logits (targets, the batch's items,
row positions), ``images`` may be None for a batch with nothing to run (its logits are None).

* **Mode**: the model is in eval mode for the whole loop and gets every module's own training
  flag back when the loop ends, however it ends (:func:`cvlib.models.factory.eval_mode`): the
  loop runs on a training model between epochs. It never changes the model otherwise: device,
  weights and their memory format stay as the caller has them.
* **Layout**: each batch goes to the device in ``memory_format``, channels-last by default
  (faster convolutions on oneDNN CPUs and cuDNN GPUs, whatever the weights' layout). A model that
  ``.view()``-s a convolution's output cannot take it: it gets the ordinary layout, from then on.
* **Precision**: the forward runs under ``torch.inference_mode()`` and autocast in ``amp_dtype``
  (:mod:`cvlib.models.precision`: :func:`~cvlib.models.precision.inference_dtype` for scoring, the
  training's own dtype for validation, None for fp32); logits come back as float32.
* **Scoring only**: ``fuse`` folds BatchNorm into the preceding convolutions of an eval-mode copy
  of the model, and ``compile`` runs that through ``torch.compile``, fed full batches only (one
  graph: a short batch is padded to ``batch_size``), falling back to eager mode if compiling fails.

* **Engines**: instead of a module, ``model`` may be a :class:`cvlib.inference.engines.BatchEngine`
  (an OpenVINO compiled model): a callable from images to float32 logits that owns its own
  device, precision and layout; the loop then only feeds it (mode, autocast, fusing and compiling
  are a module's).

The loop is a generator: the model stays in eval mode while the caller holds it suspended. A
caller that may stop early (a ``break``, an exception of its own) wraps it in
``contextlib.closing`` so that the mode comes back at once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn

from cvlib.models.factory import eval_mode
from cvlib.models.precision import autocast

__all__ = ["InferenceForward", "fuse_for_inference", "infer_batches"]

log = logging.getLogger(__name__)

P = TypeVar("P")

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> compiled, once per process
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weights fingerprint, fused copy)


def infer_batches(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[P, torch.Tensor | None]],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.channels_last,
    fuse: bool = False,
    compile: bool = False,
    batch_size: int = 0,
) -> Iterator[tuple[P, torch.Tensor | None]]:
    """``(payload, images)`` in, ``(payload, float32 logits on device)`` out, one pair per batch,
    in order; see the module docstring. ``batch_size`` matters only with ``compile``."""
    if not isinstance(model, nn.Module):  # an engine (cvlib.inference.engines)
        for payload, images in batches:
            yield payload, None if images is None else model(images)
        return
    with eval_mode(model):
        forward = InferenceForward(
            model, device, amp_dtype, memory_format=memory_format, fuse=fuse, compile=compile, batch_size=batch_size
        )
        for payload, images in batches:
            with torch.inference_mode():
                logits = None if images is None else forward(images)
            yield payload, logits


class InferenceForward:
    """One batch through the model as the loop runs it (see the module docstring): to the
    device in ``memory_format``, under autocast in ``amp_dtype``, optionally through the fused
    and compiled copy. Call it in eval mode and under ``torch.inference_mode()``."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        *,
        memory_format: torch.memory_format = torch.channels_last,
        fuse: bool = False,
        compile: bool = False,
        batch_size: int = 0,
    ) -> None:
        self.eager = fuse_for_inference(model) if fuse else model
        self.fn = _compiled(self.eager) if compile else self.eager
        self.pad_to = batch_size if compile else 0
        self.device, self.amp_dtype, self.memory_format = device, amp_dtype, memory_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, classes) float32 logits on the device."""
        x = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        n = x.shape[0]
        if self.pad_to and n < self.pad_to:
            x = torch.cat([x, x.new_zeros((self.pad_to - n, *x.shape[1:]))]).contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.amp_dtype):
            out = self._run(x)
        return out[:n].float()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The forward; a failed compiled call goes eager, a refused layout goes contiguous (each
        at most once, and for good)."""
        try:
            return self.fn(x)
        except Exception as exc:  # noqa: BLE001 - inductor's failures have many types
            if self.fn is not self.eager:
                log.warning("torch.compile failed (%s: %s); running in eager mode", type(exc).__name__, exc)
                _COMPILED.pop(self.eager, None)
                self.fn, self.pad_to = self.eager, 0
            elif _layout_refused(exc, x):
                log.info("%s cannot take channels-last input; using the contiguous layout", type(self.eager).__name__)
                self.memory_format = torch.contiguous_format
                x = x.contiguous()
            else:
                raise
        return self._run(x)


def _layout_refused(exc: Exception, x: torch.Tensor) -> bool:
    """A ``.view()`` on a channels-last activation (``x.view(x.size(0), -1)``, the notebook classic)."""
    return isinstance(exc, RuntimeError) and "view size is not compatible" in str(exc) and not x.is_contiguous()


def _compiled(model: nn.Module) -> nn.Module:
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


def _fingerprint(model: nn.Module) -> tuple:
    """Changes when a parameter or buffer is replaced or modified in place (an optimizer step)."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with every BatchNorm that follows a convolution folded into
    it (``torch.fx``), its weights channels-last: the same function, one pass over the activations
    fewer (about 10% on a CPU for ResNet-50). The model itself is not changed; one torch.fx cannot
    trace, or one in training mode, is returned as it is. Cached per model until its weights change."""
    key = _fingerprint(model)
    cached = _FUSED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    fused = model
    if not model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        try:
            from torch.fx.experimental.optimization import fuse

            fused = fuse(model).to(memory_format=torch.channels_last)
        except Exception as exc:  # noqa: BLE001 - tracing fails in many ways; fusing is optional
            log.debug("conv-bn fusion skipped for %s: %s", type(model).__name__, exc)
            fused = model
    _FUSED[model] = (key, fused)
    return fused
