"""``dsv3 plan``: parameter counts, FLOPs and a static memory budget per GPU for a layout.

Counts come from building the model on the meta device (no memory). The memory budget is
for mixed-precision training with AdamW: bf16 weights and gradients, fp32 master weights
and two fp32 moments (12 bytes per parameter) partitioned by ZeRO. Layout: ``pp`` pipeline
stages split the blocks evenly; routed experts are split over ``ep`` ranks; the remaining
``dp = gpus / pp`` ranks of a stage are data parallel, and expert parameters are data
parallel over ``dp / ep`` ranks (DeepSpeed's expert-data-parallel group).
Activations and communication buffers are not included yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.config import Config
from dsv3.errors import DsvError
from dsv3.model import Transformer, count_parameters, flops_per_token

GIB = 2**30


@dataclass
class MemoryPlan:
    """Static training memory of one GPU, in bytes."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def split_counts(model: Transformer) -> tuple[int, int]:
    """(routed-expert parameters, all other parameters) of the main model (MTP excluded)."""
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and not n.startswith("mtp."))
    main = count_parameters(model)["main"]
    return experts, main - experts


def memory_per_gpu(expert_params: int, other_params: int, gpus: int, pp: int, ep: int, zero_stage: int) -> MemoryPlan:
    """Bytes per GPU for weights (bf16), gradients (bf16) and AdamW state (fp32 master + 2 moments).

    Raises:
        DsvError: a layout that does not divide the GPUs.
    """
    if gpus % pp:
        raise DsvError(f"--gpus {gpus} is not divisible by parallel.pp={pp}; choose a multiple of {pp}")
    dp = gpus // pp
    if dp % ep:
        raise DsvError(f"the {dp} data-parallel ranks per stage are not divisible by parallel.ep={ep}; "
                       f"use a GPU count that is a multiple of pp*ep={pp * ep}")
    local_other = other_params / pp
    local_expert = expert_params / (pp * ep)
    edp = dp // ep
    weights = 2 * (local_other + local_expert)
    if zero_stage >= 2:
        grads = 2 * (local_other / dp + local_expert / edp)
    else:
        grads = 2 * (local_other + local_expert)
    if zero_stage >= 1:
        optimizer = 12 * (local_other / dp + local_expert / edp)
    else:
        optimizer = 12 * (local_other + local_expert)
    return MemoryPlan(weights=weights, grads=grads, optimizer=optimizer)


def plan(cfg: Config, gpus: int, gpu_memory_gib: float | None) -> str:
    """The report printed by ``dsv3 plan`` (several lines of text)."""
    if gpus <= 0:
        raise DsvError(f"--gpus {gpus} must be positive")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_parameters(model)
    experts, other = split_counts(model)
    m, p = cfg.model, cfg.parallel
    flops = flops_per_token(m, cfg.data.seq_len)
    cache = (m.kv_lora_rank + m.qk_rope_head_dim) * m.n_layers
    lines = [
        f"parameters  main {counts['main']:,}  (routed experts {experts:,}, other {other:,})",
        f"            MTP modules {counts['mtp']:,}  total {counts['total']:,}",
        f"            activated per token {counts['activated']:,}",
        f"training    {flops / 1e9:,.2f} GFLOP per token at seq_len {cfg.data.seq_len} (forward + backward)",
        f"decode      latent KV cache {cache:,} values per token ({m.kv_lora_rank}+{m.qk_rope_head_dim} per layer)",
    ]
    mem = memory_per_gpu(experts, other, gpus, p.pp, p.ep, p.zero_stage)
    lines.append(f"layout      {gpus} GPUs: pp={p.pp} ep={p.ep} dp={gpus // p.pp} ZeRO-{p.zero_stage}")
    lines.append(f"memory/GPU  weights {mem.weights / GIB:,.1f} GiB + grads {mem.grads / GIB:,.1f} GiB + "
                 f"optimizer {mem.optimizer / GIB:,.1f} GiB = {mem.total / GIB:,.1f} GiB (activations not included)")
    if gpu_memory_gib is not None:
        verdict = "fits" if mem.total <= gpu_memory_gib * GIB else "does NOT fit"
        lines.append(f"            {verdict} in {gpu_memory_gib:g} GiB")
    return "\n".join(lines)
