"""Whole layouts for ``dsv3 plan``: the plan of every pipeline stage of a layout, the search for
layouts that fit, and the printed report (:func:`plan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dsv3.config import Config
from dsv3.errors import DsvError
from dsv3.model import Transformer, count_parameters, flops_per_token
from dsv3.plan.costs import (
    DTYPE_BYTES,
    GB,
    GIB,
    MemoryPlan,
    a2a_buffer_bytes,
    a2a_volume_per_step,
    activation_bytes_per_token,
    check_divisible,
    in_flight_micro_batches,
    pipeline_bubble,
    split_counts,
    stage_layers,
    static_bytes,
)
from dsv3.training.schedule import schedule_table


@dataclass
class Layout:
    """A parallel layout; ``micro_batches`` = ``grad_accum`` (micro-batches per step per pipeline)."""

    gpus: int
    pp: int
    ep: int
    zero_stage: int
    micro_batch_size: int
    micro_batches: int
    checkpointing: bool

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    def describe(self) -> str:
        return (
            f"pp={self.pp} ep={self.ep} dp={self.dp} ZeRO-{self.zero_stage} micro-batch {self.micro_batch_size} "
            f"x {self.micro_batches} per step, checkpointing {'on' if self.checkpointing else 'off'}"
        )


@dataclass
class ModelParts:
    """Parameter counts of the model's parts, for placing them on pipeline stages.

    Attributes:
        layers: per block, (routed-expert parameters, other parameters).
        moe: per block, whether its FFN is MoE.
        embedding, head: parameters of ``embed_tokens``; of the final norm + ``lm_head``.
        mtp: per MTP module, (routed-expert, other) parameters (embedding and head shared).
    """

    layers: list[tuple[int, int]]
    moe: list[bool]
    embedding: int
    head: int
    mtp: list[tuple[int, int]]

    @classmethod
    def of(cls, model: Transformer) -> ModelParts:
        def split(module) -> tuple[int, int]:
            e = sum(p.numel() for n, p in module.named_parameters() if n.startswith("mlp.experts."))
            return e, sum(p.numel() for p in module.parameters()) - e

        return cls(
            layers=[split(b) for b in model.layers],
            moe=[b.is_moe for b in model.layers],
            embedding=model.embed_tokens.weight.numel(),
            head=model.lm_head.weight.numel() + model.norm.weight.numel(),
            mtp=[split(b) for b in model.mtp],
        )


@dataclass
class StagePlan:
    """Memory of the worst pipeline stage and the step's pipeline and all-to-all figures."""

    layout: Layout
    stage: int
    memory: MemoryPlan
    in_flight: int
    blocks: int
    bubble: float
    a2a_bytes: float
    stages: list[MemoryPlan] = field(default_factory=list)

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.memory.total <= gpu_memory_gib * GIB


