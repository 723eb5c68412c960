"""Fine-tune on several GPUs or machines: :func:`cvlib.training.fit.fit` in every process of a
``torchrun`` launch, without Prefect or MLflow.

One machine, 4 GPUs::

    torchrun --nproc_per_node 4 -m cvlib.training.ddp DATA_DIR --out runs/a --config retrain.json

Two machines (run on each, ``--node_rank`` 0 and 1, MASTER on the first)::

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \\
        -m cvlib.training.ddp DATA_DIR --out /shared/runs/a

Every process trains on its shard of each epoch (``batch_size`` is per process: the global batch
is ``batch_size x WORLD_SIZE``, and the learning rate is not rescaled for you). Rank 0 builds the
manifest when none is given, writes ``best.pt``/``last.pt`` under ``--out`` and prints the result
as JSON; the run resumes from ``--out/last.pt`` when it is there, so relaunching a killed job
continues it. ``DATA_DIR`` and ``--out`` must be visible to every node (shared storage).
Register the result afterwards with ``visionflow`` (rank 0's ``best.pt`` is a normal checkpoint).
Without torchrun (no ``WORLD_SIZE``) it trains in one process.

This module stays pure (no MLflow, no Prefect): ``python -m flows.ddp`` is the same launch with
a :class:`Tracker` that logs rank 0's run to MLflow. :func:`main` calls a tracker on rank 0 alone,
so whatever it talks to never hears from the other ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import pandas as pd

    from cvlib.config import RetrainConfig
    from cvlib.training.records import EpochRecord, FitResult

MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class Launch:
    """What a :class:`Tracker` is told when rank 0 is about to train."""

    data_dir: str
    out: Path  # the checkpoint folder every rank shares: a tracker keeps its own state here too
    manifest_path: Path
    manifest: pd.DataFrame
    config: RetrainConfig
    world_size: int


class Tracker(Protocol):
    """Rank 0's companion in a launch (an experiment tracker, in practice): told when training
    starts, after each epoch (once its ``last.pt`` is on disk) and how the launch ends. Only rank 0
    builds one, so the other ranks never talk to what it talks to."""

    def started(self, launch: Launch) -> None: ...

    def epoch(self, record: EpochRecord) -> None: ...

    def finished(self, result: FitResult) -> None: ...

    def failed(self, error: BaseException) -> None: ...


def make_parser(prog: str = "python -m cvlib.training.ddp", description: str | None = None) -> argparse.ArgumentParser:
    """The retraining flags and ``--config`` file of ``visionflow retrain`` (declared once, in
    :mod:`cvlib.arguments`), plus what only a launch needs."""
    from cvlib.arguments import add_retrain_arguments

    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0])
    p.add_argument("data_dir", help="image folder, one sub-folder per class")
    p.add_argument("--out", required=True, help="checkpoint folder (resumed from when it holds last.pt)")
    p.add_argument("--manifest", help="manifest Parquet (default: built by rank 0 into OUT/manifest.parquet)")
    add_retrain_arguments(p)
    p.add_argument("--backend", choices=["nccl", "gloo"], help="default: nccl on CUDA, else gloo")
    return p


def build_config(args: argparse.Namespace):
    """The configuration every rank trains with; a bad option exits every rank with one line."""
    from cvlib.arguments import OptionsError, retrain_config

    try:
        return retrain_config(args)
    except OptionsError as exc:
        raise SystemExit(f"error: {exc}") from None


def _epoch_line(record: EpochRecord) -> None:
    print(
        f"epoch {record.epoch}: train_loss {record.train_loss:.4f} val_loss {record.val_loss:.4f} "
        f"val_top1 {record.val_top1:.4f} ({record.seconds:.1f}s)",
        flush=True,
    )


def main(
    argv: list[str] | None = None,
    *,
    tracker: Callable[[], Tracker] | None = None,
    prog: str = "python -m cvlib.training.ddp",
    description: str | None = None,
) -> int:
    """Parse retrain's flags, join the process group, train. ``tracker`` builds rank 0's
    :class:`Tracker` (never called on the other ranks)."""
    args = make_parser(prog, description).parse_args(argv)
    from cvlib.data.ingest import build_manifest
    from cvlib.data.manifest import class_names, dataset_hash, read_manifest, write_manifest
    from cvlib.training import distributed
    from cvlib.training.fit import fit

    config = build_config(args)  # before joining: a bad option fails every rank the same way
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # every rank reports its checks
    dinfo = distributed.init_from_env(args.backend)
    try:
        out = Path(args.out)
        manifest_path = Path(args.manifest) if args.manifest else out / MANIFEST
        if not args.manifest:
            if dinfo.is_main and not manifest_path.is_file():
                manifest, _ = build_manifest(args.data_dir, config.data)
                out.mkdir(parents=True, exist_ok=True)
                write_manifest(manifest, manifest_path)
            distributed.barrier()
        manifest = read_manifest(manifest_path)
        config.train.progress = config.train.progress and dinfo.is_main and sys.stderr.isatty()
        rank0 = tracker() if tracker is not None and dinfo.is_main else None
        if rank0 is not None:
            rank0.started(Launch(args.data_dir, out, manifest_path, manifest, config, dinfo.world_size))

        def on_epoch(record: EpochRecord) -> None:  # rank 0 only (fit calls it there)
            if rank0 is not None:
                rank0.epoch(record)  # first: the line below tells a watcher the epoch is complete
            _epoch_line(record)

        try:
            result = fit(
                data_root=args.data_dir,
                manifest=manifest,
                class_names=class_names(manifest),
                train=config.train,
                augment=config.augment,
                out_dir=out,
                resume=True,
                extra_meta={"dataset_hash": dataset_hash(manifest), "config": config.model_dump(mode="json")},
                on_epoch=on_epoch,
            )
        except BaseException as exc:
            if rank0 is not None:
                rank0.failed(exc)
            raise
        if rank0 is not None:
            rank0.finished(result)
        if dinfo.is_main:
            print(json.dumps(result.to_dict(), default=str), flush=True)
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
