"""Kernels chosen by measurement (dsv3.model.kernels): the choice, the machine's record, the
forced settings, and every candidate computing the same values as the fixed rule."""

from __future__ import annotations

import json
import sys
import time
from unittest import mock

import pytest
import torch
from helpers import tiny_model

from dsv3.errors import DsvError
from dsv3.model import kernels
from dsv3.model.attention import ATTENTION_KERNELS, causal_attention
from dsv3.model.moe import Experts


@pytest.fixture
def record(tmp_path, monkeypatch):
    """A fresh machine record and no choices made in this process yet."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("DSV3_KERNEL_CACHE", str(path))
    monkeypatch.delenv("DSV3_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_made", {})
    return path


def _sleeper(seconds: dict[str, float], calls: list[str]):
    def run(name):
        calls.append(name)
        time.sleep(seconds[name])

    return run


def test_the_fastest_is_chosen_recorded_and_reused(record, monkeypatch):
    calls = []
    run = _sleeper({"a": 0.004, "b": 0.001}, calls)
    cpu = torch.device("cpu")
    assert kernels.choose("op", "k1", ["a", "b"], run, cpu) == "b"
    assert calls[:2] == ["a", "b"] and calls.count("a") == calls.count("b") >= 1 + kernels.ROUNDS
    entry = json.loads(record.read_text())[kernels._machine()]["op | k1"]
    assert entry["choice"] == "b" and entry["ms"]["a"] > entry["ms"]["b"] >= 1.0
    # another process on this machine reads the record instead of measuring
    monkeypatch.setattr(kernels, "_made", {})
    calls.clear()
    assert kernels.choose("op", "k1", ["a", "b"], run, cpu) == "b" and calls == []
    assert kernels.choices()["op | k1"]["choice"] == "b"
    # a checkpoint's choices come first
    kernels.preload({"op | k1": {"choice": "a"}})
    assert kernels.choose("op", "k1", ["a", "b"], run, cpu) == "a" and calls == []


def test_the_rule_stays_within_the_margin_and_off_cpu(record):
    calls = []
    run = _sleeper({"a": 0.0021, "b": 0.002}, calls)  # b is 5% faster: within MARGIN (10%)
    assert kernels.MARGIN == 0.1
    assert kernels.choose("op", "k2", ["a", "b"], run, torch.device("cpu")) == "a"
    calls.clear()
    assert kernels.choose("op", "k3", ["a", "b"], run, torch.device("meta")) == "a" and calls == []


def test_forced_kernels(record, monkeypatch):
    def run(name):
        raise AssertionError("nothing is measured when the kernel is forced")

    cpu = torch.device("cpu")
    monkeypatch.setenv("DSV3_KERNELS", "rules")
    assert kernels.choose("attention", "k", ["flash", "matmul"], run, cpu) == "flash"
    monkeypatch.setenv("DSV3_KERNELS", "attention=matmul, experts=bmm")
    assert kernels.choose("attention", "k", ["flash", "matmul"], run, cpu) == "matmul"
    assert kernels.choose("experts", "k", ["grouped_mm", "bmm"], run, cpu) == "bmm"
    monkeypatch.setenv("DSV3_KERNELS", "attention=fast")
    with pytest.raises(DsvError, match="attention=fast is not one of flash, matmul"):
        kernels.choose("attention", "k", ["flash", "matmul"], run, cpu)
    monkeypatch.setenv("DSV3_KERNELS", "matmul")
    with pytest.raises(DsvError, match="op=candidate"):
        kernels.choose("attention", "k", ["flash", "matmul"], run, cpu)
    assert not record.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernels_agree(dtype, record):
    """Every candidate computes the causal attention: values and gradients of the fp32 SDPA
    reference (fp32 within 1e-5; bf16 within its rounding), and measuring them leaves the
    global random state alone."""
    torch.manual_seed(0)
    B, H, T, Dk, Dv = 2, 3, 40, 24, 16
    q, k, v = (torch.randn(B, H, T, d) for d in (Dk, Dk, Dv))
    g = torch.randn(B, H, T, Dv)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=True, scale=0.3)
    ref_grads = torch.autograd.grad((ref * g).sum(), ref_in)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    for name, fn in ATTENTION_KERNELS.items():
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*ins, 0.3)
        grads = torch.autograd.grad((out.float() * g).sum(), ins)
        torch.testing.assert_close(out.float(), ref, **tol, msg=name)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.float(), b, **tol, msg=name)
    state = torch.random.get_rng_state()
    causal_attention(q.to(dtype), k.to(dtype), v.to(dtype), 0.3)
    assert torch.equal(state, torch.random.get_rng_state())
    (entry,) = kernels.choices().values()
    assert set(entry["ms"]) == {"flash", "sdpa", "matmul"}


def test_compiled_attention_takes_the_measured_or_forced_kernel(record, monkeypatch):
    """Compiled code asks the kernel choice once, where it is traced (outside the graph): the
    attention of a compiled function is measured like eager code's and recorded (before,
    compiled code took the fixed rule), and a forced kernel applies there too."""
    from dsv3.model import attention

    B, H, T, Dk, Dv = 1, 2, 24, 16, 8
    q, k, v = (torch.randn(B, H, T, d, generator=torch.Generator().manual_seed(d)) for d in (Dk, Dk, Dv))
    want = causal_attention(q, k, v, 0.25)
    (key,) = kernels.choices()  # the eager call measured it
    monkeypatch.setattr(kernels, "_made", {})
    torch._dynamo.reset()
    got = torch.compile(lambda a, b, c: causal_attention(a, b, c, 0.25), backend="eager", fullgraph=True)(q, k, v)
    assert list(kernels.choices()) == [key]  # measured again at trace time, in this fresh "process"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # forced: a stand-in kernel shows which one the compiled graph runs
    monkeypatch.setitem(attention.ATTENTION_KERNELS, "matmul", lambda a, b, c, s: torch.zeros_like(c))
    monkeypatch.setenv("DSV3_KERNELS", "attention=matmul")
    torch._dynamo.reset()
    out = torch.compile(lambda a, b, c: causal_attention(a, b, c, 0.25), backend="eager", fullgraph=True)(q, k, v)
    assert out.abs().sum() == 0
    monkeypatch.setenv("DSV3_KERNELS", "rules")  # the rule: flash (fp32 on CPU)
    torch._dynamo.reset()
    out = torch.compile(lambda a, b, c: causal_attention(a, b, c, 0.25), backend="eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, attention._flash(q, k, v, 0.25), atol=0, rtol=0)
    # dynamic shapes (compiled generation): the length is a symbol, so the rule (asking the
    # choice with a symbol would break the graph; a forced matmul would show as zeros)
    monkeypatch.setenv("DSV3_KERNELS", "attention=matmul")
    torch._dynamo.reset()
    dyn = torch.compile(lambda a, b, c: causal_attention(a, b, c, 0.25), backend="eager", fullgraph=True, dynamic=True)
    for n in (T, T - 5):
        a, b, c = (t[:, :, :n].contiguous() for t in (q, k, v))
        torch.testing.assert_close(dyn(a, b, c), attention._flash(a, b, c, 0.25))


def _experts(E: int, D: int, dtype: torch.dtype) -> Experts:
    """E routed experts of width D (hidden 32), weights N(0, 0.3) from seed 0, in ``dtype``."""
    torch.manual_seed(0)
    ex = Experts(E, D, 32)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return ex.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_kernels_agree(dtype, record, monkeypatch):
    """The padded bmm and the grouped products give the same output and gradients."""
    E, D, N, K = 6, 16, 20, 2
    ex = _experts(E, D, dtype)
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])
    w = torch.rand(N, K)
    got = {}
    for name in ("grouped_mm", "bmm"):
        monkeypatch.setenv("DSV3_KERNELS", f"experts={name}")
        y = ex(x, w, idx)
        got[name] = [y, *torch.autograd.grad(y.float().square().sum(), [x, *ex.parameters()])]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    for a, b in zip(got["grouped_mm"], got["bmm"]):
        torch.testing.assert_close(a, b, **tol)
    monkeypatch.delenv("DSV3_KERNELS")
    ex(x, w, idx)
    (entry,) = kernels.choices().values()
    assert set(entry["ms"]) == {"grouped_mm", "bmm"}


def test_a_model_step_measures_once_per_shape(record):
    """A forward and backward of the tiny model measures each (operation, shape) once; a second
    step measures nothing."""
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = load_config(None, tiny_model())
    model = Transformer(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(ids).float().mean().backward()
    first = json.loads(record.read_text())[kernels._machine()]
    assert {k.split(" | ")[0] for k in first} == {"attention", "experts"}
    mtime = record.stat().st_mtime_ns
    model(ids).float().mean().backward()
    assert record.stat().st_mtime_ns == mtime and set(kernels.choices()) == set(first)


def test_processes_on_one_machine_measure_once(record, tmp_path):
    """Three processes asking for the same choice at once: one measures (under the record's
    lock), the others wait and read its choice."""
    import subprocess
    import sys

    script = (
        "import sys, time, torch\n"
        "from dsv3.model import kernels\n"
        "def run(name):\n"
        "    open(sys.argv[1], 'a').write(name + '\\n')\n"
        "    time.sleep({'a': 0.02, 'b': 0.002}[name])\n"
        "print(kernels.choose('op', 'shared', ['a', 'b'], run, torch.device('cpu')))\n"
    )
    log = tmp_path / "measured.txt"
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(log)], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["b", "b", "b"] and all(p.returncode == 0 for p in procs)
    calls = log.read_text().split()
    assert calls.count("a") == calls.count("b") >= 1 + kernels.ROUNDS  # one measurement in all
    assert calls.count("a") <= 1 + kernels.MAX_ROUNDS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_expert_candidates_agree(dtype, record, monkeypatch):
    """A few inference tokens: every expert on every token (unchosen ones weighted 0) equals the
    grouped products, in fp32 and bf16."""
    E, D, N, K = 8, 16, 6, 2
    ex = _experts(E, D, dtype)
    x = torch.randn(N, D, dtype=dtype)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    w = torch.rand(N, K)
    got = {}
    for name in ("all_experts", "grouped"):
        monkeypatch.setenv("DSV3_KERNELS", f"decode_experts={name}")
        with torch.inference_mode():
            got[name] = ex(x, w, idx).float()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(got["all_experts"], got["grouped"], **tol)


def test_measuring_is_invisible_to_the_callers_saved_tensor_hooks(record):
    """What a forward keeps for backward (counted through saved-tensor hooks, as
    ``dsv3 bench train`` does) is the same whether its kernels were measured on the way or not."""
    q, k = (torch.randn(2, 2, 16, 24, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 2, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    counts = []
    for _ in range(2):  # the first call measures, the second reads the choice
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, seen=packed: seen.append(t.shape) or t, lambda t: t):
            causal_attention(q, k, v, 0.2)
        counts.append(len(packed))
    assert len(kernels.choices()) == 1 and counts[0] == counts[1] > 0


def test_a_choice_inside_a_timed_candidate_takes_the_rule_unless_made_before(record):
    """A candidate that itself asks for a measured choice gets the rule (no nested measuring,
    which would wait for the record's lock this process holds), or the choice already made."""
    cpu = torch.device("cpu")
    inner = []

    def outer(name):
        inner.append(kernels.choose("inner", "k", ["rule", "fast"], _sleeper({"rule": 0.002, "fast": 0.0}, []), cpu))
        inner.append(kernels.choose("made", "k", ["rule", "fast"], _sleeper({"rule": 0.002, "fast": 0.0}, []), cpu))

    assert kernels.choose("made", "k", ["rule", "fast"], _sleeper({"rule": 0.002, "fast": 0.0}, []), cpu) == "fast"
    state = kernels.state()
    kernels.choose("outer", "k", ["x", "y"], outer, cpu)
    assert set(inner[0::2]) == {"rule"} and set(inner[1::2]) == {"fast"}
    assert "inner | k" not in kernels.choices() and kernels.state() != state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 16, 17])
