"""Parity with Hugging Face transformers' DeepSeek-V3, and the import/export converter.

Reference: ``transformers.DeepseekV3ForCausalLM`` (transformers >= 5), eager attention, fp32,
random weights of unit-scale activations (so logits spread and greedy choices are not near
ties) and a random routing bias (so the selection-only bias path is exercised).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import HF_VOCAB as VOCAB  # noqa: E402
from helpers import dsv3_checkpoint, hf_config, hf_load, random_hf_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import DeepseekV3Config  # noqa: E402

from dsv3 import load_model  # noqa: E402
from dsv3.checkpoint import export_hf, import_hf, load_hf_model  # noqa: E402
from dsv3.checkpoint.hf_config import hf_config_to_model_config, model_config_to_hf  # noqa: E402
from dsv3.checkpoint.hf_tensors import dequantize_fp8  # noqa: E402
from dsv3.config import ModelConfig  # noqa: E402
from dsv3.errors import DsvError  # noqa: E402
from dsv3.generation import generate  # noqa: E402
from dsv3.model import Transformer, rope_cos_sin, yarn_rope_scale, yarn_softmax_scale  # noqa: E402

TOL = 1e-5  # fp32 logits (observed <= 5e-6); the exactness cases' defects move them by more than 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


CASES = {
    # no query compression, one expert group, plain rope, all layers MoE
    "nolora-g1-rope-dense0": dict(
        q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0, num_hidden_layers=2
    ),
    # query compression, 4 groups of 2 (2 kept), YaRN active beyond 16 positions, 2 dense layers
    "lora-g4-yarn-dense2": dict(
        q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=2, rope_parameters=dict(YARN)
    ),
    # YaRN with mscale = mscale_all_dim != 1, rotate-half weight layout (rope_interleave false)
    "lora-g2-yarn-mscale-halfrope": dict(
        q_lora_rank=24, rope_interleave=False, rope_parameters=dict(YARN, mscale=0.7, mscale_all_dim=0.7)
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_parity(case, tmp_path):
    """HF -> import -> dsv3 logits; dsv3 -> export -> HF logits; greedy decoding agrees."""
    cfg = hf_config(**CASES[case])
    ref = random_hf_model(cfg, seed=len(case))
    ref.save_pretrained(tmp_path / "hf", max_shard_size="60KB")  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    import_hf(tmp_path / "hf", tmp_path / "dsv3")
    model = load_model(tmp_path / "dsv3")
    assert model.cfg.mtp_depth == 0  # transformers does not save MTP layers

    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    diff = (got - want).abs().max().item()
    assert diff < TOL, f"{case}: import parity {diff:.3g}"

    # the same weights loaded straight from the HF folder (no files written)
    with torch.no_grad():
        assert (load_hf_model(tmp_path / "hf")(ids) - want).abs().max().item() < TOL

    if model.cfg.rope_factor > 1:  # YaRN must matter at these lengths: without it logits move
        off = Transformer(ModelConfig(**{**vars(model.cfg), "rope_factor": 1.0}))
        off.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (off.eval()(ids) - want).abs().max().item() > 1e-2

    export_hf(tmp_path / "dsv3", tmp_path / "hf2", max_shard_bytes=100_000)
    back, info = hf_load(tmp_path / "hf2")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert back.model.rotary_emb.attention_scaling == 1.0
    with torch.no_grad():
        diff2 = (back(ids).logits - want).abs().max().item()
    assert diff2 < TOL, f"{case}: export parity {diff2:.3g}"

    prompt = ids[0, :5].tolist()
    back.generation_config.eos_token_id = None
    back.generation_config.pad_token_id = 0
    hf_out = back.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, 5:].tolist()
    ours = generate(model, prompt, max_new_tokens=8, temperature=0)
    assert ours == hf_out


# ------------------------------------------------------------- exactness: latent eps, YaRN mscales


def shrink_latents(model: torch.nn.Module, kv_lora_rank: int, scale: float = 1e-3) -> None:
    """Scale the rows of ``q_a_proj`` and the ``c_kv`` rows of ``kv_a_proj_with_mqa`` by ``scale``.

    The latents then have RMS ~``scale`` (1e-3 from unit-scale weights), so ``mean(c**2)`` is
    ~1e-6 and the latent norms' epsilon (1e-6 in the reference) decides their output. The
    ``k_rope`` rows are left alone so rope stays visible. Works on dsv3 and transformers
    models alike (same module names).
    """
    with torch.no_grad():
        for _, mod in model.named_modules():
            if hasattr(mod, "kv_a_proj_with_mqa"):
                mod.kv_a_proj_with_mqa.weight[:kv_lora_rank] *= scale
                if getattr(mod, "q_a_proj", None) is not None:
                    mod.q_a_proj.weight *= scale


def defect_variants(model: Transformer) -> dict[str, Transformer]:
    """Copies of ``model`` with one of the two fixed defects put back, where it would change anything.

    ``latent-eps``: ``q_a_layernorm`` / ``kv_a_layernorm`` with ``rms_norm_eps`` instead of 1e-6.
    ``rope-scale``: cos/sin tables without ``yarn_rope_scale`` (the mscale ratio dropped).
    """
    cfg, out = model.cfg, {}
    if cfg.rms_norm_eps != 1e-6:
        bad = Transformer(cfg)
        bad.load_state_dict(model.state_dict())
        for _, mod in bad.named_modules():
            for name in ("q_a_layernorm", "kv_a_layernorm"):
                if hasattr(mod, name):
                    getattr(mod, name).eps = cfg.rms_norm_eps
        out["latent-eps"] = bad.eval()
    if yarn_rope_scale(cfg) != 1.0:
        bad = Transformer(cfg)
        bad.load_state_dict(model.state_dict())
        bad.rope_cos, bad.rope_sin = rope_cos_sin(ModelConfig(**{**vars(cfg), "mscale_all_dim": None}))
        out["rope-scale"] = bad.eval()
    return out


@torch.no_grad()
def cached_decode_logits(model: Transformer, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits (B, T, V) from the latent-cache path: ``prefill`` tokens at once, then one at a time."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prefill], cache=cache)]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], cache=cache))
    return torch.cat(out, dim=1)


def check_exact(model: Transformer, want: torch.Tensor, ids: torch.Tensor, what: str) -> None:
    """``model`` (full and cached-decode paths) gives ``want`` within TOL; each defect would not."""
    with torch.no_grad():
        diff = (model(ids) - want).abs().max().item()
        assert diff < TOL, f"{what}: full forward differs by {diff:.3g}"
        diff = (cached_decode_logits(model, ids, prefill=7) - want).abs().max().item()
        assert diff < TOL, f"{what}: latent-cache decode differs by {diff:.3g}"
        for defect, bad in defect_variants(model).items():
            assert (bad(ids) - want).abs().max().item() > 1e-2, f"{what}: {defect} would go unnoticed"


NO_ALL_DIM = {k: v for k, v in YARN.items() if k != "mscale_all_dim"}

TOL_CASES = {
    # rms_norm_eps 1e-5 on the block/final norms; latents of RMS ~1e-3, where the latent
    # norms' own eps (1e-6) decides their output
    "eps1e-5-small-latents-qlora": (dict(q_lora_rank=24, rms_norm_eps=1e-5), True),
    "eps1e-5-small-latents-nolora": (
        dict(q_lora_rank=None, rms_norm_eps=1e-5, first_k_dense_replace=0, num_hidden_layers=2),
        True,
    ),
    # YaRN with mscale != mscale_all_dim: softmax by m(1.0)**2, cos/sin by m(0.5)/m(1.0) = 0.9391
    "yarn-mscale0.5-all1": (dict(q_lora_rank=24, rope_parameters=dict(YARN, mscale=0.5, mscale_all_dim=1.0)), False),
    # the same with rotate-half weights, small latents and eps 1e-5 together
    "yarn-mscale0.707-all1-halfrope-eps": (
        dict(
            q_lora_rank=24,
            rope_interleave=False,
            rms_norm_eps=1e-5,
            rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=1.0),
        ),
        True,
    ),
    # an explicit attention_factor overrides the mscale ratio (folded into dsv3's mscale)
    "yarn-attention-factor1.2": (
        dict(q_lora_rank=24, rope_parameters=dict(YARN, mscale=0.7, mscale_all_dim=1.0, attention_factor=1.2)),
        False,
    ),
    # mscale without mscale_all_dim: transformers scales cos/sin by m(1) and not the softmax
    "yarn-mscale-only": (dict(q_lora_rank=None, rope_parameters=dict(NO_ALL_DIM, mscale=0.7)), False),
}


@pytest.mark.parametrize("case", list(TOL_CASES))
def test_exactness_hf_to_dsv3_and_back(case, tmp_path):
    """HF -> dsv3 (load_hf_model, import_hf) and back (export_hf -> transformers), logits within 1e-5."""
    kw, small = TOL_CASES[case]
    cfg = hf_config(**kw)
    ref = random_hf_model(cfg, seed=len(case))
    if small:
        shrink_latents(ref, cfg.kv_lora_rank)
    ref.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits

    direct = load_hf_model(tmp_path / "hf")
    assert yarn_softmax_scale(direct.cfg) == pytest.approx(ref.model.layers[0].self_attn.scaling, rel=1e-12)
    assert yarn_rope_scale(direct.cfg) == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-12)
    if cfg.rope_parameters["rope_type"] == "yarn":
        assert ref.model.rotary_emb.attention_scaling != 1.0  # the cases exercise the cos/sin factor
    check_exact(direct, want, ids, f"{case} load_hf_model")
    import_hf(tmp_path / "hf", tmp_path / "dsv3")
    model = load_model(tmp_path / "dsv3")
    assert model.cfg == direct.cfg
    check_exact(model, want, ids, f"{case} import_hf")

    export_hf(tmp_path / "dsv3", tmp_path / "hf2")
    back, info = hf_load(tmp_path / "hf2")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert back.model.rotary_emb.attention_scaling == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-12)
    assert back.model.layers[0].self_attn.scaling == pytest.approx(ref.model.layers[0].self_attn.scaling, rel=1e-12)
    with torch.no_grad():
        diff = (back(ids).logits - want).abs().max().item()
    assert diff < TOL, f"{case}: export parity {diff:.3g}"


NATIVE_YARN = dict(rope_factor=4.0, original_seq_len=16)


@pytest.mark.parametrize(
    "kw, small",
    [
        (dict(q_lora_rank=24, rms_norm_eps=1e-5), True),
        (dict(q_lora_rank=0, rms_norm_eps=1e-5, n_dense_layers=0), True),
        (dict(q_lora_rank=24, mscale=0.5, mscale_all_dim=1.0, **NATIVE_YARN), False),
        (dict(q_lora_rank=24, mscale=0.5, mscale_all_dim=1.0, rms_norm_eps=1e-5, **NATIVE_YARN), True),
        (dict(q_lora_rank=0, mscale=0.0, mscale_all_dim=1.0, **NATIVE_YARN), False),  # exported with attention_factor
        (dict(q_lora_rank=24, mscale=0.5, mscale_all_dim=0.0, **NATIVE_YARN), False),  # exported with attention_factor
    ],
    ids=["eps-qlora", "eps-nolora", "yarn-0.5-1", "yarn-0.5-1-eps", "yarn-0-1", "yarn-0.5-0"],
)
def test_exactness_dsv3_to_hf(kw, small, tmp_path):
    """A dsv3 model -> export_hf -> transformers gives its logits within 1e-5, and imports back equal."""
    mcfg = ModelConfig(
        **{
            **dict(
                vocab_size=VOCAB,
                dim=64,
                inter_dim=96,
                moe_inter_dim=32,
                n_layers=2,
                n_dense_layers=1,
                n_heads=4,
                n_routed_experts=8,
                n_activated_experts=2,
                n_expert_groups=2,
                n_limited_groups=1,
                kv_lora_rank=32,
                qk_nope_head_dim=16,
                qk_rope_head_dim=8,
                v_head_dim=16,
                max_seq_len=64,
                mtp_depth=0,
                init_std=0.125,
            ),
            **kw,
        }
    )
    model = dsv3_checkpoint(tmp_path / "ckpt", mcfg, seed=4)
    if small:
        shrink_latents(model, mcfg.kv_lora_rank)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ckpt" / "model.safetensors")
        )
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids)
    for defect, bad in defect_variants(model).items():
        with torch.no_grad():
            assert (bad(ids) - want).abs().max().item() > 1e-2, f"{defect} would go unnoticed"

    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    rope = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]
    back, info = hf_load(tmp_path / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert back.model.rotary_emb.attention_scaling == pytest.approx(yarn_rope_scale(mcfg), rel=1e-12)
    assert back.model.layers[0].self_attn.scaling == pytest.approx(yarn_softmax_scale(mcfg), rel=1e-12)
    assert ("attention_factor" in rope) == (mcfg.rope_factor > 1 and not (mcfg.mscale and mcfg.mscale_all_dim))
    with torch.no_grad():
        diff = (back(ids).logits - want).abs().max().item()
    assert diff < TOL, f"export parity {diff:.3g}"
    with torch.no_grad():
        assert (cached_decode_logits(model, ids, prefill=7) - want).abs().max().item() < TOL
    import_hf(tmp_path / "hf", tmp_path / "again")
    assert load_model(tmp_path / "again").cfg == mcfg


def test_mtp_roundtrip_and_bf16_export(tmp_path):
    """dsv3 (with MTP) -> HF -> dsv3 is exact; HF loads all but the MTP layer without complaint."""
    mcfg = ModelConfig(
        vocab_size=VOCAB,
        dim=64,
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
        max_seq_len=64,
        mtp_depth=1,
        rope_factor=4.0,
        original_seq_len=16,
        init_std=0.1,
    )
    model = dsv3_checkpoint(tmp_path / "ckpt", mcfg)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    with pytest.raises(DsvError, match=r"hf is already a Hugging Face folder \(config.json\); pass a dsv3 run "):
        export_hf(tmp_path / "hf", tmp_path / "hf-again")
    hf_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_json["architectures"] == ["DeepseekV3ForCausalLM"] and hf_json["model_type"] == "deepseek_v3"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for k in (
        "enorm.weight",
        "hnorm.weight",
        "eh_proj.weight",
        "shared_head.norm.weight",
        "shared_head.head.weight",
        "embed_tokens.weight",
        "mlp.experts.7.down_proj.weight",
    ):
        assert f"model.layers.2.{k}" in keys

    back, info = hf_load(tmp_path / "hf")
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(k.startswith("model.layers.2.") for k in info["unexpected_keys"])
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() < TOL

    import_hf(tmp_path / "hf", tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    orig = model.state_dict()
    assert set(again) == set(orig)
    for k, v in orig.items():
        assert torch.equal(again[k], v), k

    export_hf(tmp_path / "ckpt", tmp_path / "hf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf16" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.o_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"


def test_fused_expert_layout_is_accepted(tmp_path):
    """``experts.gate_up_proj`` (E, 2I, D) + ``experts.down_proj`` (E, D, I), transformers' in-memory layout."""
    ref = random_hf_model(hf_config(), seed=5)
    ref.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}  # fused names
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (load_hf_model(tmp_path / "hf")(ids) - ref(ids).logits).abs().max().item() < TOL


