"""Every DeepSpeed internal that dsv3 relies on, in one place.

dsv3 uses DeepSpeed's public API wherever one exists (``deepspeed.initialize``,
``PipelineModule``, ``deepspeed.utils.safe_set_full_*``, ``deepspeed.moe.layer.MoE``, ...).
A few things it needs have no public API: the expert-parallel process groups by name, the
per-parameter views of ZeRO's flat optimizer partitions (ZeRO-3's by sub-group, swapped in
from nvme once per sub-group), the fp32 copies of the unfused bf16 optimizer, a hook between
the pipeline engine's gradient reduction and its optimizer step, and explicit pipeline stage
boundaries. They are reached only through the functions below, so
that a DeepSpeed upgrade touches this file alone.

Checked against DeepSpeed 0.16 - 0.19 (0.19.8 is what the tests run; the ZeRO-3 functions
against 0.19.8 only). Each function names the private attribute or function it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

#: the DeepSpeed releases these accessors were checked against (major, minor)
CHECKED_VERSIONS = ((0, 16), (0, 17), (0, 18), (0, 19))


# ---------------------------------------------------------------- expert-parallel process groups
def ensure_expert_groups(ep: int, pp: int, name: str) -> None:
    """Create the expert-parallel and expert-data-parallel groups of size ``ep`` once
    (``groups._create_expert_and_data_parallel``; both stay inside a pipeline stage). Collective."""
    from deepspeed.utils import groups

    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep, pp_size=pp)


def expert_parallel_group(name: str):
    """The process group of the ranks that split one set of experts (``groups._get_expert_parallel_group``)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name)


def expert_data_parallel_group(name: str):
    """The process group of the ranks that hold the same experts (``groups._get_expert_data_parallel_group``)."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(name)


def expert_data_parallel_coords(name: str) -> tuple[int, int]:
    """(rank, size) of this process in its expert-data-parallel group
    (``groups._get_expert_data_parallel_rank`` / ``_world_size``)."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(name), groups._get_expert_data_parallel_world_size(name)


def expert_checkpoint_file(ckpt_root: Path, layer_id: int, expert: int, tag: str) -> Path:
    """The per-expert file ``engine.load_checkpoint`` reads for MoE layer ``layer_id``, global
    expert ``expert`` (``DeepSpeedEngine._get_expert_ckpt_name``)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return Path(DeepSpeedEngine._get_expert_ckpt_name(str(ckpt_root), layer_id, expert, tag, checkpoint_mp_rank=0))


# ---------------------------------------------------------------- optimizer state of ZeRO and bf16
def relink_hp_state(ds_optimizer, create_step: int | None = None) -> None:
    """(Re)link DeepSpeed's per-parameter views of the Adam state (ZeRO-1/2, bf16 optimizer).

    DeepSpeed links them once, right after the optimizer step of the first parameter group,
    when the later groups have no state yet, so ``safe_get_full_optimizer_state`` fails for
    their parameters; linking again once every group has state fixes that. With
    ``create_step`` the empty state of a fresh optimizer is created first (zero moments, that
    step count), so a resumed state can be written into it. Uses
    ``single_partition_of_fp32_groups`` (ZeRO) / ``fp32_groups_flat_partition`` (bf16),
    ``_hp_optimizer_states_linked`` and ``_lazy_init_hp_params_optimizer_state``; a no-op for
    optimizers without them.
    """
    flats = getattr(ds_optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = getattr(ds_optimizer, "fp32_groups_flat_partition", None)
    if flats is None or not hasattr(ds_optimizer, "_lazy_init_hp_params_optimizer_state"):
        return
    base = ds_optimizer.optimizer
    if create_step is not None:
        for flat in flats:
            if not base.state[flat]:
                base.state[flat].update(
                    step=torch.tensor(float(create_step)),
                    exp_avg=torch.zeros_like(flat),
                    exp_avg_sq=torch.zeros_like(flat),
                )
    ds_optimizer._hp_optimizer_states_linked = False
    ds_optimizer._lazy_init_hp_params_optimizer_state()


def master_of(ds_optimizer, p: nn.Parameter) -> nn.Parameter:
    """The tensor the torch optimizer updates for ``p``: its fp32 copy in DeepSpeed's unfused
    bf16 optimizer (bf16, ZeRO stage 0; ``fp16_groups`` / ``fp32_groups``), else ``p`` itself."""
    for lp_group, hp_group in zip(getattr(ds_optimizer, "fp16_groups", ()), getattr(ds_optimizer, "fp32_groups", ())):
        for lp, hp in zip(lp_group, hp_group):
            if lp is p:
                return hp
    return p


def has_flat_partition(p: torch.Tensor) -> bool:
    """True when ``p``'s optimizer state lives in ZeRO's (or the bf16 optimizer's) flat
    partitions (the parameter carries ``_hp_mapping``)."""
    return hasattr(p, "_hp_mapping")


def hp_fragment(p: torch.Tensor) -> tuple[int, Callable[[str | None], torch.Tensor]] | None:
    """The part of ``p``'s flat optimizer partition this rank owns, or None if none.

    Returns:
        ``(start, read)``: the fragment's first element in the row-major flattening of ``p``,
        and ``read(key)`` giving its values (``None``: the fp32 master weights; ``"exp_avg"``,
        ``"exp_avg_sq"``: Adam's moments). Uses ``p._hp_mapping``
        (``lp_fragment_address.start``, ``get_hp_fragment``).
    """
    frag = p._hp_mapping
    if frag is None:
        return None
    return frag.lp_fragment_address.start, (
        lambda key=None: frag.get_hp_fragment(key) if key else frag.get_hp_fragment()
    )


def unfused_fp32_copies(optimizer_state: dict) -> tuple[list[torch.Tensor] | None, dict]:
    """Split a saved ``optimizer`` entry of DeepSpeed's model-states file into (the unfused bf16
    optimizer's fp32 copies in parameter-group order, or None, the torch optimizer's state dict)
    (keys ``fp32_groups`` / ``optimizer_state_dict``)."""
    if "optimizer_state_dict" in optimizer_state:
        return [t for group in optimizer_state["fp32_groups"] for t in group], optimizer_state["optimizer_state_dict"]
    return None, optimizer_state


# ---------------------------------------------------------------- ZeRO-3
def optimizer_calls_per_update(ds_optimizer) -> int:
    """How many times one update calls the torch optimizer's ``step()``: once per sub-group
    of the partition for ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3.fp16_groups``), else once."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if isinstance(ds_optimizer, DeepSpeedZeroOptimizer_Stage3):
        return max(1, len(ds_optimizer.fp16_groups))
    return 1