def plan_layout(
    cfg: Config, parts: ModelParts, layout: Layout, dispatch: str | None = None, combine: str | None = None
) -> StagePlan:
    """Memory of every pipeline stage of ``layout``; returns the stage with the largest total.

    Per stage s: static memory (:func:`static_bytes`) of the parameters placed on it (see
    the module docstring); activations = in-flight micro-batches
    (:func:`in_flight_micro_batches`) x tokens per micro-batch x bytes per token of its parts
    (:func:`activation_bytes_per_token`; with checkpointing the block inputs, plus one block's
    full activations for one micro-batch while it is recomputed); all-to-all buffers of one
    MoE layer (:func:`a2a_buffer_bytes`) if the stage has one. The all-to-all volume is that
    of the stage with the most MoE layers.

    Args:
        dispatch, combine: all-to-all dtypes, ``"fp8"``, ``"bf16"`` or ``"fp32"``; default
            the activation dtype (what dsv3 sends).

    Raises:
        DsvError: a layout that does not divide the GPUs or has more stages than blocks.
    """
    m, L = cfg.model, layout
    dp = check_divisible(L.gpus, L.pp, L.ep)
    if L.pp > m.n_layers:
        raise DsvError(f"parallel.pp={L.pp} exceeds the {m.n_layers} blocks; use at most pp={m.n_layers}")
    if m.n_routed_experts % L.ep:
        raise DsvError(
            f"parallel.ep={L.ep} does not divide the {m.n_routed_experts} routed experts; "
            f"choose a divisor of {m.n_routed_experts}"
        )
    if L.micro_batch_size <= 0 or L.micro_batches <= 0:
        raise DsvError("parallel.micro_batch_size and parallel.grad_accum must be positive")
    precision = cfg.train.precision
    act = activation_bytes_per_token(m, precision)
    a = DTYPE_BYTES[precision]
    d_b = DTYPE_BYTES[dispatch or precision]
    c_b = DTYPE_BYTES[combine or precision]
    tokens = L.micro_batch_size * cfg.data.seq_len
    stages, worst, worst_s = [], None, 0
    most_moe = 0
    for s, blocks in enumerate(stage_layers(m.n_layers, L.pp)):
        first, last = s == 0, s == L.pp - 1
        expert = sum(parts.layers[i][0] for i in blocks)
        other = sum(parts.layers[i][1] for i in blocks)
        full = [act.block(parts.moe[i]) for i in blocks]
        kept = len(blocks) * act.block_input
        if first:
            other += parts.embedding
            full.append(act.embedding)
            kept += act.embedding
        n_moe = sum(parts.moe[i] for i in blocks)
        if last:
            other += parts.head + (parts.embedding if L.pp > 1 and parts.mtp else 0)
            for e, o in parts.mtp:
                expert, other = expert + e, other + o
            mtp_head = act.head - 8
            full.append(act.head + len(parts.mtp) * (act.mtp_module() + mtp_head))
            kept += act.head + len(parts.mtp) * (act.mtp_input + mtp_head)
            n_moe += len(parts.mtp)
        most_moe = max(most_moe, n_moe)
        mem = static_bytes(other, expert / L.ep, dp, L.ep, L.zero_stage, precision)
        n_in = in_flight_micro_batches(L.pp, s, L.micro_batches)
        if L.checkpointing:
            recompute = max(
                [act.block(parts.moe[i]) for i in blocks] + ([act.mtp_module()] if last and parts.mtp else []),
                default=0.0,
            )
            mem.activations = tokens * (n_in * kept + recompute)
        else:
            mem.activations = tokens * n_in * sum(full)
        if n_moe:
            mem.a2a_buffers = a2a_buffer_bytes(tokens, m, L.ep, d_b, c_b)
        stages.append(mem)
        if worst is None or mem.total > worst.total:
            worst, worst_s = mem, s
    volume = a2a_volume_per_step(tokens, m, L.ep, most_moe, L.micro_batches, d_b, c_b, a, L.checkpointing)
    return StagePlan(
        layout=L,
        stage=worst_s,
        memory=worst,
        in_flight=in_flight_micro_batches(L.pp, worst_s, L.micro_batches),
        blocks=len(stage_layers(m.n_layers, L.pp)[worst_s]),
        bubble=pipeline_bubble(L.pp, L.micro_batches),
        a2a_bytes=volume,
        stages=stages,
    )


def relative_step_time(sp: StagePlan) -> float:
    """Compute time of a step relative to one without bubble or recomputation.

    ``(1 + 1/3 [checkpointing]) / (1 - bubble)``: the backward pass costs about twice the
    forward (Kaplan et al. 2020 §2.1), so recomputing the forward adds a third of the work;
    the pipeline bubble idles that fraction of the step. Communication is not included.
    """
    return (1.0 + (1.0 / 3.0 if sp.layout.checkpointing else 0.0)) / (1.0 - sp.bubble)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def global_batch(cfg: Config, gpus: int) -> int:
    """Sequences per optimizer step of the configured layout: ``micro_batch_size * grad_accum * dp``.

    Falls back to ``dp = gpus`` when ``parallel.pp`` does not divide the GPUs.
    """
    p = cfg.parallel
    dp = gpus // p.pp if p.pp > 0 and gpus % p.pp == 0 else gpus
    return p.micro_batch_size * p.grad_accum * dp


