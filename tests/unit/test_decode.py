"""Decode fidelity: the absorbed latent-cache decode equals the full forward, step by step.

Three computations of the same next-token logits are compared at every decode step:
1. ``model(ids)`` on the whole sequence, no cache (expanded keys/values, SDPA);
2. ``model(new_token, cache=cache)``: the absorbed MLA decode over the latent cache;
3. a reference written here that keeps its own latent cache and *materializes* per-head keys
   and values from it (``kv_b_proj`` applied to every cached ``c_kv``), then plain softmax
   attention, as DeepSeek-V2 eq. 1-11 state it.
"""

from __future__ import annotations

import collections
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.config import Config, ModelConfig
from dsv3.generation import generate, generate_batch
from dsv3.model import Transformer, apply_rope

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=128,
        dim=64,
        inter_dim=96,
        moe_inter_dim=32,
        n_layers=3,
        n_dense_layers=1,
        n_heads=4,
        n_routed_experts=8,
        n_activated_experts=2,
        n_expert_groups=2,
        n_limited_groups=1,
        q_lora_rank=0,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_seq_len=64,
        mtp_depth=0,
        init_std=0.12,
    )
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for gate in model.moe_gates():
            gate.e_score_correction_bias.copy_(torch.rand(cfg.n_routed_experts, generator=g) * 0.4 - 0.2)
    return model.eval()


@torch.no_grad()
def materialized_attention(attn, x, cos, sin, lat_kv, lat_pe):
    """MLA for new tokens ``x`` (B, T, D) over a latent cache, expanding keys and values.

    ``lat_kv`` (B, S_old, C) and ``lat_pe`` (B, S_old, dr) hold earlier positions; the new
    tokens' latents are appended. Returns (out (B, T, D), new lat_kv, new lat_pe).
    """
    B, T, _ = x.shape
    H, dn, dr, dv = attn.n_heads, attn.dn, attn.dr, attn.dv
    q = attn._queries(x)  # (B, T, H, dn + dr)
    q_nope, q_pe = q.split([dn, dr], dim=-1)
    q_pe = apply_rope(q_pe, cos, sin)
    c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, dr], dim=-1)
    c_kv = attn.kv_a_layernorm(c_kv)  # (B, T, C)
    k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # (B, T, dr)
    lat_kv = torch.cat([lat_kv, c_kv], dim=1)  # (B, S, C)
    lat_pe = torch.cat([lat_pe, k_pe], dim=1)  # (B, S, dr)
    S = lat_kv.shape[1]
    kv = attn.kv_b_proj(lat_kv).view(B, S, H, dn + dv)  # materialized per-head keys/values
    k_nope, v = kv.split([dn, dv], dim=-1)  # (B, S, H, dn), (B, S, H, dv)
    scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthr,bsr->bhts", q_pe, lat_pe)
    scores = scores * attn.softmax_scale  # (B, H, T, S)
    pos_q = torch.arange(S - T, S)[:, None]
    scores = scores.masked_fill(torch.arange(S)[None, :] > pos_q, float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)  # (B, T, H, dv)
    return attn.o_proj(o.flatten(2)), lat_kv, lat_pe


