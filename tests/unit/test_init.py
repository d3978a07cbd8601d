"""Layout-independent initialization (dsv3.model.init): every parameter and every routed expert
has its own seed, so a process that materializes only its pipeline stage or expert block gets
the values of the unsplit model and allocates nothing else."""

import pytest
import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model import Transformer
from dsv3.model.init import (
    allocated_elements,
    init_module_,
    init_rule,
    init_tensor_,
    materialize_,
    normal_values,
    tensor_seed,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
        mtp_depth=1,
        route_scale=2.5,
        init_std=0.02,
    )
    base.update(kw)
    return ModelConfig(**base)


def full_model(cfg, seed=7):
    m = Transformer(cfg)
    m.init_weights(seed=seed)
    return m


def meta_model(cfg):
    with torch.device("meta"):
        return Transformer(cfg)


def test_seed_is_a_stable_hash_of_seed_name_and_expert():
    # pinned (first 8 bytes of sha256(b"0/embed_tokens.weight"), little-endian, 63 bits): changing
    # the scheme would silently change every run's initial weights
    assert tensor_seed(0, "embed_tokens.weight") == 7217937783527894398
    assert tensor_seed(0, "layers.1.mlp.experts.gate_proj", 3) == 8155850969527477766
    seeds = {
        tensor_seed(0, "a"),
        tensor_seed(1, "a"),
        tensor_seed(0, "b"),
        tensor_seed(0, "a", 0),
        tensor_seed(0, "a", 1),
    }
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


def test_meta_build_materialized_equals_the_full_model_exactly(monkeypatch):
    monkeypatch.setattr("dsv3.model.init.init_threads", lambda: 4)  # values drawn on 4 threads, in any order
    cfg = small_cfg()
    full = full_model(cfg)
    m = meta_model(cfg)
    n = materialize_(m, "cpu", 7, cfg.init_std)
    assert n == sum(p.numel() for p in full.parameters())
    a, b = full.state_dict(), m.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in ("rope_cos", "rope_sin"):  # non-persistent buffers recomputed
        assert torch.equal(getattr(full, k), getattr(m, k))
    # one named parameter, computed alone
    w = init_tensor_(torch.empty(cfg.vocab_size, cfg.dim), "embed_tokens.weight", 7, cfg.init_std)
    assert torch.equal(w, full.embed_tokens.weight)
    # a submodule initialized under its full name
    blk = full_model(cfg, seed=0).layers[2]
    init_module_(blk, 7, cfg.init_std, prefix="layers.2.")
    assert torch.equal(blk.self_attn.kv_b_proj.weight, full.layers[2].self_attn.kv_b_proj.weight)


def test_expert_block_equals_the_full_models_slice():
    cfg = small_cfg()
    full = full_model(cfg)
    name = "layers.1.mlp.experts.down_proj"
    ref = full.layers[1].mlp.experts.down_proj
    a, b = 2, 6  # any block [a, b) of the 8 experts, as an expert-parallel rank would hold it
    block = init_tensor_(
        torch.empty(b - a, cfg.dim, cfg.moe_inter_dim), name, 7, cfg.init_std, "experts", first_expert=a
    )
    assert torch.equal(block, ref[a:b])
    assert torch.equal(block[0], normal_values((cfg.dim, cfg.moe_inter_dim), cfg.init_std, 7, name, expert=2))
    assert not torch.equal(ref[0], ref[1])  # each expert its own stream


def test_seeds_and_names_give_different_values_and_rules_match_the_old_distribution():
    cfg = small_cfg()
    one, two = full_model(cfg, 1), full_model(cfg, 2)
    for (n, p), q in zip(one.named_parameters(), two.parameters()):
        if init_rule(*_owner(one, n))[0] in ("normal", "experts"):
            assert not torch.equal(p, q), n
        else:
            assert torch.equal(p, torch.ones_like(p)) and torch.equal(q, p), n  # RMSNorm
    assert not torch.equal(one.layers[0].self_attn.o_proj.weight, one.layers[1].self_attn.o_proj.weight)
    for g in one.moe_gates():
        assert torch.equal(g.e_score_correction_bias, torch.zeros(cfg.n_routed_experts))
    # N(0, 0.006) on a million values: sample mean within 4 sigma (0.006 * 4 / 1000), sample std
    # within 4 sigma of its own spread (sigma / sqrt(2n) = 0.07 %)
    x = normal_values((1000, 1000), 0.006, 0, "layers.0.self_attn.o_proj.weight").double()
    assert abs(x.mean().item()) < 2.4e-5
    assert x.std().item() == pytest.approx(0.006, rel=3e-3)
    # the model draws the same way: the 97 x 32 embedding's std near init_std (4 sigma: 5 %)
    assert one.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)


