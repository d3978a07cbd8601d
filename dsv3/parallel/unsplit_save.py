"""Save a split model in the unsplit layout without gathering it anywhere.

A run split over processes (pipeline stages, expert-parallel blocks of routed experts, ZeRO
partitions of the optimizer state) still saves single files in the layout of the unsplit,
single-process model: ``model.safetensors`` (the weights) and, for runs with pipelines or
expert parallelism, ``layout_free.safetensors`` (fp32 master weights and AdamW moments, see
:mod:`dsv3.parallel.layout_free`). Nothing is gathered: every byte is written once, by a
rank that holds it.

How one safetensors file is written by many processes (:func:`write_collective`):

1. every rank names the tensors it holds, with their dtype and *unsplit* shape (a small
   ``all_gather_object``); the union, in the model's order, is the file's header, computed
   identically on every rank (:class:`SafetensorsLayout`);
2. rank 0 creates the file under a temporary name, writes the header and extends the file
   to its final size;
3. every rank writes its pieces at their byte offsets (``os.pwrite``), then ``fsync``;
4. the element counts written are summed over the ranks and must equal the file's total
   (every element written exactly once), then rank 0 renames the file into place.

A piece is a run of elements of a tensor's row-major flattening (:class:`Piece`):

- a parameter replicated over ``K`` data-parallel ranks: replica ``k`` writes the ``k``-th of
  ``K`` near-equal chunks, so the writes are spread over the replicas;
- an expert-parallel rank's block of routed experts ``(E/P, ...)``: its rows of the stacked
  ``(E, ...)`` tensor, which are contiguous, chunked over the expert-data-parallel replicas;
- ZeRO-1/2 (and DeepSpeed's bf16 optimizer) keep the fp32 master weights and Adam moments in
  flat per-rank partitions: each rank writes the fragment of each parameter it owns
  (``param._hp_mapping``: its start in the flattened parameter and its values);
- a parameter two pipeline stages hold (the tied embedding) is written by the first of them;
- buffers (the routing biases, equal on every rank) are written whole by rank 0.

The file is an ordinary safetensors file: ``safetensors.safe_open`` and ``load_file`` read it,
a reader can take just its own rows (``get_slice``), and the bytes of a replicated tensor
come from several ranks whose copies are equal. Like DeepSpeed's own checkpoints, this needs
the run directory on a filesystem every node sees (NFS, Lustre, GPFS, ...); ranks write
disjoint byte ranges of the file and close it before rank 0 renames it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
LAYOUT_FREE = "layout_free.safetensors"
FIELDS = ("fp32", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + values.numel())`` of tensor ``key``'s row-major flattening.

    ``values``: any shape (read flattened), the dtype the file declares for ``key``, any device.
    """

    key: str
    start: int
    values: torch.Tensor


class SafetensorsLayout:
    """The byte layout of a safetensors file: 8-byte little-endian header size, JSON header
    (padded with spaces to a multiple of 8 bytes), then every tensor's bytes without gaps.

    Tensors are placed by element size, largest first (stable within a size), so each one
    starts at a multiple of its element size.

    Args:
        entries: ``{key: (dtype, shape)}`` in the order to list them.
        metadata: ``str -> str`` pairs stored under ``__metadata__``.

    Raises:
        KeyError: a dtype safetensors cannot store.
    """

    def __init__(self, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        keys = sorted(entries, key=lambda k: -torch.empty((), dtype=entries[k][0]).element_size())
        header: dict[str, object] = {}
        self.place: dict[str, tuple[int, int, int]] = {}  # key -> (offset in the data, bytes per value, values)
        offset = 0
        for key in keys:
            dtype, shape = entries[key]
            size, numel = torch.empty((), dtype=dtype).element_size(), math.prod(shape)
            header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size * numel]}
            self.place[key] = (offset, size, numel)
            offset += size * numel
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.header = struct.pack("<Q", len(raw)) + raw
        self.size = len(self.header) + offset
        self.numel = sum(n for _, _, n in self.place.values())

    def create(self, path: str | Path) -> None:
        """Write the header to ``path`` and extend the file to its full size (data still zero).

        Raises:
            OSError: the file could not be written.
        """
        with open(path, "wb") as f:
            f.write(self.header)
            f.truncate(self.size)

    def write(self, fd: int, piece: Piece) -> int:
        """Write ``piece`` into the open file ``fd`` at its place; returns the elements written.

        Raises:
            ValueError: the piece is outside its tensor, or has another element size.
            OSError: the write failed.
        """
        offset, size, numel = self.place[piece.key]
        values = piece.values.detach().reshape(-1)
        n = values.numel()
        if piece.start < 0 or piece.start + n > numel or values.element_size() != size:
            raise ValueError(f"piece [{piece.start}, {piece.start + n}) of {piece.key} does not fit its "
                             f"{numel} values of {size} bytes")
        data = memoryview(values.cpu().contiguous().view(torch.uint8).numpy())
        at = len(self.header) + offset + piece.start * size
        while len(data):
            done = os.pwrite(fd, data, at)
            data, at = data[done:], at + done
        return n


