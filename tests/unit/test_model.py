"""Component tests of the model math against values computed by hand or by plain loops."""

import math
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from dsv3.config import ModelConfig
from dsv3.model import (
    Gate,
    MoE,
    Transformer,
    apply_rope,
    rope_cos_sin,
    rope_frequencies,
    yarn_mscale,
    yarn_rope_scale,
    yarn_softmax_scale,
)
from dsv3.model.moe import Experts
from dsv3.training.balance import update_expert_bias


def small_cfg(**kw):
    base = dict(
        vocab_size=97,
        dim=32,
        inter_dim=48,
        moe_inter_dim=16,
        n_layers=3,
        n_dense_layers=1,
        n_heads=2,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        max_seq_len=64,
        mtp_depth=2,
        route_scale=2.5,
    )
    base.update(kw)
    return ModelConfig(**base)


def gate_with_scores(logits_row, bias, cfg):
    """A gate whose raw logits for input e_0 = [1, 0, ...] are ``logits_row``."""
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor(logits_row)
        gate.e_score_correction_bias.copy_(torch.tensor(bias))
    x = torch.zeros(1, cfg.dim)
    x[0, 0] = 1.0
    return gate, x


def test_gate_bias_changes_winners_not_weights():
    cfg = small_cfg(n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    logits = [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0]
    gate, x = gate_with_scores(logits, [0.0] * 8, cfg)
    w, idx, s = gate(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    # a bias that lifts expert 5 above expert 1 makes it win ...
    gate2, _ = gate_with_scores(logits, [0, 0, 0, 0, 0, 1.0, 0, 0], cfg)
    w2, idx2, _ = gate2(x)
    assert sorted(idx2[0].tolist()) == [0, 5]
    # ... but its weight is its unbiased sigmoid score, normalized, times route_scale
    s0, s5 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))
    got = dict(zip(idx2[0].tolist(), w2[0].tolist()))
    assert got[0] == pytest.approx(2.5 * s0 / (s0 + s5), rel=1e-6)
    assert got[5] == pytest.approx(2.5 * s5 / (s0 + s5), rel=1e-6)
    assert w.dtype == torch.float32 and s.dtype == torch.float32


def test_group_limited_routing_with_all_negative_selection_scores():
    # 4 groups of 2; a large negative bias makes every selection score negative. Masked groups
    # must be -inf, not 0, or a masked expert (score 0 > negative) would win.
    cfg = small_cfg(n_expert_groups=4, n_limited_groups=1, n_activated_experts=2)
    logits = [0.0, 0.1, 3.0, 2.9, -1.0, -1.0, 0.5, 0.4]
    gate, x = gate_with_scores(logits, [-5.0] * 8, cfg)
    _, idx, _ = gate(x)
    assert sorted(idx[0].tolist()) == [2, 3]  # group 1 has the best top-2 sum
    # with two groups kept, group 3 (0.5 + 0.4) beats group 0 (0.1 + 0.0)
    cfg2 = small_cfg(n_expert_groups=4, n_limited_groups=2, n_activated_experts=4)
    gate2, x = gate_with_scores(logits, [-5.0] * 8, cfg2)
    _, idx2, _ = gate2(x)
    assert sorted(idx2[0].tolist()) == [2, 3, 6, 7]


def test_group_score_is_sum_of_top_two():
    # group 0 holds one excellent expert (3.0) + a bad one; group 1 two good ones (2.0, 2.0).
    cfg = small_cfg(n_routed_experts=4, n_expert_groups=2, n_limited_groups=1, n_activated_experts=1)
    logits = [3.0, -3.0, 2.0, 2.0]
    gate, x = gate_with_scores(logits, [0.0] * 4, cfg)
    _, idx, _ = gate(x)
    sig = torch.sigmoid(torch.tensor(logits))
    assert (sig[2] + sig[3]) > (sig[0] + sig[1])
    assert idx[0].tolist() in ([2], [3])