def create_zero3_state(ds_optimizer, step: int) -> None:
    """Give ZeRO-3's flat fp32 partitions (``fp32_partitioned_groups_flat``) an empty Adam
    state (zero moments, ``step``) where they have none yet, so that a resumed state can be
    written into it; a no-op for other optimizers."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(ds_optimizer, DeepSpeedZeroOptimizer_Stage3):
        return
    base = ds_optimizer.optimizer
    for flat in ds_optimizer.fp32_partitioned_groups_flat:
        if not base.state[flat] and flat.numel():  # a sub-group swapped out to nvme: see zero3_partitions
            _fresh_adam_state(base, flat, step)


def _fresh_adam_state(base, flat: torch.Tensor, step: int) -> None:
    """Zero Adam moments of ``flat``'s size and the step count ``step`` in ``base.state[flat]``."""
    base.state[flat].update(
        step=torch.tensor(float(step)), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat)
    )


def zero3_partitions(
    ds_optimizer, named: list[tuple[str, torch.Tensor]], write: bool = False, state_step: int | None = None
):
    """This rank's partitions of ZeRO-3 parameters ``named`` in its optimizer, one sub-group at a time.

    Yields ``(name, param, read)`` where ``read(key)`` is a view of the flat fp32 partition
    (``key`` None: the master weights; ``"exp_avg"`` / ``"exp_avg_sq"``: Adam's moments) holding
    ``param``'s share: ``partition size`` elements (the last rank's padded), starting at element
    ``rank * partition size`` of the flattened parameter. A sub-group swapped out to nvme is
    swapped in once for all its parameters and released after them (``write``: written back),
    instead of once per parameter and key as ``safe_get_local_*`` would; consume the views
    before taking the next item. ``state_step`` (with ``write``): a sub-group without Adam
    moments of its size yet (swapped out before the first update of this process) gets zero
    moments and that step count once swapped in, so a resumed state can be written into them
    and swapped out with it. Uses ``grad_position``, ``get_param_id``,
    ``fp32_partitioned_groups_flat``, ``_swappable_optimizer_subgroup``,
    ``_optimizer_states_and_gradient_swap_in`` / ``_swap_out`` and ``_release_swap_buffers``.
    """
    by_group: dict[int, list] = {}
    for name, p in named:
        group, offset, numel = ds_optimizer.grad_position[ds_optimizer.get_param_id(p)]
        by_group.setdefault(group, []).append((name, p, offset, numel))
    for group in sorted(by_group):
        swapped = ds_optimizer._swappable_optimizer_subgroup(group)
        if swapped:
            ds_optimizer._optimizer_states_and_gradient_swap_in(group)
        flat = ds_optimizer.fp32_partitioned_groups_flat[group]
        moments = ds_optimizer.optimizer.state[flat].get("exp_avg")
        if write and state_step is not None and (moments is None or moments.numel() != flat.numel()):
            _fresh_adam_state(ds_optimizer.optimizer, flat, state_step)
        for name, p, offset, numel in by_group[group]:

            def read(key=None, flat=flat, offset=offset, numel=numel):
                src = flat if key is None else ds_optimizer.optimizer.state[flat][key]
                return src.narrow(0, offset, numel)

            yield name, p, read
        if swapped and write:
            ds_optimizer._optimizer_states_and_gradient_swap_out(group)
        elif swapped:
            ds_optimizer._release_swap_buffers(group)


