"""One layout of ``dsv3 bench memory``: a few real training steps, then what each rank holds.

Run as a program, alone or under ``torchrun`` (one process per rank)::

    python -m dsv3.bench.memory_probe --out DIR [--steps N] [--config CFG] [KEY=VALUE ...]

Each rank records its resident memory right after the imports (torch, DeepSpeed, dsv3), before
any model or process group exists (the process baseline), builds
:class:`dsv3.training.trainer.Trainer` for the config (evaluation, checkpoints and the sample
left out: ``train.eval_every=0``, ``train.out_dir`` a folder under
``DIR``), runs ``N`` optimizer steps (``train_step``, the trainer's own step), and in the last
step, once the gradients are reduced and before the update (``Trainer.before_update``), counts
what it holds (:func:`dsv3.parallel.memory.held_bytes`) and its resident memory (the Adam
state exists from the first update on, so ``N`` >= 2). The peak resident memory (``VmHWM``)
is read per phase, restarted in between (:func:`dsv3.parallel.memory.reset_peak_rss`):
``build`` (start-up to the end of ``Trainer()``), ``earlier_steps``, ``last_forward_backward``
(to the measurement) and ``last_update``; ``peak_rss_bytes`` is their maximum. It writes
``DIR/rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import deepspeed  # noqa: F401 - imported before the baseline is read, as every run imports it
import torch  # noqa: F401

from dsv3.config import load_config
from dsv3.fileio import atomic_write_text
from dsv3.hardware import tune_host_allocator
from dsv3.parallel.layout import stage_of_rank
from dsv3.parallel.memory import held_bytes, reset_peak_rss, rss_bytes
from dsv3.training.trainer import Trainer


def probe(config: str | None, overrides: list[str], out: Path, steps: int = 2) -> dict:
    """Train ``steps`` steps of ``config`` + ``overrides`` on this rank and measure; returns
    (and writes to ``out/rank<R>.json``) the record of this rank.

    Returns:
        ``{"rank", "world_size", "stage", "baseline_rss_bytes", "rss_at_measure_bytes",
        "peak_rss_bytes", "held": HeldBytes.to_dict(), "steps", "seconds"}``.

    Raises:
        ValueError: fewer than 2 steps (the optimizer state appears at the first update).
    """
    if steps < 2:
        raise ValueError(f"--steps {steps}: at least 2 steps are needed (Adam's state exists after the first)")
    baseline, _ = rss_bytes()
    t0 = time.perf_counter()
    run_dir = out / "run"
    cfg = load_config(
        config,
        [
            *overrides,
            f"train.steps={steps}",
            "train.eval_every=0",
            f"train.out_dir={run_dir}",
            "train.log_every=1",
            "train.warmup_steps=1",
        ],
    )
    trainer = Trainer(cfg)
    peaks = {"build": rss_bytes()[1]}  # the process's peak so far: building the model and the engine
    phases = reset_peak_rss()  # then the peak of each phase, where the kernel allows restarting it
    seen: dict = {}
    last = {"step": -1}

    def measure() -> None:
        if last["step"] == steps - 1:
            peaks["last_forward_backward"] = rss_bytes()[1]
            engine = trainer.engine
            seen["held"] = held_bytes(engine.module, engine.optimizer, engine)
            seen["rss"] = rss_bytes()[0]
            seen["disk"] = _swap_bytes(cfg)
            reset_peak_rss()

    trainer.before_update.append(measure)
    for step in range(steps):
        last["step"] = step
        if step == steps - 1 and phases:
            peaks["earlier_steps"] = rss_bytes()[1]
            reset_peak_rss()
        trainer.train_step(step)
    peaks["last_update"] = rss_bytes()[1]
    info = trainer.info
    record = {
        "rank": info.rank,
        "world_size": info.world_size,
        "stage": stage_of_rank(info.rank, info.world_size, cfg.parallel.pp),
        "baseline_rss_bytes": baseline,
        "rss_at_measure_bytes": seen["rss"],
        "peak_rss_bytes": max(peaks.values()),
        "peak_rss_by_phase": peaks if phases else {},
        "held": seen["held"].to_dict(),
        "disk_bytes": seen["disk"],
        "steps": steps,
        "seconds": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"rank{info.rank}.json", json.dumps(record, indent=1) + "\n")
    return record


def _swap_bytes(cfg) -> int:
    """Bytes of this rank's NVMe swap files (``<offload_dir>/zero_stage_3/*/rank<R>``), 0 without nvme."""
    p = cfg.parallel
    if "nvme" not in (p.offload_optimizer, p.offload_param):
        return 0
    rank = int(os.environ.get("RANK", "0"))
    root = Path(p.offload_dir).expanduser().resolve() / "zero_stage_3"
    return sum(f.stat().st_size for d in root.glob(f"*/rank{rank}") for f in d.rglob("*") if f.is_file())


def _end_with_parent() -> None:
    """Ask Linux to stop this process when its parent (torchrun, or ``dsv3 bench memory``)
    ends, so that a run given up by a timeout leaves no process holding gigabytes
    (``prctl(PR_SET_PDEATHSIG, SIGTERM)``; nothing elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    """Command line of the program (see the module docstring)."""
    _end_with_parent()
    ap = argparse.ArgumentParser(prog="python -m dsv3.bench.memory_probe")
    ap.add_argument("--out", required=True, help="folder for rank<R>.json and the run")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--config", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    tune_host_allocator()  # as the dsv3 command does
    probe(a.config, a.overrides, Path(a.out), a.steps)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # as `dsv3 train` ends (dsv3.cli.run): skip interpreter finalization, which races with
    # gloo's worker threads and can abort a finished process
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