@pytest.mark.parametrize("H", [10, 16])  # 10: padded-bmm fallback (unaligned rows); 16: torch._grouped_mm
def test_experts_grouped_matches_loop(H):
    torch.manual_seed(0)
    E, D, N, K = 6, 12, 20, 2
    ex = Experts(E, D, H)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(N, D, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    idx[:, :] = idx.clamp(max=E - 2)  # expert E-1 gets no token
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % (E - 1), idx[:, 1])
    w = torch.rand(N, K)
    y = ex(x, w, idx)
    ref = torch.zeros(N, D)
    for n in range(N):
        for k in range(K):
            e = idx[n, k]
            h = F.silu(x[n] @ ex.gate_proj[e].T) * (x[n] @ ex.up_proj[e].T)
            ref[n] += w[n, k] * (h @ ex.down_proj[e].T)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(N, D)
    gy = torch.autograd.grad((y * g).sum(), [x, ex.gate_proj], retain_graph=True)
    gr = torch.autograd.grad((ref * g).sum(), [x, ex.gate_proj])
    torch.testing.assert_close(gy[0], gr[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gy[1], gr[1], atol=1e-5, rtol=1e-5)
    assert gy[1][E - 1].abs().sum() == 0  # unused expert: zero gradient
    # an expanded (stride-0) upstream gradient also works
    y.sum().backward()


@pytest.mark.parametrize(
    "N, dtype, path, kernels",
    [
        (2, torch.float32, "_chosen_loop", "rules"),
        (2, torch.bfloat16, "_chosen_loop", "rules"),
        (2, torch.bfloat16, "_few_tokens", "decode_few=gather"),
        (2, torch.float32, "_chosen_loop", "decode_few=loop,decode_linear=packed"),
        (2, torch.bfloat16, "_chosen_loop", "decode_few=loop,decode_linear=packed"),
        (5, torch.float32, "_all_experts", "rules"),
        (5, torch.bfloat16, "_all_experts", "rules"),
        (5, torch.float32, None, "decode_experts=grouped"),
        (5, torch.float32, "_all_experts", "decode_experts=all_experts,decode_linear=packed"),
        (16, torch.bfloat16, "_all_experts", "decode_experts=all_experts,decode_linear=packed"),
        (17, torch.bfloat16, None, "rules"),
    ],
)
def test_experts_inference_paths_match_the_loop(N, dtype, path, kernels, monkeypatch):
    """Without gradients: N*K < E runs the chosen experts from views of their weights (the
    rule on CPU) or gathers them; up to DENSE_MAX_TOKENS (16) tokens may run every expert
    (the rule on CPU); otherwise the grouped products; each product of a few rows may
    read a prepacked weight (decode_linear=packed, where oneDNN runs the dtype). Each equals
    the per-token loop (computed in fp32 from the same weights). The measured choices
    themselves are in test_kernels.py."""
    from dsv3.model import moe

    monkeypatch.setenv("DSV3_KERNELS", kernels)
    torch.manual_seed(1)
    E, D, H, K = 6, 12, 16, 2
    ex = Experts(E, D, H)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ex = ex.to(dtype)
    x = torch.randn(N, D).to(dtype)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    w = torch.rand(N, K)
    calls = []
    for name in ("_chosen_loop", "_few_tokens", "_all_experts"):
        plain = getattr(Experts, name)
        monkeypatch.setattr(Experts, name, lambda self, *a, _n=name, _f=plain: calls.append(_n) or _f(self, *a))
    with torch.inference_mode():  # generation's mode (the chosen-expert path needs it; no_grad suffices for the others)
        y = ex(x, w, idx)
    assert calls == ([path] if path else []) and moe.DENSE_MAX_TOKENS == 16
    ref = torch.zeros(N, D)
    g, u, d = (p.float() for p in (ex.gate_proj, ex.up_proj, ex.down_proj))
    for n in range(N):
        for k in range(K):
            e = idx[n, k]
            h = F.silu(x[n].float() @ g[e].T) * (x[n].float() @ u[e].T)
            ref[n] += w[n, k] * (h @ d[e].T)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)  # bf16 roundings
    torch.testing.assert_close(y.float(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_compile_whole_graph_on_cpu(dtype):
    """Compiled on CPU, the routed experts stay one graph (no data-dependent block size, no
    graph break) in fp32 and bf16, and match eager in output and every gradient."""
    torch.manual_seed(0)
    E, D, H, N, K = 4, 16, 16, 12, 2
    ex = Experts(E, D, H).to(dtype)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])  # expert E-1 gets no token
    w = torch.rand(N, K)
    g = torch.randn(N, D, dtype=dtype)
    params = [x, ex.gate_proj, ex.up_proj, ex.down_proj]
    y = ex(x, w, idx)
    ref = [y.detach()] + list(torch.autograd.grad((y.float() * g.float()).sum(), params))
    torch._dynamo.reset()
    fn = torch.compile(ex, fullgraph=True)  # fullgraph: a graph break raises
    y2 = fn(x, w, idx)
    got = [y2.detach()] + list(torch.autograd.grad((y2.float() * g.float()).sum(), params))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)  # bf16 roundings differ
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)
    assert got[2][E - 1].abs().sum() == 0  # unused expert: zero gradient


