"""The fixed-shape decoding step (CUDA graphs on a GPU): the same logits as the ordinary step.

On CPU the fixed-shape step runs eagerly, so these tests check what a captured graph replays:
the cache slot and rope positions kept on the device, attention over every cache position
under the key mask, the buffers advanced by the step itself. The capture itself is checked on
a CUDA device only (skipped elsewhere).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from test_decode import random_model, tiny

from dsv3.errors import DsvError
from dsv3.generation import generate_batch
from dsv3.model.graph_decode import GraphedDecoder, decoder_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_fixed_shape_step_gives_the_ordinary_steps_logits(q_lora_rank):
    model = random_model(tiny(q_lora_rank=q_lora_rank))
    prompts = [[5, 6, 7, 8, 9, 10], [3, 4], [100, 101, 102, 103]]  # left padding 0, 4, 2
    P, B, steps, total = 6, 3, 7, 20
    pad = torch.tensor([P - len(p) for p in prompts])
    ids = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
    cols = torch.arange(total)
    key_ok = cols[None, :] >= pad[:, None]
    pos = (cols[None, :] - pad[:, None]).clamp(min=0)
    causal = cols[:P, None] >= cols[None, :P]
    mask = ((causal & key_ok[:, None, :P]) | torch.eye(P, dtype=torch.bool))[:, None]
    g = torch.Generator().manual_seed(0)
    feed = torch.randint(0, 128, (steps, B, 1), generator=g)
    with torch.inference_mode():
        cache = model.new_cache(B, total)
        want = [model(ids, cache=cache, attn_mask=mask, position_ids=pos[:, :P])[:, -1]]
        dec = GraphedDecoder(model, B, total)
        got = [dec.prefill(ids, pad, attn_mask=mask, position_ids=pos[:, :P])]
        for i in range(steps):
            end = P + i + 1
            kw = dict(attn_mask=key_ok[:, None, None, :end], position_ids=pos[:, end - 1 : end])
            want.append(model(feed[i], cache=cache, **kw)[:, -1])
            got.append(dec.step(feed[i]))
            assert dec.length == end and int(dec.slot) == end  # the step advanced its own slot
    assert dec.graph is None and not dec.capture  # CPU: the fixed-shape step ran eagerly
    for w, g_ in zip(want, got):
        assert g_.shape == (B, 128) and g_.dtype == torch.float32
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5)
    # the latent cache holds what the ordinary step wrote, padding columns included
    for c_dyn, c_fix in zip(cache, dec.cache):
        torch.testing.assert_close(c_fix.buf[:, : P + steps], c_dyn.buf[:, : P + steps], rtol=1e-5, atol=1e-5)


def test_generate_batch_with_fixed_shape_steps_gives_the_same_tokens():
    model = random_model(tiny())
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102, 103]]
    plain = generate_batch(model, prompts, 12, temperature=0, repetition_penalty=1.3)
    fixed = generate_batch(model, prompts, 12, temperature=0, repetition_penalty=1.3, cuda_graph=True)
    assert [r.ids for r in fixed] == [r.ids for r in plain]
    stop = plain[1].ids[3]  # row 1 stops early, the others run on
    plain = generate_batch(model, prompts, 12, temperature=0, stop_ids=[stop])
    fixed = generate_batch(model, prompts, 12, temperature=0, stop_ids=[stop], cuda_graph=True)
    assert fixed == plain and plain[1].finish_reason == "stop"
    kept = model.__dict__["_dsv3_graphed"]
    generate_batch(model, prompts, 12, temperature=0, cuda_graph=True)
    assert model.__dict__["_dsv3_graphed"] is kept  # same batch and length: the decoder is reused
    generate_batch(model, prompts[:2], 12, temperature=0, cuda_graph=True)
    assert model.__dict__["_dsv3_graphed"] is not kept


def test_a_kept_capture_is_dropped_when_the_weights_change():
    model = random_model(tiny())
    dec = decoder_for(model, 1, 16)
    assert decoder_for(model, 1, 16) is dec and decoder_for(model, 1, 17) is not dec
    dec = decoder_for(model, 1, 16)
    ids = torch.tensor([[1, 2, 3]])
    marker = object()  # stands for a captured graph (CPU has none)
    dec.graph, dec._weights = marker, dec._tensor_state()
    dec.prefill(ids)
    assert dec.graph is marker  # unchanged model: the capture is kept for the next prompt
    with torch.no_grad():
        model.layers[1].mlp.experts.down_proj.mul_(1.5)  # an in-place update (an optimizer step)
    dec.prefill(ids)
    assert dec.graph is None


def test_fixed_shape_decoding_refuses_what_it_cannot_run():
    model = random_model(tiny())
    with pytest.raises(DsvError, match="CUDA device"):
        GraphedDecoder(model, 1, 16, capture=True)
    with pytest.raises(DsvError, match="runs the eager dsv3 Transformer; drop --compile"):
        GraphedDecoder(torch.nn.Linear(2, 2), 1, 16)
    model.hf_device_map = {"": "cpu"}  # as accelerate marks a dispatched model
    with pytest.raises(DsvError, match="whole model on one device; drop --max-memory and --offload-folder"):
        generate_batch(model, [[1, 2]], 4, temperature=0, cuda_graph=True)
    del model.hf_device_map
    handle = model.layers[0].register_forward_hook(lambda *a: None)
    with pytest.raises(DsvError, match="forward hooks"):
        generate_batch(model, [[1, 2]], 4, temperature=0, cuda_graph=True)
    handle.remove()
    dec = GraphedDecoder(model, 1, 5)
    with pytest.raises(ValueError, match="prefill"):
        dec.step(torch.tensor([[1]]))
    dec.prefill(torch.tensor([[1, 2, 3, 4]]))
    dec.step(torch.tensor([[5]]))
    with pytest.raises(ValueError, match="holds 5 positions"):
        dec.step(torch.tensor([[6]]))


class _FakeGraph:
    """Stands for ``torch.cuda.CUDAGraph`` on CPU: its capture (:func:`_fake_capture`) runs the
    step once and then puts back what the run changed, as a capture runs no kernel; ``replay``
    runs the decoder's step into the output tensor of the capture."""

    decoder = None
    captures = 0

    def replay(self):
        d = _FakeGraph.decoder
        d.logits.copy_(d._run())


