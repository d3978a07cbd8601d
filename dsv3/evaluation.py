"""Validation loss by position (``dsv3 eval``): how well a model predicts at each position of
long windows, the measure of a context extension (DeepSeek-V3 report §4.3).

The validation split of a run's prepared data is cut into windows of ``seq_len`` tokens;
the main head's next-token cross-entropy is averaged over the windows at each position and
then over equal position ranges (``[0, seq_len/K)``, ...). A model trained on short windows
and read on longer ones without YaRN extrapolates its rotary positions and loses accuracy in
the later ranges; after a YaRN extension (``model.rope_factor``) the later ranges should be
as good as the first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline.dataset import PackedDataset
from data_pipeline.prepare import prepare
from dsv3.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint
from dsv3.errors import DsvError
from dsv3.model import IGNORE_INDEX, Transformer


def load_for_context(
    path: str | Path, seq_len: int, rope_factor: float | None = None, original_seq_len: int | None = None
) -> Transformer:
    """The model of a dsv3 run or checkpoint, for windows of ``seq_len`` tokens: its rope
    tables long enough (``max_seq_len`` raised to ``seq_len`` if needed), and optionally with
    YaRN applied (``rope_factor``, ``original_seq_len``) to weights trained without it.

    Raises:
        DsvError: no checkpoint at ``path``, or a ``rope_factor`` below 1.
    """
    if rope_factor is not None and rope_factor < 1:
        raise DsvError(f"--rope-factor {rope_factor} must be >= 1 (1 disables YaRN)")
    model = load_model(path)
    changes = {}
    if rope_factor is not None:
        changes["rope_factor"] = float(rope_factor)
    if original_seq_len is not None:
        changes["original_seq_len"] = int(original_seq_len)
    if seq_len > model.cfg.max_seq_len:
        changes["max_seq_len"] = int(seq_len)
    if not changes:
        return model
    cfg = dataclasses.replace(model.cfg, **changes)
    with torch.device("meta"):
        fresh = Transformer(cfg)
    fresh.to_empty(device="cpu")
    fresh.init_rope()
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh.eval()


@torch.no_grad()
def position_losses(
    model: Transformer, data: PackedDataset, windows: int | None = None, batch_size: int = 4
) -> tuple[torch.Tensor, int]:
    """Mean main-head cross-entropy at each position over the first ``windows`` windows of
    ``data`` (all by default).

    Returns:
        ``(loss (T,) float64, number of windows)``.

    Raises:
        DsvError: ``data`` holds no window.
    """
    n = len(data) if windows is None else min(windows, len(data))
    if n < 1:
        raise DsvError(f"the validation split holds no window of {data.seq_len} tokens; use a shorter --seq-len")
    sums = torch.zeros(data.seq_len, dtype=torch.float64)
    counts = torch.zeros(data.seq_len, dtype=torch.float64)
    for start in range(0, n, batch_size):
        inputs, labels = data.batch_xy(list(range(start, min(start + batch_size, n))))
        logits = model(inputs)
        ce = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(labels.shape)
        valid = labels != IGNORE_INDEX
        sums += (ce * valid).sum(0).double()
        counts += valid.sum(0).double()
    return sums / counts.clamp(min=1), n


def range_means(per_position: torch.Tensor, ranges: int) -> list[tuple[int, int, float]]:
    """``[(first, last, mean loss), ...]`` over ``ranges`` equal position ranges (the last one
    takes the remainder), then ``(0, T-1, mean)`` over all positions."""
    T = per_position.numel()
    ranges = max(1, min(ranges, T))
    width = T // ranges
    out = []
    for i in range(ranges):
        lo, hi = i * width, (T if i == ranges - 1 else (i + 1) * width)
        out.append((lo, hi - 1, per_position[lo:hi].mean().item()))
    out.append((0, T - 1, per_position.mean().item()))
    return out


def evaluate_positions(
    path: str | Path,
    seq_len: int,
    ranges: int = 4,
    windows: int | None = None,
    rope_factor: float | None = None,
    original_seq_len: int | None = None,
    data_from: str | Path | None = None,
) -> dict:
    """``dsv3 eval``: the validation loss of the model at ``path`` per position range of
    windows of ``seq_len`` tokens.

    Args:
        data_from: the run whose prepared validation split is read (default ``path``'s own;
            prepared first if missing).

    Returns:
        ``{"ckpt", "data", "seq_len", "windows", "rope_factor", "original_seq_len",
        "ranges": [{"positions": "0-255", "loss": ...}, ...], "loss"}``.
    """
    model = load_for_context(path, seq_len, rope_factor, original_seq_len)
    run_cfg = read_checkpoint_config(resolve_checkpoint(data_from or path))
    folder = prepare(run_cfg, progress=False)
    data = PackedDataset(folder, "val", seq_len)
    per_position, n = position_losses(model, data, windows)
    rows = range_means(per_position, ranges)
    return {
        "ckpt": str(path),
        "data": str(folder),
        "seq_len": seq_len,
        "windows": n,
        "rope_factor": model.cfg.rope_factor,
        "original_seq_len": model.cfg.original_seq_len,
        "ranges": [{"positions": f"{lo}-{hi}", "loss": loss} for lo, hi, loss in rows[:-1]],
        "loss": rows[-1][2],
    }