def is_zero3_param(p: torch.Tensor) -> bool:
    """True for a parameter ZeRO-3 partitions (it carries ``ds_id``); its ``data`` is then
    this rank's share or empty outside the forward and backward of its module."""
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of ``p`` whole: ZeRO-3's ``ds_shape`` for a partitioned parameter, else ``p.shape``."""
    return p.ds_shape if is_zero3_param(p) else p.shape


# ---------------------------------------------------------------- pipelines
def staged_pipeline_class():
    """A ``PipelineModule`` subclass taking its stage boundaries as given (``layer_parts``)
    instead of computing them: overrides ``_partition_layers`` and calls ``_set_bounds`` with
    the stage from ``_topo``."""
    from deepspeed.pipe import PipelineModule

    class StagedPipeline(PipelineModule):
        """``PipelineModule`` with the stage boundaries decided by dsv3 (``layer_parts``)."""

        def __init__(self, layers, layer_parts: list[int], **kwargs):
            self._dsv3_parts = list(layer_parts)
            super().__init__(layers=layers, **kwargs)

        def _partition_layers(self, method="uniform"):  # noqa: ARG002 - boundaries are given
            self.parts = list(self._dsv3_parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return StagedPipeline


def before_pipeline_update(engine, hook: Callable[[], None]) -> None:
    """Call ``hook()`` in the pipeline engine after the gradients are reduced and before the
    optimizer step of every ``train_batch`` (wraps ``engine._take_model_step``)."""
    plain = engine._take_model_step

    def take_model_step(lr_kwargs, _plain=plain):
        hook()
        return _plain(lr_kwargs)

    engine._take_model_step = take_model_step


def is_tied_copy(p: torch.Tensor) -> bool:
    """True for the last stage's copy of a tied pipeline weight (``ds_pipe_replicated``)."""
    return bool(getattr(p, "ds_pipe_replicated", False))


# ---------------------------------------------------------------- memory held by the engine
#: attributes of DeepSpeed's optimizer wrappers (ZeRO-1/2 ``DeepSpeedZeroOptimizer``, the bf16
#: ``BF16_Optimizer``, ``FP16_UnfusedOptimizer``) holding fp32 master weights (optimizer state)
MASTER_ATTRS = (
    "single_partition_of_fp32_groups",
    "fp32_groups_flat_partition",
    "fp32_groups",
    "fp32_groups_flat",
    "fp32_partitioned_groups_flat",  # ZeRO-3 (its ``.grad``: the fp32 gradient partition)
)
#: attribute fragments naming the low-precision (or fp32) model weights and their flat buffers
WEIGHT_FRAGMENTS = ("bit16", "bf16", "fp16")
_WRAPPER_SKIP = ("module", "client_model_parameters", "param_names", "model_parameters")


def _walk(obj, path: str, seen: set[int], depth: int):
    """(path, tensor) for every tensor reachable from ``obj`` through containers and the
    attributes of DeepSpeed and ``torch.optim`` objects (modules are not entered)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:  # ZeRO's fp32 partitions carry their fp32 gradients as .grad
            yield f"{path}.grad", obj.grad
        return
    if depth > 8 or id(obj) in seen or isinstance(obj, (nn.Module, str, bytes, int, float, bool, type(None))):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}[{k if isinstance(k, (str, int)) else '.'}]", seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]", seen, depth + 1)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim", "dsv3")) and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            if k not in _WRAPPER_SKIP:
                yield from _walk(v, f"{path}.{k}", seen, depth + 1)


def part_of(attr: str, zero3: bool = False) -> str:
    """Which model state the DeepSpeed optimizer attribute ``attr`` holds: ``"swap"`` (the
    NVMe swappers' buffers), ``"optimizer"`` (fp32 master weights: :data:`MASTER_ATTRS`, and
    the torch optimizer inside, ``optimizer``: its Adam moments), ``"buckets"`` (ZeRO-3's
    ``ipg_buckets``, the reduce bucket allocated whole: ``reduce_bucket_size`` elements),
    ``"gradients"`` (any name with ``grad``, ZeRO-1/2's ``ipg_buckets`` reduction buffers),
    ``"weights"`` (the bit16 / bf16 / fp16 groups and their flat buffers, which hold the
    model's weights, fp32 too under fp32 ZeRO), else ``"other"``."""
    if "swapper" in attr:
        return "swap"
    if attr in MASTER_ATTRS or attr == "optimizer":
        return "optimizer"
    if zero3 and attr.startswith("ipg"):
        return "buckets"
    if "grad" in attr or attr.startswith("ipg"):
        return "gradients"
    if any(f in attr for f in WEIGHT_FRAGMENTS):
        return "weights"
    return "other"


def engine_tensors(engine, ds_optimizer):
    """(part, path, tensor) for every tensor DeepSpeed's optimizer wrapper ``ds_optimizer``
    (or a plain torch optimizer) and the ``engine`` object hold, outside the module.

    Walks the instance attributes (``vars``) of the optimizer wrapper, the torch optimizer
    inside it (``.optimizer``: ``state`` holds the Adam moments) and the engine, through lists,
    tuples and dicts, and classifies each by its first attribute with :func:`part_of`
    (everything the engine holds directly is ``"other"``, e.g. pipeline buffers). The ``.grad``
    of a tensor met there (ZeRO's fp32 partitions) is ``"gradients"``. A tensor can come up
    several times (views of one flat buffer): the caller deduplicates by storage.
    """
    seen: set[int] = set()
    if isinstance(ds_optimizer, torch.optim.Optimizer) and type(ds_optimizer).__module__.startswith(
        ("torch.optim", "dsv3")
    ):
        for path, t in _walk(ds_optimizer, "optimizer", seen, 0):
            yield "gradients" if path.endswith(".grad") else "optimizer", path, t
    elif ds_optimizer is not None:
        seen.add(id(ds_optimizer))
        zero3 = is_zero3_optimizer(ds_optimizer)
        for k, v in vars(ds_optimizer).items():
            if k in _WRAPPER_SKIP:
                continue
            part = part_of(k, zero3)
            for path, t in _walk(v, k, seen, 1):
                yield "gradients" if path.endswith(".grad") and part != "swap" else part, path, t
    if engine is not None:
        seen.add(id(engine))
        for k, v in vars(engine).items():
            if k in ("module", "optimizer", "basic_optimizer", "client_optimizer", "lr_scheduler") or k.startswith("_"):
                continue
            for path, t in _walk(v, f"engine.{k}", seen, 1):
                yield "other", path, t


def param_attr_tensors(p: torch.Tensor):
    """(attribute, tensor) of tensors DeepSpeed attaches to a parameter (e.g. ZeRO's
    ``grad_accum``, the ``_hp_mapping`` fragments of the master partition; ZeRO-3's
    ``ds_tensor`` partition and its NVMe swapper are left to :func:`zero3_partition`)."""
    for k, v in vars(p).items():
        if k in ("ds_tensor", "nvme_swapper"):
            continue
        yield from _walk(v, k, set(), 1)


def is_zero3_optimizer(ds_optimizer) -> bool:
    """True for DeepSpeed's ZeRO-3 optimizer wrapper (``DeepSpeedZeroOptimizer_Stage3``)."""
    return hasattr(ds_optimizer, "fp32_partitioned_groups_flat")


def zero3_partition(p: torch.Tensor) -> torch.Tensor | None:
    """This rank's partition of a ZeRO-3 parameter (``ds_tensor``: a view of the optimizer's
    flat ``fp16_partitioned_groups_flat`` buffer, on the host under ``offload_param``), or
    None for a parameter ZeRO-3 does not partition. Its storage is empty when the partition
    is swapped out to NVMe."""
    return getattr(p, "ds_tensor", None) if is_zero3_param(p) else None


def param_swapper_tensors(module: nn.Module):
    """(path, tensor) of the buffers of ZeRO-3's NVMe parameter swapper (``offload_param:
    nvme``: ``buffer_count`` x ``buffer_size`` elements), shared by every parameter; found
    through the first parameter that carries it."""
    for p in module.parameters():
        swapper = getattr(p, "nvme_swapper", None)
        if swapper is not None:
            yield from _walk(swapper, "param.nvme_swapper", set(), 1)
            return


def master_and_state_elements(ds_optimizer, p: torch.Tensor) -> list[torch.Tensor] | None:
    """The fp32 master fragment and Adam moments this rank holds for parameter ``p`` when
    they live in a flat partition (``_hp_mapping.get_hp_fragment``; ZeRO-1/2, bf16 optimizer),
    or None when ``p`` has no flat partition; ``[]`` when this rank owns no part of it."""
    if not has_flat_partition(p):
        return None
    frag = p._hp_mapping
    if frag is None:
        return []
    out = [frag.get_hp_fragment()]
    for key in ("exp_avg", "exp_avg_sq"):
        try:
            out.append(frag.get_hp_fragment(key))
        except (KeyError, ValueError, AssertionError, AttributeError, TypeError):
            pass
    return out