def candidate_layouts(cfg: Config, gpus: int) -> list[Layout]:
    """Layouts with the configured global batch (:func:`global_batch`) on ``gpus`` GPUs.

    Searched: ``pp`` among the divisors of ``gpus`` up to ``n_layers``; ``ep`` among the
    common divisors of ``n_routed_experts`` and ``dp``; ZeRO-1 and ZeRO-2, but only ZeRO-1
    with ``pp > 1`` (DeepSpeed's pipeline engine supports no higher stage); the micro-batch
    size among the divisors of ``parallel.micro_batch_size``; activation checkpointing off
    and on. The number of micro-batches per step follows from the global batch and must be
    a whole number.
    """
    m, p = cfg.model, cfg.parallel
    batch = global_batch(cfg, gpus)
    out = []
    for pp in _divisors(gpus):
        if pp > m.n_layers:
            break
        dp = gpus // pp
        for ep in _divisors(math.gcd(m.n_routed_experts, dp)):
            for zero in [1, 2] if pp == 1 else [1]:
                for mbs in _divisors(max(1, p.micro_batch_size)):
                    if batch % (mbs * dp):
                        continue
                    for ckpt in (False, True):
                        out.append(Layout(gpus, pp, ep, zero, mbs, batch // (mbs * dp), ckpt))
    return out


def propose(
    cfg: Config,
    parts: ModelParts,
    gpus: int,
    gpu_memory_gib: float,
    dispatch: str | None = None,
    combine: str | None = None,
) -> tuple[list[StagePlan], StagePlan | None]:
    """Search :func:`candidate_layouts`; return the fitting ones ranked, and the smallest.

    Ranked by :func:`relative_step_time` (bubble and recomputation), then all-to-all bytes
    per step, then the most memory left. The second value is the candidate needing the least
    memory per GPU (None when there is no candidate at all), for the "cannot fit" message.
    """
    plans = [plan_layout(cfg, parts, lay, dispatch, combine) for lay in candidate_layouts(cfg, gpus)]
    fitting = [sp for sp in plans if sp.fits(gpu_memory_gib)]
    fitting.sort(key=lambda sp: (round(relative_step_time(sp), 6), sp.a2a_bytes, sp.memory.total))
    smallest = min(plans, key=lambda sp: sp.memory.total, default=None)
    return fitting, smallest


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith("ch") else "s")


def _layout_table(
    sp: StagePlan, gpu_memory_gib: float | None, precision: str, dispatch: str, combine: str
) -> list[str]:
    L, mem = sp.layout, sp.memory
    lines = [
        f"layout      {_count(L.gpus, 'GPU')}: pp={L.pp} ep={L.ep} dp={L.dp} (expert dp {L.dp // L.ep}) "
        f"ZeRO-{L.zero_stage}, "
        f"{precision}, activation checkpointing {'on' if L.checkpointing else 'off'}",
        f"            {_count(L.micro_batches, 'micro-batch')} of {L.micro_batch_size} per step; global batch "
        f"{L.micro_batch_size * L.micro_batches * L.dp} sequences",
        f"memory/GPU  (GiB, pipeline stage {sp.stage} of {L.pp}: {_count(sp.blocks, 'block')}, "
        f"{_count(sp.in_flight, 'micro-batch')} in flight)",
    ]
    for name, value in (
        ("weights", mem.weights),
        ("gradients", mem.grads),
        ("optimizer", mem.optimizer),
        ("activations", mem.activations),
        ("all-to-all buffers", mem.a2a_buffers),
    ):
        lines.append(f"  {name:<20}{value / GIB:>9,.2f}")
    total = f"  {'total':<20}{mem.total / GIB:>9,.2f}"
    if gpu_memory_gib is not None:
        total += f"  of {gpu_memory_gib:g}: " + ("fits" if sp.fits(gpu_memory_gib) else "does NOT fit")
    lines.append(total)
    if L.pp > 1:
        lines.append(
            f"pipeline    bubble {100 * sp.bubble:.1f}% "
            f"(1F1B: (p-1)/(m+p-1) = {L.pp - 1}/{L.micro_batches + L.pp - 1}; "
            f"DeepSeek-V3's DualPipe idles less)"
        )
    else:
        lines.append("pipeline    none (pp=1)")
    if L.ep > 1:
        lines.append(
            f"all-to-all  {sp.a2a_bytes / GB:,.1f} GB sent per GPU per step (as much received; "
            f"dispatch {dispatch}, combine {combine}, gradients {precision}"
            f"{', forward repeated by recomputation' if L.checkpointing else ''})"
        )
    else:
        lines.append("all-to-all  none (ep=1)")
    return lines


def _proposal_lines(
    fitting: list[StagePlan], smallest: StagePlan | None, gpus: int, gpu_memory_gib: float, params: int, limit: int = 10
) -> list[str]:
    if not fitting:
        if smallest is None:
            return [
                f"proposal    no layout divides {gpus} GPUs with the configured global batch; "
                f"change --gpus or parallel.grad_accum"
            ]
        state = 16 * params / GIB
        return [
            f"proposal    no layout fits: the smallest needs {smallest.memory.total / GIB:,.1f} GiB per GPU "
            f"({smallest.layout.describe()}), has {gpu_memory_gib:g}; try more GPUs, GPUs with more memory "
            f"or a shorter data.seq_len",
            f"            (weights, gradients and AdamW state alone take 16 bytes per parameter, {state:,.0f} GiB: "
            f"at least {math.ceil(state / gpu_memory_gib):,} GPUs of {gpu_memory_gib:g} GiB)",
        ]
    lines = [
        f"proposal    {len(fitting)} layouts fit in {gpu_memory_gib:g} GiB; the best {min(limit, len(fitting))} "
        f"(ranked by step time from bubble and recomputation, then all-to-all volume):",
        "   pp   ep    dp ZeRO  mbs  micro-batches ckpt   GiB/GPU  free GiB  bubble  all-to-all GB  rel. time",
    ]
    for sp in fitting[:limit]:
        L = sp.layout
        lines.append(
            f"  {L.pp:>3} {L.ep:>4} {L.dp:>5} {L.zero_stage:>4} {L.micro_batch_size:>4} {L.micro_batches:>14} "
            f"{'on' if L.checkpointing else 'off':>4} {sp.memory.total / GIB:>9,.1f} "
            f"{gpu_memory_gib - sp.memory.total / GIB:>9,.1f} {100 * sp.bubble:>6.1f}% "
            f"{sp.a2a_bytes / GB:>14,.1f} {relative_step_time(sp):>10.2f}"
        )
    best = fitting[0].layout
    lines.append(
        f"            use: parallel.pp={best.pp} parallel.ep={best.ep} parallel.zero_stage={best.zero_stage} "
        f"parallel.micro_batch_size={best.micro_batch_size} parallel.grad_accum={best.micro_batches} "
        f"parallel.activation_checkpointing={'true' if best.checkpointing else 'false'}"
    )
    return lines


def plan(
    cfg: Config,
    gpus: int,
    gpu_memory_gib: float | None,
    propose_layouts: bool = False,
    dispatch: str | None = None,
    combine: str | None = None,
) -> str:
    """The report printed by ``dsv3 plan`` (several lines of text).

    Counts, FLOPs, the configured layout's memory per GPU (worst stage), bubble and
    all-to-all volume (:func:`plan_layout`). Layouts are proposed (:func:`propose`) when
    ``propose_layouts`` is set, or when the configured layout has no model parallelism
    (pp = ep = 1) and does not fit in ``gpu_memory_gib``.

    Args:
        dispatch, combine: all-to-all dtypes (``"fp8"``, ``"bf16"``, ``"fp32"``); default
            ``train.precision``.

    Raises:
        DsvError: bad GPU count or memory, a configured layout that does not divide the GPUs
            (unless proposing), proposing without ``gpu_memory_gib``.
    """
    if gpus <= 0:
        raise DsvError(f"--gpus {gpus} must be positive")
    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise DsvError(f"--gpu-memory-gib {gpu_memory_gib:g} must be positive")
    if propose_layouts and gpu_memory_gib is None:
        raise DsvError("--propose needs --gpu-memory-gib to know what fits; add e.g. --gpu-memory-gib 80")
    for name, dt in (("dispatch", dispatch), ("combine", combine)):
        if dt is not None and dt not in DTYPE_BYTES:
            raise DsvError(f"all-to-all {name} dtype {dt!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_parameters(model)
    experts, other = split_counts(model)
    parts = ModelParts.of(model)
    m, p = cfg.model, cfg.parallel
    flops = flops_per_token(m, cfg.data.seq_len)
    cache = (m.kv_lora_rank + m.qk_rope_head_dim) * m.n_layers
    act = activation_bytes_per_token(m, cfg.train.precision)
    lines = [
        f"parameters  main {counts['main']:,}  (routed experts {experts:,}, other {other:,})",
        f"            MTP modules {counts['mtp']:,}  total {counts['total']:,}",
        f"            activated per token {counts['activated']:,}",
        f"training    {flops / 1e9:,.2f} GFLOP per token at seq_len {cfg.data.seq_len} "
        "(forward + backward; MTP modules included)",
        f"decode      latent KV cache {cache:,} values per token ({m.kv_lora_rank}+{m.qk_rope_head_dim} per layer)",
        f"activations {act.block(True) / 1024:,.1f} KiB per token per MoE block, {act.block(False) / 1024:,.1f} "
        f"dense, {act.block_input / 1024:,.1f} with checkpointing ({cfg.train.precision})",
    ]
    dispatch = dispatch or cfg.train.precision
    combine = combine or cfg.train.precision
    layout = Layout(gpus, p.pp, p.ep, p.zero_stage, p.micro_batch_size, p.grad_accum, p.activation_checkpointing)
    fits = None
    try:
        sp = plan_layout(cfg, parts, layout, dispatch, combine)
    except DsvError as err:
        if not propose_layouts:
            raise
        lines.append(f"layout      the configured layout does not apply: {err}")
    else:
        lines += _layout_table(sp, gpu_memory_gib, cfg.train.precision, dispatch, combine)
        if gpu_memory_gib is not None:
            fits = sp.fits(gpu_memory_gib)
            if fits:
                lines.append(
                    f"            fits in {gpu_memory_gib:g} GiB with "
                    f"{gpu_memory_gib - sp.memory.total / GIB:,.1f} GiB "
                    f"to spare (CUDA context and fragmentation not counted)"
                )
            else:
                hint = (
                    "see the proposals below"
                    if p.pp == 1 and p.ep == 1 or propose_layouts
                    else "try --propose, activation checkpointing, a smaller micro-batch or more GPUs"
                )
                lines.append(
                    f"            does NOT fit in {gpu_memory_gib:g} GiB: "
                    f"needs {sp.memory.total / GIB:,.1f} GiB per GPU, "
                    f"has {gpu_memory_gib:g}; {hint}"
                )
    if propose_layouts or (fits is False and p.pp == 1 and p.ep == 1):
        fitting, smallest = propose(cfg, parts, gpus, gpu_memory_gib, dispatch, combine)
        lines += _proposal_lines(fitting, smallest, gpus, gpu_memory_gib, counts["total"])
    if gpus % p.pp == 0:
        try:
            lines += schedule_table(cfg, gpus // p.pp)
        except DsvError as err:
            lines.append(f"schedule    does not apply to {_count(gpus, 'GPU')}: {err}")
    return "\n".join(lines)
