"""Training samples from a prepared folder, and the rank-independent sample order.

:class:`PackedDataset` reads ``train.bin`` / ``val.bin`` (see :mod:`data_pipeline.prepare`)
through a memory map and serves fixed windows of ``seq_len + 1`` tokens: inputs are
``window[:-1]``, next-token targets ``window[1:]``. Documents are packed back to back,
separated by EOS, so windows may span document boundaries.

:func:`global_sample_indices` defines which samples make up optimizer step ``s`` of a run,
independently of the number of data-parallel ranks; :func:`rank_micro_batches` cuts that
step into the micro-batches of one rank. Together they make a run's data order a pure
function of (seed, global batch, step), so resuming or changing the parallel layout does
not change what the model sees.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dsv3.errors import DsvError


def load_meta(prepared_dir: Path | str) -> dict[str, Any]:
    """Read ``meta.json`` of a prepared folder.

    Raises:
        DsvError: the folder or its ``meta.json`` is missing or unreadable.
    """
    folder = Path(prepared_dir)
    path = folder / "meta.json"
    if not path.is_file():
        raise DsvError(f"{folder} is not a prepared data folder (no meta.json); run dsv3 prepare first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        _ = meta["dtype"], meta["n_tokens"]["train"], meta["n_tokens"]["val"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DsvError(f"{path} is corrupt ({type(exc).__name__}); delete folder {folder} and run dsv3 prepare "
                       "again") from None
    return meta


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length windows over one split of a prepared folder.

    Window ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: consecutive windows
    share one boundary token, so every token (except the first) is a target exactly once.

    Args:
        prepared_dir: folder returned by :func:`data_pipeline.prepare.prepare`.
        split: ``"train"`` or ``"val"``.
        seq_len: model context length (may differ from the one used at prepare time).

    Attributes:
        n_tokens: tokens in the split.
        meta: the parsed ``meta.json``.

    Raises:
        DsvError: missing/corrupt ``meta.json``, a missing bin file, or one whose size does
            not match ``meta.json`` (truncated or corrupt).

    The memory map is opened lazily per process, so instances are cheap to pickle into
    DataLoader workers.
    """

    def __init__(self, prepared_dir: Path | str, split: str, seq_len: int):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.folder = Path(prepared_dir)
        self.split = split
        self.seq_len = int(seq_len)
        self.meta = load_meta(self.folder)
        self.path = self.folder / f"{split}.bin"
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.n_tokens = int(self.meta["n_tokens"][split])
        expected = self.n_tokens * self.dtype.itemsize
        actual = self.path.stat().st_size if self.path.is_file() else None
        if actual != expected:
            raise DsvError(f"prepared shard {self.path} is truncated or corrupt (size {actual} bytes, expected "
                           f"{expected}); delete folder {self.folder} and run dsv3 prepare again")
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """All token ids of the split, a read-only memory map of shape ``(n_tokens,)``."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return self._tokens

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __len__(self) -> int:
        """Number of windows: ``(n_tokens - 1) // seq_len``."""
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def _window(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples of {self.split}")
        start = i * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def __getitem__(self, i: int) -> torch.Tensor:
        """Window ``i`` as a ``torch.int64`` tensor of shape ``(seq_len + 1,)``.

        Raises:
            IndexError: ``i`` outside ``[-len, len)``.
        """
        return torch.from_numpy(self._window(int(i)).astype(np.int64))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Windows ``indices`` stacked: ``torch.int64`` tensor of shape ``(len(indices), seq_len + 1)``.

        Raises:
            IndexError: an index out of range.
        """
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = self._window(int(i))
        return torch.from_numpy(out)

    def batch_xy(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``indices`` split into inputs (B, seq_len) and next-token labels (B, seq_len),
        int64, as separate tensors (masking labels in place never touches the inputs)."""
        b = self.batch(indices)
        return b[:, :-1].clone(), b[:, 1:].clone()

    def verify(self) -> None:
        """Check the bin file's sha256 against ``meta.json`` (reads the whole file).

        Raises:
            DsvError: checksum mismatch or no checksum recorded.
        """
        want = self.meta.get("sha256", {}).get(self.path.name)
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        if want is None or digest.hexdigest() != want:
            raise DsvError(f"prepared shard {self.path} is truncated or corrupt (sha256 mismatch); delete folder "
                           f"{self.folder} and run dsv3 prepare again")


@lru_cache(maxsize=4)
def _epoch_permutation(n_samples: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))


def global_sample_indices(step: int, global_batch: int, n_samples: int, seed: int) -> list[int]:
    """The samples of optimizer step ``step`` (0-based), for all ranks together.

    The sample stream is the concatenation of per-epoch permutations; epoch ``e`` is
    ``torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed + e))``.
    Step ``step`` takes stream positions ``[step*global_batch, (step+1)*global_batch)``,
    which may straddle an epoch boundary (and span several epochs when
    ``global_batch > n_samples``).

    Args:
        step: optimizer step, >= 0.
        global_batch: samples per step (micro_batch_size * grad_accum * dp_size), >= 1.
        n_samples: ``len(dataset)``, >= 1.
        seed: base seed of the permutations.

    Returns:
        ``global_batch`` sample indices in ``[0, n_samples)``.

    Raises:
        DsvError: ``n_samples`` < 1 (the split is shorter than one sample).
        ValueError: negative ``step`` or non-positive ``global_batch``.
    """
    if n_samples < 1:
        raise DsvError("the training split holds no complete sample; lower data.seq_len or use a larger corpus")
    if step < 0 or global_batch < 1:
        raise ValueError(f"need step >= 0 and global_batch >= 1, got step={step}, global_batch={global_batch}")
    pos = step * global_batch
    end = pos + global_batch
    out: list[int] = []
    while pos < end:
        epoch, offset = divmod(pos, n_samples)
        take = min(end - pos, n_samples - offset)
        out.extend(_epoch_permutation(n_samples, seed + epoch)[offset:offset + take].tolist())
        pos += take
    return out


def rank_micro_batches(indices: Sequence[int], dp_rank: int, dp_size: int, micro_batch_size: int,
                       grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of one step.

    Element ``j`` of micro-batch ``m`` on rank ``r`` is
    ``indices[(m*dp_size + r)*micro_batch_size + j]``, so micro-batch ``m`` of all ranks
    together is one contiguous slice of ``indices``.

    Args:
        indices: the step's samples from :func:`global_sample_indices`.
        dp_rank: this rank, in ``[0, dp_size)``.
        dp_size: data-parallel world size.
        micro_batch_size: samples per micro-batch per rank.
        grad_accum: micro-batches per step.

    Returns:
        ``grad_accum`` lists of ``micro_batch_size`` indices.

    Raises:
        ValueError: ``len(indices) != micro_batch_size * grad_accum * dp_size`` or a bad rank.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    expected = micro_batch_size * grad_accum * dp_size
    if len(indices) != expected:
        raise ValueError(f"got {len(indices)} indices for micro_batch_size*grad_accum*dp_size = "
                         f"{micro_batch_size}*{grad_accum}*{dp_size} = {expected}")
    out = []
    for m in range(grad_accum):
        start = (m * dp_size + dp_rank) * micro_batch_size
        out.append([int(i) for i in indices[start:start + micro_batch_size]])
    return out