def test_mtp_matches_transformers_mtp_model(tmp_path):
    """dsv3's MTP losses equal those of transformers' generic ``MtpModel`` on exported weights.

    ``MtpModel`` reads the main model's post-final-norm state for depth 1 and each depth's
    ``shared_head.norm`` output for the next, as the released DeepSeek-V3 MTP weights expect.
    """
    layers = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(getattr(layers, "MtpModel", None), "forward_layer"):  # added in 5.x, reworked later
        pytest.skip("this transformers version has no MtpModel with forward_layer")
    mcfg = ModelConfig(
        vocab_size=VOCAB,
        dim=64,
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
        max_seq_len=64,
        mtp_depth=2,
        init_std=0.12,
    )
    model = dsv3_checkpoint(tmp_path / "ckpt", mcfg, seed=3)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    main, _ = hf_load(tmp_path / "hf")
    # transformers finds MTP weights through this list (it names layer 61 of the 671B model)
    main._keys_to_ignore_on_load_unexpected = [r"model\.layers\.2\..*", r"model\.layers\.3\..*"]
    mtp = layers.MtpModel.from_pretrained(main).eval()
    assert torch.equal(mtp.layers[1].eh_proj.weight, model.mtp[1].eh_proj.weight)

    T = 24
    window = torch.randint(0, VOCAB, (1, T + 1), generator=torch.Generator().manual_seed(4))
    inputs, labels = window[:, :T], window[:, 1:]
    with torch.no_grad():
        out = model(inputs, labels)
        h = main(inputs, output_hidden_states=True).hidden_states[-1]  # (1, T, D), after model.norm
        for k in (1, 2):
            pos = torch.arange(k, T)[None]
            h = mtp.forward_layer(k - 1, h[:, : T - k], pos, None, input_ids=inputs[:, k:])
            logits = mtp._project_to_logits(h)  # (1, T-k, V)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, k:].flatten(), reduction="sum")
            assert abs(ce.item() - out.mtp_loss_sum[k - 1].item()) < 1e-4 * ce.item(), k


