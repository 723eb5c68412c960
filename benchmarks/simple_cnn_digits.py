"""SimpleCNN on scikit-learn's 1,797 handwritten digits: held-out test accuracy and wall time on CPU.

Run: ``.venv/bin/python benchmarks/simple_cnn_digits.py`` (target: >= 97% top-1 on the held-out
test split in under 120 s of training on 2 CPU cores; ``--recipe cli`` trains with what the CLI
flags below can set, everything else at visionflow's defaults).

The figure is the test split's (``--test-fraction``, 15% by default, decided by the content hash
like the others), measured once on the checkpoint that validation chose. The best validation
epoch's top-1 is printed too, but it is not the result: picking the best of N epochs on the
validation set and reporting that same set's accuracy is optimistic by construction.

It calls :func:`cvlib.training.fit.fit` directly (no Prefect, no MLflow), so the figure is the training
loop's own cost. The data are written exactly as ``visionflow demo-data DIR`` writes them (64 px
PNGs) and ingested with :func:`cvlib.data.ingest.build_manifest`, so the split follows the retrain
flow's rule (with a test share, which the flow's default leaves at 0; ``test_fraction: 0.15`` in
the ``data`` section of a ``--config`` file does the same). The nearest the CLI comes:

    visionflow retrain DIR --arch simple_cnn --weights none --image-size 32 --epochs 10 \\
        --batch-size 64 --lr 3e-3 --loader-workers 0

(the CLI cannot set the augmentation, head or smoothing, so it keeps visionflow's defaults:
hflip 0.5, rotation 15, scale_min 0.5, eval resize 256/224, label smoothing 0.1, a 512-unit
head; ``--recipe cli`` measures what that costs on digits).

The machine is shared: the script prints ``os.getloadavg()`` before and after, and the time per
epoch, so a slow figure can be told from a slow machine. Torch runs on one thread by default
here (``--threads 0`` for torch's own choice): for a 110k-parameter CNN at batch 64 a second
OpenMP thread saves about a third of an epoch on an idle machine, but on a loaded 2-core machine
it stalls whenever the other core is taken (measured: epochs of 2.6 s became 16-37 s, while one
thread held 4-8 s), and a benchmark should measure the code, not the neighbours.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

TARGET_TOP1 = 0.97
TARGET_SECONDS = 120.0


def simple_cnn_digits_config(*, epochs: int = 10, num_workers: int = 0, seed: int = 0):
    """The tuned recipe for SimpleCNN on the digits, as a :class:`cvlib.config.RetrainConfig`.

    Why each setting:

    * ``image_size=32, resize_ratio=1.0``: the digits are 8x8 originals, so 32 px holds all their
      information; the whole digit is the object, so no eval-time crop margin.
    * ``hflip=0``: digits are not mirror-symmetric (a flipped 2 is no digit); ``rotation=10`` and
      ``scale_min=0.8``: handwriting varies by a few degrees and in size, but a crop that cuts
      strokes off changes the class (a 7 becomes a 1).
    * ``color_jitter=0.1``: the images are grey ink on black; a little contrast change only.
    * ``mean/std 0.5``: the digit images are not ImageNet photos; BN copes either way, this just
      keeps the inputs centred.
    * ``lr=3e-3`` AdamW, 0.5 warm-up epoch, cosine: a from-scratch CNN of 100k parameters with BN
      takes a high rate; ``batch_size=64`` keeps BN statistics steady and steps cheap.
    * ``label_smoothing=0.05``, ``dropout=0.2``, ``hidden_dim=128``: mild regularisation for
      1,400 training images.
    * ``num_workers=0``: decoding a 64 px PNG costs less than a worker process's start-up and
      IPC on a 2-core machine.
    """
    from cvlib.config import RetrainConfig
    from cvlib.data.options import AugmentConfig
    from cvlib.training.options import TrainConfig

    return RetrainConfig(
        model_name="simple-cnn-digits",
        augment=AugmentConfig(
            image_size=32,
            resize_ratio=1.0,
            scale_min=0.8,
            hflip=0.0,
            rotation=10.0,
            color_jitter=0.1,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        train=TrainConfig(
            arch="simple_cnn",
            weights="none",
            epochs=epochs,
            batch_size=64,
            lr=3e-3,
            weight_decay=0.05,
            warmup_epochs=0.5,
            label_smoothing=0.05,
            dropout=0.2,
            hidden_dim=128,
            num_workers=num_workers,
            device="cpu",
            seed=seed,
            progress=False,
        ),
    )


def cli_equivalent_config(*, epochs: int = 10, num_workers: int = 0, seed: int = 0):
    """What ``visionflow retrain DIR --arch simple_cnn --weights none --image-size 32 --epochs 10
    --batch-size 64 --lr 3e-3 --loader-workers 0`` trains with, built by the CLI's own parser and
    builder (plus the device and no progress bar, which a benchmark fixes)."""
    from cvlib.arguments import retrain_config
    from flows.parser import make_parser

    argv = ["retrain", "DIR", "--arch", "simple_cnn", "--weights", "none", "--image-size", "32", "--epochs", str(epochs),
            "--batch-size", "64", "--lr", "3e-3", "--loader-workers", str(num_workers), "--seed", str(seed), "--device", "cpu"]
    config = retrain_config(make_parser().parse_args(argv))
    config.train.progress = False
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=["tuned", "cli"], default="tuned",
                        help="tuned: simple_cnn_digits_config(); cli: what the retrain CLI flags can set")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--loader-workers", dest="workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's own)")
    parser.add_argument("--data", default=None, help="digits folder to use or write (default: a temp folder)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share (model selection)")
    parser.add_argument("--test-fraction", type=float, default=0.15, help="held-out test share (the reported figure)")
    args = parser.parse_args(argv)

    import torch

    from cvlib.data.demo import write_digits
    from cvlib.data.ingest import build_manifest
    from cvlib.data.manifest import class_names
    from cvlib.data.options import DataConfig
    from cvlib.training.checkpoint import model_from_checkpoint
    from cvlib.training.evaluate import evaluate_split
    from cvlib.training.fit import fit

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    with tempfile.TemporaryDirectory(prefix="simple-cnn-digits-") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "digits"
        t0 = time.perf_counter()
        counts = write_digits(data, size=64)
        manifest, _ = build_manifest(data, DataConfig(val_fraction=args.val_fraction, test_fraction=args.test_fraction))
        names = class_names(manifest)
        ok = manifest[manifest["status"] == "ok"]
        split = ok["split"].value_counts().to_dict()
        print(f"data: {sum(counts.values())} digits at 64 px, {len(ok)} usable, split {split} "
              f"({time.perf_counter() - t0:.1f}s to write and ingest)")

        make = simple_cnn_digits_config if args.recipe == "tuned" else cli_equivalent_config
        config = make(epochs=args.epochs, num_workers=args.workers, seed=args.seed)
        print(f"recipe: {args.recipe}; augment {config.augment.model_dump(exclude={'mean', 'std'})}")

        def show(rec) -> None:
            print(f"  epoch {rec.epoch:2d}  train loss {rec.train_loss:.4f} top-1 {rec.train_top1:.4f}  "
                  f"val loss {rec.val_loss:.4f} top-1 {rec.val_top1:.4f}  {rec.seconds:.1f}s", flush=True)

        t0 = time.perf_counter()
        result = fit(data_root=data, manifest=manifest, class_names=names, train=config.train,
                     augment=config.augment, out_dir=Path(tmp) / "run", on_epoch=show)
        seconds = time.perf_counter() - t0
        # The held-out test split, once, on the checkpoint validation chose (fit never looks at it).
        model, meta = model_from_checkpoint(result.best_checkpoint)
        test = evaluate_split(model, meta, str(data), manifest, "test", batch_size=256, num_workers=0, device="cpu")

    load_after = os.getloadavg()
    ok_acc, ok_time = test.top1 >= TARGET_TOP1, seconds < TARGET_SECONDS
    print(f"\ntest top-1 {test.top1:.4f} on {test.n} held-out images (checkpoint of epoch {result.best_epoch}/{args.epochs}, "
          f"chosen by validation), training wall time {seconds:.1f}s  [target >= {TARGET_TOP1:.0%} in < "
          f"{TARGET_SECONDS:.0f}s: {'met' if ok_acc and ok_time else 'NOT met'}]")
    print(f"(best validation top-1 {result.best_val_top1:.4f}: the selection criterion, optimistic as a result)")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    return 0 if ok_acc and ok_time else 1


if __name__ == "__main__":
    sys.exit(main())
