"""``dsv3 plan``: parameter counts, FLOPs and the memory, bubble and traffic of a layout.

Counts come from building the model on the meta device (no memory). For a layout (``gpus``,
``parallel.pp`` / ``ep`` / ``zero_stage`` / ``micro_batch_size`` / ``grad_accum`` /
``activation_checkpointing``, ``data.seq_len``, ``train.precision``) the plan gives, for the
worst pipeline stage, the memory per GPU (weights, gradients, optimizer state, activations,
all-to-all buffers), the pipeline bubble and the all-to-all volume per step, and proposes
layouts that fit when none is given.

Layout semantics (those of the trainer and DeepSpeed):

- ``pp`` pipeline stages take contiguous blocks, as evenly as the block count allows (the
  first ``n_layers % pp`` stages one more); stage 0 also holds the embedding, the last stage
  the final norm, the output head and the MTP modules (and, with ``pp > 1``, a tied copy of
  the embedding that the MTP modules read, as DeepSpeed's ``TiedLayerSpec`` keeps one).
- ``dp = gpus / pp`` data-parallel ranks per stage. Expert parallelism is carved out of them
  (DeepSpeed's expert-data-parallel groups): routed experts are split over ``ep`` ranks and
  expert parameters are data parallel over ``dp / ep`` ranks; every other parameter is data
  parallel over ``dp``.
- One optimizer step runs ``grad_accum`` micro-batches of ``micro_batch_size`` sequences of
  ``seq_len`` tokens on each pipeline; the global batch is ``micro_batch_size * grad_accum * dp``.

Not counted: temporaries that live inside one operator (e.g. the logits' gradient), the CUDA
context and allocator fragmentation (typically 1-3 GiB on a GPU), NCCL's own buffers, and the
fp32 gradient-accumulation buffer some optimizers keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dsv3.config import Config, ModelConfig
from dsv3.errors import DsvError
from dsv3.model import Transformer, count_parameters, flops_per_token

GIB = 2**30
GB = 1e9
DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp32": 4}


@dataclass
class MemoryPlan:
    """Training memory of one GPU, in bytes (activations and buffers 0 when not computed)."""

    weights: float
    grads: float
    optimizer: float
    activations: float = 0.0
    a2a_buffers: float = 0.0

    @property
    def static(self) -> float:
        """Weights + gradients + optimizer state."""
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.static + self.activations + self.a2a_buffers


def split_counts(model: Transformer) -> tuple[int, int]:
    """(routed-expert parameters, all other parameters) of the main model (MTP excluded)."""
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and not n.startswith("mtp."))
    main = count_parameters(model)["main"]
    return experts, main - experts


def _check_divisible(gpus: int, pp: int, ep: int) -> int:
    """dp = gpus / pp, after checking that ``pp`` divides ``gpus`` and ``ep`` divides dp."""
    if gpus <= 0:
        raise DsvError(f"--gpus {gpus} must be positive")
    if pp <= 0 or ep <= 0:
        raise DsvError(f"parallel.pp={pp} and parallel.ep={ep} must be positive")
    if gpus % pp:
        raise DsvError(f"--gpus {gpus} is not divisible by parallel.pp={pp}; choose a multiple of {pp}")
    dp = gpus // pp
    if dp % ep:
        raise DsvError(f"the {dp} data-parallel ranks per stage are not divisible by parallel.ep={ep}; "
                       f"use a GPU count that is a multiple of pp*ep={pp * ep}")
    return dp


def _static_bytes(local_other: float, local_expert: float, dp: int, ep: int, zero_stage: int,
                  precision: str = "bf16") -> MemoryPlan:
    """Weights, gradients and AdamW state of the parameters held by one GPU.

    Mixed precision (bf16, the ZeRO paper's accounting, Rajbhandari et al. 2020 §3.1): 2 bytes
    per parameter of bf16 weights, 2 of bf16 gradients, 12 of optimizer state (fp32 master
    copy and two fp32 moments). fp32: 4 + 4 + 8 (two moments), plus the fp32 partition copy
    DeepSpeed's ZeRO-1/2 optimizer keeps (4) when ``zero_stage >= 1``. ZeRO-1 partitions the
    optimizer state over the data-parallel group, ZeRO-2 also the gradients, ZeRO-3 also the
    weights; expert parameters are partitioned over the ``dp / ep`` expert-data-parallel ranks.

    Args:
        local_other: non-expert parameters held by this GPU (its stage's, unpartitioned).
        local_expert: routed-expert parameters held by this GPU (already divided by ``ep``).
    """
    edp = dp // ep
    shard = local_other / dp + local_expert / edp
    full = local_other + local_expert
    w_b, g_b = (2, 2) if precision == "bf16" else (4, 4)
    o_b = 12 if precision == "bf16" else (12 if zero_stage >= 1 else 8)
    return MemoryPlan(weights=w_b * (shard if zero_stage >= 3 else full),
                      grads=g_b * (shard if zero_stage >= 2 else full),
                      optimizer=o_b * (shard if zero_stage >= 1 else full))


def memory_per_gpu(expert_params: int, other_params: int, gpus: int, pp: int, ep: int, zero_stage: int,
                   precision: str = "bf16") -> MemoryPlan:
    """Static bytes per GPU of the main model spread evenly over ``pp`` stages (see :func:`_static_bytes`).

    This is the average stage; :func:`plan_layout` accounts each stage's own blocks, the
    embedding, the head and the MTP modules.

    Raises:
        DsvError: a layout that does not divide the GPUs.
    """
    dp = _check_divisible(gpus, pp, ep)
    return _static_bytes(other_params / pp, expert_params / (pp * ep), dp, ep, zero_stage, precision)


# ----------------------------------------------------------------------------- activations


def _norm_bytes(n: int, a: int) -> int:
    """Bytes per token that :class:`dsv3.model.norm.RMSNorm` over ``n`` channels keeps for backward.

    The norm computes in fp32: it keeps its input in fp32 (a cast copy under bf16, the input
    itself under fp32), the normalized fp32 values, one fp32 reciprocal RMS, and the consumer
    (a linear layer) keeps the output in the activation dtype: ``(4 + 4 + a) * n + 4``.
    """
    return (8 + a) * n + 4


@dataclass
class ActivationBytes:
    """Bytes per token kept for backward, by part of the model (see :func:`activation_bytes_per_token`).

    Attributes:
        attention: one MLA sublayer including its input RMSNorm.
        dense_ffn: one dense SwiGLU sublayer including its RMSNorm.
        moe_ffn: one DeepSeekMoE sublayer including its RMSNorm, the router and the experts.
        block_input: what a checkpointed block keeps (its input hidden state).
        embedding: token ids kept by the embedding lookup.
        head: final RMSNorm, fp32 log-probabilities over the vocabulary, labels.
        mtp_inner: one MTP module beyond its transformer block and its head (two norms, the
            concatenation); its head costs ``head - 8`` (the labels are shared).
        mtp_input: what a checkpointed MTP module keeps (the embeddings it reads).
    """

    attention: float
    dense_ffn: float
    moe_ffn: float
    block_input: float
    embedding: float
    head: float
    mtp_inner: float
    mtp_input: float

    def block(self, moe: bool) -> float:
        """All activations of one block (MLA + FFN), bytes per token."""
        return self.attention + (self.moe_ffn if moe else self.dense_ffn)

    def mtp_module(self) -> float:
        """All activations of one MTP module (its MoE block included), without its head."""
        return self.mtp_inner + self.block(True)


def activation_bytes_per_token(m: ModelConfig, precision: str) -> ActivationBytes:
    """Bytes per token that the forward pass keeps for the backward pass, per part of the model.

    Derived from the tensors each operation of dsv3's model must keep for its gradient (a
    linear layer keeps its input, SiLU its input, a product both factors, softmax-attention
    with a fused kernel q, k, v, its output and one fp32 log-sum-exp per head, log-softmax its
    output, an index its indices), as in Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", §4.1), applied to MLA (DeepSeek-V2 §2.1) and
    DeepSeekMoE (DeepSeek-V3 §2.1.2) instead of the GPT block. No attention matrix is kept
    (fused attention), no dropout. Activation dtype ``a`` = 2 bytes (bf16) or 4 (fp32);
    RMSNorm, RoPE, the router and the log-softmax work in fp32 (4 bytes).

    With D = dim, Rq = q_lora_rank, C = kv_lora_rank, dn/dr/dv the head dims, H heads,
    F = inter_dim, I = moe_inter_dim, S = n_shared_experts * I, E routed experts, K activated,
    G groups, Gk = n_limited_groups, V = vocab_size, ``norm(n) = (8 + a) n + 4`` (see
    :func:`_norm_bytes`), per token:

    - MLA: ``norm(D)`` + query path ``norm(Rq)`` (when Rq > 0) + key latent
      ``4 C + 4 C + a C + 4`` (the latent's fp32 copy, normalized, output; under fp32 the
      norm's input is a view of the whole kv_a output, ``4 (C + dr)`` instead of ``4 C``) +
      attention inputs ``a H (dn + dr)`` (q) ``+ a H (dn + dr)`` (k) ``+ a H (dn + dv)`` (the
      kv_b output that v is a view of) + output ``a H dv`` (also the input of o_proj) +
      log-sum-exp ``4 H``. RoPE is linear in its input and keeps only the cos/sin tables.
    - dense FFN: ``norm(D) + 4 a F`` (gate output, its SiLU, up output, their product).
    - MoE FFN: ``norm(D)`` + router (fp32 input copy ``4 D`` under bf16, sigmoid scores
      ``4 E``, group top-2 and top-Gk indices ``8 (2 G + Gk) + G`` when G > 1, top-K indices
      ``8 K``, weights ``4 K``, sums and the padding mask ``12``) + routed experts (sort order
      and token ids ``16 K``, gathered rows ``a K D``, ``4 a K I`` as in the dense FFN,
      expert outputs before and after the gate weighting ``2 a K D`` (the weighted rows are
      what the scatter-add back to the tokens keeps), the gate weight per row ``a K``) +
      shared experts ``4 a S``.
    - head: ``norm(D) + 4 V`` (fp32 log-probabilities) ``+ 8`` (labels); embedding ``8``.
    - MTP module (besides its MoE block and its head ``norm(D) + 4 V``): the norms of the
      embedding and of the previous depth's state without their outputs (the concatenation
      keeps nothing), ``2 (8 D + 4)`` (minus ``4 D`` under fp32, where the second norm's
      input is the head norm's output, kept anyway), and the concatenation ``2 a D`` (the
      input of eh_proj). Counted over T positions (depth k really has T - k).

    With per-block activation checkpointing (:mod:`dsv3.parallel.checkpointing`) a block keeps
    only its input, ``a D`` per token (an MTP module its embeddings, ``a D``); the block being
    recomputed in backward holds its full activations once.

    With expert parallelism the routed experts' rows live on the expert's rank; under
    balanced routing each GPU holds as many as its own tokens produce. The formula matches
    the storage of the tensors autograd saves in a real forward of small models to within 1%
    (``tests/test_plan.py``).

    Args:
        m: model sizes.
        precision: ``"bf16"`` or ``"fp32"`` (``train.precision``).

    Returns:
        :class:`ActivationBytes`, each field in bytes per token (integers as floats).

    Raises:
        DsvError: an unknown precision.
    """
    if precision not in ("bf16", "fp32"):
        raise DsvError(f"train.precision={precision!r} is not supported; use fp32 or bf16")
    a = DTYPE_BYTES[precision]
    D, H, C = m.dim, m.n_heads, m.kv_lora_rank
    dn, dr, dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    K, E, G = m.n_activated_experts, m.n_routed_experts, m.n_expert_groups
    attention = _norm_bytes(D, a)
    if m.q_lora_rank > 0:
        attention += _norm_bytes(m.q_lora_rank, a)
    attention += 4 * (C + (dr if a == 4 else 0)) + 4 * C + a * C + 4  # key latent and its norm
    attention += a * H * (dn + dr) * 2 + a * H * (dn + dv) + a * H * dv + 4 * H  # q, k, kv_b out, o, lse
    dense_ffn = _norm_bytes(D, a) + 4 * a * m.inter_dim
    router = (4 * D if a < 4 else 0) + 4 * E + 8 * K + 4 * K + 12
    if G > 1:
        router += 8 * (2 * G + m.n_limited_groups) + G
    routed = 16 * K + 3 * a * K * D + 4 * a * K * m.moe_inter_dim + a * K
    shared = 4 * a * m.n_shared_experts * m.moe_inter_dim
    moe_ffn = _norm_bytes(D, a) + router + routed + shared
    head = _norm_bytes(D, a) + 4 * m.vocab_size + 8
    mtp_inner = 2 * (_norm_bytes(D, a) - a * D) - (4 * D if a == 4 else 0) + 2 * a * D
    return ActivationBytes(attention=float(attention), dense_ffn=float(dense_ffn), moe_ffn=float(moe_ffn),
                           block_input=float(a * D), embedding=8.0, head=float(head),
                           mtp_inner=float(mtp_inner), mtp_input=float(a * D))


# ----------------------------------------------------------------------------- pipeline


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B pipeline step: ``(p - 1) / (m + p - 1)``.

    Each of the ``p`` stages is busy for ``m`` micro-batch slots (forward + backward) of a
    step that lasts ``m + p - 1`` slots (Narayanan et al. 2021, "Efficient Large-Scale
    Language Model Training on GPU Clusters", §2.2.1; the same for GPipe and 1F1B). DeepSeek-V3
    trained with DualPipe (report §3.2.1), whose bubble is smaller; this number is for 1F1B.
    """
    if pp <= 1:
        return 0.0
    return (pp - 1) / (micro_batches + pp - 1)


def in_flight_micro_batches(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` (0-based) holds at its peak under 1F1B.

    In 1F1B's warm-up stage s runs ``p - s - 1`` forwards before its first backward, so it
    holds ``p - s`` micro-batches (Narayanan et al. 2021 §2.2.1); the first stage is the worst.
    Never more than the micro-batches of the step. Without pipelining (p = 1) gradient
    accumulation runs one micro-batch at a time.
    """
    return max(1, min(micro_batches, pp - stage))


def stage_layers(n_layers: int, pp: int) -> list[range]:
    """Blocks of each pipeline stage: contiguous, the first ``n_layers % pp`` stages one more."""
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


# ----------------------------------------------------------------------------- all-to-all


def a2a_volume_per_step(tokens_per_micro_batch: int, m: ModelConfig, ep: int, moe_layers: int, micro_batches: int,
                        dispatch_bytes: int, combine_bytes: int, grad_bytes: int,
                        recompute: bool = False) -> float:
    """Bytes one GPU sends through the expert-parallel all-to-all in one optimizer step.

    Each token goes to its ``K = n_activated_experts`` experts: dispatch sends ``K`` rows of
    ``dim`` values, combine returns them (DeepSeek-V3 report §3.2.2; dsv3 sends one row per
    (token, expert) pair). With experts spread evenly over ``ep`` ranks and balanced routing,
    ``(ep - 1) / ep`` of the rows leave the rank. Per MoE layer and micro-batch:
    forward ``tokens * K * dim * share * (dispatch_bytes + combine_bytes)``, backward the same
    two exchanges in reverse carrying gradients, ``tokens * K * dim * share * 2 * grad_bytes``;
    activation checkpointing repeats the forward exchanges during backward. The GPU receives
    as much as it sends. DeepSeek-V3 dispatched in FP8 and combined in bf16, and sent each
    token at most once per node (node-limited routing); that deduplication is not modelled.

    Returns:
        bytes sent per GPU per step (0 when ``ep == 1``).
    """
    if ep <= 1:
        return 0.0
    rows = tokens_per_micro_batch * m.n_activated_experts * m.dim * (ep - 1) / ep
    forward = rows * (dispatch_bytes + combine_bytes)
    backward = rows * 2 * grad_bytes
    per_layer = forward * (2 if recompute else 1) + backward
    return per_layer * moe_layers * micro_batches


def a2a_buffer_bytes(tokens_per_micro_batch: int, m: ModelConfig, ep: int, dispatch_bytes: int,
                     combine_bytes: int) -> float:
    """Bytes of the all-to-all buffers of one MoE layer for one micro-batch.

    Send and receive buffers of the dispatch (``tokens * K * dim * dispatch_bytes`` each) and
    of the combine (``* combine_bytes`` each), taken as alive together; one layer exchanges at
    a time. Balanced routing assumed (an overloaded rank receives more). 0 when ``ep == 1``.
    """
    if ep <= 1:
        return 0.0
    rows = tokens_per_micro_batch * m.n_activated_experts * m.dim
    return 2.0 * rows * (dispatch_bytes + combine_bytes)


# ----------------------------------------------------------------------------- whole layout


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
        return (f"pp={self.pp} ep={self.ep} dp={self.dp} ZeRO-{self.zero_stage} micro-batch {self.micro_batch_size} "
                f"x {self.micro_batches} per step, checkpointing {'on' if self.checkpointing else 'off'}")


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
    def of(cls, model: Transformer) -> "ModelParts":
        def split(module) -> tuple[int, int]:
            e = sum(p.numel() for n, p in module.named_parameters() if n.startswith("mlp.experts."))
            return e, sum(p.numel() for p in module.parameters()) - e

        return cls(layers=[split(b) for b in model.layers], moe=[b.is_moe for b in model.layers],
                   embedding=model.embed_tokens.weight.numel(),
                   head=model.lm_head.weight.numel() + model.norm.weight.numel(),
                   mtp=[split(b) for b in model.mtp])


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


def plan_layout(cfg: Config, parts: ModelParts, layout: Layout, dispatch: str | None = None,
                combine: str | None = None) -> StagePlan:
    """Memory of every pipeline stage of ``layout``; returns the stage with the largest total.

    Per stage s: static memory (:func:`_static_bytes`) of the parameters placed on it (see
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
    dp = _check_divisible(L.gpus, L.pp, L.ep)
    if L.pp > m.n_layers:
        raise DsvError(f"parallel.pp={L.pp} exceeds the {m.n_layers} blocks; use at most pp={m.n_layers}")
    if m.n_routed_experts % L.ep:
        raise DsvError(f"parallel.ep={L.ep} does not divide the {m.n_routed_experts} routed experts; "
                       f"choose a divisor of {m.n_routed_experts}")
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
        mem = _static_bytes(other, expert / L.ep, dp, L.ep, L.zero_stage, precision)
        n_in = in_flight_micro_batches(L.pp, s, L.micro_batches)
        if L.checkpointing:
            recompute = max([act.block(parts.moe[i]) for i in blocks] +
                            ([act.mtp_module()] if last and parts.mtp else []), default=0.0)
            mem.activations = tokens * (n_in * kept + recompute)
        else:
            mem.activations = tokens * n_in * sum(full)
        if n_moe:
            mem.a2a_buffers = a2a_buffer_bytes(tokens, m, L.ep, d_b, c_b)
        stages.append(mem)
        if worst is None or mem.total > worst.total:
            worst, worst_s = mem, s
    volume = a2a_volume_per_step(tokens, m, L.ep, most_moe, L.micro_batches, d_b, c_b, a, L.checkpointing)
    return StagePlan(layout=L, stage=worst_s, memory=worst,
                     in_flight=in_flight_micro_batches(L.pp, worst_s, L.micro_batches),
                     blocks=len(stage_layers(m.n_layers, L.pp)[worst_s]),
                     bubble=pipeline_bubble(L.pp, L.micro_batches), a2a_bytes=volume, stages=stages)


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
            for zero in ([1, 2] if pp == 1 else [1]):
                for mbs in _divisors(max(1, p.micro_batch_size)):
                    if batch % (mbs * dp):
                        continue
                    for ckpt in (False, True):
                        out.append(Layout(gpus, pp, ep, zero, mbs, batch // (mbs * dp), ckpt))
    return out


def propose(cfg: Config, parts: ModelParts, gpus: int, gpu_memory_gib: float, dispatch: str | None = None,
            combine: str | None = None) -> tuple[list[StagePlan], StagePlan | None]:
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


def _layout_table(sp: StagePlan, gpu_memory_gib: float | None, precision: str, dispatch: str, combine: str) -> list[str]:
    L, mem = sp.layout, sp.memory
    lines = [
        f"layout      {_count(L.gpus, 'GPU')}: pp={L.pp} ep={L.ep} dp={L.dp} (expert dp {L.dp // L.ep}) ZeRO-{L.zero_stage}, "
        f"{precision}, activation checkpointing {'on' if L.checkpointing else 'off'}",
        f"            {_count(L.micro_batches, 'micro-batch')} of {L.micro_batch_size} per step; global batch "
        f"{L.micro_batch_size * L.micro_batches * L.dp} sequences",
        f"memory/GPU  (GiB, pipeline stage {sp.stage} of {L.pp}: {_count(sp.blocks, 'block')}, "
        f"{_count(sp.in_flight, 'micro-batch')} in flight)",
    ]
    for name, value in (("weights", mem.weights), ("gradients", mem.grads), ("optimizer", mem.optimizer),
                        ("activations", mem.activations), ("all-to-all buffers", mem.a2a_buffers)):
        lines.append(f"  {name:<20}{value / GIB:>9,.2f}")
    total = f"  {'total':<20}{mem.total / GIB:>9,.2f}"
    if gpu_memory_gib is not None:
        total += f"  of {gpu_memory_gib:g}: " + ("fits" if sp.fits(gpu_memory_gib) else "does NOT fit")
    lines.append(total)
    if L.pp > 1:
        lines.append(f"pipeline    bubble {100 * sp.bubble:.1f}% (1F1B: (p-1)/(m+p-1) = {L.pp - 1}/{L.micro_batches + L.pp - 1}; "
                     f"DeepSeek-V3's DualPipe idles less)")
    else:
        lines.append("pipeline    none (pp=1)")
    if L.ep > 1:
        lines.append(f"all-to-all  {sp.a2a_bytes / GB:,.1f} GB sent per GPU per step (as much received; "
                     f"dispatch {dispatch}, combine {combine}, gradients {precision}"
                     f"{', forward repeated by recomputation' if L.checkpointing else ''})")
    else:
        lines.append("all-to-all  none (ep=1)")
    return lines


def _proposal_lines(fitting: list[StagePlan], smallest: StagePlan | None, gpus: int, gpu_memory_gib: float,
                    params: int, limit: int = 10) -> list[str]:
    if not fitting:
        if smallest is None:
            return [f"proposal    no layout divides {gpus} GPUs with the configured global batch; "
                    f"change --gpus or parallel.grad_accum"]
        state = 16 * params / GIB
        return [f"proposal    no layout fits: the smallest needs {smallest.memory.total / GIB:,.1f} GiB per GPU "
                f"({smallest.layout.describe()}), has {gpu_memory_gib:g}; try more GPUs, GPUs with more memory "
                f"or a shorter data.seq_len",
                f"            (weights, gradients and AdamW state alone take 16 bytes per parameter, {state:,.0f} GiB: "
                f"at least {math.ceil(state / gpu_memory_gib):,} GPUs of {gpu_memory_gib:g} GiB)"]
    lines = [f"proposal    {len(fitting)} layouts fit in {gpu_memory_gib:g} GiB; the best {min(limit, len(fitting))} "
             f"(ranked by step time from bubble and recomputation, then all-to-all volume):",
             "   pp   ep    dp ZeRO  mbs  micro-batches ckpt   GiB/GPU  free GiB  bubble  all-to-all GB  rel. time"]
    for sp in fitting[:limit]:
        L = sp.layout
        lines.append(f"  {L.pp:>3} {L.ep:>4} {L.dp:>5} {L.zero_stage:>4} {L.micro_batch_size:>4} {L.micro_batches:>14} "
                     f"{'on' if L.checkpointing else 'off':>4} {sp.memory.total / GIB:>9,.1f} "
                     f"{gpu_memory_gib - sp.memory.total / GIB:>9,.1f} {100 * sp.bubble:>6.1f}% "
                     f"{sp.a2a_bytes / GB:>14,.1f} {relative_step_time(sp):>10.2f}")
    best = fitting[0].layout
    lines.append(f"            use: parallel.pp={best.pp} parallel.ep={best.ep} parallel.zero_stage={best.zero_stage} "
                 f"parallel.micro_batch_size={best.micro_batch_size} parallel.grad_accum={best.micro_batches} "
                 f"parallel.activation_checkpointing={'true' if best.checkpointing else 'false'}")
    return lines


def plan(cfg: Config, gpus: int, gpu_memory_gib: float | None, propose_layouts: bool = False,
         dispatch: str | None = None, combine: str | None = None) -> str:
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
        f"training    {flops / 1e9:,.2f} GFLOP per token at seq_len {cfg.data.seq_len} (forward + backward; MTP modules included)",
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
                lines.append(f"            fits in {gpu_memory_gib:g} GiB with {gpu_memory_gib - sp.memory.total / GIB:,.1f} GiB "
                             f"to spare (CUDA context and fragmentation not counted)")
            else:
                hint = "see the proposals below" if p.pp == 1 and p.ep == 1 or propose_layouts else \
                    "try --propose, activation checkpointing, a smaller micro-batch or more GPUs"
                lines.append(f"            does NOT fit in {gpu_memory_gib:g} GiB: needs {sp.memory.total / GIB:,.1f} GiB per GPU, "
                             f"has {gpu_memory_gib:g}; {hint}")
    if propose_layouts or (fits is False and p.pp == 1 and p.ep == 1):
        fitting, smallest = propose(cfg, parts, gpus, gpu_memory_gib, dispatch, combine)
        lines += _proposal_lines(fitting, smallest, gpus, gpu_memory_gib, counts['total'])
    return "\n".join(lines)