def test_decode_linear_packed_equals_plain(dtype, rows, record, monkeypatch):
    """decode.linear with the prepacked weight (forced) equals F.linear to rounding, for the
    weight itself, a view and a built one; more than PACK_MAX_ROWS rows take F.linear; the
    packed copy is rebuilt after an in-place update of its source."""
    from dsv3.model import decode

    if not decode.packing(dtype):
        pytest.skip(f"oneDNN does not run {dtype} on this CPU")
    monkeypatch.setenv("DSV3_KERNELS", "decode_linear=packed")
    g = torch.Generator().manual_seed(0)
    owner = torch.nn.Linear(32, 48, bias=False).to(dtype)
    stack = torch.nn.Parameter(torch.randn(3, 48, 32, generator=g).to(dtype), requires_grad=False)
    x = torch.randn(rows, 32, generator=g).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.05)
    packed_calls = []
    real = decode._packed_product
    monkeypatch.setattr(decode, "_packed_product", lambda *a: packed_calls.append(1) or real(*a))
    with torch.inference_mode():
        w = owner.weight
        y = decode.linear(owner, "w", x, (w,), tuple(w.shape))
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w), **tol)
        y = decode.linear(owner, "view", x, (stack,), (48, 32), weight=stack[1])
        torch.testing.assert_close(y, torch.nn.functional.linear(x, stack[1]), **tol)
        both = torch.cat([stack[0], stack[2]])
        y = decode.linear(owner, "built", x, (stack,), (96, 32), lambda: torch.cat([stack[0], stack[2]]))
        torch.testing.assert_close(y, torch.nn.functional.linear(x, both), **tol)
        assert len(packed_calls) == (3 if rows <= decode.PACK_MAX_ROWS else 0)
    with torch.no_grad():
        stack.mul_(-1)  # an update the kept copies must follow
    with torch.inference_mode():
        y = decode.linear(owner, "view", x, (stack,), (48, 32), weight=stack[1])
        torch.testing.assert_close(y, torch.nn.functional.linear(x, stack[1]), **tol)


