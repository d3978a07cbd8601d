"""The text ``dsv3 plan`` prints (:func:`plan`): counts, the configured layout's memory on the
device, the host and disk (or, for a CPU run, the resident memory of a process), the pipeline
and all-to-all figures, the proposals and the schedules."""

from __future__ import annotations

import copy
import math

import torch

from dsv3.config import Config
from dsv3.errors import DsvError
from dsv3.model import Transformer, count_parameters, flops_per_token, kernels
from dsv3.plan.costs import ATTENTION_FORMS, DTYPE_BYTES, GB, GIB, planned_activations, split_counts
from dsv3.plan.layouts import Layout, ModelParts, StagePlan, plan_layout, propose, relative_step_time
from dsv3.plan.offload import PROCESS_BASELINE_BYTES
from dsv3.training.schedule import schedule_table


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith(("ch", "ss")) else "s")


def _gib(x: float) -> str:
    return f"{x / GIB:>9,.2f}"


def _verdict(limit: float | None, value: float) -> str:
    if limit is None:
        return ""
    ok = value <= limit * GIB
    return f"  of {limit:g}: " + ("fits" if ok else "does NOT fit")


def _layout_table(
    sp: StagePlan,
    gpu_memory_gib: float | None,
    precision: str,
    dispatch: str,
    combine: str,
    host_memory_gib: float | None = None,
    disk_gib: float | None = None,
) -> list[str]:
    L, place = sp.layout, sp.placement
    unit = "process" if sp.cpu else "GPU"
    lines = [
        f"layout      {_count(L.gpus, unit)}: pp={L.pp} ep={L.ep} dp={L.dp} (expert dp {L.dp // L.ep}) "
        f"ZeRO-{L.zero_stage}, "
        f"{precision}, activation checkpointing {'on' if L.checkpointing else 'off'}, {L.offload_text()}",
        f"            {_count(L.micro_batches, 'micro-batch')} of {L.micro_batch_size} per step; global batch "
        f"{L.micro_batch_size * L.micro_batches * L.dp} sequences",
        f"            attention: {ATTENTION_FORMS[sp.attention]}"
        + ("" if sp.attention_known else " (not measured on this machine yet: the candidate keeping the most)"),
    ]
    where = (
        f"pipeline stage {sp.stage} of {L.pp}: {_count(sp.blocks, 'block')}, "
        f"{_count(sp.in_flight, 'micro-batch')} in flight"
    )
    node = f"{_count(sp.gpus_per_node, unit)} per node"
    if sp.cpu:
        resident = sp.resident
        lines.append(f"memory/process (GiB, CPU run: resident while training = the sum of these terms; {where})")
        lines += [f"  {name:<26}{_gib(value)}" for name, value in resident.items()]
        lines.append(f"  {'sum (training)':<26}{_gib(sum(resident.values()))}")
        lines.append(f"  {'model built in fp32':<26}{_gib(sp.init_peak)}  (baseline + 4 bytes x parameters, at start)")
        lines.append(f"  {'peak per process':<26}{_gib(sp.peak_resident)}  (the larger of the two)")
        lines.append(
            f"  {'total per node':<26}{_gib(sp.host_per_node)}  ({node})" + _verdict(host_memory_gib, sp.host_per_node)
        )
    else:
        lines.append(f"memory/GPU  (GiB, {where})")
        lines += [f"  {name:<26}{_gib(value)}" for name, value in place.device.items()]
        lines.append(f"  {'total':<26}{_gib(sp.device_total)}" + _verdict(gpu_memory_gib, sp.device_total))
        lines.append(f"host/node   (GiB, per rank; {node}, each a process)")
        lines += [f"  {name:<26}{_gib(value)}" for name, value in place.host.items()]
        lines.append(f"  {'process baseline':<26}{_gib(sp.baseline)}")
        lines.append(f"  {'total per node':<26}{_gib(sp.host_per_node)}" + _verdict(host_memory_gib, sp.host_per_node))
    if place.disk:
        lines.append(f"disk/node   (GiB on NVMe, per rank; {node})")
        lines += [f"  {name:<26}{_gib(value)}" for name, value in place.disk.items()]
        lines.append(f"  {'total per node':<26}{_gib(sp.disk_per_node)}" + _verdict(disk_gib, sp.disk_per_node))
    else:
        lines.append("disk/node   none (nothing offloaded to NVMe)")
    if L.offloads and not sp.cpu:
        lines.append(
            f"offload     {sp.offload_s:,.1f} s of host-link / NVMe traffic per step vs {sp.compute_s:,.1f} s of "
            f"compute at the assumed rates (relative step time {relative_step_time(sp):.2f})"
        )
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


