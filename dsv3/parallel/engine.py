"""The DeepSpeed engine around the plain model, configured from the typed config.

The DeepSpeed JSON is generated here from :class:`dsv3.config.Config` (one source of truth).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsv3.config import Config


def deepspeed_config(cfg: Config, dp_size: int) -> dict[str, Any]:
    """DeepSpeed config dict for ``cfg`` on ``dp_size`` data-parallel ranks.

    Global batch (sequences per optimizer step) = micro_batch_size * grad_accum * dp_size.
    Gradient clipping is DeepSpeed's (global norm over all parameters). bf16 keeps fp32
    master weights in the optimizer.
    """
    p = cfg.parallel
    return {
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": p.micro_batch_size * p.grad_accum * dp_size,
        "gradient_clipping": 0.0 if trainer_clips(cfg) else cfg.train.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


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


class GuardedAdamW(torch.optim.AdamW):
    """AdamW whose next ``step()`` can be turned into a no-op (``skip_next = True``).

    DeepSpeed's fp32, bf16 and ZeRO optimizers all end in this ``step()``, so setting the
    flag before the engine's step skips the update everywhere (weights, moments and the
    step count stay as they were); DeepSpeed then clears the gradients as usual.

    While ``starting`` (set around ``deepspeed.initialize`` by :func:`start_engine`) every
    ``step()`` is a no-op too: DeepSpeed's unfused mixed-precision optimizer (bf16 at ZeRO
    stage 0 without pipelines) steps once on zero gradients at start-up to create the Adam
    state, which would count as an update (Adam's bias correction then lags one step) and
    apply one weight decay at the peak learning rate. The state is created at the first
    real step instead, as plain AdamW does.
    """

    skip_next = False
    starting = False

    def step(self, closure=None):  # noqa: D102
        if self.starting:
            return None
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def start_engine(model: nn.Module, optimizer: GuardedAdamW, config: dict[str, Any]):
    """``deepspeed.initialize(model=model, optimizer=optimizer, config=config)`` with the
    optimizer's start-up step disabled (see :class:`GuardedAdamW`); returns the engine."""
    import deepspeed

    optimizer.starting = True
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    finally:
        optimizer.starting = False
    return engine


def build_engine(model: nn.Module, cfg: Config, dp_size: int):
    """Wrap ``model`` in a DeepSpeed engine with torch AdamW (report §4.2 betas).

    Float buffers (the MoE balancing biases, rope tables) are kept in fp32 even when the
    engine casts the module to bf16: the bias moves in steps of 1e-3 that bf16 cannot hold.

    Returns:
        (engine, the :class:`GuardedAdamW` inside it)
    """
    t = cfg.train
    opt = GuardedAdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    fp32_buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if buf.is_floating_point()}
    engine = start_engine(model, opt, deepspeed_config(cfg, dp_size))
    restore_buffers(engine.module, fp32_buffers)
    return engine, opt


def restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the named buffers ``saved`` (with their dtype) into ``model``, in place."""
    for name, value in saved.items():
        owner_name, _, buf_name = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[buf_name] = value.to(owner._buffers[buf_name].device)