def test_compiled_experts_pad_their_groups_into_a_fixed_block():
    """bf16 on CPU with enough rows per expert: compiled code pads each expert's rows too (into
    a block of a fixed row count, the rows after the last group left to no expert), stays one
    graph, and matches the eager layer (which pads to the exact total) in output and every
    gradient."""
    from dsv3.model import grouped

    torch.manual_seed(0)
    E, D, H, N, K = 4, 16, 16, 256, 2
    ex = Experts(E, D, H).to(torch.bfloat16)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(N, D, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    assert grouped.padded_rows(N * K, E, x) == 16  # 128 rows per expert on average
    w = torch.rand(N, K)
    g = torch.randn(N, D)
    params = [x, ex.gate_proj, ex.up_proj, ex.down_proj]
    y = ex(x, w, idx)
    ref = [y.detach()] + list(torch.autograd.grad((y.float() * g).sum(), params))
    shapes = []
    real = torch._grouped_mm

    def spy(a, b, offs):
        shapes.append((tuple(a.shape), int(offs[-1])))
        return real(a, b, offs=offs)

    torch._dynamo.reset()
    fn = torch.compile(ex, fullgraph=True)
    with patch.object(torch, "_grouped_mm", lambda a, b, offs: spy(a, b, offs)):
        y2 = fn(x, w, idx)
        got = [y2.detach()] + list(torch.autograd.grad((y2.float() * g).sum(), params))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)  # bf16 roundings differ (as unpadded)
    bound = N * K + E * 15
    assert shapes[0][0] == (bound, D) and shapes[0][1] % 16 == 0 and N * K <= shapes[0][1] <= bound
    # with dynamic shapes (compiled generation) the row count is a symbol: not padded, so a
    # new token count needs no new graph
    torch._dynamo.reset()
    dyn = torch.compile(ex, dynamic=True, fullgraph=True, backend="eager")
    with torch.no_grad(), patch.object(torch._dynamo.config, "error_on_recompile", True):
        torch.testing.assert_close(dyn(x, w, idx), y, atol=0.1, rtol=0.05)
        assert dyn(x[:200], w[:200], idx[:200]).shape == (200, D)


def test_cpu_grouped_op_zeroes_the_rows_after_the_last_group():
    """torch._grouped_mm leaves the rows after the last group unwritten; the op compiled code
    calls returns zeros there, so that a padded block's spare rows stay finite."""
    from dsv3.model.grouped import _grouped_mm_cpu

    x = torch.full((40, 16), float("nan"), dtype=torch.bfloat16)
    x[:20] = 1
    w = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    y = _grouped_mm_cpu(x, w, torch.tensor([10, 20], dtype=torch.int32))
    assert torch.equal(y[20:], torch.zeros(20, 8, dtype=torch.bfloat16))
    torch.testing.assert_close(y[:10].float(), (x[:10].float() @ w[0].float().T), atol=0.05, rtol=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_traces_as_one_graph(dtype):
    """``torch.compile(fullgraph=True)`` of the whole model (MLA, dense and MoE blocks, MTP,
    the loss sums) raises on any graph break: checked for the training forward with
    backward and for the evaluation forward under ``no_grad`` (what ``train.compile`` runs),
    with the eager backend (tracing only). Values match the plain model's (which may run other
    measured kernels: compiled code takes the fixed rules, except the attention's choice)."""
    torch.manual_seed(0)
    model = Transformer(small_cfg())
    model.init_weights(seed=0)
    model = model.to(dtype)
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.randint(0, 97, (2, 12))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            want, got = model(ids, labels), compiled(ids, labels)
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.02, atol=0.1)
        torch.testing.assert_close(got.lm_loss_sum, want.lm_loss_sum, **tol)
        torch.testing.assert_close(got.mtp_loss_sum, want.mtp_loss_sum, **tol)
        if grad:
            got.local_loss(0.3, 1e-4).backward()


