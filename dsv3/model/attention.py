"""Multi-head Latent Attention, MLA (stages 3 and 5).

Sources: DeepSeek-V3 report (arXiv 2412.19437) §2.1.1, eq. 1-11; DeepSeek-V2 (arXiv 2405.04434) §2.1.

Dims: B batch, T new tokens, S cached + new tokens, H heads, dn = qk_nope_head_dim,
dr = qk_rope_head_dim, dv = v_head_dim, C = kv_lora_rank, Rq = q_lora_rank.

Per token ``h`` (dim):
  queries  c_q = RMSNorm(W_qa h) (Rq), q = W_qb c_q -> per head [q_nope (dn); q_rope (dr)]
           (one projection ``q_proj`` when q_lora_rank = 0)
  keys     W_kva h -> [c_kv (C); k_rope (dr)]; c_kv is RMSNormed; W_kvb c_kv -> per head
           [k_nope (dn); v (dv)]; k_rope is one vector shared by all heads (decoupled RoPE)
  scores   (q_nope . k_nope + q_rope . k_rope) * softmax_scale, causal softmax, W_o.

Two computation paths give the same result:
- training / full forward (``cache is None``): expand keys and values per head and call
  ``scaled_dot_product_attention``;
- decode (``cache`` given): the *absorbed* form. Only ``c_kv`` and the rotated ``k_rope`` are
  cached (C + dr values per token per layer); W_kvb's key half is folded into the query
  (``q_nope W_uk``: dn -> C) and its value half applied after the attention (C -> dv), so the
  cache is never re-expanded (V2 §2.1.3 "absorb").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model import decode, kernels
from dsv3.model.decode import derived, fast_inference, interleaved_rope_tables, rotate_interleaved
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import apply_rope, yarn_softmax_scale

#: Epsilon of the latent RMSNorms ``q_a_layernorm`` and ``kv_a_layernorm``. The official
#: DeepSeek-V3 code and ``transformers`` build them with the RMSNorm default 1e-6 whatever the
#: config's ``rms_norm_eps`` (which only the block, final and MTP norms use).
LATENT_NORM_EPS = 1e-6


#: the matmul attention materializes the (B, H, T, S) scores: it is a candidate only while they
#: take at most this many bytes (the scores and the probabilities kept for the backward)
MATMUL_ATTENTION_MAX_BYTES = 1 << 28


def _flash(q, k, v, scale):
    """SDPA with v zero-padded to the q/k head dim (the flash kernels need one head dim: zero
    columns of v give zero output columns, dropped here); the causal flash kernel skips the
    masked half of the products."""
    pad = q.shape[-1] - v.shape[-1]
    o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), is_causal=True, scale=scale)
    return o[..., : v.shape[-1]]


def _sdpa(q, k, v, scale):
    """SDPA as given (with another v head dim the CPU runs its math kernel)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _matmul(q, k, v, scale):
    """Two matrix products around a softmax: ``softmax(q k^T * scale + causal) v``, the scores
    materialized in the inputs' dtype (the matmul's output dtype; the softmax computes in fp32
    inside and keeps its bf16 output for the backward). The products run at the machine's matmul
    speed, which the CPU flash kernel does not reach everywhere: in bf16 on a 2-core AVX-512-BF16
    CPU, forward + backward of 4 x 8 heads x 512 tokens took 47 ms against 104 for flash."""
    T, S = q.shape[-2], k.shape[-2]
    s = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, H, T, S)
    # -inf above the causal diagonal (query t sees keys <= S-T+t), added: a broadcast add_ ran in
    # a quarter of the time of masked_fill_ with a (T, S) bool mask (1M bf16 scores: 149 / 580 us)
    mask = torch.full((T, S), float("-inf"), dtype=s.dtype, device=s.device).triu_(S - T + 1)
    with torch.no_grad():  # not recorded: the softmax's gradient at a masked score is 0 already (p = 0 there)
        s.add_(mask)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v)  # (B, H, T, dv)


