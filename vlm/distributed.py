"""Process-group helpers: the one place vlm asks torch.distributed who it is and talks to its peers.

Everything works unchanged in a single process (rank 0 of a world of 1, no process group): the
collectives then return their input. With ``torchrun --standalone --nproc_per_node N`` (one machine)
or ``torchrun --nnodes M --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint host:port`` (M machines)
every process calls `init_distributed` once (gloo on CPU, nccl on GPU); the trainer, the data reader
and the pipeline steps then use `rank`, `world_size`, `barrier` and the collectives below. `launcher`
is the one place that decides which launcher started this process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "launcher",
    "init_distributed",
    "is_distributed",
    "rank",
    "world_size",
    "barrier",
    "print0",
    "gather_objects",
    "broadcast_object",
    "broadcast_parameters",
    "average_gradients",
    "mean_over_ranks",
    "any_rank",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def print0(message: str) -> None:
    """Print (flushed) on rank 0 only: N processes report once."""
    if rank() == 0:
        print(message, flush=True)


def launcher() -> str | None:
    """Which launcher started this process as one of several: ``"torchrun"`` or None (a lone process).

    torchrun (single- or multi-node, any rendezvous backend) exports ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` to every worker; a world of one is a lone process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    return None


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group the launcher set up (gloo on CPU, nccl on GPU); (rank, world); (0, 1) alone.

    ``timeout_s`` (default: env ``PVLM_DIST_TIMEOUT`` or torch's default) bounds every collective: when
    another process dies or hangs, this one raises instead of waiting forever. Rank 0 prints the world
    it joined (processes, machines, backend), so a launch that silently started one process shows.
    """
    if launcher() is not None and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout_s = timeout_s if timeout_s is not None else float(os.environ.get("PVLM_DIST_TIMEOUT", "0")) or None
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"init_distributed: timeout_s must be positive, got {timeout_s}")
        dist.init_process_group(backend, timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        nodes = world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        print0(f"distributed: {world_size()} processes on {nodes} machine(s), {backend}")
    return rank(), world_size()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    objs: list[Any] = [None] * world_size()
    dist.all_gather_object(objs, obj)
    return objs


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable), on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_parameters(params: Iterable[Tensor]) -> None:
    """Start every replica from rank 0's weights."""
    if is_distributed():
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def average_gradients(params: Iterable[Tensor]) -> None:
    """One flat all-reduce of every gradient, then divide by the world: replicas take the same step."""
    world = world_size()
    if world == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:  # a parameter unused on this rank still joins the reduction with zeros
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # (sum of numel,)
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def mean_over_ranks(value: float) -> float:
    world = world_size()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / world)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any: all ranks take the same branch."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item() > 0)
