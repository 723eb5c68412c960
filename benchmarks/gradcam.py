"""Grad-CAM throughput: cvlib.explain.gradcam.grad_cam against pytorch-grad-cam's GradCAM, same model,
same batch, same layer, same targets, in one run.

    .venv/bin/python benchmarks/gradcam.py [--model resnet50] [--batch 8] [--size 224]
                                            [--repeats 5] [--warmup 2] [--threads N] [--profile]
                                            [--precision fp32 auto]

Prints a small table (median seconds per batch, maps/s) and the ratio ours / theirs, for ours
in fp32 and with precision "auto" (the report's default: the forward in bf16 on CPUs with
native bf16; the activation, its gradient and the maps in fp32), each with its Pearson r against theirs. The model
has random weights (no downloads here) with a fixed seed; throughput does not depend on the
weights' values. ``--profile`` adds a torch.profiler summary of where each side spends its time.

Why ours should be faster: pytorch-grad-cam runs the forward with autograd everywhere and a full
``.backward()`` that computes every parameter's gradient and every activation's gradient back
to the input; ours runs the trunk under no_grad and differentiates only target layer -> logits
with ``torch.autograd.grad(score, [activation])``, so the backward is the head alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvlib.explain.gradcam import grad_cam
from cvlib.models.precision import PRECISIONS, cpu_supports_bf16, inference_dtype


def _time_interleaved(
    fns: list[Callable[[], object]], warmup: int, repeats: int
) -> list[list[float]]:
    """Seconds per call for each fn, run in alternation (A B A B ...) so that load from other
    processes on a shared machine hits both sides alike instead of biasing the ratio."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return times


def _profile(label: str, fn: Callable[[], object], rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- profile: {label} (self CPU time, top {rows}) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument(
        "--precision", nargs="+", default=["fp32", "auto"], choices=PRECISIONS,
        help="trunk precisions of ours to measure (default: fp32 and auto, which the report uses)",
    )
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        print("pytorch-grad-cam is not installed: .venv/bin/pip install grad-cam", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    layer = model.layer4[-1] if hasattr(model, "layer4") else None
    if layer is None:
        from cvlib.explain.target_layer import default_target_layer

        layer = default_target_layer(model)
    with torch.no_grad():
        targets = model(x).argmax(dim=1).tolist()  # same explicit targets for both sides

    def ours_at(precision: str) -> Callable[[], np.ndarray]:
        return lambda: grad_cam(model, x, target_layer=layer, targets=targets, precision=precision)

    cam = GradCAM(model=model, target_layers=[layer])
    theirs_targets = [ClassifierOutputTarget(t) for t in targets]

    def theirs() -> np.ndarray:
        return cam(input_tensor=x, targets=theirs_targets)

    # Same maps? (a benchmark of two different things would mean nothing). Every variant of
    # ours is checked against the reference, the reduced-precision trunk included.
    ours = {p: ours_at(p) for p in args.precision}
    reference = theirs()
    corr = {}
    for p, fn in ours.items():
        a = fn()
        corr[p] = min(float(np.corrcoef(a[i].ravel(), reference[i].ravel())[0, 1]) for i in range(len(a)))

    names = list(ours)
    times = _time_interleaved([theirs, *ours.values()], args.warmup, args.repeats)
    ts_theirs, ts_ours = times[0], dict(zip(names, times[1:]))
    t_theirs = statistics.median(ts_theirs)
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam leaves .grad behind; ours never does

    n = args.batch
    print(
        f"{args.model}, batch {n}, {args.size}x{args.size}, layer {type(layer).__name__}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved runs after {args.warmup} warm-up"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, 1-min load average {load:.2f} (other jobs skew absolute times; the ratio is interleaved)")
    print(f"native bf16 on this CPU: {cpu_supports_bf16()} (precision 'auto' = {inference_dtype('auto', torch.device('cpu'))})")
    print()
    print(f"{'implementation':<34}{'s/batch':>9}{'maps/s':>9}{'ratio':>7}{'pairs min-max':>15}{'Pearson min':>13}")
    print(f"{'pytorch-grad-cam GradCAM':<34}{t_theirs:>9.3f}{n / t_theirs:>9.1f}{1.0:>7.2f}{'':>15}{1.0:>13.5f}")
    for p in names:
        t = statistics.median(ts_ours[p])
        pairs = [b / a for a, b in zip(ts_ours[p], ts_theirs)]
        label = f"cvlib grad_cam precision={p}"
        print(
            f"{label:<34}{t:>9.3f}{n / t:>9.1f}{t_theirs / t:>7.2f}"
            f"{f'{min(pairs):.2f}-{max(pairs):.2f}':>15}{corr[p]:>13.5f}"
        )
    print()
    print("ratio = pytorch-grad-cam's median s/batch / ours; pairs = the same ratio per interleaved round")

    if args.profile:
        for p, fn in ours.items():
            _profile(f"cvlib.explain.gradcam.grad_cam precision={p}", fn)
        _profile("pytorch-grad-cam GradCAM", theirs)
        model.zero_grad(set_to_none=True)
    cam.activations_and_grads.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