def test_balance_loss_by_hand():
    cfg = small_cfg(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=1, dim=4)
    moe = MoE(cfg)
    idx = torch.tensor([[0], [0], [1]])  # one sequence of 3 tokens
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.8, 0.2, 0.5, 0.5], [0.2, 0.6, 0.1, 0.1]])
    aux = moe._aux(idx, scores, 1, 3, None)
    f = torch.tensor([2, 1, 0, 0]) * 4 / (1 * 3)
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    assert aux.balance_loss.item() == pytest.approx((f * p).sum().item(), rel=1e-6)
    assert aux.load.tolist() == [2, 1, 0, 0]


def test_bias_update_sign():
    cfg = small_cfg(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=1)
    gate = Gate(cfg)
    update_expert_bias([gate], torch.tensor([[6, 2, 4, 4]]), 0.001)
    assert gate.e_score_correction_bias.tolist() == pytest.approx([-0.001, 0.001, 0.0, 0.0])


def test_rope_rotation_by_hand():
    cfg = small_cfg(qk_rope_head_dim=4, rope_theta=100.0)
    inv = rope_frequencies(cfg)
    assert inv.tolist() == pytest.approx([1.0, 0.1])
    p = 3
    angles = torch.tensor([[p * 1.0, p * 0.1]])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    y = apply_rope(x, angles.cos(), angles.sin()).flatten()
    c0, s0, c1, s1 = math.cos(3), math.sin(3), math.cos(0.3), math.sin(0.3)
    expect = [1 * c0 - 2 * s0, 1 * s0 + 2 * c0, 3 * c1 - 4 * s1, 3 * s1 + 4 * c1]
    assert y.tolist() == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_rope_gradient_is_the_inverse_rotation(dtype, per_row):
    """apply_rope's backward (eager: a custom function) against autograd through the formula,
    on a non-contiguous slice as MLA passes it, shared or per-row tables; and against the
    rotation by hand: the gradient of a rotation is the rotation by the negative angle."""
    g = torch.Generator().manual_seed(0)
    B, T, H, d = 2, 5, 3, 8
    full = torch.randn(B, T, H, 12 + d, generator=g).to(dtype)
    ang = torch.rand(*((B, T) if per_row else (T,)), d // 2, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    up = torch.randn(B, T, H, d, generator=g).to(dtype)

    def formula(x):
        xf = x.float().unflatten(-1, (-1, 2))
        c = cos.unsqueeze(-2) if per_row else cos[None, :, None, :]
        s = sin.unsqueeze(-2) if per_row else sin[None, :, None, :]
        x0, x1 = xf[..., 0], xf[..., 1]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2).to(x.dtype)

    grads = []
    for f in (lambda x: apply_rope(x, cos, sin), formula):
        x = full[..., 11 : 11 + d].detach().requires_grad_()  # strided, at an odd offset: no complex view
        (y := f(x)).backward(up)
        grads.append((y, x.grad))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    back = apply_rope(up.float(), cos, -sin)  # rotated back
    torch.testing.assert_close(grads[0][1].float(), back, **tol)