ATTENTION_KERNELS = {"flash": _flash, "sdpa": _sdpa, "matmul": _matmul}


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal multi-head attention ``softmax(q k^T * scale) v`` (report eq. 7-8 per head), by the
    kernel :func:`dsv3.model.kernels.choose` picks for this dtype and shape.

    Candidates: ``flash`` (SDPA, v padded to the q/k head dim), ``sdpa`` (SDPA as given) and,
    on CPU while the scores fit :data:`MATMUL_ATTENTION_MAX_BYTES`, ``matmul``. The first is the
    fixed rule: on CUDA ``flash`` in bf16 / fp16, else ``sdpa``; on CPU ``flash`` in fp32 and
    from 512 tokens in bf16 (on the first machine measured, flash beat the math kernel in fp32 by
    18-32% per attention forward + backward, in bf16 from 512 tokens). On a 2-core
    AVX-512-BF16 CPU (bf16 matmul peak 4.4x fp32) the matmul attention beat both in bf16:
    5.4 against 12.5 ms (flash) at 4 x 4 heads x 256 tokens, 47 against 104 ms at 4 x 8 x 512.

    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv), one dtype.
        scale: the softmax scale.

    Returns:
        (B, H, T, Dv), dtype of ``q``.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    candidates = _attention_candidates(B, H, T, Dk, Dv, q.dtype, q.device.type)
    if len(candidates) == 1 or q.device.type != "cpu":
        return ATTENTION_KERNELS[candidates[0]](q, k, v, scale)
    if not torch.compiler.is_compiling():
        name = _measured_attention(B, H, T, Dk, Dv, q.dtype, not torch.is_inference_mode_enabled(), tuple(candidates))
    elif kernels.static_ints(B, H, T):  # static shapes: measured once, where traced (compiled: no inference mode)
        name = _traced_attention(B, H, T, Dk, Dv, q.dtype, torch.is_grad_enabled(), tuple(candidates))
    else:
        name = candidates[0]
    return ATTENTION_KERNELS[name](q, k, v, scale)


def _measured_attention(
    B: int, H: int, T: int, Dk: int, Dv: int, dtype: torch.dtype, train: bool, candidates: tuple[str, ...]
) -> str:
    """:func:`causal_attention`'s kernel on a CPU among ``candidates`` (:func:`_attention_candidates`):
    the measured choice (:func:`dsv3.model.kernels.choose`)."""
    key = _attention_key(B, H, T, Dk, Dv, dtype, train)

    def run(name, data={}):  # noqa: B006 - the synthetic inputs, made on the first call
        if not data:
            g, n = kernels.generator(), kernels.bucket(T)
            data["q"], data["k"] = (torch.randn(B, H, n, Dk, generator=g).to(dtype) for _ in range(2))
            data["v"] = torch.randn(B, H, n, Dv, generator=g).to(dtype)
        with torch.enable_grad() if train else torch.inference_mode():
            qs, ks, vs = (data[x].detach().requires_grad_(train) for x in "qkv")
            o = ATTENTION_KERNELS[name](qs, ks, vs, Dk**-0.5)
            if train:
                o.sum().backward()

    return kernels.choose("attention", key, candidates, run, torch.device("cpu"))


#: :func:`_measured_attention` for compiled code (:func:`dsv3.model.kernels.at_trace_time`)
_traced_attention = kernels.at_trace_time(_measured_attention)


def _attention_candidates(B: int, H: int, T: int, Dk: int, Dv: int, dtype: torch.dtype, device_type: str) -> list[str]:
    """The kernels :func:`causal_attention` may run for these shapes, the fixed rule first."""
    half = dtype in (torch.bfloat16, torch.float16)
    cuda = device_type == "cuda"
    if Dv == Dk:
        candidates = ["sdpa"]
    elif (cuda and half) or (not cuda and (not half or T >= 512)):
        candidates = ["flash", "sdpa"]
    else:
        candidates = ["sdpa", "flash"]
    if not cuda and B * H * T * T * 2 * dtype.itemsize <= MATMUL_ATTENTION_MAX_BYTES:
        candidates.append("matmul")
    return candidates


