"""Layout-free optimizer state, so an expert-parallel checkpoint resumes on another layout.

DeepSpeed saves the optimizer state of an expert-parallel run split two ways at once: by EP
rank (each rank's block of experts) and, under ZeRO-1/2, by data-parallel rank (flat
partitions of the fp32 master weights and Adam moments). Its universal-checkpoint converter
does not handle expert-parallel checkpoints, so dsv3 writes, next to DeepSpeed's files, the
optimizer state of every parameter *in the shape of the unsplit model*:

    portable_optim_replicated.safetensors   every non-expert parameter (written by rank 0)
    portable_optim_ep{r:03d}.safetensors     the expert block of EP rank r (written by its
                                             expert-data-parallel rank 0)

Each holds, per parameter ``NAME``, the fp32 master weights ``NAME::fp32`` and AdamW's moments
``NAME::exp_avg`` and ``NAME::exp_avg_sq`` (all float32, the parameter's local shape; an
expert file holds rows ``[r * E/P, (r + 1) * E/P)`` of the stacked ``(E, ...)`` expert
tensors), and in its metadata the AdamW step count and the layout it was written with.

A run with any other layout (another ``parallel.ep``, another process count, another ZeRO
stage or none) reads the rows its parameters need (:func:`load_portable_state`) and puts them
into whatever optimizer DeepSpeed built: the plain torch AdamW (fp32, ZeRO stage 0), the
unfused bf16 optimizer (fp32 master copies per parameter), or the flat ZeRO-1/2 partitions
(through DeepSpeed's ``safe_set_full_*`` fragment API). The result equals the saved state
exactly; only the summation order of later steps differs with the layout, so a resharded
run agrees with an uninterrupted one to float rounding, not bit for bit.

Cost: 12 bytes per parameter more on disk per checkpoint (the same as DeepSpeed's own
optimizer files), written once per save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dsv3.errors import DsvError

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
REPLICATED = "portable_optim_replicated.safetensors"


def expert_file(ep_rank: int) -> str:
    """File name of EP rank ``ep_rank``'s expert block."""
    return f"portable_optim_ep{ep_rank:03d}.safetensors"


def has_portable_state(folder: Path) -> bool:
    """True if the checkpoint ``folder`` holds the layout-free optimizer state."""
    return (folder / REPLICATED).is_file()


