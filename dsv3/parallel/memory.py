"""What a rank really holds: bytes of weights, gradients and optimizer state counted from the
tensors themselves, and the process's resident memory.

:func:`held_bytes` walks a model and its optimizer (a plain torch optimizer, or DeepSpeed's
engine with its ZeRO / bf16 optimizer wrapper, see :func:`dsv3.parallel.ds_internals.engine_tensors`)
and sums the bytes of every tensor storage once: the views of one flat buffer (ZeRO's
parameters are views of ``bit16_groups_flat``) count as that buffer, padding included. A
storage is counted in the first part it is met in, in this order:

1. ``weights``: the module's parameters (the storage behind them: the flat buffer under ZeRO;
   under ZeRO-3 each parameter's partition ``ds_tensor``, a view of the flat
   ``fp16_partitioned_groups_flat``, on the host under ``offload_param``), and ``gathered``:
   ZeRO-3's whole parameters alive at the time (gathered for a forward or backward and not
   yet released: ``param.data`` outside the partition; ``dsv3 plan``'s "gathered
   parameters");
2. ``buffers``: the module's buffers (rope tables, routing biases; not parameters);
3. ``gradients``: each parameter's ``.grad``;
4. the optimizer wrapper's attributes, each classified by
   :func:`dsv3.parallel.ds_internals.part_of`: fp32 master weights (ZeRO-3's
   ``fp32_partitioned_groups_flat`` too, on the host under ``offload_optimizer``) and the
   torch optimizer's state (Adam moments, step counters) are ``optimizer``; reduction
   buffers, gradient partitions and the ``.grad`` of the fp32 partitions (offload's fp32
   gradients) are ``gradients``; ZeRO-3's reduce bucket (``ipg_buckets``, allocated whole
   with ``reduce_bucket_size`` elements, of which a CPU process makes resident only the part
   it writes) is ``buckets``; the NVMe swappers' buffers (optimizer and parameters) are
   ``swap``; the bit16 groups are ``weights``;
5. tensors DeepSpeed attaches to parameters (``grad_accum`` -> ``gradients``, else ``other``);
6. the engine's own tensors (pipeline buffers, ...): ``other``.

Meta tensors and empty storages are skipped. Only tensors reachable from Python count:
allocator caches, the communication library's buffers and temporaries inside a step are not
seen (the resident memory, :func:`rss_bytes`, sees them).

Where a rank holds it depends on when: call it between the backward pass and the optimizer
step (the trainer's ``before_update`` hooks), when gradients, weights and optimizer state
are alive together.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsv3.parallel import ds_internals

PARTS = ("weights", "gradients", "optimizer", "buffers", "gathered", "buckets", "swap", "other")


@dataclass
class HeldBytes:
    """Bytes one rank holds, by part (see the module docstring), plus the routed experts' share.

    Attributes:
        weights, gradients, optimizer, buffers, gathered, buckets, swap, other: bytes of
            distinct storages (see the module docstring).
        expert_weights: bytes of the routed-expert parameters (names with ``.experts.``).
        expert_optimizer: bytes of their optimizer state on this rank (fp32 master fragment and
            Adam moments in ZeRO's flat partitions, or the per-parameter state and master copy).
        parameters: parameter elements this rank holds (allocated, not meta).
        holders: bytes per holder (``part:attribute``), for finding what a part consists of.
    """

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    buffers: int = 0
    gathered: int = 0
    buckets: int = 0
    swap: int = 0
    other: int = 0
    expert_weights: int = 0
    expert_optimizer: int = 0
    parameters: int = 0
    holders: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain dict with ``*_bytes`` keys (the ``holders`` map as it is)."""
        out = {f"{k}_bytes": v for k, v in asdict(self).items() if k not in ("holders", "parameters")}
        out["parameters"] = self.parameters
        out["holders"] = dict(sorted(self.holders.items(), key=lambda kv: -kv[1]))
        return out


def is_routed_expert(name: str) -> bool:
    """True for a routed-expert parameter name (``...mlp.experts.gate_proj``; not ``shared_experts``)."""
    return ".experts." in name


def _storage_key(t: torch.Tensor) -> tuple | None:
    if t.is_meta:
        return None
    s = t.untyped_storage()
    if s.nbytes() == 0:
        return None
    return (t.device.type, t.device.index, s.data_ptr(), s.nbytes())


class _Counter:
    def __init__(self):
        self.seen: set[tuple] = set()
        self.held = HeldBytes()

    def add(self, part: str, holder: str, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key is None or key in self.seen:
            return
        self.seen.add(key)
        setattr(self.held, part, getattr(self.held, part) + key[3])
        name = f"{part}:{holder.split('[')[0]}"
        self.held.holders[name] = self.held.holders.get(name, 0) + key[3]


def held_bytes(module: nn.Module, optimizer=None, engine=None) -> HeldBytes:
    """Bytes of weights, gradients and optimizer state that this process holds.

    Args:
        module: the model (``engine.module`` under DeepSpeed; a pipeline stage's module).
        optimizer: a torch optimizer, or DeepSpeed's optimizer wrapper (``engine.optimizer``).
        engine: DeepSpeed's engine, to count what it holds besides (``other``); optional.

    Returns:
        :class:`HeldBytes` (bytes, each storage counted once).
    """
    c = _Counter()
    named = [(n, p) for n, p in module.named_parameters() if not p.is_meta]
    for n, p in named:
        part = ds_internals.zero3_partition(p)
        if part is not None:  # ZeRO-3: the rank's partition; whole parameters alive are "gathered"
            c.add("weights", "parameters", part)
            c.add("gathered", "parameters", p)
            p = part
        else:
            c.add("weights", "parameters", p)
        if _storage_key(p) is None:  # a partition swapped out to NVMe
            continue
        c.held.parameters += p.numel()
        if is_routed_expert(n):
            c.held.expert_weights += p.numel() * p.element_size()
    for _, b in module.named_buffers():
        c.add("buffers", "buffers", b)
    for _, p in named:
        if p.grad is not None:
            c.add("gradients", "grad", p.grad)
    for part, path, t in ds_internals.engine_tensors(engine, optimizer):
        c.add(part, path, t)
    for _, p in named:
        for path, t in ds_internals.param_attr_tensors(p):
            c.add("gradients" if "grad" in path else "other", f"param.{path}", t)
    for path, t in ds_internals.param_swapper_tensors(module):
        c.add("swap", path, t)
    c.held.expert_optimizer = _expert_optimizer_bytes(named, optimizer)
    return c.held


def _expert_optimizer_bytes(named: list[tuple[str, nn.Parameter]], optimizer) -> int:
    """Bytes of optimizer state (master fragment and moments) of the routed experts on this rank."""
    if optimizer is None:
        return 0
    ds_internals.relink_hp_state(optimizer)  # every group's moments reachable through the fragments
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for n, p in named:
        if not is_routed_expert(n):
            continue
        frags = ds_internals.master_and_state_elements(optimizer, p)
        if frags is not None:
            total += sum(t.numel() * t.element_size() for t in frags)
            continue
        master = ds_internals.master_of(optimizer, p)
        if master is not p:
            total += master.numel() * master.element_size()
        state = getattr(inner, "state", {}).get(master, {})
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor) and v.ndim)
    return total


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident memory of this process in bytes: ``VmRSS`` and ``VmHWM`` of
    ``/proc/self/status`` (Linux), else ``ru_maxrss`` for both (KiB on Linux, bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.is_file():
        vals = {}
        for line in status.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0]) * 1024
        if len(vals) == 2:
            return vals["VmRSS"], vals["VmHWM"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if peak > 2**32 else peak * 1024
    return peak, peak


def reset_peak_rss() -> bool:
    """Restart the kernel's peak resident memory (``VmHWM``) at the current resident memory,
    so that the next :func:`rss_bytes` peak covers what happens from now on (writes ``5`` to
    ``/proc/self/clear_refs``, Linux). Returns False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
