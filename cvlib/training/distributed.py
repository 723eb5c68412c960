"""torch.distributed for training on several GPUs or machines, launched by ``torchrun``.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins the process group from them
(NCCL on CUDA, gloo elsewhere). Without those variables nothing is initialised and every helper
here behaves as in a single process (rank 0 of 1), so library code calls them unconditionally.

Pure library: torch only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """Rank, world size and local rank of this process (0, 1, 0 when not distributed)."""
    if not is_initialized():
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Does nothing (and returns rank 0 of 1) when ``WORLD_SIZE`` is absent or 1, or when the group
    is already initialised. ``backend`` defaults to NCCL when CUDA is available, else gloo; on
    CUDA the process is bound to ``cuda:LOCAL_RANK``.
    """
    if is_initialized():
        return info()
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local)


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that logs, checkpoints and registers."""
    return info().is_main


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU for gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float] | torch.Tensor) -> list[float]:
    """Sum numbers over all ranks (float64, so counts stay exact); identity in one process."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if is_initialized():
        t = t.to(_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(x) for x in t.cpu().tolist()]


def all_reduce_max(values: Sequence[float]) -> list[float]:
    t = torch.as_tensor(values, dtype=torch.float64)
    if is_initialized():
        t = t.to(_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(x) for x in t.cpu().tolist()]


def any_rank(flag: torch.Tensor | bool) -> bool:
    """True when ``flag`` is true on at least one rank: every rank gets the same answer, so all
    of them can raise together instead of some waiting forever in a collective."""
    t = torch.as_tensor(flag).to(torch.float32).reshape(1)
    if is_initialized():
        t = t.to(_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics) to every rank. DDP broadcasts them
    at the start of each forward, so after the last step of an epoch each rank holds its own;
    this makes the evaluated and checkpointed model the same everywhere."""
    if not is_initialized():
        return
    for b in module.buffers():
        dist.broadcast(b.data, src)


def weights_digest(module: torch.nn.Module) -> str:
    """A short SHA-256 of the module's parameters and buffers (names, dtypes, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:15]


def agreed_weights_digest(module: torch.nn.Module, epoch: int) -> str:
    """:func:`weights_digest`, checked equal on every rank: DDP keeps the replicas identical, and
    if they ever are not (a rank that resumed elsewhere, a buffer left unsynchronised) every rank
    raises here together instead of checkpointing rank 0's copy as if it were the model."""
    digest = weights_digest(module)
    if is_initialized():
        value = int(digest, 16)  # 60 bits: fits an int64
        t = torch.tensor([value, -value], dtype=torch.int64).to(_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise RuntimeError(f"after epoch {epoch} the ranks' weights differ (rank {dist.get_rank()}: {digest})")
    return digest


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A DDP wrapper over the parameters that train now (DDP fixes its set when it is built, so
    a new training phase needs a new wrapper). Buffers are synchronised at each forward."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)
