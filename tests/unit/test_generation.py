"""Generation: left-padded batches equal single rows, repetition penalty, stop ids and finish
reasons, the incremental MTP draft, and MTP speculative decoding equal to plain greedy."""

from __future__ import annotations

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.errors import DsvError
from dsv3.generation import (
    LENGTH,
    STOP,
    apply_repetition_penalty,
    generate,
    generate_batch,
    generate_speculative,
)
from dsv3.model import Transformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=96,
        dim=48,
        inter_dim=96,
        moe_inter_dim=32,
        n_layers=2,
        n_dense_layers=1,
        n_heads=4,
        n_routed_experts=8,
        n_activated_experts=2,
        n_expert_groups=2,
        n_limited_groups=1,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_seq_len=96,
        mtp_depth=1,
        init_std=0.12,
    )
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return model.eval()


def greedy_reference(model, prompt, n, penalty=1.0):
    """Greedy continuation by full forwards over the whole sequence (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[torch.tensor(ids)] = True
            ids.append(int(apply_repetition_penalty(logits, seen, penalty).argmax()))
    return ids[len(prompt) :]


PROMPTS = [[5, 17, 60, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [42], [9, 9, 9, 9, 9, 9, 9, 9]]


@pytest.mark.parametrize(
    "kw", [dict(), dict(q_lora_rank=0, rope_factor=4.0, original_seq_len=8)], ids=["plain", "yarn"]
)
def test_left_padded_batch_equals_each_row_alone(kw):
    model = random_model(tiny(**kw), seed=1)
    batch = generate_batch(model, PROMPTS, max_new_tokens=20, temperature=0)
    for prompt, res in zip(PROMPTS, batch):
        alone = generate(model, prompt, max_new_tokens=20, temperature=0)
        assert res.ids == alone
        assert res.finish_reason == LENGTH and len(res.ids) == 20
    assert batch[0].ids == greedy_reference(model, PROMPTS[0], 20)


def test_padded_prefill_and_decode_logits_match_unpadded():
    """The attention mask and per-row rope positions make padding invisible to the logits."""
    model = random_model(tiny(), seed=2)
    short, long = [7, 8, 9], [1, 2, 3, 4, 5, 6, 7]
    seen = []
    batch = generate_batch(
        model, [long, short], max_new_tokens=6, temperature=0, on_token=lambda row, i: seen.append((row, i))
    )
    ref = greedy_reference(model, short, 6)
    assert batch[1].ids == ref
    assert [i for row, i in seen if row == 1] == ref  # streaming callback per row, in order
    # the exact logits of the padded row equal the unpadded full forward
    P = len(long)
    pad = P - len(short)
    ids = torch.tensor([[0] * pad + short])
    cols = torch.arange(P)
    mask = ((cols[:, None] >= cols[None, :]) & (cols[None, :] >= pad)) | torch.eye(P, dtype=torch.bool)
    pos = (cols - pad).clamp(min=0)[None]
    cache = model.new_cache(1, P + 1)
    with torch.no_grad():
        got = model(ids, cache=cache, attn_mask=mask[None, None], position_ids=pos)[0, -1]
        want = model(torch.tensor([short]))[0, -1]
        assert (got - want).abs().max().item() < 1e-5
        nxt = int(want.argmax())
        key_ok = torch.cat([cols >= pad, torch.ones(1, dtype=torch.bool)])  # (P + 1,)
        got = model(
            torch.tensor([[nxt]]),
            cache=cache,
            attn_mask=key_ok[None, None, None],
            position_ids=torch.tensor([[len(short)]]),
        )[0, -1]
        want = model(torch.tensor([short + [nxt]]))[0, -1]
        assert (got - want).abs().max().item() < 1e-5


def test_stop_ids_and_finish_reasons():
    model = random_model(tiny(), seed=3)
    free = generate_batch(model, PROMPTS[:2], max_new_tokens=12, temperature=0)
    stop_a, stop_b = free[0].ids[4], free[1].ids[7]  # ids each row produces on its own
    res = generate_batch(model, PROMPTS[:2], max_new_tokens=12, temperature=0, stop_ids=[stop_a, stop_b])
    for r, f in zip(res, free):
        cut = next(k for k, i in enumerate(f.ids) if i in (stop_a, stop_b))
        assert r.ids == f.ids[: cut + 1] and r.ids[-1] in (stop_a, stop_b)
        assert r.finish_reason == STOP
    assert generate(model, PROMPTS[0], 12, temperature=0, eos_ids=[stop_a]) == res[0].ids


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits
    model = random_model(tiny(), seed=4)
    prompt = PROMPTS[3]
    got = generate_batch(model, [prompt, PROMPTS[0]], 16, temperature=0, repetition_penalty=1.8)
    assert got[0].ids == greedy_reference(model, prompt, 16, penalty=1.8)
    assert got[1].ids == greedy_reference(model, PROMPTS[0], 16, penalty=1.8)
    assert got[0].ids != generate(model, prompt, 16, temperature=0)


def test_sampling_is_seeded_per_row():
    model = random_model(tiny(), seed=5)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=11)
    a = generate_batch(model, PROMPTS[:2], **kw)
    b = generate_batch(model, PROMPTS[:2], **kw)
    assert [r.ids for r in a] == [r.ids for r in b]
    assert a[0].ids == generate(model, PROMPTS[0], **kw)  # row 0 uses seed + 0


def test_bad_settings():
    model = random_model(tiny(), seed=0)
    with pytest.raises(ValueError):
        generate_batch(model, [[1], []], 4)
    with pytest.raises(ValueError):
        generate(model, [1], model.cfg.max_seq_len)
    with pytest.raises(ValueError):
        generate(model, [1], 4, repetition_penalty=0)


def test_incremental_mtp_draft_matches_training_path():
    model = random_model(tiny(), seed=6)
    T = 12
    ids = torch.randint(0, model.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the training forward's depth-1 path: states 0..T-2 with the embeddings of tokens 1..T-1
        h = model.hidden_states(ids)
        mod = model.mtp[0]
        full_h, _ = mod(h[:, : T - 1], model.embed_tokens(ids[:, 1:]), model.rope_cos[: T - 1], model.rope_sin[: T - 1])
        full = model.lm_head(mod.shared_head.norm(full_h)).float()
        cache = model.new_mtp_cache(1, T)
        parts = [model.mtp_draft(h[:, :5], ids[:, 1:6], cache)]  # a prefill, then 2 + 1 + ... positions
        parts.append(model.mtp_draft(h[:, 5:7], ids[:, 6:8], cache))
        for t in range(7, T - 1):
            parts.append(model.mtp_draft(h[:, t : t + 1], ids[:, t + 1 : t + 2], cache))
        inc = torch.cat(parts, dim=1)
    assert cache.length == T - 1
    assert (inc - full).abs().max().item() < 1e-5


def test_speculative_equals_greedy_on_random_model():
    model = random_model(tiny(), seed=7)
    for prompt in PROMPTS:
        plain = generate(model, prompt, 60, temperature=0)
        res, stats = generate_speculative(model, prompt, 60)
        assert res.ids == plain and res.finish_reason == LENGTH
        assert stats.tokens == 60 and stats.forwards == 1 + stats.drafted
        assert stats.tokens == stats.forwards + stats.accepted  # each accepted draft saves one forward
    # edge cases: one and two tokens, a stop id, the repetition penalty
    for n in (1, 2, 3):
        assert generate_speculative(model, PROMPTS[0], n)[0].ids == generate(model, PROMPTS[0], n, temperature=0)
    plain = generate(model, PROMPTS[1], 30, temperature=0)
    stop = plain[9]
    res, _ = generate_speculative(model, PROMPTS[1], 30, stop_ids=[stop])
    assert res.ids == generate(model, PROMPTS[1], 30, temperature=0, eos_ids=[stop]) and res.finish_reason == STOP
    res, _ = generate_speculative(model, PROMPTS[2], 30, repetition_penalty=1.5)
    assert res.ids == generate(model, PROMPTS[2], 30, temperature=0, repetition_penalty=1.5)


def trained_periodic_model(steps: int = 60) -> Transformer:
    """A tiny model trained (main + MTP loss) on a periodic sequence, so its drafts are good."""
    torch.manual_seed(0)
    model = random_model(tiny(init_std=0.05), seed=8).train()
    period = torch.tensor([11, 23, 35, 47, 59, 71, 83, 13, 29])
    seq = period.repeat(8)[:65]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    starts = torch.arange(4) * 2
    x = torch.stack([seq[s : s + 48] for s in starts])
    y = torch.stack([seq[s + 1 : s + 49] for s in starts])
    for _ in range(steps):
        out = model(x, y)
        loss = out.local_loss(mtp_lambda=1.0, alpha=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_speculative_equals_greedy_with_accepted_drafts():
    model = trained_periodic_model()
    prompt = [11, 23, 35]
    plain = generate(model, prompt, 70, temperature=0)
    res, stats = generate_speculative(model, prompt, 70)
    assert res.ids == plain
    assert stats.acceptance_rate > 0.5 and stats.forwards < 50  # most drafts accepted: fewer forwards


def test_speculative_rejects_sampling_and_models_without_mtp():
    from dsv3.generation import check_speculative

    with pytest.raises(DsvError, match="greedy"):
        check_speculative(random_model(tiny()), temperature=0.8)
    with pytest.raises(DsvError, match="mtp_depth"):
        generate_speculative(random_model(tiny(mtp_depth=0)), [1, 2], 4)