def test_yarn_frequencies_and_softmax_scale():
    cfg = ModelConfig(
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        rope_factor=40.0,
        original_seq_len=4096,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        max_seq_len=163840,
    )
    assert yarn_softmax_scale(cfg) == pytest.approx(0.135234, abs=5e-7)
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    inv = rope_frequencies(cfg).double()
    # correction range for these settings: low = floor(10.35) = 10, high = ceil(22.93) = 23
    low = math.floor(64 * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(10000)))
    high = math.ceil(64 * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(10000)))
    assert (low, high) == (10, 23)
    torch.testing.assert_close(inv[: low + 1], base[: low + 1].float().double())  # short wavelengths kept
    torch.testing.assert_close(inv[high:], (base[high:] / 40).float().double())  # long ones / factor
    mid = 16
    ramp = (mid - low) / (high - low)
    assert inv[mid].item() == pytest.approx(base[mid].item() * (1 - ramp) + base[mid].item() / 40 * ramp, rel=1e-6)
    assert yarn_softmax_scale(ModelConfig()) == pytest.approx((32 + 16) ** -0.5)


def test_yarn_unequal_mscales_by_hand():
    """mscale_all_dim sets the softmax scale, m(mscale) / m(mscale_all_dim) multiplies cos/sin."""
    assert yarn_mscale(40.0, 1.0) == pytest.approx(1.368888, abs=5e-7)
    assert yarn_mscale(1.0, 5.0) == 1.0  # no YaRN, no correction
    cfg = ModelConfig(
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        rope_factor=4.0,
        original_seq_len=16,
        mscale=0.5,
        mscale_all_dim=1.0,
        max_seq_len=64,
    )
    # 24 ** -0.5 * (0.1 ln 4 + 1) ** 2 and (0.05 ln 4 + 1) / (0.1 ln 4 + 1)
    assert yarn_softmax_scale(cfg) == pytest.approx(0.264642, abs=5e-7)
    assert yarn_rope_scale(cfg) == pytest.approx(0.939124, abs=5e-7)
    cos, sin = rope_cos_sin(cfg)
    angles = torch.outer(torch.arange(64, dtype=torch.float32), rope_frequencies(cfg))
    torch.testing.assert_close(cos, angles.cos() * yarn_rope_scale(cfg))
    torch.testing.assert_close(sin, angles.sin() * yarn_rope_scale(cfg))
    # None (the default) means mscale_all_dim = mscale: unscaled tables, mscale sets the softmax
    same = ModelConfig(qk_nope_head_dim=16, qk_rope_head_dim=8, rope_factor=4.0, mscale=0.5)
    assert same.mscale_all_dim is None and yarn_rope_scale(same) == 1.0
    assert yarn_softmax_scale(same) == pytest.approx(24**-0.5 * (0.05 * math.log(4) + 1) ** 2)
    assert yarn_rope_scale(ModelConfig(mscale=0.5, mscale_all_dim=1.0)) == 1.0  # rope_factor 1: YaRN off
    assert yarn_softmax_scale(ModelConfig(mscale=0.5, mscale_all_dim=1.0)) == pytest.approx((32 + 16) ** -0.5)


def test_latent_norms_use_the_reference_eps():
    """q_a_layernorm / kv_a_layernorm keep eps 1e-6 whatever rms_norm_eps; the other norms take it."""
    m = Transformer(ModelConfig(q_lora_rank=32, rms_norm_eps=1e-5, n_layers=2, mtp_depth=1))
    attn = m.layers[0].self_attn
    assert attn.q_a_layernorm.eps == attn.kv_a_layernorm.eps == 1e-6
    assert m.mtp[0].self_attn.kv_a_layernorm.eps == m.mtp[0].self_attn.q_a_layernorm.eps == 1e-6
    assert m.norm.eps == m.layers[1].input_layernorm.eps == m.layers[1].post_attention_layernorm.eps == 1e-5
    assert m.mtp[0].enorm.eps == m.mtp[0].hnorm.eps == 1e-5


def build(cfg, seed=0):
    torch.manual_seed(seed)
    m = Transformer(cfg)
    m.init_weights(seed=seed)
    with torch.no_grad():  # exercise the routing bias too
        for g in m.moe_gates():
            g.e_score_correction_bias.uniform_(-0.05, 0.05)
    return m.eval()


