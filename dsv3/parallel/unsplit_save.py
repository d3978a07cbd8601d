"""What each rank of a split run writes into the unsplit checkpoint files.

A run split over processes (pipeline stages, expert-parallel blocks of routed experts, ZeRO
partitions of the optimizer state) saves single files in the layout of the unsplit,
single-process model: ``model.safetensors`` (the weights) and, for runs with pipelines or
expert parallelism, ``layout_free.safetensors`` (fp32 master weights and AdamW moments, see
:mod:`dsv3.parallel.layout_free`). Nothing is gathered: every byte is written once, by a
rank that holds it, through :func:`dsv3.checkpoint.safetensors_io.write_collective`. This
module decides the pieces:

- a parameter replicated over ``K`` data-parallel ranks: replica ``k`` writes the ``k``-th of
  ``K`` near-equal chunks, so the writes are spread over the replicas;
- an expert-parallel rank's block of routed experts ``(E/P, ...)``: its rows of the stacked
  ``(E, ...)`` tensor, which are contiguous, chunked over the expert-data-parallel replicas;
- ZeRO-3 splits every parameter (its fp32 master weights and Adam moments too) in equal
  partitions of the flattened tensor: each rank writes its own (:func:`zero3_pieces`), the
  weights cast from the fp32 master to the parameter's dtype;
- ZeRO-1/2 (and DeepSpeed's bf16 optimizer) keep the fp32 master weights and Adam moments in
  flat per-rank partitions: each rank writes the fragment of each parameter it owns
  (:func:`dsv3.parallel.ds_internals.hp_fragment`: its start in the flattened parameter and
  its values);
- a parameter two pipeline stages hold (the tied embedding) is written by the first of them;
- buffers (the routing biases, equal on every rank) are written whole by rank 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsv3.checkpoint.safetensors_io import Piece, chunk, write_collective
from dsv3.collectives import all_reduce_
from dsv3.parallel import ds_internals
from dsv3.parallel.ds_internals import master_of
from dsv3.parallel.expert_parallel import ep_module
from dsv3.parallel.layout_free import ADAM_KEYS, FIELDS, adam_steps


def _placement(model: nn.Module, name: str, p: torch.Tensor) -> tuple[int, tuple[int, ...], object]:
    """(element offset of ``p`` in the unsplit tensor, unsplit shape, its expert-parallel module or None)."""
    m = ep_module(model, name)
    if m is None:
        return 0, tuple(ds_internals.full_shape(p)), None
    row = math.prod(p.shape[1:])
    return m.first_expert * row, (m.num_experts, *p.shape[1:]), m


def _replica(m, dp: tuple[int, int]) -> tuple[int, int]:
    """(index, count) of this rank among the ranks holding the same copy: the expert-data-parallel
    group for an expert block, else the stage's data-parallel ranks ``dp``."""
    if m is None:
        return dp
    return ds_internals.expert_data_parallel_coords(m.expert_group_name)


def _replicated(key: str, base: int, value: torch.Tensor, replica: tuple[int, int]) -> Iterator[Piece]:
    flat = value.detach().reshape(-1)
    lo, hi = chunk(flat.numel(), replica[1], replica[0])
    if hi > lo:
        yield Piece(key, base + lo, flat[lo:hi])


def zero3_pieces(
    ds_optimizer, named: list[tuple[str, torch.Tensor]], keys: tuple, dp: tuple[int, int], weights: bool
) -> Iterator[Piece]:
    """This rank's partition of each ZeRO-3 parameter of ``named``, as pieces of the flattened tensors.

    ZeRO-3 splits the flattened parameter into ``dp`` equal partitions (the last one padded);
    rank ``i`` holds elements ``[i * size, (i + 1) * size)``. Values come from the optimizer's
    fp32 partitions (:func:`dsv3.parallel.ds_internals.zero3_partitions`, which swaps a
    sub-group in from nvme once for all its parameters): ``keys`` None for the master weights,
    ``"exp_avg"`` / ``"exp_avg_sq"`` for Adam's moments. ``weights``: pieces of
    ``model.safetensors`` (key = the parameter's name, the master weights cast to its dtype),
    else of ``layout_free.safetensors`` (``NAME/fp32``, ``NAME/exp_avg``, ... in fp32).
    """
    for name, p, read in ds_internals.zero3_partitions(ds_optimizer, named):
        total = math.prod(ds_internals.full_shape(p))
        for key in keys:
            local = read(key).detach().reshape(-1)
            start = dp[0] * local.numel()
            valid = min(local.numel(), total - start)
            if valid > 0:
                out = name if weights else f"{name}/{key or 'fp32'}"
                yield Piece(out, start, local[:valid].to(p.dtype if weights else torch.float32))


