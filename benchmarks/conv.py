"""Vectorised conv2d vs the notebook's double loop (and PyTorch for scale), side by side.

Run: ``.venv/bin/python benchmarks/conv.py`` (about 10 s on 2 CPU cores).

All three run on one thread (BLAS and torch pinned with threadpoolctl / set_num_threads, change
with ``--threads``): the loop is single-threaded, so that is the like-for-like ratio, and it keeps
the figures stable on a busy machine, where OpenBLAS's spinning worker threads can make a
sub-millisecond matmul 20x slower.

Each figure is the best of several repeats, the usual way to time a short function: the minimum
is the run least disturbed by whatever else the machine was doing. The naive loop is slow enough
that a few repeats suffice; the fast ones are averaged over many calls per repeat.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from cvlib.toolkit.conv import conv2d, conv2d_naive  # noqa: E402

TARGET_SPEEDUP = 50.0


def best_seconds(fn, *, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--naive-repeat", type=int, default=3, help="repeats of the slow loop (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        return run(args, torch, F)


def run(args: argparse.Namespace, torch, F) -> int:

    rng = np.random.default_rng(0)
    image = rng.random((args.size, args.size), dtype=np.float32)
    image_t = torch.from_numpy(image)[None, None]

    print(
        f"conv2d on a {args.size}x{args.size} float32 single-channel image, stride 1, 'same' zero padding\n"
        f"numpy {np.__version__}, torch {torch.__version__}, {args.threads} thread(s) for BLAS and torch, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs\n"
    )
    header = f"{'kernel':>6} | {'naive loop (s)':>14} | {'conv2d (s)':>11} | {'speed-up':>9} | {'torch (s)':>10} | {'conv2d/torch':>12}"
    print(header)
    print("-" * len(header))

    ok = True
    for k in (3, 5):
        kernel = rng.standard_normal((k, k)).astype(np.float32)
        pad = k // 2
        kernel_t = torch.from_numpy(kernel)[None, None]

        # Same answer first: a fast wrong result would make the ratio meaningless.
        fast = conv2d(image, kernel, padding=pad)
        slow = conv2d_naive(image, kernel, padding=pad)
        ref = F.conv2d(image_t, kernel_t, padding=pad)[0, 0].numpy()
        np.testing.assert_allclose(fast, slow, atol=1e-4)
        np.testing.assert_allclose(fast, ref, atol=1e-4)

        t_naive = best_seconds(lambda: conv2d_naive(image, kernel, padding=pad), number=1, repeat=args.naive_repeat)
        t_fast = best_seconds(lambda: conv2d(image, kernel, padding=pad), number=50, repeat=5)
        with torch.inference_mode():
            t_torch = best_seconds(lambda: F.conv2d(image_t, kernel_t, padding=pad), number=50, repeat=5)
        speedup = t_naive / t_fast
        ok &= speedup >= TARGET_SPEEDUP
        print(
            f"{f'{k}x{k}':>6} | {t_naive:14.4f} | {t_fast:11.6f} | {speedup:8.0f}x | {t_torch:10.6f} | {t_fast / t_torch:11.1f}x"
        )

    print(f"\ntarget: conv2d at least {TARGET_SPEEDUP:.0f}x faster than the naive loop -> {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