# --------------------------------------------------------------------------- FP8


def quantize_fp8(w: torch.Tensor, block: int):
    """Blockwise e4m3 quantization as in DeepSeek's release: ``w ~= q * scale_inv`` per block."""
    m, n = w.shape
    gm, gn = math.ceil(m / block), math.ceil(n / block)
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    s = torch.empty(gm, gn)
    for i in range(gm):
        for j in range(gn):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def reference_dequant(q: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out.to(torch.bfloat16)


def test_dequantize_fp8_blocks():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))  # partial edge blocks
    q, s = quantize_fp8(w, 128)
    assert s.shape == (2, 3)
    got = dequantize_fp8(q, s)
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    assert torch.equal(got, reference_dequant(q, s, 128))
    assert ((got.float() - w).abs() <= 0.07 * w.abs() + 1e-2).all()  # e4m3 keeps ~2-3 significant bits
    with pytest.raises(DsvError, match="scale"):
        dequantize_fp8(q, s[:, :2])


def test_import_fp8_checkpoint(tmp_path):
    ref = random_hf_model(hf_config(q_lora_rank=24), seed=7)
    ref.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(f))
    block, quantized, expect = 16, {}, {}
    for k, v in state.items():
        if k.startswith("model.layers.") and k.endswith(".weight") and v.dim() == 2 and ".mlp.gate." not in k:
            q, s = quantize_fp8(v, block)
            quantized[k], quantized[k + "_scale_inv"] = q, s
            expect[k] = reference_dequant(q, s, block)
        else:
            quantized[k] = v
    save_file(quantized, str(f))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))

    import_hf(tmp_path / "hf", tmp_path / "dsv3")
    got = load_file(str(tmp_path / "dsv3" / "model.safetensors"))
    assert got["layers.0.self_attn.q_b_proj.weight"].dtype == torch.bfloat16
    assert got["layers.1.mlp.gate.weight"].dtype == torch.float32
    assert torch.equal(got["layers.0.self_attn.q_b_proj.weight"], expect["model.layers.0.self_attn.q_b_proj.weight"])
    assert torch.equal(got["layers.0.mlp.down_proj.weight"], expect["model.layers.0.mlp.down_proj.weight"])
    for e in range(8):
        hf_key = f"model.layers.2.mlp.experts.{e}.gate_proj.weight"
        assert torch.equal(got["layers.2.mlp.experts.gate_proj"][e], expect[hf_key])


