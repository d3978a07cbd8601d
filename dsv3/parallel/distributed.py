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
    port. The backend is NCCL when CUDA is present, else gloo (CPU). DeepSpeed's accelerator
    is forced to ``cpu`` when no GPU is visible.

    Returns:
        :class:`DistInfo`.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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
            raise DsvError(f"DeepSpeed could not build its C++ communication op ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); install a C++ compiler (g++, e.g. "
                           "apt install g++ / build-essential) and run again") from None
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def check_launch(cfg, world_size: int) -> list[int] | None:
    """Check, before any process starts, what would otherwise fail on every rank of a launch.

    The launch scripts run this (``dsv3 train --check WORLD``) so that a bad config or an
    impossible layout ends with one error line and exit code 2 instead of one line per rank
    and the launcher's report. Checks: :func:`dsv3.config.check_trainable`, the pipeline
    layout (:func:`dsv3.parallel.pipeline.check_layout`), the expert-parallel layout
    (:func:`dsv3.parallel.expert_parallel.check_layout`) and that ``train.init_from`` names a
    checkpoint or Hugging Face folder. Config keys and types were checked when ``cfg`` was
    loaded.

    The trainer runs the same checks at start-up.

    Args:
        cfg: the run's :class:`dsv3.config.Config`.
        world_size: processes the launch will start (all nodes).

    Returns:
        The blocks per pipeline stage of :func:`dsv3.parallel.pipeline.check_layout` (None
        without pipelines, or when they are split by parameter count).

    Raises:
        DsvError: the first problem found.
    """
    from pathlib import Path

    from dsv3.config import check_trainable

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as init_distributed: no warning from DeepSpeed
    if world_size < 1:
        raise DsvError(f"dsv3 train --check needs the number of processes (>= 1), not {world_size}")
    check_trainable(cfg)
    p = cfg.parallel
    stage_blocks = None
    if p.pp > 1:
        from dsv3.parallel.pipeline import check_layout as check_pp

        stage_blocks = check_pp(cfg, world_size)
    if p.ep > 1:
        from dsv3.parallel.expert_parallel import check_layout as check_ep

        check_ep(p.ep, cfg.model.n_routed_experts, world_size // p.pp, p.pp)
    if p.pp > 1 and p.ep > 1 and p.zero_stage >= 1:
        _check_moe_on_every_stage(cfg, stage_blocks)
    if cfg.train.init_from:
        from dsv3.convert import is_hf_folder
        from dsv3.training.checkpoint import resolve_checkpoint

        if not is_hf_folder(Path(cfg.train.init_from)):
            resolve_checkpoint(cfg.train.init_from)
    return stage_blocks


def _check_moe_on_every_stage(cfg, stage_blocks: list[int] | None) -> None:
    """With pipelines, expert parallelism and ZeRO-1, every stage must hold a MoE layer.

    DeepSpeed's ZeRO optimizer reduces the gradient norm of each optimizer group over the
    pipeline stages; a stage without MoE layers has no expert group, takes one reduction fewer
    and every rank then waits forever.

    Raises:
        DsvError: a stage holds only dense blocks; names a split that works when there is one.
    """
    from dsv3.model import Transformer
    from dsv3.model.moe import MoE
    from dsv3.parallel.pipeline import _uniform, balanced_counts, stage_prefixes

    p = cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = stage_blocks or balanced_counts(model, p.pp)
    moe_names = [name + "." for name, m in model.named_modules() if isinstance(m, MoE)]

    def dense_stages(split: list[int]) -> list[int]:
        return [s for s in range(p.pp)
                if not any(n.startswith(tuple(stage_prefixes(model, split, s))) for n in moe_names)]

    bad = dense_stages(counts)
    if not bad:
        return
    n, dense = cfg.model.n_layers, cfg.model.n_dense_layers
    fix = ""
    if n - dense - 1 >= p.pp - 1:  # the first stage takes the dense blocks and one MoE block
        split = [dense + 1] + _uniform(n - dense - 1, p.pp - 1)
        if min(split) >= 1 and not dense_stages(split):
            fix = f"parallel.pp_partition={','.join(map(str, split))} or "
    first = sum(counts[: bad[0]])
    raise DsvError(f"pipeline stage {bad[0]} holds only dense blocks ({first}-{first + counts[bad[0]] - 1}), but with "
                   f"parallel.ep={p.ep} and ZeRO stage {p.zero_stage} every stage needs a MoE block (DeepSpeed's "
                   f"ZeRO optimizer would wait forever); set {fix}parallel.zero_stage=0")


def started() -> bool:
    """True once :func:`init_distributed` has run in this process (even after the process
    group was destroyed): the process then has gloo/NCCL threads that outlive the run."""
    return _started


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``t`` over all ranks in place with ``op`` (a no-op for a single process); returns ``t``.

    The small host-side values the trainer agrees on (flags, loss sums, expert loads) are CPU
    tensors; NCCL reduces only CUDA tensors, so under NCCL a CPU tensor makes a round trip
    through this process's GPU.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=op)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (a no-op for a single process); returns ``t``. See
    :func:`all_reduce_`."""
    return all_reduce_(t, dist.ReduceOp.SUM)
