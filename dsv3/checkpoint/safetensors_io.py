"""Safetensors files written in place: one dtype table, one byte layout, one writer.

A safetensors file is an 8-byte little-endian header size, a JSON header (names, dtypes,
shapes, byte offsets, ``__metadata__``) padded with spaces to a multiple of 8 bytes, then every
tensor's bytes without gaps. Since the header is known before any tensor is read, every
writer here computes it first (:class:`SafetensorsLayout`) and then puts each tensor (or each
piece of one) straight at its offset: nothing is held in memory beyond the piece being
written. Two writers share that layout:

- :class:`TensorWriter`: one process writes a file tensor by tensor, or slice by slice along
  dim 0 (the Hugging Face import and export, :mod:`dsv3.checkpoint.hf_import` and
  :mod:`dsv3.checkpoint.hf_export`);
- :func:`write_collective`: every rank of a split run writes the pieces it holds into one
  file (``model.safetensors`` and ``layout_free.safetensors`` of a checkpoint; what each rank
  holds is decided by :mod:`dsv3.parallel.unsplit_save`).

How one file is written by many processes (:func:`write_collective`):

1. every rank names the tensors it holds, with their dtype and *unsplit* shape (a small
   ``all_gather_object``); the union, in the model's order, is the file's header, computed
   identically on every rank;
2. rank 0 creates the file under a temporary name, writes the header and extends the file
   to its final size;
3. every rank writes its pieces at their byte offsets (``os.pwrite``), then ``fsync``;
4. the element counts written are summed over the ranks and must equal the file's total
   (every element written exactly once), then rank 0 renames the file into place, and the
   ranks agree on the outcome (every rank returns once the file is there).

A piece is a run of elements of a tensor's row-major flattening (:class:`Piece`). The result
is an ordinary safetensors file: ``safetensors.safe_open`` and ``load_file`` read it, and a
reader can take just its own rows (``get_slice``). Like DeepSpeed's own checkpoints, writing
from several nodes needs the run directory on a filesystem every node sees (NFS, Lustre,
GPFS, ...); ranks write disjoint byte ranges and close the file before rank 0 renames it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3.collectives import all_gather_object, all_reduce_sum
from dsv3.errors import DsvError

#: torch dtype -> safetensors dtype name, for every dtype a checkpoint of this project holds
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_OF_NAME: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPES.items()}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``).

    Raises:
        DsvError: a dtype this project does not read (e.g. ``"U16"``).
    """
    if name not in DTYPE_OF_NAME:
        raise DsvError(f"tensor dtype {name} is not supported by dsv3 (supported: {', '.join(DTYPE_OF_NAME)})")
    return DTYPE_OF_NAME[name]


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
        keys = sorted(entries, key=lambda k: -itemsize(entries[k][0]))
        header: dict[str, object] = {}
        self.place: dict[str, tuple[int, int, int]] = {}  # key -> (offset in the data, bytes per value, values)
        offset = 0
        for key in keys:
            dtype, shape = entries[key]
            size, numel = itemsize(dtype), math.prod(shape)
            header[key] = {
                "dtype": DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size * numel],
            }
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
            raise ValueError(
                f"piece [{piece.start}, {piece.start + n}) of {piece.key} does not fit its "
                f"{numel} values of {size} bytes"
            )
        data = memoryview(values.cpu().contiguous().view(torch.uint8).numpy())
        at = len(self.header) + offset + piece.start * size
        while len(data):
            done = os.pwrite(fd, data, at)
            data, at = data[done:], at + done
        return n


def chunk(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)``: the ``index``-th of ``parts`` near-equal chunks of ``range(n)``."""
    return n * index // parts, n * (index + 1) // parts


def _sum(values: list[int]) -> list[int]:
    return all_reduce_sum(torch.tensor(values, dtype=torch.int64)).tolist()


def write_collective(
    path: str | Path,
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    stage: int,
    pieces: Callable[[set[str]], Iterable[Piece]],
    order: list[str],
    metadata: dict[str, str] | None = None,
) -> str | None:
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
    for st, part in all_gather_object((stage, {k: (d, tuple(s)) for k, (d, s) in entries.items()})):
        for key, spec in part.items():
            if key in merged and merged[key] != spec:
                error = f"ranks disagree on {key}: {merged[key]} against {spec}"
            merged.setdefault(key, spec)
            first_stage[key] = min(st, first_stage.get(key, st))
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_of = {k: i for i, k in enumerate(order)}
    layout = SafetensorsLayout(
        {k: merged[k] for k in sorted(merged, key=lambda k: (rank_of.get(k, len(order)), k))}, metadata
    )
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
            raise OSError(
                f"{tmp} created by rank 0 is not visible on rank {rank}; train.out_dir must be on "
                "a filesystem every node shares"
            ) from exc
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
    # rank 0's rename is part of the collective: every rank returns once the file is in place,
    # with the same outcome (without this step the others could find no file yet)
    if _sum([error is not None])[0]:
        return error or "failed on another rank"
    return None


class TensorWriter:
    """Write one safetensors file from one process, tensor by tensor or slice by slice.

    The file is created at ``path`` with its header and full size on construction; each
    :meth:`write` puts a tensor (or ``tensor[index]`` of a stacked one) at its offset. On a
    clean exit from the ``with`` block every tensor must have been written completely.

    Args:
        path: the file to write (the caller renames the folder or file into place).
        entries: ``{key: (dtype, shape)}``.
        metadata: ``__metadata__`` pairs (default ``{"format": "pt"}``).

    Attributes:
        total: bytes of tensor data in the file.
    """

    def __init__(
        self,
        path: str | Path,
        entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.entries = entries
        self.layout = SafetensorsLayout(entries, metadata or {"format": "pt"})
        self.total = self.layout.size - len(self.layout.header)
        self.written = dict.fromkeys(entries, 0)
        self.layout.create(self.path)
        self.fd = os.open(self.path, os.O_WRONLY)

    def write(self, name: str, tensor: torch.Tensor, index: int | None = None) -> None:
        """Write ``tensor`` as entry ``name`` or, with ``index``, as ``name[index]``.

        Raises:
            RuntimeError: the tensor's shape or dtype is not the entry's (an internal error).
        """
        dtype, shape = self.entries[name]
        want = tuple(shape) if index is None else tuple(shape[1:])
        if tuple(tensor.shape) != want or tensor.dtype != dtype:
            raise RuntimeError(f"internal: {name} got {tuple(tensor.shape)} {tensor.dtype}, want {want} {dtype}")
        start = 0 if index is None else index * math.prod(want)
        self.written[name] += self.layout.write(self.fd, Piece(name, start, tensor))

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        os.close(self.fd)
        if exc_type is not None:
            return
        for name, (_, shape) in self.entries.items():
            if self.written[name] != math.prod(shape):
                raise RuntimeError(f"internal: {name} was not completely written")