# --------------------------------------------------------------------------- configs


OFFICIAL_671B = {  # config.json of the official release (rope_scaling style, remote-code keys)
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "v_head_dim": 128,
    "vocab_size": 129280,
    "initializer_range": 0.02,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def test_official_config_maps_to_architecture_table():
    cfg = hf_config_to_model_config(OFFICIAL_671B)
    assert (cfg.dim, cfg.n_layers, cfg.n_dense_layers, cfg.inter_dim, cfg.n_heads) == (7168, 61, 3, 18432, 128)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (
        1536,
        512,
        128,
        64,
        128,
    )
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.n_activated_experts) == (256, 1, 8)
    assert (cfg.n_expert_groups, cfg.n_limited_groups, cfg.moe_inter_dim, cfg.route_scale) == (8, 4, 2048, 2.5)
    assert (cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow, cfg.mscale) == (40, 4096, 32, 1, 1)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.mtp_depth, cfg.rms_norm_eps) == (129280, 163840, 1, 1e-6)
    # the transformers 5 form of the same config gives the same result
    assert hf_config_to_model_config(model_config_to_hf(cfg)) == cfg
    new_style = DeepseekV3Config(
        **{
            k: v
            for k, v in OFFICIAL_671B.items()
            if k not in ("topk_method", "scoring_func", "moe_layer_freq", "quantization_config")
        }
    ).to_dict()
    assert hf_config_to_model_config(new_style) == cfg