@torch.no_grad()
def reference_forward(model, ids, latents):
    """Logits (B, T, V) of new tokens ``ids`` given per-layer latents [(kv, pe), ...] (updated)."""
    start = latents[0][0].shape[1]
    T = ids.shape[1]
    cos, sin = model.rope_cos[start : start + T], model.rope_sin[start : start + T]
    h = model.embed_tokens(ids)
    for i, layer in enumerate(model.layers):
        a, kv, pe = materialized_attention(layer.self_attn, layer.input_layernorm(h), cos, sin, *latents[i])
        latents[i] = (kv, pe)
        h = h + a
        x = layer.post_attention_layernorm(h)
        h = h + (layer.mlp(x)[0] if layer.is_moe else layer.mlp(x))
    return model.lm_head(model.norm(h)).float()


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(q_lora_rank=24, n_expert_groups=4, n_limited_groups=2, rope_factor=4.0, original_seq_len=8),
        # unequal YaRN coefficients: the decode path rotates (and caches k_rope) with scaled tables
        dict(q_lora_rank=24, rope_factor=4.0, original_seq_len=8, mscale=0.5, mscale_all_dim=1.0, rms_norm_eps=1e-5),
    ],
    ids=["plain", "qlora-yarn", "qlora-yarn-mscales"],
)
def test_absorbed_decode_matches_full_and_materialized(kw):
    cfg = tiny(**kw)
    model = random_model(cfg)
    B, prompt_len, steps = 2, 5, 12
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, cfg.vocab_size, (B, prompt_len + steps), generator=g)
    cache = model.new_cache(B, prompt_len + steps)
    C, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    for layer_cache in cache:  # the latent cache: kv_lora_rank + qk_rope_head_dim values per token per layer
        assert layer_cache.kv.shape[-1] + layer_cache.pe.shape[-1] == C + dr
        assert layer_cache.kv.shape[:2] == layer_cache.pe.shape[:2] == (B, prompt_len + steps)
    latents = [(torch.zeros(B, 0, C), torch.zeros(B, 0, dr)) for _ in model.layers]

    with torch.no_grad():
        dec = model(seq[:, :prompt_len], cache=cache)  # prefill
        ref = reference_forward(model, seq[:, :prompt_len], latents)
        full = model(seq[:, :prompt_len])
        assert (dec - full).abs().max().item() < TOL
        assert (ref - full).abs().max().item() < TOL
        assert all(c.length == prompt_len for c in cache)
        for t in range(prompt_len, prompt_len + steps):
            dec = model(seq[:, t : t + 1], cache=cache)[:, -1]
            ref = reference_forward(model, seq[:, t : t + 1], latents)[:, -1]
            full = model(seq[:, : t + 1])[:, -1]
            assert full.abs().max() > 0.5  # logits are not trivially small
            assert (dec - full).abs().max().item() < TOL, f"step {t}"
            assert (ref - full).abs().max().item() < TOL, f"step {t}"
            assert all(c.length == t + 1 for c in cache)  # exactly one entry per token
    # the cache holds exactly the normalized c_kv and rotated k_rope of every position
    for c, (kv, pe) in zip(cache, latents):
        assert (c.kv[:, : c.length] - kv).abs().max().item() < TOL
        assert (c.pe[:, : c.length] - pe).abs().max().item() < TOL


def test_greedy_generate_equals_uncached_argmax():
    model = random_model(tiny(q_lora_rank=24), seed=4)
    prompt = [5, 17, 99, 3]
    out = generate(model, prompt, max_new_tokens=10, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


class _OpCounter(TorchDispatchMode):
    """Counts every ATen operator call that reaches the dispatcher (views included)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


#: Operator calls of one eager fp32 decode step of the ``tiny`` model (4 layers, 8 experts),
#: counted as generation runs it (``torch.inference_mode``), after a first step. Measured:
#: 354 (batch 1) and 375 (batch 8), of which 52 are the 13 norms (each a mirrored
#: ``layer_norm``: 4 calls, where ``F.rms_norm`` counts as one but runs as eight on CPU); the
#: implementation before the eager decode path (einsum + SDPA attention, two first projections,
#: gathered expert weights) made 447 and 480.
DECODE_STEP_OPS = {1: 360, 8: 380}


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_operator_count(batch, monkeypatch):
    """A regression guard on per-step dispatch work: one eager decode step of the tiny model
    stays within its operator budget, with no copies of expert weights at batch 1
    (``index_select``) and the attention as plain batched products (no SDPA call). The
    decoding kernels are fixed (the rules), so the count does not depend on what this CPU
    measured."""
    monkeypatch.setenv("DSV3_KERNELS", "decode_few=loop,decode_experts=grouped,decode_linear=plain")
    model = Transformer(Config().model)
    model.init_weights(seed=0)
    model.eval()
    with torch.inference_mode():
        cache = model.new_cache(batch, 16)
        model(torch.randint(0, model.cfg.vocab_size, (batch, 8)), cache=cache)
        new = torch.randint(0, model.cfg.vocab_size, (batch, 1))
        model(new, cache=cache)  # the first step derives the fused weights
        with _OpCounter() as counter:
            model(new, cache=cache)
    total = sum(counter.ops.values())
    assert total <= DECODE_STEP_OPS[batch], sorted(counter.ops.items(), key=lambda kv: -kv[1])
    assert not any("scaled_dot_product" in op for op in counter.ops)
    if batch == 1:
        assert counter.ops["aten.index_select"] == 0
    assert cache[0].length == 10


def test_hooked_modules_keep_the_plain_path():
    """A linear layer with a forward pre-hook (ZeRO stage 3 gathers parameters that way) is
    called, not bypassed by the eager path's derived weights, and greedy ids stay the same."""
    model = random_model(tiny(), seed=3)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    want = [r.ids for r in generate_batch(model, prompts, 6, temperature=0)]
    called = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda m, inp, _n=name: called.add(_n))
    assert [r.ids for r in generate_batch(model, prompts, 6, temperature=0)] == want
    # kv_b_proj is never called on the cache path: its weight is split for the absorbed form
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "kv_b_proj" not in n}
    assert called == linears