def test_causality_later_token_never_changes_earlier_logits():
    cfg = small_cfg(init_std=0.2)
    m = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 5) % cfg.vocab_size
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-5, rtol=0)  # routing order may change summation order
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


def test_mtp_targets_shifted_exactly_once():
    cfg = small_cfg(mtp_depth=2)
    m = build(cfg)
    window = torch.randint(0, cfg.vocab_size, (2, 17))  # T+1 tokens
    inputs, labels = window[:, :-1], window[:, 1:]
    out = m(inputs, labels)
    T = inputs.shape[1]
    with torch.no_grad():
        h, _ = m._trunk(inputs)
        h = m.norm(h)  # MTP depth 1 reads the main model's post-norm state
        main = m.lm_head(h)
        lm = F.cross_entropy(main.flatten(0, 1), window[:, 1:].flatten(), reduction="sum")
        torch.testing.assert_close(out.lm_loss_sum, lm)
        for k in (1, 2):
            mod = m.mtp[k - 1]
            emb = m.embed_tokens(window[:, k:T])  # token i+k, for i < T-k
            h, _ = mod(h[:, : T - k], emb, m.rope_cos[: T - k], m.rope_sin[: T - k])
            h = mod.shared_head.norm(h)
            logits = m.lm_head(h)
            target = window[:, k + 1 : T + 1]  # token i+k+1
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
            torch.testing.assert_close(out.mtp_loss_sum[k - 1], ce)
            assert out.mtp_tokens[k - 1].item() == 2 * (T - k)


def test_ignore_index_labels_carry_no_loss():
    cfg = small_cfg()
    m = build(cfg)
    window = torch.randint(0, cfg.vocab_size, (1, 11))
    labels = window[:, 1:].clone()
    labels[:, :4] = -100
    out = m(window[:, :-1], labels)
    assert out.lm_tokens.item() == 6
    assert out.mtp_tokens.tolist() == [6, 6]  # depth k sees labels[:, k:]: 9-3 and 8-2 valid


def test_train_output_load_counts_every_token_k_times():
    cfg = small_cfg()
    m = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 10))
    out = m(x, x)
    # 2 MoE layers in the main model (n_dense_layers=1 of 3) + 2 MTP modules
    assert out.expert_load.shape == (4, cfg.n_routed_experts)
    assert out.expert_load.sum(1).tolist() == [60, 60, 54, 48]


def test_activation_checkpointing_keeps_loss_and_gradients():
    from dsv3.parallel.checkpointing import apply_activation_checkpointing

    cfg = small_cfg()
    plain, ckpt = build(cfg).train(), build(cfg).train()
    apply_activation_checkpointing(ckpt)
    window = torch.randint(0, cfg.vocab_size, (2, 13))
    outs = []
    for m in (plain, ckpt):
        out = m(window[:, :-1], window[:, 1:])
        out.local_loss(0.3, 1e-4).backward()
        outs.append(out)
    assert torch.equal(outs[0].expert_load, outs[1].expert_load)
    torch.testing.assert_close(outs[0].lm_loss_sum, outs[1].lm_loss_sum, rtol=0, atol=0)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_cross_entropy_equals_torch(monkeypatch, dtype):
    """ce_sum works block by block (here 3 rows of 40 logits per block, 7 blocks and a short
    one); value and gradient equal torch's cross-entropy in fp32, labels -100 included."""
    from dsv3.model import objective

    monkeypatch.setattr(objective, "CE_BLOCK_ELEMENTS", 120)
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 11, 40, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (2, 11), generator=g)
    labels[0, :3] = objective.IGNORE_INDEX
    ours = objective.ce_sum(logits, labels)
    (2.5 * ours).backward()
    grad, logits.grad = logits.grad, None
    ref = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    (2.5 * ref).backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    assert grad.dtype == dtype and not grad[0, :3].any()  # unlabelled positions get no gradient
    torch.testing.assert_close(grad, logits.grad)  # the tolerance of the dtype: rounding of the last bit
    empty = objective.ce_sum(torch.zeros(1, 0, 40), torch.zeros(1, 0, dtype=torch.long))
    assert empty.item() == 0.0