def _attention_key(B: int, H: int, T: int, Dk: int, Dv: int, dtype: torch.dtype, train: bool) -> str:
    """The key of :func:`causal_attention`'s measured choice (lengths rounded up to a power of two)."""
    return f"{str(dtype).removeprefix('torch.')} {'train' if train else 'infer'} {B}x{H}x{kernels.bucket(T)} {Dk}/{Dv}"


def planned_attention(
    B: int, H: int, T: int, Dk: int, Dv: int, dtype: torch.dtype, device_type: str
) -> tuple[list[str], bool]:
    """What the training forward of :func:`causal_attention` will keep for the backward pass
    at these shapes, for the memory plan (:func:`dsv3.plan.costs.activation_bytes_per_token`).

    Each kernel keeps its own tensors (:func:`saved_form`); which one runs on a CPU is
    measured on first use (:func:`dsv3.model.kernels.choose`). Where the choice is known
    without timing (one candidate, a GPU, ``DSV3_KERNELS``, this process or the machine's
    record) it is the one returned; else every candidate, for the plan to count the largest.

    Args:
        B, H, T: micro-batch size, heads, sequence length; Dk, Dv: query/key and value head dims.
        dtype: the activations' dtype; device_type: ``"cpu"`` or ``"cuda"``.

    Returns:
        ``(forms, known)``: the distinct :func:`saved_form` of the kernel(s) that may run, and
        whether the kernel is known (else the machine has not measured this shape yet).
    """
    candidates = _attention_candidates(B, H, T, Dk, Dv, dtype, device_type)
    key = _attention_key(B, H, T, Dk, Dv, dtype, train=True)
    choice = candidates[0] if len(candidates) == 1 else kernels.known("attention", key, candidates, device_type)
    names = candidates if choice is None else [choice]
    forms = list(dict.fromkeys(saved_form(n, Dk, Dv, device_type) for n in names))
    return forms, choice is not None


def saved_form(kernel: str, Dk: int, Dv: int, device_type: str) -> str:
    """What attention kernel ``kernel`` of :data:`ATTENTION_KERNELS` keeps for its backward pass:

    - ``"fused"``: q, k, v, the output and one fp32 log-sum-exp per row and head (a fused
      kernel: ``sdpa`` with equal head dims, or on a GPU, where SDPA runs a fused kernel for
      any head dims);
    - ``"padded"``: the same with v and the output zero-padded to the q/k head dim (``flash``
      with ``Dv < Dk``), plus the unpadded output copied for the output projection;
    - ``"math"``: ``sdpa`` with ``Dv != Dk`` on a CPU, SDPA's math kernel: the scaled q and k,
      the (T, T) probabilities and v, in fp32 whatever the inputs' dtype;
    - ``"matmul"``: the scaled q, k, the (T, T) probabilities and v in the inputs' dtype.
    """
    if kernel == "matmul":
        return "matmul"
    if Dv == Dk:
        return "fused"
    if kernel == "flash":
        return "padded"
    return "fused" if device_type == "cuda" else "math"