def test_prepacked_copies_stay_within_their_budget(record, monkeypatch):
    """Past pack_budget() the products read their weights as they are; the bytes of the packed
    copies are counted while they live and released with them."""
    import gc

    from dsv3.model import decode

    if not decode.packing(torch.float32):
        pytest.skip("oneDNN does not run fp32 on this CPU")
    monkeypatch.setenv("DSV3_KERNELS", "decode_linear=packed")
    gc.collect()  # copies of models that earlier tests left in reference cycles go now, not midway
    before = decode._packed_bytes[0]
    monkeypatch.setattr(decode, "pack_budget", lambda: before + 48 * 32 * 4)  # room for one 48 x 32 fp32 copy
    calls = []
    real = decode._packed_product
    monkeypatch.setattr(decode, "_packed_product", lambda *a: calls.append(1) or real(*a))
    a, b = (torch.nn.Linear(32, 48, bias=False) for _ in range(2))
    x = torch.randn(2, 32)
    with torch.inference_mode():
        for m in (a, b, a):
            y = decode.linear(m, "w", x, (m.weight,), (48, 32))
            torch.testing.assert_close(y, torch.nn.functional.linear(x, m.weight), rtol=1e-5, atol=1e-5)
    assert calls == [1, 1] and decode._packed_bytes[0] == before + 48 * 32 * 4  # a packed, b plain, a packed
    del a, m
    gc.collect()
    assert decode._packed_bytes[0] == before


