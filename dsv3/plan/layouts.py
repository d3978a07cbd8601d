"""Whole layouts for ``dsv3 plan``: the plan of every pipeline stage of a layout, the search for
layouts that fit, and the printed report (:func:`plan`)."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

from dsv3.config import Config
from dsv3.errors import DsvError
from dsv3.model import Transformer, flops_per_token
from dsv3.parallel.engine import param_groups, zero_settings
from dsv3.plan.costs import (
    DTYPE_BYTES,
    GIB,
    MemoryPlan,
    a2a_buffer_bytes,
    a2a_volume_per_step,
    check_divisible,
    in_flight_micro_batches,
    pipeline_bubble,
    planned_activations,
    stage_layers,
    static_bytes,
    zero_held_elements,
)
from dsv3.plan.offload import (
    DEVICE_FLOPS_PER_S,
    PROCESS_BASELINE_BYTES,
    Placement,
    check_offload,
    cpu_init_peak,
    cpu_resident,
    largest_sub_group,
    offload_seconds,
    offload_traffic,
    place_states,
    unswapped_elements,
)


@dataclass
class Layout:
    """A parallel layout; ``micro_batches`` = ``grad_accum`` (micro-batches per step per pipeline).

    ``offload_optimizer`` / ``offload_param``: ``"none"``, ``"cpu"`` or ``"nvme"``
    (``parallel.offload_optimizer`` / ``parallel.offload_param``, see :mod:`dsv3.plan.offload`).
    """

    gpus: int
    pp: int
    ep: int
    zero_stage: int
    micro_batch_size: int
    micro_batches: int
    checkpointing: bool
    offload_optimizer: str = "none"
    offload_param: str = "none"

    @classmethod
    def of(cls, parallel, gpus: int) -> Layout:
        """The layout a config's ``parallel`` section runs on ``gpus`` processes (offload keys a
        section lacks count as ``"none"``)."""
        p = parallel
        return cls(
            gpus,
            p.pp,
            p.ep,
            p.zero_stage,
            p.micro_batch_size,
            p.grad_accum,
            p.activation_checkpointing,
            getattr(p, "offload_optimizer", "none"),
            getattr(p, "offload_param", "none"),
        )

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    @property
    def offloads(self) -> bool:
        return self.offload_optimizer != "none" or self.offload_param != "none"

    def offload_text(self) -> str:
        """``"optimizer on cpu, parameters on nvme"``, or ``"no offload"``."""
        parts = [
            f"{what} on {dev}"
            for what, dev in (("optimizer", self.offload_optimizer), ("parameters", self.offload_param))
            if dev != "none"
        ]
        return ", ".join(parts) or "no offload"

    def describe(self) -> str:
        return (
            f"pp={self.pp} ep={self.ep} dp={self.dp} ZeRO-{self.zero_stage} micro-batch {self.micro_batch_size} "
            f"x {self.micro_batches} per step, checkpointing {'on' if self.checkpointing else 'off'}"
            + (f", {self.offload_text()}" if self.offloads else "")
        )


@dataclass
class ModelParts:
    """Parameter counts of the model's parts, for placing them on pipeline stages.

    Attributes:
        layers: per block, (routed-expert parameters, other parameters).
        moe: per block, whether its FFN is MoE.
        embedding, head: parameters of ``embed_tokens``; of the final norm + ``lm_head``.
        mtp: per MTP module, (routed-expert, other) parameters (embedding and head shared).
        groups: per optimizer parameter group of the trainer
            (:func:`dsv3.parallel.engine.param_groups`), the sizes of its parameters in order
            (ZeRO-3's sub-groups, :func:`dsv3.plan.offload.largest_sub_group`); empty: unknown.
        tensors: every parameter tensor of the plain model in its order, (name, elements, ndim),
            for ZeRO's flat partitions (:func:`dsv3.plan.costs.zero_held_elements`).
    """

    layers: list[tuple[int, int]]
    moe: list[bool]
    embedding: int
    head: int
    mtp: list[tuple[int, int]]
    groups: list[list[int]] = field(default_factory=list)
    tensors: list[tuple[str, int, int]] = field(default_factory=list)

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
            groups=[[p.numel() for p in g["params"]] for g in param_groups(model, 0.0)],
            tensors=[(n, p.numel(), p.dim()) for n, p in model.named_parameters()],
        )

    def stage_counts(self, pp: int, spec: str = "parameters") -> list[int]:
        """Blocks per pipeline stage as the trainer splits them (``parallel.pp_partition``):
        explicit counts ``"2,3,3"``, or balanced by parameter count with the embedding on the
        first stage and the head, MTP modules and tied embedding on the last (the weights and
        DeepSpeed's ``partition_balanced`` of :func:`dsv3.parallel.layout.balanced_counts`);
        ``stage_layers``' even split when that leaves a stage empty or ``spec`` does not fit."""
        n = len(self.layers)
        spec = str(spec).strip()
        if pp <= 1:
            return [n]
        if spec != "parameters":
            try:
                counts = [int(x) for x in spec.split(",")]
            except ValueError:
                counts = []
            if len(counts) == pp and min(counts) >= 1 and sum(counts) == n:
                return counts
        else:
            importlib.import_module("dsv3.parallel")  # picks DeepSpeed's accelerator before DeepSpeed loads
            partition_balanced = importlib.import_module("deepspeed.runtime.utils").partition_balanced

            weights = [e + o for e, o in self.layers]
            weights[0] += self.embedding
            weights[-1] += self.head + sum(e + o for e, o in self.mtp) + self.embedding
            bounds = partition_balanced(weights=weights, num_parts=pp)
            counts = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]
            if len(counts) == pp and min(counts) >= 1:
                return counts
        return [len(r) for r in stage_layers(n, pp)]

    def stage_tensors(self, counts: list[int], stage: int) -> list[tuple[str, int, int]]:
        """The tensors pipeline stage ``stage`` holds, in the order of its pipeline layers
        (:mod:`dsv3.parallel.pipeline`): embedding (first stage), its blocks, and on the last
        stage the tied embedding (with pipelines), final norm, head and MTP modules."""
        first = sum(counts[:stage])
        prefixes = ["embed_tokens."] if stage == 0 else []
        prefixes += [f"layers.{i}." for i in range(first, first + counts[stage])]
        if stage == len(counts) - 1:
            prefixes += (["embed_tokens."] if len(counts) > 1 else []) + ["norm.", "lm_head.", "mtp."]
        return [t for pre in prefixes for t in self.tensors if t[0].startswith(pre)]


def zero_grad_elements(tensors: list[tuple[str, int, int]], dp: int, ep: int, dp_rank: int | None) -> int:
    """Gradient elements a ZeRO-1/2 rank holds for the ``tensors`` of its stage, group by group
    as :func:`dsv3.parallel.engine.param_groups` forms them (matrices, vectors, and with
    ``ep`` > 1 the local routed experts, 1/ep of each, over the ``dp / ep`` expert-data-parallel
    ranks: rank ``dp_rank // ep``); see :func:`dsv3.plan.costs.zero_held_elements`.
    ``dp_rank`` None: each group's largest share."""
    decay = [n for name, n, nd in tensors if nd >= 2 and not (ep > 1 and ".experts." in name)]
    no_decay = [n for _, n, nd in tensors if nd < 2]
    experts = [n // ep for name, n, _ in tensors if ep > 1 and ".experts." in name]
    edp_rank = None if dp_rank is None else dp_rank // ep
    return (
        zero_held_elements(decay, dp, dp_rank)
        + zero_held_elements(no_decay, dp, dp_rank)
        + zero_held_elements(experts, dp // ep, edp_rank)
    )


@dataclass
class StagePlan:
    """Memory of the worst pipeline stage and the step's pipeline and all-to-all figures.

    ``memory`` is the stage's :class:`MemoryPlan` before offloading; ``placement`` splits it
    (plus ZeRO-3's buffers) into device, host and disk bytes per rank
    (:func:`dsv3.plan.offload.place_states`). Per node: ``gpus_per_node`` ranks of the worst
    stage, each with a process baseline in host memory. ``cpu``: a CPU run (device = host).
    ``compute_s`` / ``offload_s``: seconds of model FLOPs at ``DEVICE_FLOPS_PER_S`` and of
    offload traffic at the assumed rates per step (:func:`relative_step_time`). ``attention``:
    the saved form of the attention counted (:func:`dsv3.plan.costs.planned_activations`);
    ``attention_known`` False when the CPU has not measured its attention kernel at this shape
    yet (the largest candidate is counted).
    """

    layout: Layout
    stage: int
    memory: MemoryPlan
    in_flight: int
    blocks: int
    bubble: float
    a2a_bytes: float
    stages: list[MemoryPlan] = field(default_factory=list)
    placement: Placement = field(default_factory=Placement)
    gpus_per_node: int = 1
    cpu: bool = False
    baseline: float = PROCESS_BASELINE_BYTES
    compute_s: float = 0.0
    offload_s: float = 0.0
    stage_params: float = 0.0
    attention: str = "fused"
    attention_known: bool = True

    @property
    def device_total(self) -> float:
        """Bytes on one device (GPU) after offloading."""
        return self.placement.device_total

    @property
    def resident(self) -> dict[str, float]:
        """CPU run: resident bytes of one process by term (:func:`dsv3.plan.offload.cpu_resident`)."""
        return cpu_resident(self.placement, self.baseline)

    @property
    def init_peak(self) -> float:
        """CPU run: resident bytes of a process while the model is built in fp32
        (:func:`dsv3.plan.offload.cpu_init_peak`)."""
        return cpu_init_peak(self.stage_params, self.baseline)

    @property
    def peak_resident(self) -> float:
        """CPU run: peak resident bytes of one process, ``max(sum of resident terms, init peak)``."""
        return max(sum(self.resident.values()), self.init_peak)

    @property
    def host_per_node(self) -> float:
        """Host memory of a node: ``gpus_per_node`` x (host terms + process baseline); on a CPU
        run, ``gpus_per_node`` x the peak resident memory of one process."""
        per_rank = self.peak_resident if self.cpu else self.placement.host_total + self.baseline
        return self.gpus_per_node * per_rank

    @property
    def disk_per_node(self) -> float:
        return self.gpus_per_node * self.placement.disk_total

    def fits(
        self, gpu_memory_gib: float | None, host_memory_gib: float | None = None, disk_gib: float | None = None
    ) -> bool:
        """Device bytes within ``gpu_memory_gib`` (ignored on a CPU run or when None), host memory
        and disk per node within the limits given (None: not checked)."""
        if not self.cpu and gpu_memory_gib is not None and self.device_total > gpu_memory_gib * GIB:
            return False
        if host_memory_gib is not None and self.host_per_node > host_memory_gib * GIB:
            return False
        return disk_gib is None or self.disk_per_node <= disk_gib * GIB


def plan_layout(
    cfg: Config,
    parts: ModelParts,
    layout: Layout,
    dispatch: str | None = None,
    combine: str | None = None,
    gpus_per_node: int | None = None,
    cpu: bool = False,
    baseline: float = PROCESS_BASELINE_BYTES,
    sub_group_size: float | None = None,
    dp_rank: int | None = None,
) -> StagePlan:
    """Memory of every pipeline stage of ``layout``; returns the stage with the largest total.

    Per stage s (its blocks as the trainer places them, :meth:`ModelParts.stage_counts`):
    static memory (:func:`static_bytes`) of the parameters placed on it (see the module
    docstring), with ZeRO-1/2 the gradients a rank keeps of the tensors overlapping its
    partitions (:func:`zero_grad_elements`); activations = in-flight micro-batches
    (:func:`in_flight_micro_batches`) x tokens per micro-batch x bytes per token of its parts
    (:func:`activation_bytes_per_token`; with checkpointing the block inputs, plus one block's
    full activations for one micro-batch while it is recomputed); all-to-all buffers of one
    MoE layer (:func:`a2a_buffer_bytes`) if the stage has one. The all-to-all volume is that
    of the stage with the most MoE layers. Each stage's memory is then placed on device, host
    and disk under the layout's offload options (:func:`dsv3.plan.offload.place_states`); the
    worst stage is the one with the most device bytes (on a CPU run, resident bytes).

    Args:
        dispatch, combine: all-to-all dtypes, ``"fp8"``, ``"bf16"`` or ``"fp32"``; default
            the activation dtype (what dsv3 sends).
        gpus_per_node: ranks per node (default ``min(gpus, 8)``).
        cpu: a CPU run (every rank a process on the host; device terms are host memory).
        baseline: resident bytes of a process before model states.
        sub_group_size: ZeRO-3's ``sub_group_size`` in elements (sizes the NVMe swap buffers);
            None: the engine's for the layout (:func:`dsv3.parallel.engine.zero_settings`).
        dp_rank: the data-parallel rank within the stage whose ZeRO partitions to count;
            None = the largest share over the ranks.

    Raises:
        DsvError: a layout that does not divide the GPUs, has more stages than blocks or an
            offload / ZeRO-3 combination the trainer refuses (:func:`check_offload`).
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
    check_offload(L.zero_stage, L.ep, L.pp, L.offload_optimizer, L.offload_param)
    per_node = min(L.gpus, 8) if gpus_per_node is None else gpus_per_node
    if per_node <= 0 or L.gpus % per_node:
        raise DsvError(f"--gpus-per-node {per_node} must divide --gpus {L.gpus}")
    precision = cfg.train.precision
    act, form, known = planned_activations(cfg, L.micro_batch_size, cpu)
    a = DTYPE_BYTES[precision]
    d_b = DTYPE_BYTES[dispatch or precision]
    c_b = DTYPE_BYTES[combine or precision]
    tokens = L.micro_batch_size * cfg.data.seq_len
    if sub_group_size is None:
        sub_group_size = zero_settings(L.offload_optimizer).sub_group_size
    largest_param = max((n for _, n, _ in parts.tensors), default=0)
    sub_group = largest_sub_group(parts.groups, dp, sub_group_size) if L.zero_stage >= 3 and parts.groups else None
    unswapped = unswapped_elements(parts.groups, dp, sub_group_size) if L.zero_stage >= 3 else 0
    stages, worst, worst_s, worst_place, worst_key, worst_shard, worst_params = [], None, 0, None, -1.0, 0.0, 0.0
    most_moe = 0
    counts = parts.stage_counts(L.pp, cfg.parallel.pp_partition)
    spans = [range(sum(counts[:s]), sum(counts[: s + 1])) for s in range(L.pp)]
    for s, blocks in enumerate(spans):
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
            other += parts.head + (parts.embedding if L.pp > 1 else 0)  # the pipeline's tied copy
            for e, o in parts.mtp:
                expert, other = expert + e, other + o
            mtp_head = act.head
            full.append(act.head + len(parts.mtp) * (act.mtp_module() + mtp_head))
            kept += act.head + len(parts.mtp) * (act.mtp_input + mtp_head)
            n_moe += len(parts.mtp)
        most_moe = max(most_moe, n_moe)
        mem = static_bytes(other, expert / L.ep, dp, L.ep, L.zero_stage, precision, pipeline=L.pp > 1)
        if L.zero_stage in (1, 2) and parts.tensors:
            held = zero_grad_elements(parts.stage_tensors(counts, s), dp, L.ep, dp_rank)
            mem.grads = DTYPE_BYTES[precision] * held
        sizes = [parts.layers[i][0] / L.ep + parts.layers[i][1] for i in blocks]
        sizes += [parts.embedding] if first else []
        sizes += [e / L.ep + o for e, o in parts.mtp] + [parts.head] if last else []
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
        shard = other / dp + expert / L.ep / (dp // L.ep)
        place = place_states(
            mem, shard, other + expert / L.ep, max(sizes), L.zero_stage, precision, L.micro_batches,
            L.offload_optimizer, L.offload_param, cpu, sub_group_size, sub_group, largest_param, unswapped,
        )  # fmt: skip
        params = other + expert / L.ep
        steady = sum(cpu_resident(place, baseline).values())
        key = max(steady, cpu_init_peak(params, baseline)) if cpu else place.device_total
        if key > worst_key:
            worst, worst_s, worst_place, worst_key, worst_shard, worst_params = mem, s, place, key, shard, params
    volume = a2a_volume_per_step(tokens, m, L.ep, most_moe, L.micro_batches, d_b, c_b, a, L.checkpointing)
    link, nvme = offload_traffic(
        worst_shard, L.zero_stage, precision, L.micro_batches, L.checkpointing, L.offload_optimizer, L.offload_param
    )
    return StagePlan(
        layout=L,
        stage=worst_s,
        memory=worst,
        in_flight=in_flight_micro_batches(L.pp, worst_s, L.micro_batches),
        blocks=counts[worst_s],
        bubble=pipeline_bubble(L.pp, L.micro_batches),
        a2a_bytes=volume,
        stages=stages,
        placement=worst_place,
        gpus_per_node=per_node,
        cpu=cpu,
        baseline=baseline,
        compute_s=flops_per_token(m, cfg.data.seq_len) * tokens * L.micro_batches / L.pp / DEVICE_FLOPS_PER_S,
        offload_s=offload_seconds(link, nvme),
        stage_params=worst_params,
        attention=form,
        attention_known=known,
    )


def relative_step_time(sp: StagePlan) -> float:
    """Compute time of a step relative to one without bubble, recomputation or offloading.

    ``(1 + 1/3 [checkpointing]) / (1 - bubble) + offload_s / compute_s``: the backward pass
    costs about twice the forward (Kaplan et al. 2020 §2.1), so recomputing the forward adds a
    third of the work; the pipeline bubble idles that fraction of the step. Offloading adds
    the time its host-link and NVMe traffic takes (:func:`dsv3.plan.offload.offload_traffic`
    at the assumed ``HOST_LINK_BYTES_PER_S`` = 25 GB/s and ``NVME_BYTES_PER_S`` = 3 GB/s per
    GPU), not overlapped, relative to the step's model FLOPs at ``DEVICE_FLOPS_PER_S`` = 400
    TFLOP/s per GPU. The host's optimizer step and data-parallel communication are not included.
    """
    base = (1.0 + (1.0 / 3.0 if sp.layout.checkpointing else 0.0)) / (1.0 - sp.bubble)
    return base + (sp.offload_s / sp.compute_s if sp.compute_s > 0 else 0.0)


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
    with ``pp > 1`` (DeepSpeed's pipeline engine supports no higher stage), and ZeRO-3 with
    ``pp = ep = 1`` (what the trainer runs); the optimizer state on the device or offloaded to
    the host (and, at ZeRO-3, to NVMe), and at ZeRO-3 the parameters on the device, the host
    or NVMe (:func:`dsv3.plan.offload.check_offload`); the micro-batch size among the divisors
    of ``parallel.micro_batch_size``; activation checkpointing off and on. The number of
    micro-batches per step follows from the global batch and must be a whole number.
    """
    m, p = cfg.model, cfg.parallel
    batch = global_batch(cfg, gpus)
    out = []
    for pp in _divisors(gpus):
        if pp > m.n_layers:
            break
        dp = gpus // pp
        for ep in _divisors(math.gcd(m.n_routed_experts, dp)):
            zeros = [1, 2] + ([3] if ep == 1 else []) if pp == 1 else [1]
            for zero in zeros:
                optimizer = ("none", "cpu", "nvme") if zero == 3 else ("none", "cpu")
                params = ("none", "cpu", "nvme") if zero == 3 else ("none",)
                for mbs in _divisors(max(1, p.micro_batch_size)):
                    if batch % (mbs * dp):
                        continue
                    for ckpt in (False, True):
                        for opt in optimizer:
                            for par in params:
                                out.append(Layout(gpus, pp, ep, zero, mbs, batch // (mbs * dp), ckpt, opt, par))
    return out


def propose(
    cfg: Config,
    parts: ModelParts,
    gpus: int,
    gpu_memory_gib: float | None,
    dispatch: str | None = None,
    combine: str | None = None,
    host_memory_gib: float | None = None,
    disk_gib: float | None = None,
    gpus_per_node: int | None = None,
    cpu: bool = False,
    baseline: float = PROCESS_BASELINE_BYTES,
    sub_group_size: float | None = None,
) -> tuple[list[StagePlan], StagePlan | None]:
    """Search :func:`candidate_layouts`; return the fitting ones ranked, and the smallest.

    Fitting: :meth:`StagePlan.fits` (device memory, and host memory and disk per node when
    given). Ranked: layouts without offloading first (they fit without the host link's
    traffic), then by :func:`relative_step_time` (bubble, recomputation, offload traffic),
    ZeRO-1/2 before ZeRO-3 (ZeRO-3 gathers the weights again in every forward and backward,
    1.5x the data-parallel traffic, ZeRO paper §7.2.2), all-to-all bytes per step, and the
    fewest device bytes. The second value is the candidate needing the least device memory
    (on a CPU run, host memory per node; None when there is no candidate at all), for the
    "cannot fit" message.
    """
    plans = [
        plan_layout(cfg, parts, lay, dispatch, combine, gpus_per_node, cpu, baseline, sub_group_size)
        for lay in candidate_layouts(cfg, gpus)
    ]
    fitting = [sp for sp in plans if sp.fits(gpu_memory_gib, host_memory_gib, disk_gib)]
    fitting.sort(
        key=lambda sp: (
            sp.layout.offloads,
            round(relative_step_time(sp), 6),
            sp.layout.zero_stage == 3,
            sp.a2a_bytes,
            sp.host_per_node if cpu else sp.device_total,
        )
    )
    smallest = min(plans, key=lambda sp: sp.host_per_node if cpu else sp.device_total, default=None)
    return fitting, smallest