def test_exported_config_builds_in_transformers():
    mcfg = ModelConfig(rope_factor=4.0, original_seq_len=256, mscale=0.0, q_lora_rank=32, mtp_depth=2)
    hf = model_config_to_hf(mcfg)
    assert hf_config_to_model_config(hf) == mcfg
    built = DeepseekV3Config(**hf)
    assert built.rope_parameters["rope_type"] == "yarn" and built.num_nextn_predict_layers == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "unknown architecture"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"topk_method": "greedy"}, "topk_method='greedy'"),
        ({"norm_topk_prob": False}, "norm_topk_prob=False"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
        (
            {"rope_scaling": dict(OFFICIAL_671B["rope_scaling"], factor=1, attention_factor=0.9)},
            r"^config.json yarn factor=1.0 with attention_factor=0.9 scales the rope tables without YaRN",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
    ],
)
def test_unsupported_config_values(change, message):
    with pytest.raises(DsvError, match=message) as info:
        hf_config_to_model_config({**OFFICIAL_671B, **change})
    assert "\n" not in str(info.value)


def test_unequal_mscales_are_imported():
    """DeepSeek-V2-style ``mscale`` != ``mscale_all_dim`` (once refused) maps onto both fields."""
    v2_style = dict(OFFICIAL_671B["rope_scaling"], mscale=0.707)
    cfg = hf_config_to_model_config({**OFFICIAL_671B, "rope_scaling": v2_style})
    assert (cfg.mscale, cfg.mscale_all_dim) == (0.707, 1.0)
    assert yarn_softmax_scale(cfg) == pytest.approx(0.135234, abs=5e-7)  # mscale_all_dim sets the softmax
    assert yarn_rope_scale(cfg) == pytest.approx((0.0707 * math.log(40) + 1) / (0.1 * math.log(40) + 1), rel=1e-12)
    hf = model_config_to_hf(cfg)
    assert (hf["rope_parameters"]["mscale"], hf["rope_parameters"]["mscale_all_dim"]) == (0.707, 1.0)
    assert "attention_factor" not in hf["rope_parameters"]
    assert hf_config_to_model_config(hf) == cfg


