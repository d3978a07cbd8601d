"""Loading only the owned tensors (dsv3.checkpoint.weights, dsv3.model.init.materialize_): a process that
holds one pipeline stage and one block of experts reads exactly those tensors (rows) from a
dsv3 checkpoint or a Hugging Face folder, gets the saved values bit for bit, and allocates
nothing else."""

import json
import math

import pytest
import torch
from helpers import dsv3_checkpoint
from safetensors.torch import load_file, save_file
from test_init import _LocalExperts, meta_model, small_cfg

from dsv3.checkpoint import CheckpointWeights, HFWeights, export_hf, load_hf_model, open_weights
from dsv3.errors import DsvError
from dsv3.model.init import allocated_elements, materialize_
from dsv3.parallel.layout import stage_prefixes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EP, EP_RANK, COUNTS, STAGE = 4, 1, [2, 1], 1  # experts [2, 4) of 8; stage 1 = block 2 + head + MTP
A, B = 2, 4


class Recording:
    """A weights source that records every read (name, rows)."""

    def __init__(self, source):
        self.source, self.shapes, self.reads = source, source.shapes, []

    def read(self, name, rows=None):
        self.reads.append((name, rows))
        return self.source.read(name, rows)


def saved_checkpoint(folder, cfg):
    """A dsv3 checkpoint of a random model whose norms and routing biases are not their initial
    values; returns (its state dict, the model)."""
    model = dsv3_checkpoint(folder, cfg, seed=5)
    return {k: v.contiguous() for k, v in model.state_dict().items()}, model