def test_a_layer_too_large_to_measure_decodes_with_the_grouped_products(monkeypatch):
    """Every expert on every token reads E/K times the weights: a layer above the measuring
    limit keeps the grouped products for a few tokens, in fp32 and bf16."""
    from dsv3.model import moe

    monkeypatch.delenv("DSV3_KERNELS", raising=False)
    monkeypatch.setattr(moe, "MEASURE_MAX_ELEMENTS", 100)
    ex = Experts(8, 16, 16)
    for dtype in (torch.float32, torch.bfloat16):
        assert ex.kernel(torch.zeros(4, 16, dtype=dtype), 4, 2, dense=True) == "grouped"


def test_absorbed_attention_equals_the_expanded_heads():
    """The absorbed form (queries folded through W_uk, values through W_uv after the softmax)
    equals per-head attention over the expanded keys [c_kv W_uk^T ; k_rope] and values
    c_kv W_uv^T, with and without a mask, in fp32."""
    from dsv3.model.attention import absorbed_attention

    g = torch.Generator().manual_seed(0)
    B, T, H, dn, dr, C, dv, S = 2, 3, 4, 8, 4, 16, 6, 7
    q_nope, q_pe = torch.randn(B, T, H, dn, generator=g), torch.randn(B, T, H, dr, generator=g)
    keys = torch.randn(B, S, C + dr, generator=g)
    w_uk, w_uv = torch.randn(H, dn, C, generator=g) * 0.3, torch.randn(H, dv, C, generator=g) * 0.3
    allowed = torch.rand(B, T, 1, S, generator=g) > 0.3
    allowed[..., 0] = True
    for mask in (None, allowed):
        got = absorbed_attention(q_nope, q_pe, keys, w_uk, w_uv.transpose(1, 2).contiguous(), 0.25, mask)
        k_nope = torch.einsum("bsc,hdc->bhsd", keys[..., :C], w_uk)  # (B, H, S, dn)
        k = torch.cat([k_nope, keys[:, None, :, C:].expand(B, H, S, dr)], -1)
        q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)  # (B, H, T, dn + dr)
        scores = q @ k.transpose(-1, -2) * 0.25  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask.permute(0, 2, 1, 3), float("-inf"))
        v = torch.einsum("bsc,hdc->bhsd", keys[..., :C], w_uv)  # (B, H, S, dv)
        want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * dv)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _tiny_transformer(seed: int):
    from dsv3.config import load_config
    from dsv3.model import Transformer

    model = Transformer(load_config(None, tiny_model()).model)
    model.init_weights(seed=seed)
    return model.eval()


