"""Every check of a parallel layout, in one place.

A layout is the process count together with ``parallel.pp`` (pipeline stages),
``parallel.ep`` (expert parallelism), ``parallel.zero_stage``, ``parallel.pp_partition`` and
the model's blocks. :func:`check_launch` runs all checks; ``dsv3 train --check WORLD`` (every
launch script runs it before starting any process) and the trainer at start-up call it, so an
impossible layout ends with one error line and exit code 2 before any process group exists.
The stage split helpers (:func:`uniform_counts`, :func:`balanced_counts`,
:func:`stage_prefixes`, :func:`stage_of_rank`) are here too, since the checks need them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dsv3.checkpoint import is_hf_folder, resolve_checkpoint
from dsv3.config import Config
from dsv3.errors import DsvError
from dsv3.model import Transformer
from dsv3.model.moe import MoE


def check_zero(cfg: Config) -> None:
    """Refuse ZeRO stages and offload settings the trainer cannot run (``dsv3 plan`` still accepts them).

    ZeRO-3 partitions every parameter over the data-parallel ranks; it runs without expert
    parallelism and without pipelines. Offload (ZeRO-Offload / ZeRO-Infinity, DeepSpeed's own)
    needs ZeRO: the optimizer state to the CPU from ZeRO-1, to nvme only with ZeRO-3 (ZeRO-1/2
    treat nvme as cpu), the parameters only with ZeRO-3.

    Raises:
        DsvError: the first unsupported combination, naming what works.
    """
    p = cfg.parallel
    if p.zero_stage == 3 and p.ep > 1:
        raise DsvError(
            f"parallel.zero_stage=3 is not available with expert parallelism (parallel.ep={p.ep}): ZeRO-3 would "
            "gather every expert on every rank; use zero_stage 1 or 2 with ep, or ep=1 with zero_stage 3"
        )
    if p.zero_stage == 3 and p.pp > 1:
        raise DsvError(
            f"parallel.zero_stage=3 is not available with pipeline parallelism (parallel.pp={p.pp}): DeepSpeed "
            "pipelines support ZeRO stage 0 or 1 only; use zero_stage 1 with pp, or pp=1 with zero_stage 3"
        )
    for key, value in (("offload_optimizer", p.offload_optimizer), ("offload_param", p.offload_param)):
        if value != "none" and p.zero_stage == 0:
            raise DsvError(
                f"parallel.{key}={value} needs ZeRO (parallel.zero_stage=0 keeps everything on each rank); "
                f"set zero_stage to {'3' if key == 'offload_param' or value == 'nvme' else '1, 2 or 3'}"
            )
    if p.offload_param != "none" and p.zero_stage != 3:
        raise DsvError(
            f"parallel.offload_param={p.offload_param} needs parallel.zero_stage=3 (ZeRO-{p.zero_stage} keeps "
            "every weight on each rank); set zero_stage=3 or offload_param=none"
        )
    if p.offload_optimizer == "nvme" and p.zero_stage != 3:
        raise DsvError(
            f"parallel.offload_optimizer=nvme needs parallel.zero_stage=3 (DeepSpeed's ZeRO-{p.zero_stage} keeps "
            "an nvme-offloaded optimizer state in CPU memory); set zero_stage=3, or offload_optimizer=cpu"
        )
    if "nvme" in (p.offload_optimizer, p.offload_param):
        check_async_io()


def check_async_io() -> None:
    """Refuse nvme offload where DeepSpeed's asynchronous I/O op cannot be built.

    Raises:
        DsvError: ``AsyncIOBuilder().is_compatible()`` is False (libaio missing).
    """
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise DsvError(
            "offload to nvme needs DeepSpeed's async_io op, which cannot be built here (install libaio-dev, "
            "e.g. apt-get install libaio-dev); or set parallel.offload_optimizer / offload_param to cpu or none"
        )


def check_launch(cfg, world_size: int) -> list[int] | None:
    """Check, before any process starts, what would otherwise fail on every rank of a launch.

    The launch scripts run this (``dsv3 train --check WORLD``) so that a bad config or an
    impossible layout ends with one error line and exit code 2 instead of one line per rank
    and the launcher's report. Checks: the ZeRO stage (:func:`check_zero`), the pipeline
    layout (:func:`check_pipeline`), the expert-parallel layout (:func:`check_expert_parallel`),
    that every pipeline stage holds a MoE block where DeepSpeed needs one, that
    ``offload_param: nvme`` would not swap parameters (:func:`_check_param_swapping`), and that
    ``train.init_from`` names a checkpoint or Hugging Face folder. Config keys and types were checked when ``cfg`` was
    loaded.

    The trainer runs the same checks at start-up.

    Args:
        cfg: the run's :class:`dsv3.config.Config`.
        world_size: processes the launch will start (all nodes).

    Returns:
        The blocks per pipeline stage of :func:`check_pipeline` (None
        without pipelines, or when they are split by parameter count).

    Raises:
        DsvError: the first problem found.
    """
    if world_size < 1:
        raise DsvError(f"dsv3 train --check needs the number of processes (>= 1), not {world_size}")
    check_zero(cfg)
    p = cfg.parallel
    stage_blocks = None
    if p.pp > 1:
        stage_blocks = check_pipeline(cfg, world_size)
    if p.ep > 1:
        check_expert_parallel(p.ep, cfg.model.n_routed_experts, world_size // p.pp, p.pp)
    if p.pp > 1 and p.ep > 1 and p.zero_stage >= 1:
        _check_moe_on_every_stage(cfg, stage_blocks)
    if p.offload_param == "nvme":
        _check_param_swapping(cfg, world_size)
    if cfg.train.init_from:
        if not is_hf_folder(Path(cfg.train.init_from)):
            resolve_checkpoint(cfg.train.init_from)
    return stage_blocks


def _check_param_swapping(cfg: Config, world_size: int) -> None:
    """Refuse ``offload_param: nvme`` where DeepSpeed would really swap parameters to nvme.

    DeepSpeed keeps the first ``max_in_cpu`` (:data:`dsv3.parallel.engine.PARAMS_KEPT_IN_HOST`,
    1e9) parameter elements of a process in host memory and swaps the rest through a fixed
    set of buffers. With dsv3's model (DeepSpeed 0.19.8, 1.77B parameters, bf16) every swapped
    parameter kept its buffer after the first step and the second step stopped with
    DeepSpeed's "Not enough buffers" error, with 5 or 8 buffers and with or without
    prefetching; so a run that would swap is refused at start-up, and one below the limit
    keeps its parameters in host memory (as with ``offload_param: cpu``).

    Raises:
        DsvError: this process's ZeRO-3 partition exceeds the host limit.
    """
    from dsv3.parallel.engine import PARAMS_KEPT_IN_HOST

    with torch.device("meta"):
        total = sum(t.numel() for t in Transformer(cfg.model).parameters())
    per_process = -(-total // max(1, world_size))
    if per_process > PARAMS_KEPT_IN_HOST:
        raise DsvError(
            f"parallel.offload_param=nvme would swap parameters to nvme ({per_process:,} elements per process, "
            f"above the {PARAMS_KEPT_IN_HOST:,} DeepSpeed keeps in host memory), which runs out of DeepSpeed's "
            "parameter swap buffers at the second step; set offload_param=cpu and keep offload_optimizer=nvme"
        )


def _check_moe_on_every_stage(cfg, stage_blocks: list[int] | None) -> None:
    """With pipelines, expert parallelism and ZeRO-1, every stage must hold a MoE layer.

    DeepSpeed's ZeRO optimizer reduces the gradient norm of each optimizer group over the
    pipeline stages; a stage without MoE layers has no expert group, takes one reduction fewer
    and every rank then waits forever.

    Raises:
        DsvError: a stage holds only dense blocks; names a split that works when there is one.
    """
    p = cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = stage_blocks or balanced_counts(model, p.pp)
    moe_names = [name + "." for name, m in model.named_modules() if isinstance(m, MoE)]

    def dense_stages(split: list[int]) -> list[int]:
        return [
            s for s in range(p.pp) if not any(n.startswith(tuple(stage_prefixes(model, split, s))) for n in moe_names)
        ]

    bad = dense_stages(counts)
    if not bad:
        return
    n, dense = cfg.model.n_layers, cfg.model.n_dense_layers
    fix = ""
    if n - dense - 1 >= p.pp - 1:  # the first stage takes the dense blocks and one MoE block
        split = [dense + 1] + uniform_counts(n - dense - 1, p.pp - 1)
        if min(split) >= 1 and not dense_stages(split):
            fix = f"parallel.pp_partition={','.join(map(str, split))} or "
    first = sum(counts[: bad[0]])
    raise DsvError(
        f"pipeline stage {bad[0]} holds only dense blocks ({first}-{first + counts[bad[0]] - 1}), but with "
        f"parallel.ep={p.ep} and ZeRO stage {p.zero_stage} every stage needs a MoE block (DeepSpeed's "
        f"ZeRO optimizer would wait forever); set {fix}parallel.zero_stage=0"
    )


def check_pipeline(cfg: Config, world_size: int) -> list[int] | None:
    """Validate ``parallel.pp`` against the run and return the blocks per stage.

    Args:
        cfg: the run's config.
        world_size: number of processes.

    Returns:
        ``[c_0, ..., c_{pp-1}]``, blocks owned by each stage (each >= 1, summing to n_layers),
        or None for ``pp_partition=parameters`` (see :func:`balanced_counts`).

    Raises:
        DsvError: pp does not divide the process count, there are more stages than blocks,
            ZeRO-2/3 is requested, ``pp_partition`` is malformed, or document-aware packing
            is requested (its attention mask does not travel between stages yet).
    """
    p, n = cfg.parallel, cfg.model.n_layers
    if cfg.data.document_aware:
        raise DsvError(
            f"data.document_aware=true is not available with pipeline parallelism (parallel.pp={p.pp}) "
            "yet; set data.document_aware=false or parallel.pp=1"
        )
    if p.zero_stage >= 2:
        raise DsvError(
            f"parallel.zero_stage={p.zero_stage} is not available with pipeline parallelism "
            f"(parallel.pp={p.pp}): DeepSpeed pipelines support ZeRO stage 0 or 1 only; set zero_stage=1"
        )
    if world_size % p.pp:
        raise DsvError(
            f"parallel.pp={p.pp} does not divide the {world_size} process(es); run a multiple of {p.pp} "
            f"processes or choose a pp that divides {world_size}"
        )
    if p.pp > n:
        raise DsvError(
            f"parallel.pp={p.pp} stages but the model has only model.n_layers={n} blocks; use at most {n} stages"
        )
    spec = str(getattr(p, "pp_partition", "parameters")).strip()
    if spec == "parameters":
        return None  # decided from the parameter counts once the model exists
    try:
        counts = [int(x) for x in spec.split(",")]
    except ValueError:
        counts = []
    if len(counts) != p.pp or min(counts, default=0) < 1 or sum(counts) != n:
        raise DsvError(
            f"parallel.pp_partition={spec!r} must be 'parameters' or {p.pp} positive block counts "
            f"separated by commas that sum to model.n_layers={n} (e.g. "
            f"{','.join(str(c) for c in uniform_counts(n, p.pp))})"
        )
    return counts


def uniform_counts(n: int, parts: int) -> list[int]:
    """``n`` blocks over ``parts`` stages as evenly as possible, the first stages taking the extra ones."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def balanced_counts(model: Transformer, pp: int) -> list[int]:
    """Blocks per stage that balance the parameter count (embedding on the first stage,
    final norm, head and MTP modules on the last), each stage at least one block."""
    from deepspeed.runtime.utils import partition_balanced

    weights = [sum(p.numel() for p in block.parameters()) for block in model.layers]
    weights[0] += model.embed_tokens.weight.numel()
    weights[-1] += sum(
        p.numel() for m in (model.norm, model.lm_head, model.mtp, model.embed_tokens) for p in m.parameters()
    )
    parts = partition_balanced(weights=weights, num_parts=pp)
    counts = [b - a for a, b in zip(parts[:-1], parts[1:])]
    return counts if len(counts) == pp and min(counts) >= 1 else uniform_counts(len(weights), pp)


def stage_of_rank(rank: int, world_size: int, pp: int) -> int:
    """The pipeline stage of global ``rank``, as DeepSpeed's ``PipelineModule`` assigns it
    (``PipeDataParallelTopology``: ranks ``stage * world/pp + data_rank``)."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    return PipeDataParallelTopology(num_pp=pp, num_dp=world_size // pp).get_coord(rank).pipe


def stage_prefixes(model: Transformer, counts: list[int], stage: int) -> list[str]:
    """Name prefixes (plain-model names, ending in ``.``) of the modules stage ``stage`` holds
    when the blocks are split ``counts`` (see :func:`build_pipeline_module`): its blocks, the
    embedding on the first stage, and on the last stage the embedding (tied copy), the final
    norm, the output head and the MTP modules.

    Raises:
        ValueError: ``stage`` is not in ``[0, len(counts))``.
    """
    if not 0 <= stage < len(counts):
        raise ValueError(f"stage {stage} outside the {len(counts)} pipeline stages")
    first = sum(counts[:stage])
    out = [f"layers.{i}." for i in range(first, first + counts[stage])]
    if stage == 0:
        out.insert(0, "embed_tokens.")
    if stage == len(counts) - 1:
        out += ["embed_tokens.", "norm.", "lm_head.", "mtp."]
    return list(dict.fromkeys(out))


def check_expert_parallel(ep: int, n_routed_experts: int, world_size: int, pp: int = 1) -> None:
    """Refuse layouts expert parallelism cannot run.

    Args:
        ep: ``parallel.ep``.
        n_routed_experts: ``model.n_routed_experts``.
        world_size: the data-parallel size (processes / ``pp``), over which EP is carved.
        pp: ``parallel.pp`` (only for the message).

    Raises:
        DsvError: ``ep`` < 1, ``ep`` does not divide ``n_routed_experts`` or the data-parallel
            size (the expert-data-parallel groups need world_size / ep ranks each); the
            message lists the ep values that would work.
    """
    fits = [e for e in range(1, n_routed_experts + 1) if math.gcd(n_routed_experts, world_size) % e == 0]
    if ep < 1:
        raise DsvError(f"parallel.ep={ep} must be at least 1")
    if n_routed_experts % ep:
        raise DsvError(
            f"model.n_routed_experts={n_routed_experts} is not divisible by parallel.ep={ep}; choose ep in {fits}"
        )
    if world_size % ep:
        if pp == 1:
            raise DsvError(
                f"parallel.ep={ep} does not divide the {world_size} process(es); run a multiple of {ep} "
                f"processes or choose ep in {fits}"
            )
        raise DsvError(
            f"parallel.ep={ep} does not divide the data-parallel size {world_size} ({world_size * pp} "
            f"processes / parallel.pp={pp}); run a multiple of {ep * pp} processes or choose ep in {fits}"
        )