def _limits(gpu: float | None, host: float | None, disk: float | None, cpu: bool) -> str:
    parts = [] if cpu or gpu is None else [f"{gpu:g} GiB per GPU"]
    parts += [f"{host:g} GiB host memory per node"] if host is not None else []
    parts += [f"{disk:g} GiB disk per node"] if disk is not None else []
    return ", ".join(parts)


def _proposal_lines(
    fitting: list[StagePlan],
    smallest: StagePlan | None,
    gpus: int,
    gpu_memory_gib: float | None,
    params: int,
    limit: int = 10,
    host_memory_gib: float | None = None,
    disk_gib: float | None = None,
    cpu: bool = False,
) -> list[str]:
    limits = _limits(gpu_memory_gib, host_memory_gib, disk_gib, cpu)
    if not fitting:
        if smallest is None:
            return [
                f"proposal    no layout divides {gpus} GPUs with the configured global batch; "
                f"change --gpus or parallel.grad_accum"
            ]
        if cpu:
            return [
                f"proposal    no layout fits in {limits}: the smallest needs {smallest.host_per_node / GIB:,.1f} GiB "
                f"of host memory and {smallest.disk_per_node / GIB:,.1f} GiB of disk per node "
                f"({smallest.layout.describe()}); try NVMe offload, more disk or a shorter data.seq_len"
            ]
        state = 16 * params / GIB
        return [
            f"proposal    no layout fits in {limits}: the smallest needs {smallest.device_total / GIB:,.1f} GiB "
            f"per GPU, {smallest.host_per_node / GIB:,.1f} GiB host memory and "
            f"{smallest.disk_per_node / GIB:,.1f} GiB disk per node ({smallest.layout.describe()}); try more GPUs, "
            f"GPUs with more memory, more host memory or disk, or a shorter data.seq_len",
            f"            (weights, gradients and AdamW state alone take 16 bytes per parameter, {state:,.0f} GiB: "
            f"at least {math.ceil(state / gpu_memory_gib):,} GPUs of {gpu_memory_gib:g} GiB without offloading)",
        ]
    lines = [
        f"proposal    {len(fitting)} layouts fit in {limits}; the best {min(limit, len(fitting))} "
        f"(without offloading first, then by step time from bubble, recomputation and offload traffic, "
        f"then all-to-all volume):",
        "   pp   ep    dp ZeRO  mbs  micro-batches ckpt optimizer params "
        + ("  GiB/proc" if cpu else "   GiB/GPU")
        + " host GiB/node disk GiB/node  bubble  all-to-all GB  rel. time",
    ]
    for sp in fitting[:limit]:
        L = sp.layout
        per = sp.peak_resident if cpu else sp.device_total
        lines.append(
            f"  {L.pp:>3} {L.ep:>4} {L.dp:>5} {L.zero_stage:>4} {L.micro_batch_size:>4} {L.micro_batches:>14} "
            f"{'on' if L.checkpointing else 'off':>4} {L.offload_optimizer:>9} {L.offload_param:>6} "
            f"{per / GIB:>9,.1f} {sp.host_per_node / GIB:>13,.1f} {sp.disk_per_node / GIB:>13,.1f} "
            f"{100 * sp.bubble:>6.1f}% {sp.a2a_bytes / GB:>14,.1f} {relative_step_time(sp):>10.2f}"
        )
    best = fitting[0].layout
    lines.append(
        f"            use: parallel.pp={best.pp} parallel.ep={best.ep} parallel.zero_stage={best.zero_stage} "
        f"parallel.micro_batch_size={best.micro_batch_size} parallel.grad_accum={best.micro_batches} "
        f"parallel.activation_checkpointing={'true' if best.checkpointing else 'false'}"
        + (
            f" parallel.offload_optimizer={best.offload_optimizer} parallel.offload_param={best.offload_param}"
            if best.offloads
            else ""
        )
    )
    if best.offloads:
        lines.append(
            f"            (needs {fitting[0].host_per_node / GIB:,.1f} GiB of host memory"
            + (f" and {fitting[0].disk_per_node / GIB:,.1f} GiB of NVMe" if fitting[0].disk_per_node else "")
            + " per node)"
        )
    return lines


