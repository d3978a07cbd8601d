"""The DeepSpeed engine around the plain model, configured from the typed config.

The DeepSpeed JSON is generated here from :class:`dsv3.config.Config` (one source of truth).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv3.config import Config
from dsv3.model import kernels
from dsv3.parallel import ds_internals

# ZeRO settings of dsv3's runs (DeepSpeed 0.19.8 names; where dsv3 keeps DeepSpeed's default the
# value is that default, written into the config all the same). dsv3.plan sizes its terms by them.
SUB_GROUP_SIZE = int(1e9)  # ZeRO-3 sub_group_size (elements per optimizer sub-group), DeepSpeed's default
NVME_SUB_GROUP_SIZE = int(1e8)  # ... with offload_optimizer nvme: 16 bytes x 1e8 = 1.6 GB in memory at a time
REDUCE_BUCKET_SIZE = int(5e8)  # reduce_bucket_size (elements)
ALLGATHER_BUCKET_SIZE = int(5e8)  # allgather_bucket_size (elements, ZeRO-1/2)
PREFETCH_BUCKET_SIZE = int(5e7)  # stage3_prefetch_bucket_size (elements)
MAX_LIVE_PARAMETERS = int(1e9)  # stage3_max_live_parameters (gathered elements)
PARAM_PERSISTENCE_THRESHOLD = 0  # stage3_param_persistence_threshold: every parameter is partitioned
OPTIMIZER_SWAP_BUFFERS = 4  # offload_optimizer buffer_count (nvme), DeepSpeed's default
PARAM_SWAP_BUFFERS = 5  # offload_param buffer_count (nvme)
PARAM_SWAP_BUFFER_SIZE = int(1e8)  # offload_param buffer_size (elements), at least the largest parameter
PARAMS_KEPT_IN_HOST = int(1e9)  # offload_param max_in_cpu (elements), DeepSpeed's default
AIO_BLOCK_SIZE = 1048576  # aio block_size (bytes): DeepSpeed swaps only a sub-group of at least
# max(1 MiB, block_size) fp32 bytes; a smaller one keeps its optimizer state in host memory


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO settings a run uses (elements unless noted; see the constants above).

    Attributes:
        sub_group_size: ZeRO-3's optimizer sub-group size.
        reduce_bucket_size, allgather_bucket_size, prefetch_bucket_size: bucket sizes.
        max_live_parameters: ZeRO-3's limit of gathered parameter elements.
        param_persistence_threshold: ZeRO-3 keeps parameters below it whole on every rank.
        optimizer_swap_buffers: fp32 sub-group swap buffers (``offload_optimizer: nvme``).
        param_swap_buffers, param_swap_buffer_size: parameter swap buffers (``offload_param: nvme``).
        params_kept_in_host: ``max_in_cpu``, parameter elements kept in host memory under nvme.
    """

    sub_group_size: int = SUB_GROUP_SIZE
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE
    allgather_bucket_size: int = ALLGATHER_BUCKET_SIZE
    prefetch_bucket_size: int = PREFETCH_BUCKET_SIZE
    max_live_parameters: int = MAX_LIVE_PARAMETERS
    param_persistence_threshold: int = PARAM_PERSISTENCE_THRESHOLD
    optimizer_swap_buffers: int = OPTIMIZER_SWAP_BUFFERS
    param_swap_buffers: int = PARAM_SWAP_BUFFERS
    param_swap_buffer_size: int = PARAM_SWAP_BUFFER_SIZE
    params_kept_in_host: int = PARAMS_KEPT_IN_HOST


def zero_settings(offload_optimizer: str = "none", largest_param: int = 0) -> ZeroSettings:
    """The ZeRO settings :func:`deepspeed_config` writes for a run with ``offload_optimizer``
    (``"none"``, ``"cpu"`` or ``"nvme"``) whose largest parameter has ``largest_param`` elements.

    With ``offload_optimizer: nvme`` the update runs over sub-groups of
    :data:`NVME_SUB_GROUP_SIZE` (fp32 weights, gradients and both moments of one sub-group in
    memory at a time), else DeepSpeed's 1e9; a parameter swap buffer holds the largest
    parameter whole (DeepSpeed swaps a parameter through one buffer).
    """
    return ZeroSettings(
        sub_group_size=NVME_SUB_GROUP_SIZE if offload_optimizer == "nvme" else SUB_GROUP_SIZE,
        param_swap_buffer_size=max(PARAM_SWAP_BUFFER_SIZE, int(largest_param)),
    )