def chunk(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)``: the ``index``-th of ``parts`` near-equal chunks of ``range(n)``."""
    return n * index // parts, n * (index + 1) // parts


def _all_gather_object(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _sum(values: list[int]) -> list[int]:
    from dsv3.parallel.distributed import all_reduce_sum

    return all_reduce_sum(torch.tensor(values, dtype=torch.int64)).tolist()


def write_collective(path: str | Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], stage: int,
                     pieces: Callable[[set[str]], Iterable[Piece]], order: list[str],
                     metadata: dict[str, str] | None = None) -> str | None:
    """Write one safetensors file at ``path`` from all ranks, each writing the pieces it holds.

    Collective over all ranks (also a single process without a process group). Every rank
    takes the same collective steps whatever fails, so a failure never leaves ranks waiting.

    Args:
        path: the final file; it appears (renamed from ``.NAME.tmp``) only once complete.
        entries: ``{key: (dtype, unsplit shape)}`` of the tensors this rank holds.
        stage: this rank's pipeline stage; a key several stages hold is written by the first.
        pieces: called with the keys this rank writes; yields their :class:`Piece` s.
        order: the keys in the order of the unsplit model (keys not in it come after, sorted).
        metadata: the header's ``__metadata__`` (rank 0's is used).

    Returns:
        None when the file is complete, else an error message: the rank's own error, or
        ``"failed on another rank"``. Every rank gets None or a message alike.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    merged: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    first_stage: dict[str, int] = {}
    error = None
    for st, part in _all_gather_object((stage, {k: (d, tuple(s)) for k, (d, s) in entries.items()})):
        for key, spec in part.items():
            if key in merged and merged[key] != spec:
                error = f"ranks disagree on {key}: {merged[key]} against {spec}"
            merged.setdefault(key, spec)
            first_stage[key] = min(st, first_stage.get(key, st))
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_of = {k: i for i, k in enumerate(order)}
    layout = SafetensorsLayout({k: merged[k] for k in sorted(merged, key=lambda k: (rank_of.get(k, len(order)), k))},
                               metadata)
    if rank == 0 and error is None:
        try:
            layout.create(tmp)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    if _sum([error is not None])[0]:
        return error or "failed on another rank"
    mine = {k for k in entries if first_stage[k] == stage}
    written = 0
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY)
        except FileNotFoundError as exc:  # rank 0 made it: another node that does not see the folder
            raise OSError(f"{tmp} created by rank 0 is not visible on rank {rank}; train.out_dir must be on "
                          "a filesystem every node shares") from exc
        try:
            for piece in pieces(mine):
                written += layout.write(fd, piece)
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, ValueError, RuntimeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    failed, total = _sum([error is not None, written])
    if not failed and total != layout.numel:
        error = f"internal error: the ranks wrote {total:,} values of {path.name} for its {layout.numel:,}"
    elif failed:
        error = error or "failed on another rank"
    if rank == 0:
        try:
            if error:
                tmp.unlink(missing_ok=True)
            else:
                os.replace(tmp, path)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    return error