def test_bf16_decode_attention_in_fp32_agrees_with_native(record, monkeypatch):
    """A bf16 model's decode attention computed in fp32 (the candidate a CPU's slow small bf16
    products favour) gives the native bf16 logits to bf16 rounding, keeps fp32 copies of the
    absorbed weights only in that mode, and an fp32 model makes no such choice."""
    model = _tiny_transformer(seed=0).to(torch.bfloat16)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name in ("native", "fp32"):
        monkeypatch.setenv("DSV3_KERNELS", f"decode_attention={name}")
        with torch.inference_mode():
            cache = model.new_cache(2, 8)
            model(ids[:, :5], cache=cache)
            logits[name] = model(ids[:, 5:], cache=cache).float()
        kept = model.layers[0].self_attn.__dict__["_dsv3_derived"]
        assert ("decode torch.float32" in kept) == (name == "fp32")
    torch.testing.assert_close(logits["fp32"], logits["native"], rtol=0.05, atol=0.08)
    assert (logits["fp32"] - logits["native"]).abs().max() > 0  # they did compute differently
    monkeypatch.delenv("DSV3_KERNELS")
    fp32 = _tiny_transformer(seed=0)
    with torch.inference_mode():
        fp32(ids, cache=fp32.new_cache(2, 8))
    assert not any(k.startswith("decode_attention") for k in kernels.choices())


def test_streamed_measurements_fill_a_quarter_of_the_last_level_cache(record):
    """A decode product is timed over enough copies of its weight to fill a quarter of the
    last-level cache (each read once, as a decoding step reads it), at most STREAM_MAX_COPIES, at
    least one; STREAM_ROUNDS timed rounds."""
    part, most = kernels._last_level_cache_bytes() // 4, kernels.STREAM_MAX_COPIES
    assert kernels.stream_copies(64) == most and kernels.stream_copies(4 * part) == 1
    for nbytes in (part // most, part // 3, part // 2 + 1, part):
        n = kernels.stream_copies(nbytes)
        assert n * nbytes >= part and (n - 1) * nbytes < part
    calls = []
    assert kernels.choose(
        "op", "s", ["a", "b"], _sleeper({"a": 0.0, "b": 0.0}, calls), torch.device("cpu"), streamed=True
    )
    assert calls == ["a", "b"] * (kernels.WARMUP + kernels.STREAM_ROUNDS)


def test_compiled_few_row_products_keep_one_packed_copy_per_weight(record, monkeypatch):
    """The opaque product compiled inference calls (decode.few_rows_linear): F.linear's values
    (a stacked (E, I, D) weight read as (E I, D)), one packed copy per weight tensor, rebuilt
    after an in-place update, dropped with the tensor; in code being compiled for a few CPU rows
    compiled_linear calls it (a whole-model graph holds it), elsewhere it is F.linear."""
    import gc

    from dsv3.model import decode

    if not decode.packing(torch.float32):
        pytest.skip("oneDNN does not run fp32 on this CPU")
    monkeypatch.setenv("DSV3_KERNELS", "decode_linear=packed")
    packs = []
    real = decode._pack
    monkeypatch.setattr(decode, "_pack", lambda w: packs.append(w.shape) or real(w))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 16, 32, generator=g)
    x = torch.randn(2, 32, generator=g)
    with torch.inference_mode():
        for _ in range(2):
            y = decode.few_rows_linear(x, w)
            torch.testing.assert_close(y, x @ w.reshape(48, 32).t(), rtol=1e-5, atol=1e-5)
    assert packs == [(48, 32)]
    w.mul_(-1)
    with torch.inference_mode():
        torch.testing.assert_close(decode.few_rows_linear(x, w), x @ w.reshape(48, 32).t(), rtol=1e-5, atol=1e-5)
    assert len(packs) == 2 and id(w) in decode._compiled_packs
    key = id(w)
    del w
    gc.collect()
    assert key not in decode._compiled_packs

    lin = torch.nn.Linear(32, 24, bias=False)
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.inference_mode():
        out = torch.compile(lambda t: decode.project(lin, t), backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)
    assert any("few_rows_linear" in op for op in ops)
    assert torch.equal(decode.project(lin, x), lin(x))  # eager: the module itself


