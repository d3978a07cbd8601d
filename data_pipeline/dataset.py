"""Training samples from a prepared folder.

:class:`PackedDataset` reads the token shards of one split (see :mod:`data_pipeline.prepare`)
through memory maps and serves fixed windows of ``seq_len + 1`` tokens: inputs are
``window[:-1]``, next-token targets ``window[1:]``. Documents are packed back to back, each
followed by EOS, so windows may span document boundaries; with document-aware packing
(:meth:`PackedDataset.batch_documents`) position ids restart at each document, attention
stays inside it, and the label that would predict the next document's first token is masked.
A blended training split (several corpora) mixes the corpora's windows by weight
(:func:`blend_index`).

The order in which a run reads the samples is :mod:`data_pipeline.sampling`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3.errors import DsvError
from dsv3.model import IGNORE_INDEX


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
        raise DsvError(
            f"{path} is corrupt ({type(exc).__name__}); delete folder {folder} and run dsv3 prepare again"
        ) from None
    return meta


def blend_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """Samples per corpus in a blend of ``total`` samples: ``total * w / sum(w)`` rounded by
    largest remainder (ties to the lower index), so the counts sum to ``total``.

    Returns:
        int64 array, one count per corpus.
    """
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    rest = int(total - counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def blend_index(n_windows: Sequence[int], weights: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The blended training split: which corpus window is blended sample ``i``.

    The blend has ``N = sum(n_windows)`` samples per epoch; corpus ``c`` contributes
    ``k_c`` of them (:func:`blend_counts` of its weight), spread evenly: its ``j``-th
    contribution sits at "time" ``(j + 0.5) / k_c`` and the blend is all contributions sorted
    by time (ties by corpus). Contribution ``j`` is window ``perm_c[j % n_c]`` of the corpus,
    ``perm_c`` a permutation seeded by ``seed`` and ``c``; so a corpus with a larger share
    than its size repeats its windows (upsampling), a smaller one uses a seeded subset. The
    sampler (:func:`global_sample_indices`) then shuffles the blend per epoch.

    Args:
        n_windows: windows of each corpus (each >= 1).
        weights: positive relative weights.
        seed: seed of the per-corpus permutations.

    Returns:
        ``(corpus, window)``: int16 and int64 arrays of length ``N``.
    """
    n = np.asarray(n_windows, dtype=np.int64)
    counts = blend_counts(weights, int(n.sum()))
    times, corpus, window = [], [], []
    for c, (k, nc) in enumerate(zip(counts.tolist(), n.tolist())):
        j = np.arange(k, dtype=np.int64)
        times.append((j + 0.5) / max(k, 1))
        corpus.append(np.full(k, c, dtype=np.int16))
        perm = np.random.default_rng([seed, c]).permutation(nc)
        window.append(perm[j % nc])
    times_a, corpus_a = np.concatenate(times), np.concatenate(corpus)
    order = np.lexsort((corpus_a, times_a))
    return corpus_a[order], np.concatenate(window)[order]


def blend_report(meta: dict[str, Any], seq_len: int, seed: int) -> list[dict[str, Any]]:
    """The realized mix of a blended training split: per corpus its source, weight, target
    share, realized share of samples per epoch, samples and tokens per epoch, and its own
    windows (so ``samples / windows`` > 1 means it is repeated)."""
    n_windows = _corpus_windows(meta, "train", seq_len)
    weights = [c["weight"] for c in meta["corpora"]]
    counts = blend_counts(weights, sum(n_windows))
    total = max(int(counts.sum()), 1)
    return [
        {
            "source": c["source"],
            "weight": c["weight"],
            "target_share": c["weight"] / sum(weights),
            "share": int(k) / total,
            "samples": int(k),
            "tokens": int(k) * seq_len,
            "windows": int(nw),
        }
        for c, k, nw in zip(meta["corpora"], counts.tolist(), n_windows)
    ]