def deepspeed_config(cfg: Config, dp_size: int, largest_param: int = 0) -> dict[str, Any]:
    """DeepSpeed config dict for ``cfg`` on ``dp_size`` data-parallel ranks.

    Global batch (sequences per optimizer step) = micro_batch_size * grad_accum * dp_size.
    Gradient clipping is DeepSpeed's (global norm over all parameters). bf16 keeps fp32
    master weights in the optimizer.

    The ZeRO section carries :func:`zero_settings` (bucket sizes; at ZeRO-3 the sub-group
    size, prefetch bucket, live-parameter limit and no persistence threshold: each rank holds
    1/dp of every parameter, however small).
    ``parallel.offload_optimizer`` / ``parallel.offload_param`` become ZeRO's
    ``offload_optimizer`` / ``offload_param`` sections (``nvme_path`` = ``parallel.offload_dir``)
    and, with nvme, an ``aio`` section (DeepSpeed's defaults for the asynchronous I/O op).
    ``largest_param`` (elements of the largest parameter) sizes the swap buffers of
    ``offload_param: nvme``.
    """
    p = cfg.parallel
    z = zero_settings(p.offload_optimizer, largest_param)
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage >= 1:
        zero.update(reduce_bucket_size=z.reduce_bucket_size, allgather_bucket_size=z.allgather_bucket_size)
    if p.zero_stage == 3:
        zero.update(
            sub_group_size=z.sub_group_size,
            stage3_prefetch_bucket_size=z.prefetch_bucket_size,
            stage3_max_live_parameters=z.max_live_parameters,
            stage3_param_persistence_threshold=z.param_persistence_threshold,
        )
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload_section(p.offload_optimizer, p.offload_dir)
        if p.offload_optimizer == "nvme":
            zero["offload_optimizer"]["buffer_count"] = z.optimizer_swap_buffers
    if p.offload_param != "none":
        zero["offload_param"] = _offload_section(p.offload_param, p.offload_dir)
        if p.offload_param == "nvme":
            zero["offload_param"].update(
                buffer_count=z.param_swap_buffers,
                buffer_size=z.param_swap_buffer_size,
                max_in_cpu=z.params_kept_in_host,
            )
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
            "block_size": AIO_BLOCK_SIZE,
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


#: torch AdamW's implementations: ``fused`` (one kernel per tensor that reads and writes each
#: element once) and ``foreach`` (each step of the update as one operation over the list of
#: tensors: torch's default). The first is the rule where nothing is measured (a GPU).
ADAMW_KERNELS = ("fused", "foreach")
#: a measurement updates at most this many synthetic elements (64 MiB of fp32 weights,
#: gradients and moments per candidate), in at most ADAMW_SAMPLE_TENSORS tensors
ADAMW_SAMPLE_ELEMENTS, ADAMW_SAMPLE_TENSORS = 1 << 22, 64


def adamw_kernel(params: list[torch.Tensor], dtype: torch.dtype | None = None) -> str:
    """torch AdamW's implementation (one of :data:`ADAMW_KERNELS`) for updating ``params``, as
    :func:`dsv3.model.kernels.choose` picks it: on a CPU measured once per machine, dtype and
    size, else ``fused``.

    The measurement updates synthetic tensors with each implementation (op ``optimizer``, key
    ``"<dtype> <elements> in <tensors>"``): the parameters' element count and tensor count,
    each rounded up to a power of two and capped (:data:`ADAMW_SAMPLE_ELEMENTS`,
    :data:`ADAMW_SAMPLE_TENSORS`), the elements split evenly over the tensors. Both compute
    the AdamW update of Loshchilov & Hutter (2019) in the parameters' dtype and differ only in
    rounding. Measured on a 2-core AMD EPYC (one thread, the 8.7M fp32 parameters of the
    ``tiny`` config in 73 tensors): fused 4.7 ms per update, foreach 15.7 ms.

    Args:
        params: the tensors the optimizer will update (any float dtype, one device); empty
            gives the rule.
        dtype: the dtype the update runs in, if not the parameters' (fp32 master copies of
            bf16 parameters).
    """
    if not params:
        return ADAMW_KERNELS[0]
    total = sum(p.numel() for p in params)
    elements = kernels.bucket(min(total, ADAMW_SAMPLE_ELEMENTS))
    tensors = min(kernels.bucket(len(params)), ADAMW_SAMPLE_TENSORS, elements)
    dtype = dtype or params[0].dtype
    key = f"{str(dtype).removeprefix('torch.')} {elements} in {tensors}"

    def run(name, made={}):  # noqa: B006 - the synthetic optimizers, made on the first call
        if not made:
            gen = kernels.generator()
            for kernel in ADAMW_KERNELS:
                ws = [torch.randn(elements // tensors, generator=gen).to(dtype) for _ in range(tensors)]
                for w in ws:
                    w.grad = torch.randn(w.shape, generator=gen).to(dtype) * 1e-3
                made[kernel] = torch.optim.AdamW(ws, lr=1e-4, weight_decay=0.1, **{kernel: True})
        made[name].step()

    return kernels.choose("optimizer", key, ADAMW_KERNELS, run, params[0].device)


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
    kernel on the offloaded fp32 partitions), else torch's ``AdamW`` in the implementation
    :func:`adamw_kernel` picks; either with :class:`UpdateGuard`.
    """
    t = cfg.train
    kwargs = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": 1e-8}
    if cfg.parallel.offload_optimizer != "none":
        return guarded_cpu_adam_class()(groups, adamw_mode=True, bias_correction=True, **kwargs)
    kernel = adamw_kernel([p for g in groups for p in g["params"]])
    return GuardedAdamW(groups, **kwargs, **{kernel: True})


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
