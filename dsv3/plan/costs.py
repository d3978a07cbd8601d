"""The cost model behind ``dsv3 plan``: memory of model states and activations per token, the
pipeline bubble, all-to-all volume and buffers (the layout semantics are in :mod:`dsv3.plan`)."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from dsv3.config import Config, ModelConfig
from dsv3.errors import DsvError
from dsv3.hardware import DTYPES
from dsv3.model import Transformer, count_parameters
from dsv3.model.attention import planned_attention

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


def check_divisible(gpus: int, pp: int, ep: int) -> int:
    """dp = gpus / pp, after checking that ``pp`` divides ``gpus`` and ``ep`` divides dp."""
    if gpus <= 0:
        raise DsvError(f"--gpus {gpus} must be positive")
    if pp <= 0 or ep <= 0:
        raise DsvError(f"parallel.pp={pp} and parallel.ep={ep} must be positive")
    if gpus % pp:
        raise DsvError(f"--gpus {gpus} is not divisible by parallel.pp={pp}; choose a multiple of {pp}")
    dp = gpus // pp
    if dp % ep:
        raise DsvError(
            f"the {dp} data-parallel ranks per stage are not divisible by parallel.ep={ep}; "
            f"use a GPU count that is a multiple of pp*ep={pp * ep}"
        )
    return dp


def static_bytes(
    local_other: float,
    local_expert: float,
    dp: int,
    ep: int,
    zero_stage: int,
    precision: str = "bf16",
    pipeline: bool = False,
) -> MemoryPlan:
    """Weights, gradients and AdamW state of the parameters held by one GPU, as DeepSpeed holds
    them between the gradient reduction and the optimizer step (when all three are alive).

    Mixed precision (bf16, the ZeRO paper's accounting, Rajbhandari et al. 2020 §3.1): 2 bytes
    per parameter of bf16 weights, 2 of bf16 gradients, 12 of optimizer state (fp32 master copy
    and two fp32 moments). fp32: 4 + 4 + 8 (two moments), plus the fp32 partition copy
    DeepSpeed's ZeRO-1/2 optimizer keeps (4) when ``zero_stage >= 1``. ZeRO-1 partitions the
    optimizer state over the data-parallel group, ZeRO-2 also the gradients, ZeRO-3 also the
    weights; expert parameters are partitioned over the ``dp / ep`` expert-data-parallel ranks.

    DeepSpeed (0.19; checked with 0.19.8) reduces the gradients of ZeRO-1 into the partitions
    at the end of the backward pass as ZeRO-2 does and frees the rest, so from then to the
    update a ZeRO-1 rank holds only its partition of the gradients too (during the backward
    pass both hold up to a reduction bucket more, not counted here); :func:`zero_held_elements`
    adds the parts of the tensors that straddle a partition's edges. With pipelines, bf16 at ZeRO stage 0 runs
    DeepSpeed's ``BF16_Optimizer`` (``pipeline=True``): besides the bf16 ``.grad`` it keeps a
    gradient accumulation buffer of the same size (2 + 2 bytes per parameter) and partitions
    the fp32 master weights and moments over the data-parallel ranks like ZeRO-1.

    Args:
        local_other: non-expert parameters held by this GPU (its stage's, unpartitioned).
        local_expert: routed-expert parameters held by this GPU (already divided by ``ep``).
        pipeline: the layout has pipeline stages (``pp > 1``).
    """
    edp = dp // ep
    shard = local_other / dp + local_expert / edp
    full = local_other + local_expert
    w_b, g_b = (2, 2) if precision == "bf16" else (4, 4)
    o_b = 12 if precision == "bf16" else (12 if zero_stage >= 1 else 8)
    bf16_pipe = precision == "bf16" and pipeline and zero_stage == 0
    return MemoryPlan(
        weights=w_b * (shard if zero_stage >= 3 else full),
        grads=g_b * (shard if zero_stage >= 1 else (2 * full if bf16_pipe else full)),
        optimizer=o_b * (shard if zero_stage >= 1 or bf16_pipe else full),
    )


def zero_held_elements(sizes: list[int], parts: int, rank: int | None = None) -> int:
    """Gradient elements rank ``rank`` of ``parts`` holds for one ZeRO-1/2 optimizer group.

    DeepSpeed flattens the group's tensors in order (``sizes``, elements each), pads the total
    to a multiple of ``2 * parts`` and gives each rank an equal slice; after the reduction a
    rank keeps views of the gradients of the tensors that overlap its slice (its
    ``averaged_gradients``), which hold each such tensor whole: the slice plus the parts of
    the (at most two) tensors straddling its edges (the per-tensor alignment padding is
    ignored: a few elements).

    Args:
        rank: the rank in the group; None = the largest over the ranks.

    Returns:
        elements held (0 for an empty group).
    """
    sizes = [n for n in sizes if n > 0]
    total = sum(sizes)
    if total == 0:
        return 0
    align = 2 * parts
    part = -(-total // align) * align // parts
    ends = list(itertools.accumulate(sizes))  # ends[i]: offset just after tensor i
    starts = [0, *ends[:-1]]

    def held(r: int) -> int:
        lo, hi = r * part, (r + 1) * part
        first = bisect.bisect_right(ends, lo)  # first tensor ending after lo
        last = bisect.bisect_left(starts, hi) - 1  # last tensor starting before hi
        return ends[last] - starts[first] if last >= first else 0

    return held(rank) if rank is not None else max(held(r) for r in range(parts))


# ----------------------------------------------------------------------------- activations


def _norm_bytes(n: int, a: int) -> int:
    """Bytes per token that :class:`dsv3.model.norm.RMSNorm` over ``n`` channels keeps for backward.

    The norm computes in fp32 and keeps its input in the activation dtype and one fp32
    reciprocal RMS; the consumer (a linear layer) keeps the output: ``2 a n + 4``.
    """
    return 2 * a * n + 4


@dataclass
class ActivationBytes:
    """Bytes per token kept for backward, by part of the model (see :func:`activation_bytes_per_token`).

    Attributes:
        attention: one MLA sublayer including its input RMSNorm.
        dense_ffn: one dense SwiGLU sublayer including its RMSNorm.
        moe_ffn: one DeepSeekMoE sublayer including its RMSNorm, the router and the experts.
        block_input: what a checkpointed block keeps (its input hidden state).
        embedding: token ids kept by the embedding lookup.
        head: final RMSNorm, the logits, targets and their mask.
        mtp_inner: one MTP module beyond its transformer block and its head (two norms, the
            concatenation); its head costs ``head`` too (its own label and mask tensors).
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


#: what an attention kernel keeps for backward (:func:`dsv3.model.attention.saved_form`)
ATTENTION_FORMS = {
    "fused": "fused attention, no (T, T) matrix kept",
    "padded": "flash attention with v padded to the q/k head dim, no (T, T) matrix kept",
    "math": "SDPA's math kernel, keeps fp32 (T, T) probabilities",
    "matmul": "matmul attention, keeps (T, T) probabilities",
}


def activation_bytes_per_token(
    m: ModelConfig, precision: str, attention: str = "fused", seq_len: int | None = None
) -> ActivationBytes:
    """Bytes per token that the forward pass keeps for the backward pass, per part of the model.

    Derived from the tensors each operation of dsv3's model must keep for its gradient (a
    linear layer keeps its input, SiLU its input, a product both factors, softmax-attention
    with a fused kernel q, k, v, its output and one fp32 log-sum-exp per head, log-softmax its
    output, an index its indices), as in Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", §4.1), applied to MLA (DeepSeek-V2 §2.1) and
    DeepSeekMoE (DeepSeek-V3 §2.1.2) instead of the GPT block. No dropout. Activation dtype
    ``a`` = 2 bytes (bf16) or 4 (fp32); RMSNorm, RoPE, the router and the log-softmax work in
    fp32 (4 bytes). What the attention keeps depends on its kernel (``attention``, see
    :func:`dsv3.model.attention.saved_form`); the unfused ones keep a row of probabilities per
    query, so their bytes per token grow with ``seq_len``.

    With D = dim, Rq = q_lora_rank, C = kv_lora_rank, dn/dr/dv the head dims, H heads,
    F = inter_dim, I = moe_inter_dim, S = n_shared_experts * I, E routed experts, K activated,
    G groups, Gk = n_limited_groups, V = vocab_size, ``norm(n) = 2 a n + 4`` (see
    :func:`_norm_bytes`), per token:

    - MLA: ``norm(D)`` + query path ``norm(Rq)`` (when Rq > 0) + key latent
      ``a (C + dr) + a C + 4`` (the norm's input is a view of the whole kv_a output; its
      output; the reciprocal RMS) +
      the attention's tensors, with Dk = dn + dr, T = seq_len:

      - ``fused``: q ``a H Dk`` + k ``a H Dk`` + ``a H (dn + dv)`` (the kv_b output that v is
        a view of) + output ``a H dv`` (also the input of o_proj) + log-sum-exp ``4 H``;
      - ``padded``: q, k, v padded ``3 a H Dk`` + padded output ``a H Dk`` + log-sum-exp
        ``4 H`` + the output's unpadded copy (o_proj's input) ``a H dv``;
      - ``math``: contiguous fp32 copies (whatever ``a``) of the scaled q and k ``4 H 2 Dk``,
        the probabilities ``4 H T`` and v ``4 H dv`` + o_proj's input ``a H dv``;
      - ``matmul``: contiguous copies of the scaled q and of k ``a H 2 Dk``, the probabilities
        ``a H T``, a contiguous copy of v ``a H dv`` (the batched product's operand) + o_proj's
        input ``a H dv``.

      RoPE is linear in its input and keeps only the cos/sin tables.
    - dense FFN: ``norm(D) + 4 a F`` (gate output, its SiLU, up output, their product).
    - MoE FFN: ``norm(D)`` + router (fp32 input copy ``4 D`` under bf16, sigmoid scores
      ``4 E``, group top-2 and top-Gk indices ``8 (2 G + Gk) + G`` when G > 1, top-K indices
      ``8 K``, weights ``4 K``, sums and the padding mask ``12``) + routed experts (sort order
      and token ids ``16 K``, gathered rows ``a K D``, ``4 a K I`` as in the dense FFN,
      expert outputs before and after the gate weighting ``2 a K D`` (the weighted rows are
      what the scatter-add back to the tokens keeps), the gate weight per row ``a K``) +
      shared experts ``4 a S``.
    - head: ``norm(D) + a V`` (the logits, kept by the blocked cross-entropy of
      :func:`dsv3.model.objective.ce_sum`) ``+ 9`` (int64 targets and their bool mask);
      embedding ``8``.
    - MTP module (besides its MoE block and its head ``norm(D) + a V + 9``): the norms of the
      embedding and of the previous depth's state without their outputs (the concatenation
      keeps nothing): the embedding ``a D`` and two reciprocal RMS ``8`` (the second norm's
      input is the head norm's output, kept anyway), and the concatenation ``2 a D`` (the
      input of eh_proj). Counted over T positions (depth k really has T - k).

    With per-block activation checkpointing (:mod:`dsv3.parallel.checkpointing`) a block keeps
    only its input, ``a D`` per token (an MTP module its embeddings, ``a D``); the block being
    recomputed in backward holds its full activations once.

    With expert parallelism the routed experts' rows live on the expert's rank; under
    balanced routing each GPU holds as many as its own tokens produce. The formula matches
    the storage of the tensors autograd saves in a real forward of small models to within 1%
    (``tests/unit/test_plan.py``).

    Args:
        m: model sizes.
        precision: ``"bf16"`` or ``"fp32"`` (``train.precision``).
        attention: one of :data:`ATTENTION_FORMS` (default the fused kernel of a GPU).
        seq_len: tokens per sequence; needed for ``math`` and ``matmul``.

    Returns:
        :class:`ActivationBytes`, each field in bytes per token (integers as floats).

    Raises:
        DsvError: an unknown precision or attention form, or no ``seq_len`` for an unfused one.
    """
    if precision not in ("bf16", "fp32"):
        raise DsvError(f"train.precision={precision!r} is not supported; use fp32 or bf16")
    if attention not in ATTENTION_FORMS:
        raise DsvError(f"attention form {attention!r} is unknown; use one of {', '.join(ATTENTION_FORMS)}")
    if attention in ("math", "matmul") and not seq_len:
        raise DsvError(f"the {attention} attention keeps (T, T) probabilities: give seq_len")
    a = DTYPE_BYTES[precision]
    D, H, C = m.dim, m.n_heads, m.kv_lora_rank
    dn, dr, dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    K, E, G = m.n_activated_experts, m.n_routed_experts, m.n_expert_groups
    mla = _norm_bytes(D, a)
    if m.q_lora_rank > 0:
        mla += _norm_bytes(m.q_lora_rank, a)
    mla += a * (C + dr) + a * C + 4  # key latent and its norm
    mla += _attention_bytes(attention, a, H, dn + dr, dn, dv, seq_len or 0)
    dense_ffn = _norm_bytes(D, a) + 4 * a * m.inter_dim
    router = (4 * D if a < 4 else 0) + 4 * E + 8 * K + 4 * K + 12
    if G > 1:
        router += 8 * (2 * G + m.n_limited_groups) + G
    routed = 16 * K + 3 * a * K * D + 4 * a * K * m.moe_inter_dim + a * K
    shared = 4 * a * m.n_shared_experts * m.moe_inter_dim
    moe_ffn = _norm_bytes(D, a) + router + routed + shared
    head = _norm_bytes(D, a) + a * m.vocab_size + 9
    mtp_inner = a * D + 8 + 2 * a * D
    return ActivationBytes(
        attention=float(mla),
        dense_ffn=float(dense_ffn),
        moe_ffn=float(moe_ffn),
        block_input=float(a * D),
        embedding=8.0,
        head=float(head),
        mtp_inner=float(mtp_inner),
        mtp_input=float(a * D),
    )


def _attention_bytes(form: str, a: int, H: int, Dk: int, dn: int, dv: int, T: int) -> int:
    """Bytes per token the attention kernel of saved form ``form`` keeps (see
    :func:`activation_bytes_per_token`), its output copy for o_proj included."""
    if form == "fused":
        return a * H * (2 * Dk + dn + dv + dv) + 4 * H
    if form == "padded":
        return a * H * (4 * Dk + dv) + 4 * H
    if form == "math":
        return 4 * H * (2 * Dk + T + dv) + a * H * dv
    return a * H * (2 * Dk + T + dv + dv)  # matmul


def planned_activations(cfg: Config, micro_batch_size: int, cpu: bool = False) -> tuple[ActivationBytes, str, bool]:
    """Activation bytes per token of ``cfg``'s model with the attention kernel a run will use.

    On a GPU the fused or padded flash attention (the fixed rule); on a CPU the kernel is
    measured on first use (:func:`dsv3.model.attention.planned_attention`): the recorded choice
    when the machine has one for this micro-batch shape, else the candidate that keeps the most
    (SDPA's math kernel or the matmul attention, with their (T, T) probabilities).

    Returns:
        ``(bytes, form, known)``: :func:`dsv3.plan.costs.activation_bytes_per_token` with the
        attention's saved form ``form``, and whether the kernel is known.
    """
    m, T = cfg.model, cfg.data.seq_len
    dk = m.qk_nope_head_dim + m.qk_rope_head_dim
    dtype, device_type = DTYPES[cfg.train.precision], "cpu" if cpu else "cuda"
    forms, known = planned_attention(micro_batch_size, m.n_heads, T, dk, m.v_head_dim, dtype, device_type)
    acts = {f: activation_bytes_per_token(m, cfg.train.precision, f, T) for f in forms}
    form = max(forms, key=lambda f: acts[f].attention)
    return acts[form], form, known


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


def a2a_volume_per_step(
    tokens_per_micro_batch: int,
    m: ModelConfig,
    ep: int,
    moe_layers: int,
    micro_batches: int,
    dispatch_bytes: int,
    combine_bytes: int,
    grad_bytes: int,
    recompute: bool = False,
) -> float:
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


def a2a_buffer_bytes(
    tokens_per_micro_batch: int, m: ModelConfig, ep: int, dispatch_bytes: int, combine_bytes: int
) -> float:
    """Bytes of the all-to-all buffers of one MoE layer for one micro-batch.

    Send and receive buffers of the dispatch (``tokens * K * dim * dispatch_bytes`` each) and
    of the combine (``* combine_bytes`` each), taken as alive together; one layer exchanges at
    a time. Balanced routing assumed (an overloaded rank receives more). 0 when ``ep == 1``.
    """
    if ep <= 1:
        return 0.0
    rows = tokens_per_micro_batch * m.n_activated_experts * m.dim
    return 2.0 * rows * (dispatch_bytes + combine_bytes)