def rank_model(cfg):
    """The meta model of EP rank 1 of 4 on pipeline stage 1 of [2, 1], and its ownership test."""
    m = meta_model(cfg)
    for layer in [*m.layers[cfg.n_dense_layers :], *m.mtp]:
        layer.mlp.experts = _LocalExperts(layer.mlp.experts, EP_RANK * (8 // EP), 8 // EP)
    prefixes = tuple(stage_prefixes(m, COUNTS, STAGE))
    return m, lambda name: name.startswith(prefixes)


def owned_count(cfg, full):
    """Hand count: block 2 (MoE, 2 of 8 experts) + embedding + final norm + head + MTP (MoE, 2 of 8)."""
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    moe_block = sum(p.numel() for p in full.layers[2].parameters()) - 6 * per_expert
    mtp = sum(p.numel() for p in full.mtp.parameters()) - 6 * per_expert
    return moe_block + mtp + 2 * cfg.vocab_size * cfg.dim + cfg.dim


def check_owned(m, owned, ref):
    """Owned parameters equal ``ref`` (experts: rows [A, B)); the others are still meta."""
    for name, p in m.named_parameters():
        if not owned(name):
            assert p.is_meta, name
        elif ".experts." in name:
            assert torch.equal(p, ref[name][A:B]), name
        else:
            assert torch.equal(p, ref[name]), name
    for g in m.moe_gates():  # every process holds every routing bias
        name = next(n for n, b in m.named_buffers() if b is g.e_score_correction_bias)
        assert torch.equal(g.e_score_correction_bias, ref[name]), name


def test_checkpoint_rank_reads_only_its_stage_and_expert_rows(tmp_path):
    cfg = small_cfg(q_lora_rank=16)
    state, full = saved_checkpoint(tmp_path / "ckpt", cfg)
    got_cfg, source = open_weights(tmp_path / "ckpt")
    assert got_cfg == cfg and isinstance(source, CheckpointWeights)
    rec = Recording(source)
    m, owned = rank_model(cfg)
    n = materialize_(m, "cpu", 0, 0.0, owned=owned, source=rec)
    assert n == owned_count(cfg, full) == allocated_elements(m)
    check_owned(m, owned, state)
    assert torch.equal(m.rope_cos, full.rope_cos)
    # what was read: the owned tensors, the expert blocks as rows [2, 4) only, every routing bias
    reads = dict(rec.reads)
    assert len(reads) == len(rec.reads)  # nothing twice
    want = {n for n, _ in m.named_parameters() if owned(n)} | {n for n in state if "e_score_correction_bias" in n}
    assert set(reads) == want
    assert {rows for name, rows in reads.items() if ".experts." in name} == {(A, B)}
    assert all(rows is None for name, rows in reads.items() if ".experts." not in name)


def test_checkpoint_that_does_not_match_is_one_line(tmp_path):
    cfg = small_cfg()
    saved_checkpoint(tmp_path / "ckpt", cfg)
    weights = tmp_path / "ckpt" / "model.safetensors"
    with pytest.raises(
        DsvError,
        match=r"does not match its config.yaml \(layers.0.mlp.down_proj.weight has shape "
        r"\(32, 48\), the config gives \(32, 40\); \d+ problem\(s\)\); use a matching",
    ):
        CheckpointWeights(weights, small_cfg(inter_dim=40))
    with pytest.raises(DsvError, match=r"does not match the run's config \(missing mtp\.1\."):
        CheckpointWeights(weights, small_cfg(mtp_depth=2), "the run's config")
    weights.write_bytes(b"\x00" * 3)
    with pytest.raises(DsvError, match="the checkpoint is corrupt"):
        open_weights(tmp_path / "ckpt")
    with pytest.raises(DsvError, match="does not exist"):
        open_weights(tmp_path / "nowhere")


def quantize_fp8(w, block):
    """Blockwise e4m3 quantization as in DeepSeek's release: ``w ~= q * scale_inv`` per block."""
    m, n = w.shape
    grid = (math.ceil(m / block), math.ceil(n / block))
    s = torch.empty(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            s[i, j] = w[i * block : (i + 1) * block, j * block : (j + 1) * block].abs().max().clamp(min=1e-12) / 448
    full = s.repeat_interleave(block, 0)[:m].repeat_interleave(block, 1)[:, :n]
    return (w / full).to(torch.float8_e4m3fn), s


def test_hf_folder_rank_reads_only_its_expert_keys(tmp_path):
    cfg = small_cfg(q_lora_rank=16)
    state, full = saved_checkpoint(tmp_path / "ckpt", cfg)
    hf = export_hf(tmp_path / "ckpt", tmp_path / "hf")  # per-expert keys, one file, float32
    _, source = open_weights(hf)
    assert isinstance(source, HFWeights) and source.cfg == cfg
    rec = Recording(source)
    m, owned = rank_model(cfg)
    assert materialize_(m, "cpu", 0, 0.0, owned=owned, source=rec) == owned_count(cfg, full)
    check_owned(m, owned, state)
    assert {rows for name, rows in rec.reads if ".experts." in name} == {(A, B)}

    # the layouts the importer reads: shards, FP8 blocks, rotate-half rope rows, fused experts;
    # a rank gets exactly what the full import gives
    weights = load_file(str(hf / "model.safetensors"))
    out = {}
    for k, v in weights.items():
        if k.startswith("model.layers.2.mlp.experts."):
            continue  # fused below
        if (k.startswith("model.layers.3.mlp.experts.") or k.endswith("self_attn.q_b_proj.weight")) and v.dim() == 2:
            out[k], out[k + "_scale_inv"] = quantize_fp8(v, 8)
        else:
            out[k] = v
    pre = "model.layers.2.mlp.experts"
    gate_up = [
        torch.cat([weights[f"{pre}.{e}.gate_proj.weight"], weights[f"{pre}.{e}.up_proj.weight"]]) for e in range(8)
    ]
    out[f"{pre}.gate_up_proj"] = torch.stack(gate_up)
    out[f"{pre}.down_proj"] = torch.stack([weights[f"{pre}.{e}.down_proj.weight"] for e in range(8)])
    hard = tmp_path / "hard"
    hard.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in out.items() if ".layers.3." not in k},
        "model-00002-of-00002.safetensors": {k: v for k, v in out.items() if ".layers.3." in k},
    }
    for file, part in shards.items():
        save_file(part, str(hard / file))
    index = {"weight_map": {k: file for file, part in shards.items() for k in part}}
    (hard / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((hf / "config.json").read_text())
    config.update(rope_interleave=False, quantization_config={"quant_method": "fp8", "weight_block_size": [8, 8]})
    (hard / "config.json").write_text(json.dumps(config))

    ref = load_hf_model(hard).state_dict()
    m, owned = rank_model(cfg)
    rec = Recording(HFWeights(hard))
    materialize_(m, "cpu", 0, 0.0, owned=owned, source=rec)
    check_owned(m, owned, ref)
    assert torch.equal(m.layers[2].mlp.experts.up_proj, state["layers.2.mlp.experts.up_proj"][A:B])  # fused, exact
    assert not torch.equal(m.mtp[0].mlp.experts.gate_proj, state["mtp.0.mlp.experts.gate_proj"][A:B])  # FP8
    kv = "layers.2.self_attn.kv_a_proj_with_mqa.weight"  # rope rows permuted, not quantized
    assert not torch.equal(m.get_parameter(kv), state[kv])
    assert torch.equal(m.get_parameter(kv).sort(0).values, state[kv].sort(0).values)


def test_layout_free_read_skips_other_stages(tmp_path):
    """Resuming a single-stage ZeRO-0 checkpoint on a pipeline stage reads the fp32 weights and
    Adam moments of that stage's parameters only, with their saved values and step."""
    from dsv3.config import Config
    from dsv3.parallel.layout_free import read_layout_free

    cfg = small_cfg()
    model = dsv3_checkpoint(tmp_path / "ckpt", cfg, seed=3)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [n for n, p in trainable if p.ndim >= 2] + [n for n, p in trainable if p.ndim < 2]
    moments = {n: torch.full(dict(trainable)[n].shape, float(i)) for i, n in enumerate(order)}
    opt = {i: {"exp_avg": moments[n], "exp_avg_sq": moments[n] + 0.5, "step": 7} for i, n in enumerate(order)}
    torch.save({"optimizer": {"state": opt}}, tmp_path / "ckpt" / "mp_rank_00_model_states.pt")
    mine = tuple(stage_prefixes(model, COUNTS, STAGE))
    with torch.no_grad():  # what PipelineRun leaves: the other stages' parameters on the meta device
        for name, p in list(model.named_parameters()):
            if not name.startswith(mine):
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                module._parameters[leaf] = torch.nn.Parameter(torch.empty_like(p, device="meta"))
    state, step = read_layout_free(tmp_path / "ckpt", Config(model=cfg), model)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert step == 7
    assert sorted(state) == sorted(n for n, p in model.named_parameters() if not p.is_meta)
    assert 0 < len(state) < len(order)
    for name, entry in state.items():
        assert torch.equal(entry["fp32"], saved[name])
        assert torch.equal(entry["exp_avg"], moments[name]) and torch.equal(entry["exp_avg_sq"], moments[name] + 0.5)