@contextlib.contextmanager
def _fake_capture(graph, fail=False):
    d = _FakeGraph.decoder
    state = [d.slot, d.positions, d.key_ok, *(c.buf for c in d.cache)]
    saved = [t.clone() for t in state]
    _FakeGraph.captures += 1
    yield
    if fail:
        raise RuntimeError("operation not permitted when stream is capturing")
    for t, v in zip(state, saved):
        t.copy_(v)


def test_capture_warm_up_and_replay_keep_the_decoding_state(monkeypatch):
    """The CUDA path of GraphedDecoder with the CUDA calls replaced: warm-up runs on the side
    stream leave the step's state as it was, the first step captures, every step replays into
    the one output buffer, a weight change captures again, and a failed capture is one clear
    error."""
    no_stream = types.SimpleNamespace(wait_stream=lambda s: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: no_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: no_stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _fake_capture)
    model = random_model(tiny())
    dec = GraphedDecoder(model, 2, 16)
    dec.capture = True  # (the constructor refuses capture off CUDA)
    monkeypatch.setattr(_FakeGraph, "decoder", dec)  # (dropped after the test, with the model)
    monkeypatch.setattr(_FakeGraph, "captures", 0)
    ref = GraphedDecoder(model, 2, 16, capture=False)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    feed = torch.randint(0, 128, (6, 2, 1), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # a second prompt reuses the capture
        torch.testing.assert_close(dec.prefill(ids), ref.prefill(ids))
        outs = []
        for t in feed:
            out = dec.step(t)
            outs.append(out)
            torch.testing.assert_close(out, ref.step(t), rtol=0, atol=0)
            assert int(dec.slot) == int(ref.slot) == dec.length
        assert all(o is dec.logits for o in outs)  # one output buffer, overwritten by each step
    assert _FakeGraph.captures == 1
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    dec.prefill(ids)
    ref.prefill(ids)
    torch.testing.assert_close(dec.step(feed[0]), ref.step(feed[0]), rtol=0, atol=0)
    assert _FakeGraph.captures == 2  # the changed weight was captured again
    monkeypatch.setattr(torch.cuda, "graph", lambda g: _fake_capture(g, fail=True))
    dec.graph = None
    with pytest.raises(DsvError, match="capturing the decoding step as a CUDA graph failed .*without --cuda-graph"):
        dec.step(feed[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_graph_replays_the_eager_fixed_shape_step(dtype):
    model = random_model(tiny(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1)).to("cuda", dtype)
    prompts = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(0)).tolist()
    eager = generate_batch(model, prompts, 10, temperature=0)
    graphed = generate_batch(model, prompts, 10, temperature=0, cuda_graph=True)
    assert model.__dict__["_dsv3_graphed"].graph is not None  # captured once, replayed per token
    if dtype == torch.float32:  # (bf16 rounds differently over the longer masked rows)
        assert [r.ids for r in graphed] == [r.ids for r in eager]
    with torch.inference_mode():
        dec = decoder_for(model, 1, 12)
        ids = torch.tensor([[3, 4, 5]], device="cuda")
        first = dec.prefill(ids)
        dec.step(torch.tensor([[7]], device="cuda"))
        replayed = dec.step(torch.tensor([[8]], device="cuda")).clone()
        plain = GraphedDecoder(model, 1, 12, capture=False)
        plain.prefill(ids)
        plain.step(torch.tensor([[7]], device="cuda"))
        torch.testing.assert_close(replayed, plain.step(torch.tensor([[8]], device="cuda")), rtol=1e-4, atol=1e-4)
        assert first.isfinite().all()