def _decode_run(model, prompt, steps, after_prefill=list):
    """Prefill ``prompt`` (B, T), call ``after_prefill()``, then ``steps`` greedy steps: (the
    steps' logits, the caches' buffers, their lengths)."""
    logits = []
    with torch.inference_mode():
        cache = model.new_cache(prompt.shape[0], 32)
        out = model(prompt, cache=cache)
        after_prefill()
        for _ in range(steps):
            out = model(out[:, -1:].argmax(-1), cache=cache)
            logits.append(out)
    return logits, [c.buf.clone() for c in cache], [c.length for c in cache]


def test_the_decoding_step_choice_is_timed_on_the_step_and_leaves_no_trace(tmp_path, monkeypatch):
    """The eager decoding step's choice (op ``decode_step``: each product's own kernel, here
    forced prepacked and made slow, or every product plain) is timed on the model's own first
    step, both candidates recorded (plain chosen), once per dtype, batch and shapes; the timing leaves the cache as it
    was (the next steps' logits and the caches equal, bit for bit, those of a run given the
    same choice without timing); inside ``plain`` no product reads a prepacked weight; a
    prompt (several tokens per row) takes the products' own kernels without timing."""
    from dsv3.model import decode, kernels

    if not decode.packing(torch.float32):
        pytest.skip("oneDNN does not run fp32 on this CPU")
    monkeypatch.setenv("DSV3_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.setenv("DSV3_KERNELS", "decode_linear=packed")
    monkeypatch.setattr(kernels, "_made", {})
    model = random_model(tiny(q_lora_rank=24), seed=5)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    real = decode._packed_product
    monkeypatch.setattr(decode, "_packed_product", lambda *a: time.sleep(1e-3) or real(*a))  # made slow
    timed = _decode_run(model, prompt, 3)
    (key,) = [k for k in kernels.choices() if k.startswith("decode_step | ")]
    entry = kernels.choices()[key]
    assert key.startswith("decode_step | float32 B=2 dim=64 layers=3/1 ") and entry["choice"] == "plain"
    assert entry["ms"]["measured"] > entry["ms"]["plain"] + 10  # (the products' 10+ slowed calls)
    assert timed[2] == [9, 9, 9]
    calls = []
    monkeypatch.setattr(decode, "_packed_product", lambda *a: calls.append(1) or real(*a))
    for choice in ("measured", "plain"):
        monkeypatch.setenv("DSV3_KERNELS", f"decode_linear=packed,decode_step={choice}")
        logits, bufs, lengths = _decode_run(model, prompt, 3, calls.clear)  # (the prompt's 12 rows: packed)
        assert (len(calls) > 0) == (choice == "measured"), choice
        if choice == entry["choice"]:
            assert all(torch.equal(a, b) for a, b in zip(logits, timed[0]))
            assert all(torch.equal(a, b) for a, b in zip(bufs, timed[1])) and lengths == timed[2]
        else:  # the other candidate: the same values to rounding
            for a, b in zip(logits, timed[0]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("DSV3_KERNELS", "decode_linear=packed")
    with torch.inference_mode():
        assert model.decode_kernel(prompt, model.new_cache(2, 32)) == "measured"
    assert [k for k in kernels.choices() if k.startswith("decode_step | ")] == [key]
