"""The DeepSpeed engine around the plain model, configured from the typed config.

The DeepSpeed JSON is generated here from :class:`dsv3.config.Config` (one source of truth).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv3.config import Config
from dsv3.parallel import ds_internals


def deepspeed_config(cfg: Config, dp_size: int, largest_param: int = 0) -> dict[str, Any]:
    """DeepSpeed config dict for ``cfg`` on ``dp_size`` data-parallel ranks.

    Global batch (sequences per optimizer step) = micro_batch_size * grad_accum * dp_size.
    Gradient clipping is DeepSpeed's (global norm over all parameters). bf16 keeps fp32
    master weights in the optimizer.

    ``parallel.offload_optimizer`` / ``parallel.offload_param`` become ZeRO's
    ``offload_optimizer`` / ``offload_param`` sections (``nvme_path`` = ``parallel.offload_dir``)
    and, with nvme, an ``aio`` section (DeepSpeed's defaults for the asynchronous I/O op).
    ZeRO-3 partitions every parameter (no persistence threshold for small ones).
    ``largest_param`` (elements of the largest parameter) sizes the swap buffers of
    ``offload_param: nvme``: DeepSpeed swaps a parameter whole through one buffer. With
    ``offload_optimizer: nvme`` the update runs over sub-groups of 1e8 elements (fp32 weights,
    gradients and both moments of one sub-group, 1.6 GB, in memory at a time).
    """
    p = cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 3:  # partition every parameter, however small: each rank holds 1/dp of each
        zero["stage3_param_persistence_threshold"] = 0
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload_section(p.offload_optimizer, p.offload_dir)
    if p.offload_optimizer == "nvme":  # the update swaps in one sub-group at a time: 16 bytes per element
        zero["sub_group_size"] = int(1e8)
    if p.offload_param != "none":
        zero["offload_param"] = _offload_section(p.offload_param, p.offload_dir)
        if p.offload_param == "nvme":
            zero["offload_param"].update(buffer_count=5, buffer_size=max(int(1e8), int(largest_param)))
    out = {
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": p.micro_batch_size * p.grad_accum * dp_size,
        "gradient_clipping": 0.0 if trainer_clips(cfg) else cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if "nvme" in (p.offload_optimizer, p.offload_param):
        out["aio"] = {
            "block_size": 1048576,
            "queue_depth": 8,
            "intra_op_parallelism": 1,
            "single_submit": False,
            "overlap_events": True,
        }
    return out


def _offload_section(device: str, folder: str) -> dict[str, Any]:
    """One ZeRO offload section: the device, and for nvme the swap folder (absolute)."""
    section: dict[str, Any] = {"device": device, "pin_memory": False}
    if device == "nvme":
        section["nvme_path"] = str(Path(folder).expanduser().resolve())
    return section


def trainer_clips(cfg: Config) -> bool:
    """True when the trainer, not DeepSpeed, clips gradients and measures their norm.

    DeepSpeed's plain fp32 path (ZeRO stage 0) neither reports the global gradient norm nor
    exposes it, so there the trainer calls ``clip_grad_norm_`` on the all-reduced gradients.
    With expert parallelism the trainer also clips for bf16 at ZeRO stage 0: DeepSpeed's
    optimizer there (``FP16_UnfusedOptimizer``) leaves expert gradients out of the norm; the
    trainer's :func:`dsv3.parallel.expert_parallel.clip_grad_norm_` counts every expert once.
    """
    p = cfg.parallel
    return p.zero_stage == 0 and (cfg.train.precision == "fp32" or p.ep > 1)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (and stacked expert weights) decay; norms and vectors do not.

    Expert-parallel expert weights (``param.allreduce = False``, see
    :mod:`dsv3.parallel.expert_parallel`) form their own decaying group per expert group,
    marked ``moe=True`` and named by ``param.group_name``: DeepSpeed's ZeRO-1/2 and bf16
    optimizers partition and reduce such a group over its expert-data-parallel ranks.
    """
    decay, no_decay, experts = [], [], {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "allreduce", True) is False:
            experts.setdefault(p.group_name, []).append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ] + [{"params": ps, "weight_decay": weight_decay, "moe": True, "name": name} for name, ps in experts.items()]


