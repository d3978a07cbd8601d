"""Small collectives over the default process group that also work in a single process.

Every function here is a no-op (or returns its input) when no process group is running or
the world has one process, so code that agrees on a value across ranks runs unchanged
alone. The trainer's host-side values (step flags, loss sums, expert loads, save checks) are
small CPU tensors; NCCL reduces only CUDA tensors, so under NCCL :func:`all_reduce_` sends a
CPU tensor through this process's GPU and back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if world() > 1:
        dist.barrier()


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``t`` over all ranks in place with ``op``; returns ``t``.

    A CPU tensor under NCCL makes a round trip through this process's GPU.
    """
    if world() > 1:
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=op)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place; returns ``t`` (see :func:`all_reduce_`)."""
    return all_reduce_(t, dist.ReduceOp.SUM)


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` alone)."""
    if world() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