def test_compiled_cross_entropy_equals_the_blocked_one():
    """Compiled code takes torch's cross-entropy in fp32 (the compiler fuses the cast, the
    log-softmax and its backward; the blocked function's in-place block updates cost it 3x in
    the backward): the same value and bf16 gradient as the eager blocked one."""
    from dsv3.model import objective

    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(3, 9, 64, generator=g)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 64, (3, 9), generator=g)
    labels[1, 4:] = objective.IGNORE_INDEX
    want = objective.ce_sum(logits, labels)
    (want * 1.5).backward()
    want_grad, logits.grad = logits.grad, None
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # keeps the traced graph's code, runs it as it is
        graphs.append(gm.code)
        return gm.forward

    got = torch.compile(objective.ce_sum, backend=backend, fullgraph=True)(logits, labels)
    (got * 1.5).backward()
    assert len(graphs) == 1 and "cross_entropy" in graphs[0] and "_log_softmax" not in graphs[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert not logits.grad[1, 4:].any()
    torch.testing.assert_close(logits.grad, want_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_of_a_decoding_step_is_the_mirrored_layer_norm(dtype):
    """In inference on a few CPU rows RMSNorm runs as layer_norm of [x, -x] (mean 0, variance
    mean(x^2)): the values of x * rsqrt(mean(x^2) + eps) * w to fp32 rounding, rounded once to
    the input dtype; many rows, autograd and a hooked module keep F.rms_norm."""
    from dsv3.model.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(3, 2, 48, generator=g) * 3).to(dtype)
    xf, wf = x.double(), norm.weight.double()
    want = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-5) * wf).to(dtype)
    with torch.inference_mode():
        got = norm(x)
    assert "mirrored" in norm.__dict__["_dsv3_derived"]
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.008, atol=0.008)
    torch.testing.assert_close(got, want, **tol)
    many = RMSNorm(48).to(dtype)
    with torch.inference_mode():
        many(torch.randn(17, 48).to(dtype))  # more than a decoding step's rows
    with torch.no_grad():
        many(x)  # not inference mode (a training run's evaluation)
    assert "_dsv3_derived" not in many.__dict__


@pytest.mark.parametrize("groups,limited,scale", [(1, 1, 1.0), (4, 2, 2.5), (2, 1, 1.0)])
def test_host_routing_equals_the_gate(groups, limited, scale):
    """Gate.route_on_host (a decoding step's routing in Python) gives the gate's expert ids
    and float32 weights exactly, group-limited or not, with route_scale; a tie at the boundary
    of the kept experts (which topk breaks its own way) returns None (the caller uses the gate)."""
    from dsv3.model.moe import Gate

    cfg = ModelConfig(
        dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=groups, n_limited_groups=limited
    )
    cfg.route_scale = scale
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(groups)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(8, 16, generator=g))
        gate.e_score_correction_bias.copy_(torch.rand(8, generator=g) * 0.2 - 0.1)
    x = torch.randn(40, 16, generator=g)
    x[1] = 0.0  # every score 0.5: the selection is decided by the bias alone
    with torch.inference_mode():
        weights, indices, _ = gate(x)
        ids, ws = gate.route_on_host(x)
    assert ids == indices.flatten().tolist()
    assert torch.equal(torch.tensor(ws, dtype=torch.float32), weights)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
    with torch.inference_mode():
        assert gate.route_on_host(torch.zeros(1, 16)) is None  # every selection score 0.5