class UpdateGuard:
    """Mixed into an optimizer class: its next update can be turned into a no-op (``skip_next = True``).

    DeepSpeed's fp32, bf16 and ZeRO optimizers all end in the torch optimizer's ``step()``, so
    setting the flag before the engine's step skips the update everywhere (weights, moments
    and the step count stay as they were); DeepSpeed then clears the gradients as usual.
    Before an update the step counts of a state written by the other AdamW (a checkpoint
    saved with or without offload) are converted to this one's type (``tensor_steps``).
    ZeRO-3 calls ``step()`` once per sub-group of its partition in one update;
    ``calls_per_update`` (set by :func:`build_engine`) is that count, and the flag holds for
    all of them.

    While ``starting`` (set around ``deepspeed.initialize`` by :func:`start_engine`) every
    ``step()`` is a no-op too: DeepSpeed's unfused mixed-precision optimizer (bf16 at ZeRO
    stage 0 without pipelines) steps once on zero gradients at start-up to create the Adam
    state, which would count as an update (Adam's bias correction then lags one step) and
    apply one weight decay at the peak learning rate. The state is created at the first
    real step instead, as plain AdamW does.
    """

    skip_next = False
    starting = False
    calls_per_update = 1
    skipped_calls = 0
    tensor_steps = True  # torch's AdamW counts steps in a tensor, DeepSpeed's CPU Adam in an int

    def step(self, closure=None):  # noqa: D102
        if self.starting:
            return None
        if self.skip_next:
            self.skipped_calls += 1
            if self.skipped_calls >= self.calls_per_update:
                self.skip_next, self.skipped_calls = False, 0
            return None
        for st in self.state.values():  # a state saved or restored by the other kind of AdamW
            if "step" in st and torch.is_tensor(st["step"]) != self.tensor_steps:
                st["step"] = torch.tensor(float(st["step"])) if self.tensor_steps else int(st["step"])
        return super().step(closure)


class GuardedAdamW(UpdateGuard, torch.optim.AdamW):
    """torch AdamW with the skippable update of :class:`UpdateGuard`."""


@cache
def guarded_cpu_adam_class() -> type:
    """DeepSpeed's ``DeepSpeedCPUAdam`` with the skippable update of :class:`UpdateGuard`
    (defined on first use: importing it loads DeepSpeed's ops)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    class GuardedCPUAdam(UpdateGuard, DeepSpeedCPUAdam):
        """DeepSpeed's vectorized CPU AdamW (ZeRO-Offload) with a skippable update."""

        tensor_steps = False

        def __setstate__(self, state):  # a state dict saved by torch's AdamW lacks bias_correction
            super().__setstate__(state)
            for group in self.param_groups:
                group.setdefault("bias_correction", True)

    return GuardedCPUAdam


def make_optimizer(groups: list[dict[str, Any]], cfg: Config) -> UpdateGuard:
    """The torch optimizer of a run: AdamW (report §4.2 betas, eps 1e-8, decoupled weight decay,
    bias correction) over ``groups`` (:func:`param_groups`).

    With ``parallel.offload_optimizer`` cpu or nvme it is DeepSpeed's CPU AdamW
    (``DeepSpeedCPUAdam(adamw_mode=True)``, the same update computed by DeepSpeed's vectorized
    kernel on the offloaded fp32 partitions), else torch's ``AdamW``; either with
    :class:`UpdateGuard`.
    """
    t = cfg.train
    kwargs = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": 1e-8}
    if cfg.parallel.offload_optimizer != "none":
        return guarded_cpu_adam_class()(groups, adamw_mode=True, bias_correction=True, **kwargs)
    return GuardedAdamW(groups, **kwargs)


def start_engine(model: nn.Module, optimizer: UpdateGuard, config: dict[str, Any]):
    """``deepspeed.initialize(model=model, optimizer=optimizer, config=config)`` with the
    optimizer's start-up step disabled (see :class:`UpdateGuard`); returns the engine."""
    import deepspeed

    optimizer.starting = True
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    finally:
        optimizer.starting = False
    return engine


def build_engine(model: nn.Module, cfg: Config, dp_size: int):
    """Wrap ``model`` in a DeepSpeed engine with AdamW (report §4.2 betas; :func:`make_optimizer`).

    Float buffers (the MoE balancing biases, rope tables) are kept in fp32 even when the
    engine casts the module to bf16: the bias moves in steps of 1e-3 that bf16 cannot hold.
    With ZeRO-3 the engine partitions the parameters of ``model`` in place (each rank keeps
    its share; DeepSpeed gathers a module's parameters around its forward and backward).

    Returns:
        (engine, the :class:`UpdateGuard` optimizer inside it)
    """
    opt = make_optimizer(param_groups(model, cfg.train.weight_decay), cfg)
    fp32_buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if buf.is_floating_point()}
    largest = max((p.numel() for p in model.parameters()), default=0)
    engine = start_engine(model, opt, deepspeed_config(cfg, dp_size, largest))
    opt.calls_per_update = ds_internals.optimizer_calls_per_update(engine.optimizer)
    restore_buffers(engine.module, fp32_buffers)
    return engine, opt


def remove_swap_files(cfg: Config, rank: int) -> None:
    """Delete this rank's nvme swap files (``<offload_dir>/zero_stage_3/*/rank<rank>``) once a
    run is over: DeepSpeed removes them at interpreter exit, which a process that joined a
    process group skips (see :func:`dsv3.parallel.distributed.started`). A no-op without nvme."""
    import shutil

    p = cfg.parallel
    if "nvme" not in (p.offload_optimizer, p.offload_param):
        return
    root = Path(p.offload_dir).expanduser().resolve() / "zero_stage_3"
    for folder in root.glob(f"*/rank{rank}"):
        shutil.rmtree(folder, ignore_errors=True)


def restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the named buffers ``saved`` (with their dtype) into ``model``, in place."""
    for name, value in saved.items():
        owner_name, _, buf_name = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[buf_name] = value.to(owner._buffers[buf_name].device)