def test_remembered_answers_follow_the_state_and_the_pinned_environment(record, monkeypatch):
    """A hot path's remembered choice is asked again when DSV3_KERNELS or the choices change,
    never kept while candidates are timed; inside pinned() DSV3_KERNELS is read once."""
    asked = []

    def answer():
        asked.append(1)
        return kernels._forced() or "rule"

    assert kernels.remembered(("op", 1), answer) == "rule" and kernels.remembered(("op", 1), answer) == "rule"
    assert len(asked) == 1
    monkeypatch.setenv("DSV3_KERNELS", "rules")
    assert kernels.remembered(("op", 1), answer) == "rules" and len(asked) == 2
    with kernels.pinned():
        monkeypatch.setenv("DSV3_KERNELS", "op=x")  # not seen until the pinned call ends
        assert kernels.remembered(("op", 1), answer) == "rules" and len(asked) == 2
    assert kernels.remembered(("op", 1), answer) == {"op": "x"} and len(asked) == 3
    monkeypatch.setattr(kernels, "_measuring", 1)
    kernels.remembered(("op", 2), answer)
    kernels.remembered(("op", 2), answer)
    assert len(asked) == 5  # asked each time while timing, nothing kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_implementations_update_alike_and_the_run_takes_the_measured_one(dtype, record, monkeypatch):
    """torch AdamW fused and foreach give the same weights after three updates (to rounding);
    the choice is measured once per dtype and rounded size (both timed, recorded); the run's
    optimizer (dsv3.parallel.engine.make_optimizer) is built with the chosen or forced one."""
    from dsv3.config import load_config
    from dsv3.parallel.engine import ADAMW_KERNELS, adamw_kernel, make_optimizer

    gen = torch.Generator().manual_seed(0)
    shapes = [(33, 17), (17,), (5, 4, 3)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(3)]
    after = {}
    for name in ADAMW_KERNELS:
        ws = [w.clone().requires_grad_() for w in init]
        opt = torch.optim.AdamW(ws, lr=1e-2, weight_decay=0.1, **{name: True})
        for gs in grads:
            for w, g in zip(ws, gs):
                w.grad = g.clone()
            opt.step()
        after[name] = [w.detach().float() for w in ws]
    # bf16: foreach rounds each step of the update to bf16, fused once: up to 4 units in the last place
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=4 * 2**-7)
    for a, b, w in zip(*after.values(), init):
        assert (a - w.float()).abs().max() > 5e-3  # each moved the weights (by about 3 lr)
        torch.testing.assert_close(a, b, **tol)
    params = [torch.zeros(100, 60, dtype=dtype) for _ in range(70)]  # 420,000 elements, 70 tensors
    choice = adamw_kernel(params)
    name = str(dtype).removeprefix("torch.")
    entry = kernels.choices()[f"optimizer | {name} 524288 in 64"]
    assert entry["choice"] == choice and set(entry["ms"]) == set(ADAMW_KERNELS)
    assert adamw_kernel(params, torch.float32) == kernels.choices()["optimizer | float32 524288 in 64"]["choice"]
    assert adamw_kernel(params[:3]) in ADAMW_KERNELS and f"optimizer | {name} 32768 in 4" in kernels.choices()
    assert adamw_kernel([torch.zeros(3, device="meta")]) == "fused"  # not a CPU: the rule
    cfg = load_config(None, tiny_model())
    groups = [{"params": params[:40], "weight_decay": 0.1}, {"params": params[40:], "weight_decay": 0.0}]
    assert make_optimizer(groups, cfg).defaults[choice] is True
    for forced in ADAMW_KERNELS:
        monkeypatch.setenv("DSV3_KERNELS", f"optimizer={forced}")
        opt = make_optimizer(groups, cfg)
        assert opt.defaults[forced] is True and not any(opt.defaults[k] for k in ADAMW_KERNELS if k != forced)


