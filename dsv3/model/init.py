"""Parameter initialization that does not depend on the parallel layout.

Every parameter draws its values from its own random generator, seeded from the run seed and
the parameter's fully qualified name in the unsplit :class:`dsv3.model.Transformer`
(``layers.3.self_attn.q_a_proj.weight``); the stacked routed experts (``Experts.gate_proj``
(E, I, D), ...) use one generator per expert, seeded from (seed, name, global expert index).
So a process that holds only some parameters (one pipeline stage) or only a block of experts
(one expert-parallel rank) computes exactly the values the unsplit model has, without
generating anything it does not own, and replicated parameters are equal on every process
without a broadcast.

Distribution (DeepSeek-V3 report §4.2): linear, embedding, gate and expert weights
~ N(0, ``init_std``) (0.006), RMSNorm weights = 1, the balancing bias
``e_score_correction_bias`` = 0. Values are drawn in float32 on the CPU and then copied to
the tensor's device and dtype, so they also do not depend on the device. :func:`materialize_`
draws the tensors (and experts) on several threads at once (:func:`init_threads`: the node's
cores divided among its processes), which the independent generators allow.

Loaded weights take the same route: :func:`materialize_` with ``source=``
fills the allocated parameters from a :class:`WeightsSource` by the same full names, an expert
block from rows ``[first_expert, first_expert + n)`` of the stacked tensor, so a process reads
only what it holds.

Seeds: the first 8 bytes (little-endian) of ``sha256("{seed}/{name}")`` (experts:
``"{seed}/{name}/{e}"``), masked to 63 bits. Python's ``hash`` is salted per process and is
not used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from torch import nn

from dsv3.model.moe import Gate
from dsv3.model.norm import RMSNorm

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")
RULES = ("normal", "experts", "ones", "zeros")


def tensor_seed(seed: int, name: str, expert: int | None = None) -> int:
    """The generator seed of parameter ``name`` (or of expert ``expert`` of a stacked expert
    tensor): a stable 63-bit hash of (seed, name[, expert]), equal in every process.

    Args:
        seed: the run seed (``train.seed``).
        name: fully qualified parameter name in the unsplit Transformer.
        expert: global routed-expert index for the stacked expert tensors, else None.
    """
    key = f"{seed}/{name}" if expert is None else f"{seed}/{name}/{expert}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def normal_values(
    shape: tuple[int, ...] | torch.Size, std: float, seed: int, name: str, expert: int | None = None
) -> torch.Tensor:
    """N(0, std) values of ``name`` (or of one expert of it): float32 CPU tensor of ``shape``,
    drawn from ``torch.Generator().manual_seed(tensor_seed(seed, name, expert))``."""
    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name, expert))
    return torch.empty(tuple(shape), dtype=torch.float32).normal_(0.0, std, generator=gen)


def init_rule(module: nn.Module, leaf: str) -> tuple[str, int]:
    """How tensor ``leaf`` of ``module`` is initialized: (rule, first global expert index).

    Rules: ``"normal"`` (``nn.Linear`` / ``nn.Embedding`` / :class:`Gate` weights),
    ``"experts"`` (``gate_proj`` / ``up_proj`` / ``down_proj`` of a module with a
    ``first_expert`` attribute: :class:`dsv3.model.moe.Experts` (0) or an expert-parallel
    block), ``"ones"`` (RMSNorm weight), ``"zeros"`` (the gate's balancing bias).

    Raises:
        ValueError: no rule for this tensor (a new parameter kind needs one here).
    """
    if isinstance(module, RMSNorm) and leaf == "weight":
        return "ones", 0
    first = getattr(module, "first_expert", None)
    if first is not None and leaf in EXPERT_WEIGHTS:
        return "experts", int(first)
    if isinstance(module, Gate) and leaf == "e_score_correction_bias":
        return "zeros", 0
    if isinstance(module, (nn.Linear, nn.Embedding, Gate)) and leaf == "weight":
        return "normal", 0
    raise ValueError(f"no initialization rule for {type(module).__name__}.{leaf}")


@torch.no_grad()
def init_tensor_(
    t: torch.Tensor, name: str, seed: int, std: float, rule: str = "normal", first_expert: int = 0
) -> torch.Tensor:
    """Initialize one named tensor in place, as the unsplit model has it.

    Args:
        t: the parameter or buffer (any device except meta, any float dtype). For
            ``rule="experts"`` it is a block of stacked experts (n, ...) whose row j is global
            expert ``first_expert + j``.
        name: fully qualified name in the unsplit Transformer (e.g.
            ``layers.1.mlp.experts.gate_proj``; for experts, the stacked tensor's name).
        seed: the run seed.
        std: standard deviation of the normal rules (``ModelConfig.init_std``).
        rule: one of :data:`RULES` (see :func:`init_rule`).
        first_expert: global index of row 0 (``rule="experts"`` only).

    Returns:
        ``t``.

    Raises:
        ValueError: ``t`` is on the meta device, or the rule is unknown.
    """
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device; allocate it (to_empty) before initializing it")
    if rule == "ones":
        t.fill_(1.0)
    elif rule == "zeros":
        t.zero_()
    elif rule == "normal":
        t.copy_(normal_values(t.shape, std, seed, name))
    elif rule == "experts":
        for j in range(t.shape[0]):
            t[j].copy_(normal_values(t.shape[1:], std, seed, name, first_expert + j))
    else:
        raise ValueError(f"unknown initialization rule {rule!r} for {name}; use one of {RULES}")
    return t


def _named_tensors(module: nn.Module, prefix: str = ""):
    """(owner module, leaf, full name, tensor, is_parameter) of every direct parameter and
    buffer of every submodule, skipping None entries."""
    for mod_name, mod in module.named_modules(prefix=prefix.rstrip(".")):
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for leaf, t in list(table.items()):
                if t is not None:
                    yield mod, leaf, f"{mod_name}.{leaf}" if mod_name else leaf, t, is_param


@torch.no_grad()
def init_module_(module: nn.Module, seed: int, std: float, prefix: str = "") -> None:
    """Initialize every parameter and every rule-bearing buffer of ``module`` (see
    :func:`init_rule`) that is not on the meta device, by name.

    Buffers without a rule (the rope tables) are left alone; :meth:`Transformer.init_rope`
    computes them.

    Args:
        module: the Transformer or any submodule of it.
        seed, std: as :func:`init_tensor_`.
        prefix: ``module``'s own name in the unsplit Transformer (``"layers.3."``), so names
            are the full ones.

    Raises:
        ValueError: a parameter has no rule (:func:`init_rule`).
    """
    for mod, leaf, name, t, is_param in _named_tensors(module, prefix):
        if t.is_meta:
            continue
        if not is_param and not isinstance(mod, Gate):
            continue
        rule, first = init_rule(mod, leaf)
        init_tensor_(t, name, seed, std, rule, first)


class WeightsSource(Protocol):
    """Named tensors of the unsplit model, readable one at a time (a weights file).

    ``shapes``: full parameter / persistent-buffer name -> shape in the unsplit
    :class:`dsv3.model.Transformer` (stacked experts (E, ...)). ``read(name, rows)`` returns
    that tensor (any float dtype, on the CPU), or with ``rows=(a, b)`` only rows ``[a, b)`` of
    its first dimension (an expert block), reading no more of the file than that. See
    :mod:`dsv3.checkpoint.weights` for the dsv3-checkpoint and Hugging Face implementations.
    """

    shapes: dict[str, tuple[int, ...]]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...


@torch.no_grad()
def _fill_from(source: WeightsSource, t: torch.Tensor, name: str, rule: str, first: int) -> None:
    """Copy ``name`` (rows ``[first, first + len(t))`` of a stacked expert tensor) from
    ``source`` into the allocated ``t`` (cast to its dtype).

    Raises:
        ValueError: ``source`` has no tensor ``name`` or it has another shape than ``t``.
    """
    if name not in source.shapes:
        raise ValueError(f"the weights hold no tensor {name}")
    rows = (first, first + t.shape[0]) if rule == "experts" else None
    value = source.read(name, rows)
    if tuple(value.shape) != tuple(t.shape):
        raise ValueError(
            f"the weights give {name}{'' if rows is None else f' rows {rows}'} the shape "
            f"{tuple(value.shape)}, the model holds {tuple(t.shape)}"
        )
    t.copy_(value)


@torch.no_grad()
def materialize_(
    model: nn.Module,
    device: torch.device | str,
    seed: int,
    std: float,
    owned: Callable[[str], bool] | None = None,
    source: WeightsSource | None = None,
) -> int:
    """Allocate on ``device`` and initialize the parts of ``model`` still on the meta device.

    Parameters are allocated only where ``owned(name)`` is true (all when ``owned`` is None);
    the others stay on the meta device and take no memory. Parameters already real are left
    as they are (e.g. loaded weights). Every meta buffer is allocated (they are small: the
    balancing biases, which every process updates, and the rope tables, recomputed here via
    ``init_rope()`` of the module that holds them). A replaced parameter keeps its attributes
    (such as the expert-parallel marks ``allreduce`` / ``group_name``) and its sharing.

    Args:
        model: a :class:`dsv3.model.Transformer` built under ``torch.device("meta")``, possibly
            with its experts split (expert parallelism); names must be those of the unsplit
            model.
        device: where the allocated tensors go.
        seed: the run seed; std: ``ModelConfig.init_std``.
        owned: predicate on full parameter names.
        source: take the values from these weights instead of the random initialization
            (``seed`` and ``std`` are then unused): each allocated parameter and each routing
            bias is read by its full name, an expert block (``first_expert`` = a) of n rows
            as rows ``[a, a + n)`` of the stacked tensor, so nothing that is not allocated is
            read. The rope tables are recomputed as without a source.

    Returns:
        Number of parameter elements allocated by this call.

    Raises:
        ValueError: a parameter or buffer has no initialization rule; with ``source``, a
            tensor it lacks or holds with another shape (check the names and shapes up front,
            as :class:`dsv3.checkpoint.CheckpointWeights` does, for a one-line user error).
    """
    allocated = 0
    done: dict[int, nn.Parameter] = {}
    rope_owners: dict[int, nn.Module] = {}
    jobs: list[tuple] = []  # random initializations, run in parallel at the end
    for mod, leaf, name, t, is_param in list(_named_tensors(model)):
        if not t.is_meta:
            continue
        if not is_param:
            real = torch.empty_like(t, device=device)
            if isinstance(mod, Gate) and source is not None:
                _fill_from(source, real, name, *init_rule(mod, leaf))
            elif isinstance(mod, Gate):
                init_tensor_(real, name, seed, std, *init_rule(mod, leaf))
            elif leaf in ("rope_cos", "rope_sin") and hasattr(mod, "init_rope"):
                rope_owners[id(mod)] = mod
            else:
                raise ValueError(f"no initialization rule for the buffer {name}")
            mod._buffers[leaf] = real
            continue
        if id(t) in done:  # shared parameter: keep it shared
            mod._parameters[leaf] = done[id(t)]
            continue
        if owned is not None and not owned(name):
            continue
        rule, first = init_rule(mod, leaf)
        new = nn.Parameter(torch.empty_like(t, device=device), requires_grad=t.requires_grad)
        new.__dict__.update(t.__dict__)
        if source is not None:
            _fill_from(source, new, name, rule, first)
        elif rule == "experts":  # one job per expert: its own generator, its own rows
            jobs += [(new.data[j : j + 1], name, seed, std, rule, first + j) for j in range(new.shape[0])]
        else:
            jobs.append((new.data, name, seed, std, rule, first))
        mod._parameters[leaf] = done[id(t)] = new
        allocated += new.numel()
    _run_parallel(jobs)
    for mod in rope_owners.values():  # after allocation: init_rope computes on the buffers' device
        mod.init_rope()
    return allocated


def init_threads() -> int:
    """Threads for drawing initial values: the CPU cores this process may use, shared with the
    other processes of this node (``LOCAL_WORLD_SIZE``, set by torchrun / the launchers), at
    most 32."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(32, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))))


def _run_parallel(jobs: list[tuple]) -> None:
    """Run :func:`init_tensor_` on every job, largest first, on :func:`init_threads` threads.

    The values do not depend on the threads (each tensor and each expert has its own
    generator); drawing normal values releases the GIL, so the threads run at once."""
    jobs = sorted(jobs, key=lambda job: -job[0].numel())
    threads = min(init_threads(), len(jobs))
    if threads <= 1:
        for job in jobs:
            init_tensor_(*job)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(init_tensor_, *job) for job in jobs]:
            future.result()


def allocated_elements(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` that have storage (not on the meta device)."""
    return sum(p.numel() for p in model.parameters() if not p.is_meta)


__all__ = [
    "EXPERT_WEIGHTS",
    "RULES",
    "WeightsSource",
    "allocated_elements",
    "init_module_",
    "init_rule",
    "init_tensor_",
    "materialize_",
    "normal_values",
    "tensor_seed",
]