# ---------------------------------------------------------------------------- what each rank holds
def _placement(model: nn.Module, name: str, p: torch.Tensor) -> tuple[int, tuple[int, ...], object]:
    """(element offset of ``p`` in the unsplit tensor, unsplit shape, its expert-parallel module or None)."""
    from dsv3.parallel.layout_free import _ep_module

    m = _ep_module(model, name)
    if m is None:
        return 0, tuple(p.shape), None
    row = math.prod(p.shape[1:])
    return m.first_expert * row, (m.num_experts, *p.shape[1:]), m


def _replica(m, dp: tuple[int, int]) -> tuple[int, int]:
    """(index, count) of this rank among the ranks holding the same copy: the expert-data-parallel
    group for an expert block, else the stage's data-parallel ranks ``dp``."""
    if m is None:
        return dp
    from deepspeed.utils import groups

    return (groups._get_expert_data_parallel_rank(m.expert_group_name),
            groups._get_expert_data_parallel_world_size(m.expert_group_name))


def _replicated(key: str, base: int, value: torch.Tensor, replica: tuple[int, int]) -> Iterator[Piece]:
    flat = value.detach().reshape(-1)
    lo, hi = chunk(flat.numel(), replica[1], replica[0])
    if hi > lo:
        yield Piece(key, base + lo, flat[lo:hi])


def save_weights(path: str | Path, model: nn.Module, names: list[str], stage: int, dp: tuple[int, int],
                 metadata: dict[str, str]) -> str | None:
    """Write ``model.safetensors`` in the unsplit layout (the keys and shapes of the
    single-process ``model.state_dict()``) from every rank's parameters. Collective.

    Args:
        path: the file to write.
        model: the plain model (expert-parallel blocks in place, other stages' parameters meta).
        names: the parameters this rank holds, by plain name.
        stage: this rank's pipeline stage (0 without pipelines).
        dp: (index, count) of this rank among its stage's data-parallel ranks.
        metadata: the header's ``__metadata__``.

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
        for n in names:
            if n in mine:
                base, _, m = _placement(model, n, params[n])
                yield from _replicated(n, base, params[n], _replica(m, dp))
        for n, b in buffers.items():
            if n in mine:
                yield Piece(n, 0, b)

    return write_collective(path, entries, stage, pieces, order, metadata)


def save_optimizer_state(path: str | Path, model: nn.Module, names: list[str], ds_optimizer, stage: int,
                         dp: tuple[int, int]) -> str | None:
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
    from dsv3.parallel.distributed import all_reduce_
    from dsv3.parallel.layout_free import ADAM_KEYS, _link_hp_state, _master, adam_steps

    optimizer = ds_optimizer if isinstance(ds_optimizer, torch.optim.Optimizer) else ds_optimizer.optimizer
    step = int(all_reduce_(torch.tensor([adam_steps(optimizer)], dtype=torch.int64), dist.ReduceOp.MAX).item())
    if ds_optimizer is not optimizer and step > 0:
        _link_hp_state(ds_optimizer)
    params = dict(model.named_parameters())
    fields = FIELDS if step > 0 else FIELDS[:1]
    entries = {f"{n}/{f}": (torch.float32, _placement(model, n, params[n])[1]) for n in names for f in fields}

    def pieces(mine: set[str]) -> Iterator[Piece]:
        for n in names:
            if f"{n}/fp32" not in mine:
                continue
            p = params[n]
            base, _, m = _placement(model, n, p)
            if hasattr(p, "_hp_mapping"):  # flat partitions: the fragment this rank owns, if any
                frag = p._hp_mapping
                if frag is not None:
                    start = base + frag.lp_fragment_address.start
                    yield Piece(f"{n}/fp32", start, frag.get_hp_fragment().float())
                    for key in fields[1:]:
                        yield Piece(f"{n}/{key}", start, frag.get_hp_fragment(key).float())
                continue
            master = _master(ds_optimizer, p)  # every replica holds all of it
            st = optimizer.state.get(master, {})
            values = {"fp32": master}
            values.update({k: st.get(k, torch.zeros_like(master)) for k in ADAM_KEYS if k in fields})
            for key, value in values.items():
                yield from _replicated(f"{n}/{key}", base, value.float(), _replica(m, dp))

    order = [f"{n}/{f}" for n, p in model.named_parameters() if p.requires_grad for f in fields]
    return write_collective(path, entries, stage, pieces, order, {"step": str(step), "format": "dsv3-layout-free"})