def test_precision_auto_takes_the_faster_one_and_bf16_is_told_when_fp32_is_faster(record, monkeypatch):
    """``auto`` becomes the precision whose linear layer trained faster here (recorded with both
    timings, bf16 kept within the margin); an explicit bf16 stays bf16, with a note when fp32
    measured faster; fp32 asks nothing; a GPU gets bf16 without measuring."""
    cpu = torch.device("cpu")
    assert kernels.resolve_precision("fp32", cpu) == ("fp32", None)
    assert kernels.choices() == {}  # nothing measured for fp32
    choice, note = kernels.resolve_precision("auto", cpu)
    (key,) = kernels.choices()
    entry = kernels.choices()[key]
    assert key == "precision | linear train 512x512x512" and set(entry["ms"]) == {"bf16", "fp32"}
    ms = entry["ms"]
    assert choice == entry["choice"] == ("bf16" if ms["bf16"] <= ms["fp32"] * (1 + kernels.MARGIN) else "fp32")
    assert note == (
        f"train.precision=auto: {choice} on {kernels.device_name(cpu)} (a linear layer's forward and backward: "
        f"bf16 {ms['bf16']:g} ms, fp32 {ms['fp32']:g} ms)"
    )
    assert json.loads(record.read_text()).popitem()[1][key] == entry  # the machine's record
    bf16, bf16_note = kernels.resolve_precision("bf16", cpu, "--precision")
    assert bf16 == "bf16" and (bf16_note is None) == (choice == "bf16")
    if bf16_note:
        assert bf16_note.startswith("--precision=bf16 runs slower than fp32 on this CPU (a linear layer's")
        assert bf16_note.endswith("; --precision=fp32 (or auto) is faster here")
    # forced either way (DSV3_KERNELS): the same answers without timings
    for forced in ("fp32", "bf16"):
        monkeypatch.setattr(kernels, "_made", {})
        monkeypatch.setenv("DSV3_KERNELS", f"precision={forced}")
        assert kernels.resolve_precision("auto", cpu)[0] == forced
        note = kernels.resolve_precision("bf16", cpu)[1]
        assert note == (
            None
            if forced == "bf16"
            else "train.precision=bf16 runs slower than fp32 on this CPU; train.precision=fp32 (or auto) is faster here"
        )
    monkeypatch.setenv("DSV3_KERNELS", "rules")  # the rule: bf16
    assert kernels.resolve_precision("auto", cpu)[0] == "bf16"
    assert kernels.resolve_precision("auto", torch.device("cuda")) == ("bf16", "train.precision=auto: bf16 on cuda")
    assert kernels.resolve_precision("bf16", torch.device("cuda")) == ("bf16", None)


def test_assume_constant_result_sets_the_mark_torch_sets():
    """:func:`kernels.assume_constant_result` marks a function as the public
    ``torch.compiler.assume_constant_result`` does in this torch (which it stands in for while
    ``torch._dynamo`` is not imported), and defers to it once it is."""

    def public():
        return 1

    def ours():
        return 1

    assert torch.compiler.assume_constant_result(public) is public
    with mock.patch.dict(sys.modules):  # (restored on exit)
        sys.modules.pop("torch._dynamo", None)
        assert kernels.assume_constant_result(ours) is ours
    assert vars(ours) == vars(public) == {"_dynamo_marked_constant": True}
    assert kernels.known_true(True) and not kernels.known_true(3 < 2)