def _corpus_windows(meta: dict[str, Any], split: str, seq_len: int) -> list[int]:
    n_corpora = len(meta.get("corpora", [None]))
    tokens = [0] * n_corpora
    for sh in meta["shards"][split]:
        tokens[sh.get("corpus", 0)] += sh["n_tokens"]
    return [max(0, (t - 1) // seq_len) for t in tokens]


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length windows over one split of a prepared folder.

    Window ``i`` of a corpus is its tokens ``[i*seq_len, i*seq_len + seq_len + 1)`` (the
    split's shards of that corpus read as one stream): consecutive windows share one
    boundary token, so every token (except the first) is a target exactly once. With one
    corpus, sample ``i`` is window ``i``; a blended training split maps samples to corpus
    windows by :func:`blend_index`; a blended validation split lists the corpora's windows
    one corpus after the other.

    Args:
        prepared_dir: folder returned by :func:`data_pipeline.prepare.prepare`.
        split: ``"train"`` or ``"val"``.
        seq_len: model context length (may differ from the one used at prepare time).

    Attributes:
        n_tokens: tokens in the split.
        meta: the parsed ``meta.json``.
        eos_id: the separator id.

    Raises:
        DsvError: missing/corrupt ``meta.json``, a folder of an older format, a missing
            shard or one whose size does not match ``meta.json`` (truncated), naming it.

    Memory maps are opened lazily per process, so instances are cheap to pickle into
    DataLoader workers. Reading a window whose ids fall outside the vocabulary (a corrupt
    shard) raises DsvError naming the shard; :meth:`verify` checks the sha256 checksums.
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
        if "shards" not in self.meta:
            raise DsvError(
                f"{self.folder} was prepared by an older dsv3 (no token shards); delete it and run dsv3 prepare again"
            )
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.eos_id = int(self.meta["eos_id"])
        self.vocab_size = int(self.meta.get("tokenizer_vocab_size", self.meta["vocab_size"]))
        self.n_tokens = int(self.meta["n_tokens"][split])
        self.shards = list(self.meta["shards"][split])
        for sh in self.shards:
            path = self.folder / sh["file"]
            expected = sh["n_tokens"] * self.dtype.itemsize
            actual = path.stat().st_size if path.is_file() else None
            if actual != expected:
                raise DsvError(
                    f"prepared shard {path} is truncated or corrupt (size {actual} bytes, expected "
                    f"{expected}); delete folder {self.folder} and run dsv3 prepare again"
                )
        n_corpora = len(self.meta.get("corpora", [None]))
        # per corpus: its shards and their start offsets in the corpus stream
        self._corpus_shards = [
            [i for i, sh in enumerate(self.shards) if sh.get("corpus", 0) == c] for c in range(n_corpora)
        ]
        self._corpus_starts = [
            np.cumsum([0] + [self.shards[i]["n_tokens"] for i in ids]) for ids in self._corpus_shards
        ]
        self.corpus_windows = _corpus_windows(self.meta, split, self.seq_len)
        self.weights = [c["weight"] for c in self.meta.get("corpora", [{"weight": 1.0}])]
        self._blend: tuple[np.ndarray, np.ndarray] | None = None
        self._maps: dict[int, np.ndarray] = {}

    @property
    def blended(self) -> bool:
        """Whether samples are drawn from several corpora by weight (training split of a blend)."""
        return self.split == "train" and len(self.corpus_windows) > 1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _map(self, i: int) -> np.ndarray:
        m = self._maps.get(i)
        if m is None:
            sh = self.shards[i]
            m = np.memmap(self.folder / sh["file"], dtype=self.dtype, mode="r", shape=(sh["n_tokens"],))
            self._maps[i] = m
        return m

    @property
    def tokens(self) -> np.ndarray:
        """All token ids of the split (shards in order, corpora concatenated), int64 copy of
        shape ``(n_tokens,)``; for tests and small splits only."""
        parts = [np.asarray(self._map(i), dtype=np.int64) for i in range(len(self.shards))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        """Number of samples: ``(n_tokens - 1) // seq_len`` for one corpus; the sum of the
        corpora's windows for a blend."""
        return int(sum(self.corpus_windows))

    def locate(self, i: int) -> tuple[int, int]:
        """Sample ``i`` as ``(corpus, window)``.

        Raises:
            IndexError: ``i`` outside ``[-len, len)``.
        """
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples of {self.split}")
        if self.blended:
            if self._blend is None:
                self._blend = blend_index(self.corpus_windows, self.weights, int(self.meta.get("seed", 0)))
            return int(self._blend[0][i]), int(self._blend[1][i])
        for c, nw in enumerate(self.corpus_windows):
            if i < nw:
                return c, i
            i -= nw
        raise AssertionError("unreachable")

    def _window(self, i: int) -> np.ndarray:
        c, w = self.locate(i)
        start = w * self.seq_len
        end = start + self.seq_len + 1
        starts = self._corpus_starts[c]
        k = int(np.searchsorted(starts, start, side="right")) - 1
        parts = []
        while start < end:
            shard = self._corpus_shards[c][k]
            lo = start - int(starts[k])
            take = min(end - start, int(starts[k + 1]) - start)
            part = self._map(shard)[lo : lo + take]
            if len(part) and int(part.max()) >= self.vocab_size:
                raise DsvError(
                    f"prepared shard {self.folder / self.shards[shard]['file']} is corrupt (token id "
                    f"{int(part.max())} >= vocabulary {self.vocab_size}); delete folder {self.folder} "
                    "and run dsv3 prepare again"
                )
            parts.append(part)
            start += take
            k += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Sample ``i`` as a ``torch.int64`` tensor of shape ``(seq_len + 1,)``.

        Raises:
            IndexError: ``i`` outside ``[-len, len)``.
            DsvError: the window holds ids outside the vocabulary (corrupt shard, named).
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

    def batch_documents(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows ``indices`` for document-aware packing.

        Returns:
            ``(inputs, labels, position_ids)``, each int64 (B, seq_len). ``position_ids``
            count from 0 at the window start and again after every EOS (a document's
            first token); ``labels`` are the next tokens, except ``IGNORE_INDEX`` where the
            input is EOS (its next token starts another document). Build the attention mask
            with :func:`document_attention_mask` ``(position_ids)``.
        """
        inputs, labels = self.batch_xy(indices)
        position_ids = document_positions(inputs, self.eos_id)
        labels[inputs == self.eos_id] = IGNORE_INDEX
        return inputs, labels, position_ids

    def verify(self) -> None:
        """Check every shard's sha256 against ``meta.json`` (reads the whole split).

        Raises:
            DsvError: a checksum mismatch or no checksum recorded, naming the shard.
        """
        for sh in self.shards:
            path = self.folder / sh["file"]
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            if sh.get("sha256") is None or digest.hexdigest() != sh["sha256"]:
                raise DsvError(
                    f"prepared shard {path} is truncated or corrupt (sha256 mismatch); delete folder "
                    f"{self.folder} and run dsv3 prepare again"
                )


def document_positions(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids restarting at each document of packed windows.

    Args:
        inputs: (B, T) int64 token ids, documents separated by ``eos_id`` (each document's
            EOS is its last token).

    Returns:
        (B, T) int64: ``j - s`` where ``s`` is the start of token ``j``'s document inside
        the window (0 for the window's first, possibly partial, document).
    """
    B, T = inputs.shape
    idx = torch.arange(T, device=inputs.device).expand(B, T)
    after_eos = torch.zeros_like(inputs, dtype=torch.bool)
    after_eos[:, 1:] = inputs[:, :-1] == eos_id
    starts = torch.where(after_eos, idx, torch.zeros_like(idx))
    return idx - torch.cummax(starts, dim=1).values


def document_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask of document-aware packing.

    Args:
        position_ids: (B, T) int64 from :func:`document_positions` (0 starts a document).

    Returns:
        (B, 1, T, T) bool, True where query ``t`` may attend key ``s``: ``s <= t`` and both
        in the same document (the boolean ``attn_mask`` of
        ``torch.nn.functional.scaled_dot_product_attention``).
    """
    seg = (position_ids == 0).cumsum(dim=1)  # (B, T) document number inside the window
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