def test_a_decoding_step_routed_on_the_host_equals_the_gated_layer(monkeypatch):
    """An MoE layer on one token in inference mode (the chosen experts in a loop) routes on the
    host and gives the output of the gate + experts path (computed under no_grad) to fp32
    rounding; each token's expert outputs are weighted by its own gate weights."""
    monkeypatch.setenv("DSV3_KERNELS", "decode_few=loop,decode_linear=plain")
    cfg = ModelConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2)
    layer = MoE(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        layer.gate.e_score_correction_bias.copy_(torch.rand(8, generator=g) * 0.2)
    layer.eval()
    routed = []
    real = Gate.route_on_host
    monkeypatch.setattr(Gate, "route_on_host", lambda self, x: routed.append(1) or real(self, x))
    for seed in range(4):
        x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want, _ = layer(x)
        with torch.inference_mode():
            got, aux = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert aux is None
    assert len(routed) == 4


def test_pad_groups_by_hand():
    """Groups of 2, 0 and 3 rows padded to multiples of 4: rows 0-1, 4-6 hold the input."""
    from dsv3.model.grouped import pad_groups

    x = torch.arange(10.0).view(5, 2)
    padded, counts, dest = pad_groups(x, torch.tensor([2, 0, 3]), torch.tensor([0, 0, 2, 2, 2]), 4)
    assert counts.tolist() == [4, 0, 4] and dest.tolist() == [0, 1, 4, 5, 6]
    assert padded.shape == (8, 2) and torch.equal(padded[dest], x)
    assert padded[[2, 3, 7]].abs().sum() == 0


def test_padded_rows_rule():
    """bf16 / fp16 on CPU from 128 rows per expert: an eighth of the power of two at or above
    the mean rows per expert; fewer rows, fp32 and other devices: no padding."""
    from dsv3.model.grouped import padded_rows

    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    assert padded_rows(2048, 8, bf16) == 32 and padded_rows(8192, 16, bf16) == 64
    assert padded_rows(2000, 8, bf16) == 32 and padded_rows(1024, 8, bf16) == 16
    assert padded_rows(1016, 8, bf16) == 0 and padded_rows(100, 8, bf16) == 0
    assert padded_rows(2048, 8, torch.zeros(1, dtype=torch.float16)) == 32
    assert padded_rows(2048, 8, torch.zeros(1)) == 0
    assert padded_rows(2048, 8, torch.zeros(1, dtype=torch.bfloat16, device="meta")) == 0


def test_padded_expert_products_see_few_shapes_and_compute_the_same(monkeypatch):
    """In bf16 on CPU every grouped product of the routed experts (forward, input and weight
    gradients) has its rows per expert in multiples of the padding, whatever the routing, so oneDNN's
    per-shape kernels repeat; output and gradients equal the unpadded layer's to bf16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsv3.model import grouped

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.groups = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket == torch.ops.aten._grouped_mm:
                offs = (kwargs or {}).get("offs", args[2] if len(args) > 2 else None)
                ends = [0, *offs.tolist()]
                self.groups.update(b - a for a, b in zip(ends, ends[1:]))  # rows (or depth) per expert
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("DSV3_KERNELS", "experts=grouped_mm")
    torch.manual_seed(0)
    E, D, I, N, K = 4, 16, 24, 300, 2
    ex = Experts(E, D, I)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ex = ex.to(torch.bfloat16)
    pad = grouped.padded_rows(N * K, E, torch.zeros(1, dtype=torch.bfloat16))
    assert pad == 32  # 150 rows per expert on average
    unpadded = set()
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N, D, generator=g).to(torch.bfloat16).requires_grad_()
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
        w = torch.rand(N, K, generator=g)
        got = {}
        for padded in (True, False):
            if not padded:
                monkeypatch.setattr(grouped, "padded_rows", lambda *a: 0)
                monkeypatch.setattr("dsv3.model.moe.padded_rows", lambda *a: 0)
            with Shapes() as shapes:
                y = ex(x, w, idx)
                grads = torch.autograd.grad(y.float().square().sum(), [x, *ex.parameters()])
            got[padded] = [y, *grads]
            if padded:
                assert shapes.groups and all(r % pad == 0 for r in shapes.groups), sorted(shapes.groups)
            else:
                unpadded |= shapes.groups
            monkeypatch.undo()
            monkeypatch.setenv("DSV3_KERNELS", "experts=grouped_mm")
        for a, b in zip(got[True], got[False]):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.05)
    assert any(r % pad for r in unpadded)  # (what the padding changes)