def plan(
    cfg: Config,
    gpus: int,
    gpu_memory_gib: float | None,
    propose_layouts: bool = False,
    dispatch: str | None = None,
    combine: str | None = None,
    host_memory_gib: float | None = None,
    disk_gib: float | None = None,
    gpus_per_node: int | None = None,
    cpu: bool = False,
    baseline: float = PROCESS_BASELINE_BYTES,
    sub_group_size: float | None = None,
) -> str:
    """The report printed by ``dsv3 plan`` (several lines of text).

    Counts, FLOPs, the configured layout's memory per GPU (worst stage), host memory and disk
    per node, bubble and all-to-all volume (:func:`plan_layout`); the offload options come
    from ``parallel.offload_optimizer`` / ``parallel.offload_param`` when the config has them
    (else ``"none"``). With ``cpu`` the ranks are processes on CPU hosts (``gpus`` of them) and
    the report gives the peak resident memory of one process term by term
    (:func:`dsv3.plan.offload.cpu_resident`). Layouts are proposed (:func:`propose`) when
    ``propose_layouts`` is set, or when the configured layout has no model parallelism
    (pp = ep = 1) and does not fit.

    Args:
        dispatch, combine: all-to-all dtypes (``"fp8"``, ``"bf16"``, ``"fp32"``); default
            ``train.precision``.
        host_memory_gib, disk_gib: limits per node that fitting layouts respect (None: none).
        gpus_per_node: ranks per node (default ``min(gpus, 8)``).
        baseline: resident bytes of one process before model states.
        sub_group_size: ZeRO-3's ``sub_group_size`` (elements), overriding the engine's; None:
            what the engine configures for each layout (:func:`dsv3.parallel.engine.zero_settings`:
            1e8 under nvme optimizer offload, else DeepSpeed's 1e9).

    Raises:
        DsvError: bad GPU count or memory, a configured layout that does not divide the GPUs
            or that the trainer refuses (unless proposing), proposing without a limit.
    """
    if gpus <= 0:
        raise DsvError(f"--gpus {gpus} must be positive")
    for name, value in (
        ("--gpu-memory-gib", gpu_memory_gib),
        ("--host-memory-gib", host_memory_gib),
        ("--disk-gib", disk_gib),
    ):
        if value is not None and value <= 0:
            raise DsvError(f"{name} {value:g} must be positive")
    if propose_layouts and cpu and host_memory_gib is None:
        raise DsvError("--propose --cpu needs --host-memory-gib to know what fits; add e.g. --host-memory-gib 24")
    if propose_layouts and not cpu and gpu_memory_gib is None:
        raise DsvError("--propose needs --gpu-memory-gib to know what fits; add e.g. --gpu-memory-gib 80")
    for name, dt in (("dispatch", dispatch), ("combine", combine)):
        if dt is not None and dt not in DTYPE_BYTES:
            raise DsvError(f"all-to-all {name} dtype {dt!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
    auto_note = None
    if cfg.train.precision == "auto":  # GPUs train in bf16; a CPU plan takes the faster precision of this CPU
        cfg = copy.deepcopy(cfg)
        cfg.train.precision, auto_note = kernels.resolve_precision("auto", torch.device("cpu" if cpu else "cuda"))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_parameters(model)
    experts, other = split_counts(model)
    parts = ModelParts.of(model)
    m, p = cfg.model, cfg.parallel
    flops = flops_per_token(m, cfg.data.seq_len)
    cache = (m.kv_lora_rank + m.qk_rope_head_dim) * m.n_layers
    act = planned_activations(cfg, p.micro_batch_size, cpu)[0]
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
    if auto_note:
        lines.append(f"precision   {auto_note}")
    dispatch = dispatch or cfg.train.precision
    combine = combine or cfg.train.precision
    layout = Layout.of(p, gpus)
    if sub_group_size is not None and sub_group_size <= 0:
        raise DsvError(f"--sub-group-size {sub_group_size:g} must be positive")
    limited = (gpu_memory_gib is not None and not cpu) or host_memory_gib is not None or disk_gib is not None
    limits = _limits(gpu_memory_gib, host_memory_gib, disk_gib, cpu)
    fits = None
    try:
        sp = plan_layout(cfg, parts, layout, dispatch, combine, gpus_per_node, cpu, baseline, sub_group_size)
    except DsvError as err:
        if not propose_layouts:
            raise
        lines.append(f"layout      the configured layout does not apply: {err}")
    else:
        lines += _layout_table(
            sp, gpu_memory_gib, cfg.train.precision, dispatch, combine, host_memory_gib, disk_gib
        )  # fmt: skip
        if limited:
            fits = sp.fits(gpu_memory_gib, host_memory_gib, disk_gib)
            if fits and not cpu and gpu_memory_gib is not None:
                lines.append(
                    f"            fits in {gpu_memory_gib:g} GiB with "
                    f"{gpu_memory_gib - sp.device_total / GIB:,.1f} GiB "
                    f"to spare (CUDA context and fragmentation not counted)"
                )
            elif fits:
                lines.append(f"            fits in {limits}")
            else:
                hint = (
                    "see the proposals below"
                    if p.pp == 1 and p.ep == 1 or propose_layouts
                    else "try --propose, activation checkpointing, a smaller micro-batch or more GPUs"
                )
                if cpu:
                    need = f"needs {sp.host_per_node / GIB:,.1f} GiB host memory per node"
                else:
                    need = f"needs {sp.device_total / GIB:,.1f} GiB per GPU, has {gpu_memory_gib:g}"
                    need += f" ({sp.host_per_node / GIB:,.1f} GiB host memory per node"
                    need += f", {sp.disk_per_node / GIB:,.1f} GiB disk)" if sp.disk_per_node else ")"
                head = f"in {gpu_memory_gib:g} GiB" if not cpu and gpu_memory_gib is not None else f"in {limits}"
                lines.append(f"            does NOT fit {head}: {need}; {hint}")
    if propose_layouts or (fits is False and p.pp == 1 and p.ep == 1):
        fitting, smallest = propose(
            cfg, parts, gpus, gpu_memory_gib, dispatch, combine, host_memory_gib, disk_gib, gpus_per_node, cpu,
            baseline, sub_group_size,
        )  # fmt: skip
        lines += _proposal_lines(
            fitting, smallest, gpus, gpu_memory_gib, counts["total"], 10, host_memory_gib, disk_gib, cpu
        )
    if gpus % p.pp == 0:
        try:
            lines += schedule_table(cfg, gpus // p.pp)
        except DsvError as err:
            lines.append(f"schedule    does not apply to {_count(gpus, 'GPU')}: {err}")
    return "\n".join(lines)