@pytest.mark.parametrize("attention_factor", [None, 1.0, 1.3])
@pytest.mark.parametrize("all_dim", [None, 0.0, 0.707, 1.0])
@pytest.mark.parametrize("mscale", [None, 0.0, 0.5, 1.0])
def test_yarn_mscales_give_what_transformers_computes(mscale, all_dim, attention_factor):
    """Every mscale / mscale_all_dim / attention_factor combination, in and out, against transformers.

    transformers scales the softmax by m(mscale_all_dim)**2 only when mscale_all_dim is set and
    non-zero, and cos/sin by attention_factor, else by the ratio m(mscale) / m(mscale_all_dim)
    when both are non-zero, else by m(1); dsv3 must reproduce both numbers on import and
    write a config.json that transformers turns into the same numbers.
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    def hf_factors(hc: DeepseekV3Config) -> tuple[float, float]:
        return DeepseekV3Attention(hc, 0).scaling, DeepseekV3RotaryEmbedding(hc).attention_scaling

    rope = dict(NO_ALL_DIM)
    for key, value in (("mscale", mscale), ("mscale_all_dim", all_dim), ("attention_factor", attention_factor)):
        rope.pop(key, None)
        if value is not None:
            rope[key] = value
    hc = hf_config(q_lora_rank=24, rope_parameters=rope)
    want_scaling, want_table = hf_factors(hc)
    cfg = hf_config_to_model_config(hc.to_dict())
    assert yarn_softmax_scale(cfg) == pytest.approx(want_scaling, rel=1e-12)
    assert yarn_rope_scale(cfg) == pytest.approx(want_table, rel=1e-12)
    if attention_factor is None and mscale and all_dim:
        assert (cfg.mscale, cfg.mscale_all_dim) == (mscale, None if mscale == all_dim else all_dim)
    out = model_config_to_hf(cfg)
    assert hf_config_to_model_config(out) == cfg
    got_scaling, got_table = hf_factors(DeepseekV3Config(**out))
    assert got_scaling == pytest.approx(want_scaling, rel=1e-12)
    assert got_table == pytest.approx(want_table, rel=1e-12)


def test_yarn_factors_by_hand():
    """Factor 4, mscale 0.5, mscale_all_dim 1, qk head dim 24: softmax 0.264642, cos/sin x 0.9391."""
    m_half, m_one = 0.1 * 0.5 * math.log(4) + 1, 0.1 * 1.0 * math.log(4) + 1  # 1.069315, 1.138629
    assert 24**-0.5 * m_one**2 == pytest.approx(0.264642, abs=5e-7)
    assert m_half / m_one == pytest.approx(0.9391, abs=5e-5)
    hc = hf_config(q_lora_rank=24, rope_parameters=dict(YARN, mscale=0.5, mscale_all_dim=1.0))
    cfg = hf_config_to_model_config(hc.to_dict())
    assert cfg.qk_head_dim == 24 and (cfg.mscale, cfg.mscale_all_dim) == (0.5, 1.0)
    assert yarn_softmax_scale(cfg) == pytest.approx(0.264642, abs=5e-7)
    assert yarn_rope_scale(cfg) == pytest.approx(0.9391, abs=5e-5)
    ref = random_hf_model(hc, seed=0)
    assert ref.model.layers[0].self_attn.scaling == pytest.approx(0.264642, abs=5e-7)
    assert ref.model.rotary_emb.attention_scaling == pytest.approx(0.9391, abs=5e-5)
    cos, sin = rope_cos_sin(cfg)
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, (m_half / m_one) ** 2))


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def sharded_hf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "model"
    random_hf_model(hf_config(), seed=11).save_pretrained(d, max_shard_size="60KB")
    return d


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard(sharded_hf, tmp_path):
    d = copy_folder(sharded_hf, tmp_path / "hf")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(DsvError, match=f"shard .*{shard.name}.* is missing"):
        import_hf(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_shape(sharded_hf, tmp_path):
    d = copy_folder(sharded_hf, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DsvError, match=r"experts\.0\.down_proj\.weight has shape \[64, 32\], expected \[64, 48\]"):
        import_hf(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_and_missing_config(sharded_hf, tmp_path):
    d = copy_folder(sharded_hf, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DsvError, match="unknown architecture"):
        import_hf(d, tmp_path / "out")
    (d / "config.json").unlink()
    with pytest.raises(DsvError, match="no config.json"):
        import_hf(d, tmp_path / "out")


def test_missing_tensor_and_nonempty_out(sharded_hf, tmp_path):
    d = copy_folder(sharded_hf, tmp_path / "hf")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DsvError, match=r"lacks experts \[3\] for layers\.1\.mlp\.experts\.up_proj"):
        import_hf(d, tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(DsvError, match="not empty"):
        import_hf(sharded_hf, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