class LatentCache:
    """Per-layer MLA decode cache: normalized ``c_kv`` and rotated ``k_rope`` per position.

    Attributes:
        buf: (B, max_len, kv_lora_rank + qk_rope_head_dim) the one preallocated buffer; each
            position holds ``[c_kv ; k_rope]``, so attention reads keys as one tensor.
        kv: (B, max_len, kv_lora_rank) latent keys/values (a view of ``buf``).
        pe: (B, max_len, qk_rope_head_dim) rotated rope keys (a view of ``buf``).
        slot: None, or a 0-dim int64 tensor on the cache's device: the position a fixed-shape
            step writes its one token per row at (:class:`dsv3.model.graph_decode.GraphedDecoder`,
            which advances it); such a step attends over all ``max_len`` positions under the
            caller's mask instead of slicing the filled ones.
    Positions ``[0, length)`` are filled; ``length`` grows by the tokens of each forward.
    Bytes per token: ``(kv_lora_rank + qk_rope_head_dim) * element size`` per layer.
    """

    def __init__(self, batch: int, max_len: int, cfg: ModelConfig, dtype: torch.dtype, device=None):
        self.buf = torch.zeros(batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.kv = self.buf[..., : cfg.kv_lora_rank]
        self.pe = self.buf[..., cfg.kv_lora_rank :]
        self.length = 0
        self.slot: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.kv.shape[1]


class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE.

    Module names match the Hugging Face DeepSeek-V3 checkpoint keys (``q_a_proj``,
    ``q_a_layernorm``, ``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
    ``kv_b_proj``, ``o_proj``). The two latent norms use :data:`LATENT_NORM_EPS` (1e-6), not
    ``cfg.rms_norm_eps``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = yarn_softmax_scale(cfg)
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, cfg.kv_lora_rank + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.dv, cfg.dim, bias=False)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            q = decode.project(self.q_proj, x)
        else:
            q = decode.project(self.q_b_proj, self.q_a_layernorm(decode.project(self.q_a_proj, x)))
        return q.unflatten(-1, (self.n_heads, -1))  # (B, T, H, dn + dr)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over the sequence (training) or over the cache plus the new tokens (decode).

        Args:
            x: (B, T, dim) hidden states of the new tokens.
            cos, sin: (T, dr/2) float32 rope tables (:func:`dsv3.model.rope.rope_cos_sin`, which
                carry YaRN's ``yarn_rope_scale``) for the absolute positions of the new tokens,
                or (B, T, dr/2) for per-row positions (see :func:`dsv3.model.rope.apply_rope`),
                or their interleaved forms (..., 1, dr) (:mod:`dsv3.model.decode`). Both paths
                rotate ``q_rope`` and ``k_rope`` with them; the decode cache keeps
                ``k_rope`` as rotated (scale included).
            cache: decode cache; the new tokens are appended at ``cache.length``.
            attn_mask: optional boolean (B or 1, 1, T, S) mask, True = may attend; replaces
                the plain causal mask (used for left padding).

        Returns:
            (B, T, dim), dtype of ``x``.
        """
        first = (self.q_proj,) if hasattr(self, "q_proj") else (self.q_a_proj,)
        if cache is not None and fast_inference(*first, self.kv_a_proj_with_mqa, self.kv_b_proj, self.o_proj):
            return self._decode(x, cos, sin, cache, attn_mask)
        if cos.shape[-1] == self.dr:  # interleaved tables (T or B, T, 1, dr) from the eager inference path
            cos, sin = cos[..., 0, 0::2], sin[..., 0, 1::2]  # back to the half tables, same values
        B, T, _ = x.shape
        q = self._queries(x)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)  # (B, T, H, dn), (B, T, H, dr)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = decode.project(self.kv_a_proj_with_mqa, x).split([self.kv_lora_rank, self.dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, C)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)  # (B, T, 1, dr): one key for all heads

        if cache is None:
            kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, self.dn + self.dv))  # (B, T, H, dn+dv)
            k_nope, v = kv.split([self.dn, self.dv], dim=-1)
            qh = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, dn+dr)
            kh = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
            vh = v.transpose(1, 2)  # (B, H, T, dv)
            if attn_mask is None:
                o = causal_attention(qh, kh, vh, self.softmax_scale)  # (B, H, T, dv)
            else:
                o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=self.softmax_scale)
            o = o.transpose(1, 2).flatten(2)  # (B, T, H*dv)
            return self.o_proj(o)

        if cache.slot is not None:
            raise ValueError("a fixed-shape decoding step runs only on the eager inference path (no forward hooks)")
        start = cache.length
        end = start + T
        if end > cache.max_len:
            raise ValueError(f"decode cache holds {cache.max_len} positions; {end} needed")
        cache.kv[:B, start:end] = c_kv.to(cache.kv.dtype)
        cache.pe[:B, start:end] = k_pe.squeeze(2).to(cache.pe.dtype)
        cache.length = end
        keys = cache.buf[:B, :end]  # (B, S, C + dr): [c_kv ; k_rope] per position
        w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, self.dn + self.dv))  # (H, dn+dv, C)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]  # (H, dn, C), (H, dv, C)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, C)
        # one multi-query attention over the latent keys: q = [q_nope W_uk ; q_rope] (C + dr),
        # k = [c_kv ; k_rope] shared by all heads, v = c_kv
        q = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1).transpose(1, 2)  # (B, H, T, C + dr)
        k = keys.unsqueeze(1).to(q.dtype)  # (B, 1, S, C + dr)
        v = k[..., : self.kv_lora_rank]  # (B, 1, S, C)
        if attn_mask is None:
            if T == 1:  # one new token sees the whole cache
                o_lat = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale, enable_gqa=True)
            else:
                pos_q = torch.arange(start, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= pos_q  # (T, S)
                o_lat = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=True
                )
        else:
            o_lat = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, scale=self.softmax_scale, enable_gqa=True
            )
        o = torch.einsum("bhtc,hdc->bthd", o_lat, w_uv)  # (B, T, H, dv)
        return decode.project(self.o_proj, o.flatten(2))

    def _decode_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk (H, dn, C), W_uv^T (H, C, dv)) in ``dtype``, derived once from ``kv_b_proj``'s weight."""
        wb = self.kv_b_proj.weight

        def build():
            w = wb.unflatten(0, (self.n_heads, self.dn + self.dv)).to(dtype)  # (H, dn+dv, C)
            return w[:, : self.dn].contiguous(), w[:, self.dn :].transpose(1, 2).contiguous()

        return derived(self, f"decode {dtype}", (wb,), build)

    def _first_projection(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through ``q_proj`` (or ``q_a_proj``) and ``kv_a_proj_with_mqa`` as one product
        (their weights stacked once; :func:`dsv3.model.decode.linear`): (..., q + C + dr)."""
        wq = self.q_proj.weight if hasattr(self, "q_proj") else self.q_a_proj.weight
        wkv = self.kv_a_proj_with_mqa.weight
        shape = (wq.shape[0] + wkv.shape[0], wq.shape[1])
        return decode.linear(self, "first", x, (wq, wkv), shape, lambda: torch.cat([wq, wkv]))

    def _decode(self, x, cos, sin, cache: LatentCache, attn_mask) -> torch.Tensor:
        """The cache path of :meth:`forward` in inference (no autograd, not compiled), in fewer
        operators: one product for the query and latent projections, one rotation for the
        query and key rope slices, and the absorbed multi-query attention as two ``bmm``
        around a softmax (fp32) over the ``H * T`` query rows of each sequence. ``cos`` /
        ``sin`` may be the half tables of :meth:`forward` or the interleaved ones of
        :func:`dsv3.model.decode.interleaved_rope_tables`, shaped to broadcast over
        (B, T, H + 1, dr). Every query row must be allowed at least one key."""
        B, T, _ = x.shape
        H, dn, dr, C = self.n_heads, self.dn, self.dr, self.kv_lora_rank
        a = self._first_projection(x)  # (B, T, q + C + dr)
        if hasattr(self, "q_proj"):
            q, c_kv, k_pe = a.split([H * (dn + dr), C, dr], dim=-1)
        else:
            q_a, c_kv, k_pe = a.split([a.shape[-1] - C - dr, C, dr], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.unflatten(-1, (H, dn + dr))  # (B, T, H, dn+dr)
        if cos.shape[-1] != dr:  # half tables (T, dr/2) or (B, T, dr/2)
            cos, sin = interleaved_rope_tables(cos, sin)
            cos, sin = (cos.unsqueeze(-2), sin.unsqueeze(-2)) if cos.dim() == 3 else (cos[:, None], sin[:, None])
        pe = rotate_interleaved(torch.cat([q[..., dn:], k_pe.unsqueeze(2)], dim=2), cos, sin)  # (B, T, H+1, dr)
        if cache.slot is not None:  # a fixed-shape step: write at the device-side slot, read every position
            if T != 1 or attn_mask is None:
                raise ValueError("a fixed-shape decoding step takes one token per row and the key mask of its cache")
            new = torch.cat([self.kv_a_layernorm(c_kv), pe[:, :, H]], dim=-1)  # (B, 1, C + dr)
            cache.buf[:B].index_copy_(1, cache.slot.view(1), new.to(cache.buf.dtype))
            keys, end = cache.buf[:B], cache.max_len  # (the caller's attn_mask hides the unwritten positions)
        else:
            start = cache.length
            end = start + T
            if end > cache.max_len:
                raise ValueError(f"decode cache holds {cache.max_len} positions; {end} needed")
            cache.kv[:B, start:end] = self.kv_a_layernorm(c_kv)
            cache.pe[:B, start:end] = pe[:, :, H]
            cache.length = end
            keys = cache.buf[:B, :end]  # (B, S, C + dr): [c_kv ; k_rope] per position
        allowed = None
        if attn_mask is not None or T > 1:
            if attn_mask is None:  # causal: query t sees positions <= start + t
                allowed = torch.arange(end, device=x.device) <= torch.arange(start, end, device=x.device)[:, None]
                allowed = allowed[None, :, None]  # (1, T, 1, S)
            else:
                allowed = attn_mask.transpose(1, 2)  # (B, T, 1, S)
        ct = decode_attention_dtype(x.dtype, B, T, H, end, (dn, dr, C, self.dv), x.device)
        w_uk, w_uv_t = self._decode_weights(ct)
        o = absorbed_attention(q[..., :dn], pe[:, :, :H], keys, w_uk, w_uv_t, self.softmax_scale, allowed)
        wo = self.o_proj.weight
        o = o if o.dtype == x.dtype else o.to(x.dtype)
        return decode.linear(self, "o_proj", o, (wo,), tuple(wo.shape))


def absorbed_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    keys: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv_t: torch.Tensor,
    scale: float,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """MLA's absorbed attention over the latent cache (V2 §2.1.3; V3 eq. 1-11), as two batched
    products around a softmax over the ``H * T`` query rows of each sequence, computed in the
    dtype of ``w_uk`` (the model's dtype, or float32 for a bf16 model where that measured faster:
    :func:`decode_attention_dtype`).

    Args:
        q_nope: (B, T, H, dn) the queries' non-rotated part; q_pe: (B, T, H, dr) their rotated part.
        keys: (B, S, C + dr) the cache, ``[c_kv ; k_rope]`` per position (any float dtype).
        w_uk: (H, dn, C) and w_uv_t: (H, C, dv): ``kv_b_proj``'s key and value halves.
        scale: the softmax scale.
        allowed: optional bool broadcastable to (B, T, 1, S), True = may attend (every query
            row must be allowed at least one key); None: every row sees all S positions.

    Returns:
        (B, T, H * dv) in ``w_uk``'s dtype.
    """
    B, T, H, dn = q_nope.shape
    C, dv, dt = w_uk.shape[2], w_uv_t.shape[2], w_uk.dtype
    S = keys.shape[1]
    keys, q_nope, q_pe = (t if t.dtype == dt else t.to(dt) for t in (keys, q_nope, q_pe))  # (no call when equal)
    q_lat = torch.bmm(q_nope.reshape(B * T, H, dn).transpose(0, 1), w_uk)  # (H, B*T, C)
    qk = torch.cat([q_lat.transpose(0, 1), q_pe.reshape(B * T, H, -1)], dim=-1)  # (B*T, H, C + dr)
    scores = torch.bmm(qk.view(B, T * H, -1).mul_(scale), keys.transpose(1, 2))  # (B, T*H, S)
    if allowed is not None:
        scores = scores.view(B, T, H, S).masked_fill_(~allowed, float("-inf")).view(B, T * H, S)
    probs = scores.softmax(-1, dtype=torch.float32)
    probs = probs if dt == torch.float32 else probs.to(dt)
    o_lat = torch.bmm(probs, keys[..., :C])  # (B, T*H, C)
    o = torch.bmm(o_lat.view(B * T, H, C).transpose(0, 1), w_uv_t)  # (H, B*T, dv)
    return o.transpose(0, 1).reshape(B, T, H * dv)


def decode_attention_dtype(
    dtype: torch.dtype, B: int, T: int, H: int, S: int, dims: tuple[int, int, int, int], device: torch.device
) -> torch.dtype:
    """The dtype :func:`absorbed_attention` computes in for a ``dtype`` model: ``dtype`` itself
    (the rule), or, for a half-precision model on CPU, float32 where that measured faster
    (operation ``decode_attention``, candidates ``native`` / ``fp32``, per B, T * H and
    power-of-two S; :mod:`dsv3.model.kernels`). A CPU's bf16 batched product of a few rows
    costs about 13 us however small it is (fp32: under 2 us), and a decode step makes four per
    layer. fp32 keeps the query's latent part and the probabilities unrounded: the two agree to
    the model dtype's rounding.

    Args:
        dims: (dn, dr, C, dv).
    """
    if dtype == torch.float32 or device.type != "cpu":
        return dtype
    S = kernels.bucket(S)
    ask = ("decode_attention", dtype, B, T, H, S, dims)
    return kernels.remembered(ask, lambda: _attention_choice(dtype, B, T, H, S, dims, device))


def _attention_choice(
    dtype: torch.dtype, B: int, T: int, H: int, S: int, dims: tuple[int, int, int, int], device: torch.device
) -> torch.dtype:
    dn, dr, C, dv = dims
    key = f"{str(dtype).removeprefix('torch.')} B={B} TH={T * H} S={S} dn={dn} dr={dr} C={C} dv={dv}"

    def run(name, sets=[]):  # noqa: B006 - the synthetic operands (copies, as a step meets them), made once
        if not sets:
            g = kernels.generator()
            with torch.inference_mode(False):
                w = (torch.randn(H, dn + dv, C, generator=g) * 0.05).to(dtype)
                data = {"q": torch.randn(B, T, H, dn + dr, generator=g).to(dtype)}
                data["keys"] = torch.randn(B, S, C + dr, generator=g).to(dtype)
                for ct in (dtype, torch.float32):
                    wc = w.to(ct)
                    data[ct] = (wc[:, :dn].contiguous(), wc[:, dn:].transpose(1, 2).contiguous())
                nbytes = (w.numel() + data["keys"].numel()) * dtype.itemsize
                sets.extend(
                    {
                        k: v.clone() if isinstance(v, torch.Tensor) else tuple(t.clone() for t in v)
                        for k, v in data.items()
                    }
                    for _ in range(kernels.stream_copies(nbytes))
                )
        for data in sets:
            w_uk, w_uv_t = data[dtype if name == "native" else torch.float32]
            q = data["q"]
            absorbed_attention(q[..., :dn], q[..., dn:], data["keys"], w_uk, w_uv_t, 0.1).to(dtype)

    choice = kernels.choose("decode_attention", key, ["native", "fp32"], run, device, streamed=True)
    return torch.float32 if choice == "fp32" else dtype
