"""Process-group setup that works alone, under ``torchrun``, the ``deepspeed`` launcher or ``srun``."""

from __future__ import annotations

import contextlib
import io
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv3.errors import DsvError

_started = False  # set once this process has joined a process group (see started())


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _from_slurm() -> None:
    """Map SLURM's per-task variables to torch's when ``srun`` started us directly."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


@contextlib.contextmanager
def _without_build_notice():
    """Drop DeepSpeed's "DeepSpeed <op> built successfully" line, which it prints on every
    start (the op is cached after the first build); any other output passes through."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        rest = [line for line in buf.getvalue().splitlines() if not line.endswith(" built successfully")]
        if rest:
            print("\n".join(rest), flush=True)


def init_distributed() -> DistInfo:
    """Start (or join) the default process group and pick this process's device.

    A process started without a launcher becomes rank 0 of a world of 1 on a free local
    port. The backend is NCCL when CUDA is present, else gloo (CPU) (DeepSpeed's accelerator is
    ``cpu`` then, see :mod:`dsv3.parallel`).

    Returns:
        :class:`DistInfo`.
    """
    _from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    global _started
    _started = True
    if not dist.is_initialized():
        import subprocess

        import deepspeed

        try:
            with _without_build_notice():
                deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
        except (subprocess.CalledProcessError, OSError) as exc:  # DeepSpeed JIT-builds its CPU comm op with g++
            raise DsvError(
                f"DeepSpeed could not build its C++ communication op ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); install a C++ compiler (g++, e.g. "
                "apt install g++ / build-essential) and run again"
            ) from None
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def started() -> bool:
    """True once :func:`init_distributed` has run in this process (even after the process
    group was destroyed): the process then has gloo/NCCL threads that outlive the run."""
    return _started