# ------------------------------------------------------------------ where each optimizer keeps its state
def _inner(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the Adam state (DeepSpeed's wrappers keep it in ``.optimizer``)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def _uses_fragments(p: torch.Tensor) -> bool:
    """ZeRO-1/2 and DeepSpeed's BF16_Optimizer map each parameter to a flat fp32 partition."""
    return hasattr(p, "_hp_mapping")


def _master(engine, p: nn.Parameter) -> torch.Tensor:
    """The fp32 tensor the optimizer updates for ``p`` (not for fragment-mapped parameters)."""
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups"):  # DeepSpeed's unfused bf16/fp16 optimizer: per-parameter fp32 copies
        for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                if lp is p:
                    return hp
        raise RuntimeError("parameter not found in the optimizer's groups")
    return p


def adam_step_count(engine) -> int:
    """AdamW's step count (updates applied so far; skipped steps do not count)."""
    steps = [float(s["step"]) for s in _inner(engine).state.values() if "step" in s]
    return int(max(steps)) if steps else 0


def _get_state(engine, p: nn.Parameter) -> dict[str, torch.Tensor]:
    """Full fp32 master weights and moments of ``p`` in its local shape (collective with ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _uses_fragments(p):
        out = {"fp32": safe_get_full_fp32_param(p)}
        for k in KEYS[1:]:
            out[k] = safe_get_full_optimizer_state(p, k)
        return {k: v.detach().float().cpu().reshape(p.shape) for k, v in out.items()}
    master = _master(engine, p)
    state = _inner(engine).state.get(master, {})
    zero = torch.zeros(p.shape, dtype=torch.float32)
    return {"fp32": master.detach().float().cpu().clone(),
            "exp_avg": state["exp_avg"].detach().float().cpu().clone() if "exp_avg" in state else zero,
            "exp_avg_sq": state["exp_avg_sq"].detach().float().cpu().clone() if "exp_avg_sq" in state else zero}


def _set_state(engine, p: nn.Parameter, value: dict[str, torch.Tensor], step: int) -> None:
    """Put ``value`` (full fp32 master weights and moments in ``p``'s shape) into the optimizer."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    dev = p.device
    with torch.no_grad():
        p.data.copy_(value["fp32"].to(dev, p.dtype))
        if _uses_fragments(p):
            safe_set_full_fp32_param(p, value["fp32"].to(dev))
            for k in KEYS[1:]:
                safe_set_full_optimizer_state(p, value[k].to(dev), k)
            return
        master = _master(engine, p)
        master.data.copy_(value["fp32"].to(dev, master.dtype))
        _inner(engine).state[master] = {"step": torch.tensor(float(step)),
                                        "exp_avg": value["exp_avg"].to(dev, master.dtype).clone(),
                                        "exp_avg_sq": value["exp_avg_sq"].to(dev, master.dtype).clone()}


def _link_fragments(engine, create_step: int | None = None) -> None:
    """(Re)link every parameter's fragment to the Adam state of its flat ZeRO / BF16_Optimizer
    partition.

    DeepSpeed links them once, right after the optimizer step of the *first* parameter group,
    when the other groups' states do not exist yet, so the fragments of those groups (e.g. the
    expert group) stay unlinked; linking again once every state exists fixes that.

    Args:
        create_step: if given, first create zero states with this step count for partitions
            that have none (torch creates them lazily at the first step).
    """
    opt = engine.optimizer
    if not hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        return
    inner = _inner(engine)
    if create_step is not None:
        for group in inner.param_groups:
            for flat in group["params"]:
                if not inner.state.get(flat):
                    inner.state[flat] = {"step": torch.tensor(float(create_step)), "exp_avg": torch.zeros_like(flat),
                                         "exp_avg_sq": torch.zeros_like(flat)}
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def _is_stacked_expert(name: str) -> bool:
    """``layers.N.mlp.experts.{gate,up,down}_proj``: the (E, ...) stacked routed-expert weights."""
    owner, _, leaf = name.rpartition(".")
    return owner.endswith(".experts") and leaf in ("gate_proj", "up_proj", "down_proj")


def _params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------ save
def collect_portable_state(engine, ep: int) -> list[tuple[str, dict[str, torch.Tensor], dict[str, str]]]:
    """Gather this run's optimizer state in the unsplit model's layout (what this rank writes).

    Collective: every rank must call it (ZeRO's full-state reads all-reduce over the
    data-parallel group of each parameter). Global rank 0 gets the replicated parameters; the
    expert-data-parallel rank 0 of each EP rank gets its expert block.

    Args:
        engine: the DeepSpeed engine (fp32 or bf16, ZeRO stage 0-2, with expert parallelism).
        ep: the run's ``parallel.ep``.

    Returns:
        ``[(file name, {key: float32 CPU tensor}, metadata)]`` for :func:`write_portable_state`
        (empty on ranks that write nothing).
    """
    from dsv3.parallel.expert_parallel import ep_modules, is_expert_param

    rank = dist.get_rank() if dist.is_initialized() else 0
    mods = ep_modules(engine.module)
    _link_fragments(engine)
    replicated, experts = {}, {}
    for name, p in _params(engine.module):
        state = _get_state(engine, p)  # collective: every rank, same order
        target = experts if is_expert_param(p) else replicated
        for k, v in state.items():
            target[f"{name}::{k}"] = v.contiguous()
    meta = {"adam_step": str(adam_step_count(engine)), "ep": str(ep),
            "world_size": str(dist.get_world_size() if dist.is_initialized() else 1)}
    jobs = []
    if rank == 0:
        jobs.append((REPLICATED, replicated, meta))
    if mods and _expert_dp_rank(mods[0]) == 0:
        m = mods[0]
        jobs.append((expert_file(m.ep_rank), experts,
                     {**meta, "first_expert": str(m.first), "n_local_experts": str(m.num_local_experts)}))
    return jobs


def write_portable_state(folder: Path, jobs: list[tuple[str, dict[str, torch.Tensor], dict[str, str]]]) -> None:
    """Write what :func:`collect_portable_state` returned into the step folder (temp + rename).

    Raises:
        OSError: a file could not be written.
    """
    from safetensors.torch import save_file

    for name, tensors, meta in jobs:
        path = folder / name
        tmp = path.with_name(f".{name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)


def _expert_dp_rank(m) -> int:
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(m.expert_group_name)


# ------------------------------------------------------------------ load
class _Reader:
    """Reads the rows of a saved parameter that one rank of the new layout needs."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        self.replicated = safe_open(str(folder / REPLICATED), framework="pt")
        meta = self.replicated.metadata() or {}
        self.saved_ep = int(meta.get("ep", "1"))
        self.adam_step = int(meta.get("adam_step", "0"))
        self.experts = []  # (first global expert, n_local, handle), by EP rank
        for r in range(self.saved_ep if self.saved_ep > 1 else 0):
            f = folder / expert_file(r)
            if not f.is_file():
                raise DsvError(f"checkpoint {folder} lacks {f.name}; it is incomplete, resume an older checkpoint")
            h = safe_open(str(f), framework="pt")
            m = h.metadata()
            self.experts.append((int(m["first_expert"]), int(m["n_local_experts"]), h))

    def rows(self, name: str, key: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        """Parameter ``name``'s saved ``key`` tensor; for expert parameters rows ``[lo, hi)`` of
        the stacked (E, ...) tensor, assembled from the saved EP blocks."""
        full = f"{name}::{key}"
        if lo is None:
            if full not in self.replicated.keys():
                raise KeyError(full)
            return self.replicated.get_tensor(full)
        parts = []
        for first, n, h in self.experts:
            a, b = max(lo, first), min(hi, first + n)
            if a < b:
                parts.append(h.get_slice(full)[a - first:b - first])
        if not parts:  # saved without expert parallelism: the whole stack is in the replicated file
            return self.rows(name, key)[lo:hi]
        return torch.cat(parts)


def load_portable_state(engine, folder: Path) -> int:
    """Load the layout-free optimizer state of checkpoint ``folder`` into ``engine``.

    Sets the fp32 master weights, AdamW's moments and step count of every trainable parameter
    (the model's own weights too, cast to their dtype); expert parameters get the rows of this
    rank's experts. Buffers (the routing biases) are not touched: load them from
    ``model.safetensors`` first. Not collective.

    Returns:
        The AdamW step count restored.

    Raises:
        DsvError: the files are missing, unreadable, or do not match the model.
    """
    from dsv3.parallel.expert_parallel import _named_ep_modules

    try:
        reader = _Reader(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise DsvError(f"cannot read the optimizer state of {folder} ({exc}); resume an older checkpoint") from None
    step = reader.adam_step
    _link_fragments(engine, create_step=step)
    block = {}  # parameter name -> (first, n) of this rank's experts
    for prefix, m in _named_ep_modules(engine.module):
        for w in ("gate_proj", "up_proj", "down_proj"):
            block[f"{prefix}.{w}"] = (m.first, m.num_local_experts)
    for name, p in _params(engine.module):
        if name in block:
            lo, hi = block[name][0], block[name][0] + block[name][1]
        elif _is_stacked_expert(name):  # this run does not split the experts: all rows
            lo, hi = 0, p.shape[0]
        else:
            lo = hi = None
        try:
            value = {k: reader.rows(name, k, lo, hi) for k in KEYS}
        except KeyError as exc:
            raise DsvError(f"checkpoint {folder} has no optimizer state for {exc}; it belongs to another model") from None
        for k, v in value.items():
            if tuple(v.shape) != tuple(p.shape):
                raise DsvError(f"checkpoint {folder}: saved {name}::{k} has shape {tuple(v.shape)}, the model needs "
                               f"{tuple(p.shape)}; it belongs to another model")
        _set_state(engine, p, value, step)
    for s in _inner(engine).state.values():  # the flat ZeRO partitions and every per-parameter state
        if "step" in s:
            s["step"] = torch.tensor(float(step))
    return step


__all__ = ["collect_portable_state", "has_portable_state", "load_portable_state", "write_portable_state", "adam_step_count"]