def save_weights(
    path: str | Path,
    model: nn.Module,
    names: list[str],
    stage: int,
    dp: tuple[int, int],
    metadata: dict[str, str],
    ds_optimizer=None,
) -> str | None:
    """Write ``model.safetensors`` in the unsplit layout (the keys and shapes of the
    single-process ``model.state_dict()``) from every rank's parameters. Collective.

    Args:
        path: the file to write.
        model: the plain model (expert-parallel blocks in place, other stages' parameters meta).
        names: the parameters this rank holds, by plain name.
        stage: this rank's pipeline stage (0 without pipelines).
        dp: (index, count) of this rank among its stage's data-parallel ranks.
        metadata: the header's ``__metadata__``.
        ds_optimizer: the engine's optimizer; needed with ZeRO-3, whose parameters are
            written from its fp32 partitions (:func:`zero3_pieces`).

    Returns:
        None, or an error message (see :func:`write_collective`).
    """
    params = dict(model.named_parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    buffers = {n: b for n, b in model.named_buffers() if not b.is_meta} if rank == 0 else {}
    order = list(model.state_dict(keep_vars=True))
    persistent = set(order)
    buffers = {n: b for n, b in buffers.items() if n in persistent}
    entries = {}
    for n in names:
        entries[n] = (params[n].dtype, _placement(model, n, params[n])[1])
    entries.update({n: (b.dtype, tuple(b.shape)) for n, b in buffers.items()})

    def pieces(mine: set[str]) -> Iterator[Piece]:
        zero3 = [(n, params[n]) for n in names if n in mine and ds_internals.is_zero3_param(params[n])]
        for n in names:
            if n in mine and not ds_internals.is_zero3_param(params[n]):
                base, _, m = _placement(model, n, params[n])
                yield from _replicated(n, base, params[n], _replica(m, dp))
        if zero3:  # this rank's partitions, from the fp32 master weights
            yield from zero3_pieces(ds_optimizer, zero3, (None,), dp, weights=True)
        for n, b in buffers.items():
            if n in mine:
                yield Piece(n, 0, b)

    return write_collective(path, entries, stage, pieces, order, metadata)


def save_optimizer_state(
    path: str | Path, model: nn.Module, names: list[str], ds_optimizer, stage: int, dp: tuple[int, int]
) -> str | None:
    """Write ``layout_free.safetensors``: for every trainable parameter of the unsplit model,
    ``NAME/fp32`` (the fp32 master weight), and after the first update ``NAME/exp_avg`` and
    ``NAME/exp_avg_sq`` (AdamW's moments), all fp32 in the unsplit shape; the metadata holds
    ``step``, the AdamW step count. Collective.

    Args:
        path: the file to write.
        model: the plain model (expert-parallel blocks in place, other stages' parameters meta).
        names: the trainable parameters this rank's optimizer updates, by plain name.
        ds_optimizer: the engine's optimizer (DeepSpeed's ZeRO-1/2 or bf16 wrapper, or the
            torch optimizer itself).
        stage, dp: as for :func:`save_weights`.

    Returns:
        None, or an error message (see :func:`write_collective`).
    """
    optimizer = ds_optimizer if isinstance(ds_optimizer, torch.optim.Optimizer) else ds_optimizer.optimizer
    step = int(all_reduce_(torch.tensor([adam_steps(optimizer)], dtype=torch.int64), dist.ReduceOp.MAX).item())
    if ds_optimizer is not optimizer and step > 0:
        ds_internals.relink_hp_state(ds_optimizer)
    params = dict(model.named_parameters())
    fields = FIELDS if step > 0 else FIELDS[:1]
    entries = {f"{n}/{f}": (torch.float32, _placement(model, n, params[n])[1]) for n in names for f in fields}

    def pieces(mine: set[str]) -> Iterator[Piece]:
        zero3 = [(n, params[n]) for n in names if f"{n}/fp32" in mine and ds_internals.is_zero3_param(params[n])]
        if zero3:  # ZeRO-3: this rank's partition of each
            keys = (None,) + tuple(f for f in fields[1:])
            yield from zero3_pieces(ds_optimizer, zero3, keys, dp, weights=False)
        for n in names:
            if f"{n}/fp32" not in mine or ds_internals.is_zero3_param(params[n]):
                continue
            p = params[n]
            base, _, m = _placement(model, n, p)
            if ds_internals.has_flat_partition(p):  # flat partitions: the fragment this rank owns, if any
                frag = ds_internals.hp_fragment(p)
                if frag is not None:
                    start, read = frag
                    yield Piece(f"{n}/fp32", base + start, read(None).float())
                    for key in fields[1:]:
                        yield Piece(f"{n}/{key}", base + start, read(key).float())
                continue
            master = master_of(ds_optimizer, p)  # every replica holds all of it
            st = optimizer.state.get(master, {})
            values = {"fp32": master}
            values.update({k: st.get(k, torch.zeros_like(master)) for k in ADAM_KEYS if k in fields})
            for key, value in values.items():
                yield from _replicated(f"{n}/{key}", base, value.float(), _replica(m, dp))

    order = [f"{n}/{f}" for n, p in model.named_parameters() if p.requires_grad for f in fields]
    return write_collective(path, entries, stage, pieces, order, {"step": str(step), "format": "dsv3-layout-free"})
