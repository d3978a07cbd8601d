"""Rotary position embeddings with YaRN frequency scaling (stage 4).

Sources: RoFormer (Su et al., 2021) for the rotation; YaRN (Peng et al., 2023) for the
frequency ramp and the attention scale, as DeepSeek-V2 (arXiv 2405.04434) and V3 use it to
extend the context window.

DeepSeek's weights expect the *interleaved-pair* convention: channels (0, 1), (2, 3), ... of
the rope slice form the complex numbers that are rotated. dsv3 uses that layout internally,
so Hugging Face / official checkpoints import with no permutation of ``q_b_proj`` or
``kv_a_proj_with_mqa`` rows.
"""

from __future__ import annotations

import math

import torch

from dsv3.config import ModelConfig


def _correction_dim(n_rotations: float, dim: int, base: float, max_len: int) -> float:
    """Channel index whose wavelength completes ``n_rotations`` turns over ``max_len`` tokens."""
    return dim * math.log(max_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rope channel pairs, with YaRN applied when ``rope_factor > 1``.

    ``theta_j = rope_theta ** (-2j / d)`` for ``j < d/2`` (``d = qk_rope_head_dim``). With YaRN,
    pairs whose wavelength is short (index below the ``beta_fast`` correction point) keep
    ``theta_j``, long ones (above the ``beta_slow`` point) use ``theta_j / rope_factor``, and a
    linear ramp blends the two in between (YaRN eq. 18-19, "NTK-by-parts").

    Returns:
        float32 tensor (d/2,), radians per position.
    """
    d = cfg.qk_rope_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if cfg.rope_factor > 1:
        low = max(math.floor(_correction_dim(cfg.beta_fast, d, cfg.rope_theta, cfg.original_seq_len)), 0)
        high = min(math.ceil(_correction_dim(cfg.beta_slow, d, cfg.rope_theta, cfg.original_seq_len)), d - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: short wavelength, extrapolate; 0: long wavelength, interpolate
        inv_freq = inv_freq / cfg.rope_factor * (1 - keep) + inv_freq * keep
    return inv_freq.float()


def yarn_mscale(factor: float, coefficient: float) -> float:
    """YaRN magnitude correction ``0.1 * coefficient * ln(factor) + 1``; 1 when ``factor <= 1``.

    YaRN eq. 22 (``sqrt(1/t) = 0.1 ln(s) + 1``) with DeepSeek's coefficient on the log
    (DeepSeek-V2 §3.1 long-context extension: 0.0707, i.e. coefficient 0.707; V3 report §4.3:
    0.1, coefficient 1). Factor 40, coefficient 1: 1.368888. Plain Python floats.
    """
    if factor <= 1:
        return 1.0
    return 0.1 * coefficient * math.log(factor) + 1.0


def _softmax_mscale(cfg: ModelConfig) -> float:
    return cfg.mscale if cfg.mscale_all_dim is None else cfg.mscale_all_dim


def yarn_softmax_scale(cfg: ModelConfig) -> float:
    """Attention logit scale: ``qk_head_dim ** -0.5``, times ``m**2`` under YaRN.

    ``m = yarn_mscale(rope_factor, mscale_all_dim)`` (YaRN eq. 22), with ``mscale_all_dim``
    None meaning ``mscale``. It multiplies all ``qk_head_dim`` channels of the scores, the
    rope and the no-rope ones (DeepSeek-V2's ``softmax_scale``; V3 report §4.3).
    For the 671B config (rope_factor 40, mscale 1) m = 1.368888 and the scale is
    ``192 ** -0.5 * 1.368888**2`` = 0.135234; for rope_factor 4, mscale_all_dim 1,
    qk_head_dim 24 it is 0.264642.
    """
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_factor > 1:
        m = yarn_mscale(cfg.rope_factor, _softmax_mscale(cfg))
        scale = scale * m * m
    return scale


def yarn_rope_scale(cfg: ModelConfig) -> float:
    """Factor on the rope cos/sin tables: ``yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)``.

    1 without YaRN and when ``mscale_all_dim`` is None or equals ``mscale`` (DeepSeek-V3).
    Otherwise the rotated query and key slices are both scaled by it, so the rope part of
    the scores gets its square (YaRN eq. 22 split as DeepSeek-V2's Hugging Face modeling code
    and ``transformers``' ``attention_factor`` do). Example: factor 4, mscale 0.5,
    mscale_all_dim 1: 1.069315 / 1.138629 = 0.939124.
    """
    if cfg.rope_factor <= 1 or cfg.mscale_all_dim is None:
        return 1.0
    return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)


def rope_cos_sin(cfg: ModelConfig, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables of ``a * cos(p * theta_j)`` and ``a * sin(p * theta_j)``, ``a = yarn_rope_scale(cfg)``.

    ``theta_j`` from :func:`rope_frequencies`; ``a`` is 1 unless YaRN's two mscale
    coefficients differ. The training path and the latent-cache decode path both rotate with
    these tables, so both apply ``a`` to ``q_rope`` and ``k_rope``.

    Returns:
        (cos, sin), each float32 (max_len, qk_rope_head_dim / 2); max_len defaults to
        ``cfg.max_seq_len``.
    """
    n = max_len or cfg.max_seq_len
    angles = torch.outer(torch.arange(n, dtype=torch.float32), rope_frequencies(cfg))
    cos, sin = angles.cos(), angles.sin()
    a = yarn_rope_scale(cfg)
    if a != 1.0:
        cos, sin = cos * a, sin * a
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` by the position angles.

    Pair ``(x[2j], x[2j+1])`` at position p becomes
    ``(x0 cos - x1 sin, x0 sin + x1 cos)`` with angle ``p * theta_j`` (RoFormer eq. 34); with
    tables from :func:`rope_cos_sin` that also multiplies by YaRN's ``yarn_rope_scale``.

    Args:
        x: (B, T, H, d) rope slice of queries or keys (any float dtype).
        cos, sin: (T, d/2) float32 rows for the T positions of ``x``, or (B, T, d/2) when
            each row has its own positions (left-padded batches).

    Returns:
        Tensor of the shape and dtype of ``x``.

    Eagerly the pairs are complex numbers multiplied by ``cos + i sin`` (the same products and
    sums, in fp32; :class:`_ComplexRotation`): one elementwise operator instead of six with
    their broadcasts, 4x faster forward and backward for ``tiny``'s (4, 256, 4, 16) bf16 queries
    on a 2-core AMD EPYC (118 against 455 us). Code being compiled keeps the real form, which
    the compiler fuses.
    """
    c = cos.unsqueeze(-2) if cos.dim() == 3 else cos[None, :, None, :]  # (B or 1, T, 1, d/2)
    s = sin.unsqueeze(-2) if sin.dim() == 3 else sin[None, :, None, :]
    if not torch.compiler.is_compiling():
        return _ComplexRotation.apply(x, c, s)
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, d/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, d/2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # (B, T, H, d/2, 2)
    return out.flatten(-2).to(x.dtype)


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pairs of ``x`` (..., d) as complex numbers times ``c + i s`` (broadcast to (..., d/2)), in
    fp32, returned in ``dtype``."""
    xf = x.float().unflatten(-1, (-1, 2))  # (..., d/2, 2)
    if xf.stride(-1) != 1 or any(st % 2 for st in xf.stride()[:-1]) or xf.storage_offset() % 2:
        xf = xf.contiguous()  # (a complex view needs its pairs at even offsets)
    turn = torch.complex(c.float(), s.float())
    return torch.view_as_real(torch.view_as_complex(xf) * turn).flatten(-2).to(dtype)


class _ComplexRotation(torch.autograd.Function):
    """:func:`apply_rope` of eager code. The backward rotates the gradient back (by ``c - i s``)
    and keeps only the tables (views of the model's rope buffers), not a complex copy of them
    per call."""

    @staticmethod
    def forward(ctx, x, c, s):  # noqa: D102
        ctx.save_for_backward(c, s)
        return _rotate(x, c, s, x.dtype)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        c, s = ctx.saved_tensors
        return _rotate(g, c, -s, g.dtype), None, None