def _owner(model, name):
    owner, _, leaf = name.rpartition(".")
    return model.get_submodule(owner), leaf


def test_device_and_dtype_do_not_change_the_values():
    cfg = small_cfg()
    w = init_tensor_(
        torch.empty(cfg.inter_dim, cfg.dim, dtype=torch.bfloat16), "layers.0.mlp.up_proj.weight", 7, cfg.init_std
    )
    assert torch.equal(w, full_model(cfg).layers[0].mlp.up_proj.weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="meta device"):
        init_tensor_(torch.empty(2, device="meta"), "x", 0, 0.1)
    with pytest.raises(ValueError, match="no initialization rule"):
        init_rule(nn.Conv1d(1, 1, 1), "weight")


class _LocalExperts(nn.Module):
    """What an expert-parallel rank holds for one MoE layer: experts [first, first + n) (meta until
    materialized), as dsv3.parallel.expert_parallel.ExpertParallelExperts builds it from a meta model."""

    def __init__(self, full, first, n):
        super().__init__()
        self.first_expert = first
        for w in ("gate_proj", "up_proj", "down_proj"):
            p = nn.Parameter(torch.empty((n,) + tuple(getattr(full, w).shape[1:]), device="meta"))
            p.allreduce = False  # the expert-parallel marks survive materialization
            setattr(self, w, p)


def test_pipeline_stage_and_expert_block_allocate_only_what_they_own():
    from dsv3.parallel.layout import stage_prefixes

    cfg = small_cfg()
    full = full_model(cfg)
    m = meta_model(cfg)
    assert allocated_elements(m) == 0
    ep, rank = 4, 1  # this process: EP rank 1 of 4 -> experts [2, 4)
    for layer in [*m.layers[1:], *m.mtp]:
        layer.mlp.experts = _LocalExperts(layer.mlp.experts, 2 * rank, 8 // ep)
    assert allocated_elements(m) == 0  # the split allocates nothing
    counts = [2, 1]
    prefixes = stage_prefixes(m, counts, 1)
    assert prefixes == ["layers.2.", "embed_tokens.", "norm.", "lm_head.", "mtp."]
    assert stage_prefixes(m, counts, 0) == ["embed_tokens.", "layers.0.", "layers.1."]
    n = materialize_(m, "cpu", 7, cfg.init_std, owned=lambda name: name.startswith(tuple(prefixes)))
    # hand count for stage 1: block 2 (MoE, 2 of 8 experts) + embedding + norm + head + MTP (MoE, 2 of 8)
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    moe_block = sum(p.numel() for p in full.layers[2].parameters()) - 6 * per_expert
    mtp = sum(p.numel() for p in full.mtp.parameters()) - 6 * per_expert
    want = moe_block + mtp + 2 * cfg.vocab_size * cfg.dim + cfg.dim
    assert n == want == allocated_elements(m)
    ref = dict(full.named_parameters())
    for name, p in m.named_parameters():
        if not name.startswith(tuple(prefixes)):
            assert p.is_meta, name
        elif ".experts." in name:
            assert torch.equal(p, ref[name][2:4]), name
            assert p.allreduce is False
        else:
            assert torch.equal(p, ref[name]), name
    for g_full, g in zip(full.moe_gates(), m.moe_gates()):  # every buffer exists on every stage
        assert torch.equal(g.e_score_correction_bias, g_full.e_score_correction_bias)
    assert torch.equal(m.rope_cos, full.rope_cos)


def test_init_weights_without_seed_follows_the_global_rng():
    cfg = small_cfg(n_layers=1, mtp_depth=0)
    a, b = Transformer(cfg), Transformer(cfg)
    torch.manual_seed(3)
    a.init_weights()
    torch.manual_seed(3)
    b.init_weights()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    torch.manual_seed(4)
    b.init_weights()
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_init_threads_share_the_cores_of_a_node(monkeypatch):
    from dsv3.model.init import init_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert init_threads() == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert init_threads() == 32
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "128")
    assert init_threads() == 1
