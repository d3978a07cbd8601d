"""Tensor transforms of the Hugging Face import: FP8 block dequantization and the rotary row order."""

from __future__ import annotations

import math

import torch

from dsv3.errors import DsvError


def dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Blockwise FP8 dequantization of a DeepSeek-V3 weight.

    ``out[i, j] = float(weight[i, j]) * scale_inv[i // bm, j // bn]`` (``bm, bn = block``),
    computed in float32 and returned in ``dtype``. Partial blocks at the right and bottom
    edges use their block's scale like full ones.

    Args:
        weight: (M, N) ``float8_e4m3fn`` (any float dtype works).
        scale_inv: (ceil(M / bm), ceil(N / bn)) float32.

    Raises:
        DsvError: the scale grid does not match the weight shape.
    """
    if weight.dim() != 2:
        raise DsvError(f"FP8 weight of shape {tuple(weight.shape)} is not a matrix; cannot dequantize")
    m, n = weight.shape
    bm, bn = block
    grid = (math.ceil(m / bm), math.ceil(n / bn))
    if tuple(scale_inv.shape) != grid:
        raise DsvError(
            f"FP8 scale of shape {tuple(scale_inv.shape)} does not fit a {m}x{n} weight in "
            f"{bm}x{bn} blocks (expected {grid}); the checkpoint is corrupt"
        )
    s = scale_inv.float().repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]  # (M, N)
    return (weight.float() * s).to(dtype)


def rope_rows_from_half(n_rows: int, start: int, d: int, period: int, n_blocks: int) -> torch.Tensor:
    """Row order turning rotate-half rope rows into interleaved pairs.

    In each of ``n_blocks`` blocks of ``period`` rows, the ``d`` rope rows beginning at
    ``start`` are reordered so new row ``2i`` is old row ``i`` and ``2i+1`` is ``i + d/2``.
    """
    order = torch.arange(n_rows)
    half = torch.arange(d // 2)
    local = torch.stack([half, half + d // 2], dim=-1).flatten()  # (d,)
    for b in range(n_blocks):
        base = b * period + start
        order[base : base + d] = base + local
    return order
