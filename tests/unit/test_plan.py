"""dsv3 plan: counts, memory per GPU, bubble and all-to-all volume, checked against numbers
worked out by hand and against the tensors autograd actually keeps."""

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from dsv3.cli import main
from dsv3.config import load_config
from dsv3.errors import DsvError
from dsv3.model import Transformer, kernels
from dsv3.model.attention import causal_attention, saved_form
from dsv3.parallel.layout import check_launch
from dsv3.plan import (
    ATTENTION_FORMS,
    GIB,
    Layout,
    ModelParts,
    a2a_buffer_bytes,
    a2a_volume_per_step,
    activation_bytes_per_token,
    check_divisible,
    in_flight_micro_batches,
    pipeline_bubble,
    plan,
    plan_layout,
    planned_activations,
    propose,
    split_counts,
    stage_layers,
    static_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
V3 = ROOT / "configs" / "deepseek_v3_671b.yaml"
# DeepSeek-V3's pre-training layout (report §3.2, §4.2): 2048 GPUs, 16 pipeline stages, 64-way
# expert parallelism, ZeRO-1, 4K sequences, 15360 sequences per step. Assumed here: one
# sequence per micro-batch, so 15360 / dp (= 128) = 120 micro-batches per step, and per-block
# activation checkpointing standing in for DeepSeek's recomputation of RMSNorm and the MLA
# up-projections and its FP8 activation caching (finer-grained, which dsv3 does not model).
DEEPSEEK_LAYOUT = [
    "parallel.pp=16",
    "parallel.ep=64",
    "parallel.zero_stage=1",
    "parallel.micro_batch_size=1",
    "parallel.grad_accum=120",
    "parallel.activation_checkpointing=true",
    "data.seq_len=4096",
]
# the 2-layer model of tests/helpers.py (tiny_overrides) (dense layer 0, MoE layer 1, one MTP module)
TINY = tiny_model()


@pytest.fixture(scope="module")
def v3_parts():
    with torch.device("meta"):
        return ModelParts.of(Transformer(load_config(V3).model))


def test_671b_split_and_deepseek_layout_fits(v3_parts):
    cfg = load_config(V3, DEEPSEEK_LAYOUT)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    experts, other = split_counts(model)
    assert experts == 58 * 256 * 3 * 7168 * 2048 == 653_908_770_816  # 58 MoE layers x 256 experts x SwiGLU
    assert experts + other == 671_026_404_352
    mem = static_bytes(other / 16, experts / 1024, check_divisible(2048, pp=16, ep=64), ep=64, zero_stage=1)
    # per GPU: 1/16 of the non-expert weights, 1/(16*64) of the experts; dp = 128, expert dp = 2
    local = other / 16 + experts / 1024
    assert mem.weights == pytest.approx(2 * local)
    # ZeRO-1: from the reduction to the update a rank keeps its partition of the gradients only
    assert mem.grads == pytest.approx(2 * (other / 16 / 128 + experts / 1024 / 2))
    assert mem.optimizer == pytest.approx(12 * (other / 16 / 128 + experts / 1024 / 2))
    assert mem.total / 2**30 == pytest.approx(7.45, abs=0.01)

    sp = plan_layout(cfg, v3_parts, Layout(2048, 16, 64, 1, 1, 120, True))
    assert sp.bubble == pytest.approx(15 / 135)  # (p-1)/(m+p-1)
    assert [len(r) for r in stage_layers(61, 16)] == [4] * 13 + [3] * 3
    # the trainer's split by parameter count (the 3 dense blocks are small): 6 blocks on stage 0
    assert v3_parts.stage_counts(16) == [6] + [4] * 11 + [3] * 3 + [2]
    # stage 0: 6 blocks, 16 micro-batches in flight, each block keeps its bf16 input (2 x 7168 bytes
    # per token), plus one MoE block recomputed: its activations for one 4096-token micro-batch;
    # a GPU's bf16 flash attention pads v (128) to the q/k head dim (192)
    assert sp.attention == "padded" and sp.attention_known
    act = activation_bytes_per_token(cfg.model, "bf16", "padded")
    s0 = sp.stages[0]
    assert s0.activations == pytest.approx(4096 * (16 * (6 * 2 * 7168 + 8) + act.block(True)))
    assert max(s.total for s in sp.stages) == sp.memory.total < 80 * GIB
    text = plan(cfg, 2048, 80)
    assert "main 671,026,404,352" in text and "activated per token 37,552,282,624" in text
    assert "fits in 80 GiB" in text and "does NOT" not in text
    assert "bubble 11.1% (1F1B: (p-1)/(m+p-1) = 15/135" in text


def test_671b_deepseek_layout_without_checkpointing_does_not_fit(v3_parts):
    cfg = load_config(V3, DEEPSEEK_LAYOUT)
    sp = plan_layout(cfg, v3_parts, Layout(2048, 16, 64, 1, 1, 120, False))
    # stage 0 keeps 16 micro-batches x 4096 tokens of 3 dense + 3 MoE blocks: far beyond 80 GiB
    act = activation_bytes_per_token(cfg.model, "bf16", "padded")
    assert sp.stages[0].activations == pytest.approx(16 * 4096 * (3 * act.block(False) + 3 * act.block(True) + 8))
    assert sp.memory.total > 150 * GIB


NO_MODEL_PARALLELISM = ["parallel.pp=1", "parallel.ep=1", "parallel.activation_checkpointing=false"]


def test_671b_config_is_deepseeks_layout_and_fits():
    text = plan(load_config(V3), 2048, 80)
    assert "pp=16 ep=64" in text and "fits in 80 GiB" in text


def test_671b_without_model_parallelism_does_not_fit_and_proposes():
    text = plan(load_config(V3, NO_MODEL_PARALLELISM), 2048, 80)
    needs = 2 * 671_026_404_352  # bf16 weights alone, unpartitioned at pp=1 ep=1
    assert "does NOT fit in 80 GiB: needs" in text and "GiB per GPU, has 80" in text
    assert float(text.split("needs ")[1].split(" GiB")[0].replace(",", "")) * GIB > needs
    assert "layouts fit in 80 GiB" in text and "use: parallel.pp=" in text


def test_671b_on_8_gpus_cannot_fit(v3_parts):
    cfg = load_config(V3, NO_MODEL_PARALLELISM)
    text = plan(cfg, 8, 80, propose_layouts=True, host_memory_gib=1024)
    assert "does NOT fit in 80 GiB" in text
    # 682.6B parameters x 16 bytes = 10,172 GiB: 128 GPUs of 80 GiB at the very least without
    # offloading; with it, ZeRO-3's host-side gradient partitions alone exceed a 1 TiB node
    assert "no layout fits in 80 GiB per GPU, 1024 GiB host memory per node: the smallest needs" in text
    assert "16 bytes per parameter, 10,172 GiB: at least 128 GPUs of 80 GiB without offloading" in text
    fitting, smallest = propose(cfg, v3_parts, 8, 80, host_memory_gib=1024)
    assert fitting == [] and smallest.memory.total > 1000 * GIB
    # without a host limit only ZeRO-3 with the parameters offloaded fits the GPUs
    fitting, _ = propose(cfg, v3_parts, 8, 80)
    assert fitting and all(sp.layout.zero_stage == 3 and sp.layout.offload_param != "none" for sp in fitting)
    assert all(sp.device_total <= 80 * GIB and sp.host_per_node > 1024 * GIB for sp in fitting)


def test_proposer_finds_a_fitting_layout_for_671b(v3_parts):
    cfg = load_config(V3, DEEPSEEK_LAYOUT)
    fitting, _ = propose(cfg, v3_parts, 2048, 80)
    assert fitting and all(sp.device_total <= 80 * GIB for sp in fitting)
    layouts = [sp.layout for sp in fitting]
    assert Layout(2048, 16, 64, 1, 1, 120, True) in layouts  # DeepSeek's own layout is among them
    for lay in layouts:  # global batch kept: 15360 sequences; no ZeRO-2 with a pipeline
        assert lay.micro_batch_size * lay.micro_batches * lay.dp == 15360
        assert lay.pp == 1 or lay.zero_stage == 1
        assert lay.zero_stage < 3 or lay.pp == lay.ep == 1  # ZeRO-3 only without model parallelism
    best = fitting[0]
    assert not best.layout.offloads  # fits without offloading: no host-link traffic
    assert best.fits(80) and plan_layout(cfg, v3_parts, best.layout).memory.total == best.memory.total


def test_activation_bytes_by_hand():
    m = load_config(None, TINY).model  # D=64 H=2 C=16 dn=16 dr=8 dv=16 F=128 I=32 E=8 K=2 G=2 Gk=1 V=512
    a32 = activation_bytes_per_token(m, "fp32")
    norm = 4 * 64 + 4 * 64 + 4  # input, output (kept by the next linear), 1/rms
    latent = 4 * (16 + 8) + 4 * 16 + 4  # kv_a output (the latent norm's input is a view), normalized, 1/rms
    assert a32.attention == norm + latent + 4 * 2 * 24 * 2 + 4 * 2 * 32 + 4 * 2 * 16 + 4 * 2
    assert a32.attention == 1456
    assert a32.dense_ffn == norm + 4 * 4 * 128 == 2564
    router = 4 * 8 + 8 * 2 + 4 * 2 + 12 + 8 * (2 * 2 + 1) + 2  # scores, top-K, weights, sums, group top-k, mask
    routed = 16 * 2 + 3 * 4 * 2 * 64 + 4 * 4 * 2 * 32 + 4 * 2
    assert a32.moe_ffn == norm + router + routed + 4 * 4 * 32 == 3738
    assert a32.head == norm + 4 * 512 + 9 == 2573  # logits, targets, mask
    assert a32.mtp_inner == 4 * 64 + 8 + 2 * 4 * 64 == 776  # embedding, two 1/rms, the concatenation
    assert a32.block_input == 256 and a32.embedding == 8

    a16 = activation_bytes_per_token(m, "bf16")
    norm = 2 * 64 + 2 * 64 + 4
    latent = 2 * (16 + 8) + 2 * 16 + 4
    assert a16.attention == norm + latent + 2 * 2 * 24 * 2 + 2 * 2 * 32 + 2 * 2 * 16 + 4 * 2
    assert a16.attention == 736
    assert a16.dense_ffn == norm + 4 * 2 * 128 == 1284
    router = 4 * 64 + 4 * 8 + 8 * 2 + 4 * 2 + 12 + 8 * (2 * 2 + 1) + 2  # + the gate's fp32 input copy
    routed = 16 * 2 + 3 * 2 * 2 * 64 + 4 * 2 * 2 * 32 + 2 * 2
    assert a16.moe_ffn == norm + router + routed + 4 * 2 * 32 == 2198
    assert a16.head == norm + 2 * 512 + 9 == 1293  # bf16 logits
    assert a16.mtp_inner == 2 * 64 + 8 + 2 * 2 * 64 == 392
    assert a16.block_input == 128
    with pytest.raises(DsvError, match="train.precision='fp16'"):
        activation_bytes_per_token(m, "fp16")


def test_attention_forms_by_hand():
    """What each attention kernel keeps, per token (H=2 heads, Dk = dn + dr = 24, dn = dv = 16,
    T = 64): the fused kernel q, k, the kv_b output, the output and a log-sum-exp per head."""
    m = load_config(None, TINY).model
    for a, precision in ((4, "fp32"), (2, "bf16")):
        rest = activation_bytes_per_token(m, precision).attention - (a * 2 * (24 + 24 + 32 + 16) + 4 * 2)

        def att(form, precision=precision, rest=rest):
            return activation_bytes_per_token(m, precision, form, 64).attention - rest

        # q, k, v and the output padded to 24, the log-sum-exp, the unpadded output for o_proj
        assert att("padded") == a * 2 * (4 * 24 + 16) + 4 * 2
        # fp32 copies of q and k (scaled), the probabilities and v, whatever the dtype; o_proj's input
        assert att("math") == 4 * 2 * (24 + 24 + 64 + 16) + a * 2 * 16
        # scaled q, k, the probabilities and v in the activations' dtype; o_proj's input
        assert att("matmul") == a * 2 * (24 + 24 + 64 + 16) + a * 2 * 16
    assert (
        activation_bytes_per_token(m, "fp32", "matmul", 128).attention
        - activation_bytes_per_token(m, "fp32", "matmul", 64).attention
        == 4 * 2 * 64
    )  # one more probability per head per extra key
    with pytest.raises(DsvError, match="give seq_len"):
        activation_bytes_per_token(m, "fp32", "matmul")
    with pytest.raises(DsvError, match="attention form 'flash' is unknown"):
        activation_bytes_per_token(m, "fp32", "flash", 64)


def test_tiny_stage_activations_by_hand():
    cfg = load_config(None, TINY + ["train.precision=fp32"])
    with torch.device("meta"):
        parts = ModelParts.of(Transformer(cfg.model))
    tokens = 4 * 64
    # pp=2: stage 0 = embedding + dense layer 0, 2 micro-batches in flight (m=3);
    # stage 1 = MoE layer 1 + head + MTP module (MoE block + its head), 1 in flight
    sp = plan_layout(cfg, parts, Layout(2, 2, 1, 1, 4, 3, False))
    assert sp.stages[0].activations == tokens * 2 * (1456 + 2564 + 8)
    assert sp.stages[1].activations == tokens * ((1456 + 3738) + 2573 + (776 + 1456 + 3738) + 2573)
    ck = plan_layout(cfg, parts, Layout(2, 2, 1, 1, 4, 3, True))
    # checkpointed: block inputs (+ ids) per micro-batch in flight, plus the recomputed block once
    assert ck.stages[0].activations == tokens * (2 * (256 + 8) + 1456 + 2564)
    assert ck.stages[1].activations == tokens * ((256 + 2573 + 256 + 2573) + (776 + 1456 + 3738))
    assert sp.stages[0].a2a_buffers == 0 and sp.a2a_bytes == 0  # ep=1: no all-to-all
    assert sp.bubble == pytest.approx(1 / 4)


def test_bubble_and_in_flight():
    assert pipeline_bubble(1, 8) == 0.0
    assert pipeline_bubble(4, 8) == pytest.approx(3 / 11)
    assert pipeline_bubble(16, 120) == pytest.approx(15 / 135)
    assert [in_flight_micro_batches(4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert [in_flight_micro_batches(4, s, 2) for s in range(4)] == [2, 2, 2, 1]
    assert in_flight_micro_batches(1, 0, 60) == 1


def test_a2a_volume_and_buffer_by_hand():
    m = load_config(None, TINY).model  # K=2, D=64
    tokens = 64
    rows = tokens * 2 * 64 * 3 / 4  # ep=4: 3 of 4 rows leave the rank = 6144
    fwd, bwd = rows * (2 + 2), rows * 2 * 2  # bf16 dispatch + combine; two gradient exchanges
    assert a2a_volume_per_step(tokens, m, 4, 1, 3, 2, 2, 2) == 3 * (fwd + bwd) == 147_456
    assert a2a_volume_per_step(tokens, m, 4, 5, 3, 2, 2, 2, recompute=True) == 5 * 3 * (2 * fwd + bwd) == 1_105_920
    assert a2a_volume_per_step(tokens, m, 4, 1, 1, 1, 2, 2) == rows * (1 + 2) + bwd == 43_008  # fp8 dispatch
    assert a2a_volume_per_step(tokens, m, 1, 1, 3, 2, 2, 2) == 0
    assert a2a_buffer_bytes(tokens, m, 4, 1, 2) == 2 * tokens * 2 * 64 * (1 + 2) == 49_152


def _saved_bytes(cfg, B, T):
    """Bytes of the tensors autograd saves for backward in a real forward of ``cfg``'s model
    (each storage once, parameters excluded)."""
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights(0)
    if cfg.train.precision == "bf16":
        model.to(torch.bfloat16)
        model.init_rope()
    ids = torch.randint(0, cfg.model.vocab_size, (B, T))
    labels = torch.roll(ids, -1, 1)
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels)
    out.local_loss(0.3, 1e-4).backward()  # the saved tensors are what backward needs
    return sum(saved.values())


def _planned_bytes(cfg, form, B, T):
    """The formula's bytes for that forward, attention of saved form ``form``."""
    act = activation_bytes_per_token(cfg.model, cfg.train.precision, form, T)
    n = cfg.model.n_layers
    main = act.embedding + act.block(False) + (n - 1) * act.block(True) + act.head
    mtp = act.mtp_module() + act.head
    return B * T * main + B * (T - 1) * mtp  # the MTP module sees T - 1 positions


def test_activation_formula_matches_saved_tensors(one_torch_thread, monkeypatch):
    """The formula against the tensors autograd really saves in the tiny model.

    v_head_dim = qk_head_dim (24) so that CPU attention takes the fused kernel, as a GPU does;
    the padded experts a CPU may choose by measuring are ruled out (the fixed rules). Tolerance
    1.5%: parameter-sized casts (norm and gate weights in fp32) are kept too and are not
    per-token.
    """
    monkeypatch.setenv("DSV3_KERNELS", "rules")
    wider = [
        "model.q_lora_rank=48",
        "model.n_routed_experts=16",
        "model.n_expert_groups=4",
        "model.n_limited_groups=2",
        "model.n_activated_experts=4",
        "model.n_shared_experts=2",
        "model.n_layers=3",
    ]
    for precision, extra in (("fp32", []), ("bf16", []), ("fp32", wider), ("bf16", wider)):
        cfg = load_config(None, TINY + extra + ["model.v_head_dim=24", f"train.precision={precision}"])
        saved = _saved_bytes(cfg, 2, 32)
        assert saved == pytest.approx(_planned_bytes(cfg, "fused", 2, 32), rel=0.015), (precision, extra)


def test_each_attention_kernel_keeps_what_the_plan_counts(one_torch_thread, monkeypatch):
    """With v narrower than q/k (16 against 24, as in DeepSeek-V3: 128 against 192) each CPU
    attention kernel keeps something else: flash the padded v and output, SDPA's math kernel
    and the matmul attention the (T, T) probabilities (fp32 in the math kernel). The plan
    counts the form of the kernel that runs (:func:`saved_form`), within 1.5% of what autograd
    saves, and closer than any form that counts other bytes."""
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, TINY + [f"train.precision={precision}"])
        for kernel, form in (("flash", "padded"), ("sdpa", "math"), ("matmul", "matmul")):
            assert saved_form(kernel, 24, 16, "cpu") == form
            monkeypatch.setenv("DSV3_KERNELS", f"attention={kernel},experts=grouped_mm")
            saved = _saved_bytes(cfg, 2, 64)
            planned = {f: _planned_bytes(cfg, f, 2, 64) for f in ATTENTION_FORMS}
            assert saved == pytest.approx(planned[form], rel=0.015), (precision, kernel)
            others = [abs(saved - b) for f, b in planned.items() if b != planned[form]]
            assert abs(saved - planned[form]) < min(others), (precision, kernel, planned)
    assert saved_form("sdpa", 24, 16, "cuda") == "fused" and saved_form("sdpa", 24, 24, "cpu") == "fused"


def test_cli_plan_propose_and_errors(capsys):
    args = [
        "plan",
        "--config",
        str(V3),
        "--gpus",
        "2048",
        "--gpu-memory-gib",
        "80",
        "--propose",
        "--dispatch-dtype",
        "fp8",
    ] + DEEPSEEK_LAYOUT
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dispatch fp8, combine bf16" in out and "layouts fit in 80 GiB" in out
    assert main(["plan", "--config", str(V3), "--gpus", "2048", "--propose"]) == 2
    assert "--propose needs --gpu-memory-gib" in capsys.readouterr().err
    assert main(["plan", "--config", str(V3), "--gpus", "2048", "parallel.ep=3"]) == 2
    assert "not divisible by parallel.ep=3" in capsys.readouterr().err


def test_bad_layouts():
    with pytest.raises(DsvError, match="not divisible by parallel.pp=16"):
        check_divisible(100, pp=16, ep=1)
    with pytest.raises(DsvError, match="multiple of pp\\*ep=8"):
        check_divisible(12, pp=2, ep=4)
    check_launch(load_config(None, ["parallel.pp=2"]), 2)  # pipelines train (ZeRO 0-1)
    with pytest.raises(DsvError, match="zero_stage=2 is not available with pipeline parallelism"):
        check_launch(load_config(None, ["parallel.pp=2", "parallel.zero_stage=2"]), 2)


def test_the_cpu_plan_counts_the_attention_the_machine_chose(tmp_path, monkeypatch):
    """On a CPU the attention kernel is measured on first use: the plan counts the recorded
    choice (this process's, else the machine's record), the candidate keeping the most before
    any measurement, the fixed rule under DSV3_KERNELS=rules; a GPU plan its flash kernel."""
    monkeypatch.setenv("DSV3_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv("DSV3_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_made", {})
    cfg = load_config(None, TINY + ["train.precision=bf16", "parallel.micro_batch_size=2"])
    m, T = cfg.model, cfg.data.seq_len

    def planned():
        act, form, known = planned_activations(cfg, 2, cpu=True)
        assert act == activation_bytes_per_token(m, "bf16", form, T)
        sp = plan_layout(cfg, ModelParts.of(Transformer(m)), Layout(1, 1, 1, 0, 2, 1, False), cpu=True)
        assert (sp.attention, sp.attention_known) == (form, known)
        return form, known

    # bf16 on a CPU: sdpa (its math kernel keeps fp32 probabilities), flash or matmul
    assert planned() == ("math", False)
    assert planned_activations(cfg, 2, cpu=False)[1:] == ("padded", True)
    # the run measures (timings replaced by a fixed answer here) and records its choice
    monkeypatch.setattr(kernels, "_measure", lambda candidates, run, streamed=False: {"choice": "matmul"})
    q, k = (torch.randn(2, m.n_heads, T, 24, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, m.n_heads, T, 16, dtype=torch.bfloat16, requires_grad=True)
    causal_attention(q, k, v, 0.2).sum().backward()
    ((key, entry),) = kernels.choices().items()
    (recorded,) = json.loads((tmp_path / "kernels.json").read_text()).values()  # one machine
    assert entry["choice"] == recorded[key]["choice"] == "matmul"
    monkeypatch.setattr(kernels, "_made", {})  # another process on the machine: the record
    assert planned() == ("matmul", True)
    kernels.preload({key: {"choice": "flash"}})
    assert planned() == ("padded", True)  # this process's choice (e.g. from a checkpoint) first
    monkeypatch.setenv("DSV3_KERNELS", "rules")
    assert planned() == ("math", True)
    monkeypatch.setenv("DSV3_KERNELS", "attention=matmul")
    assert planned() == ("matmul", True)
    # equal head dims: SDPA's fused kernel, or the matmul attention while its scores fit its limit
    monkeypatch.delenv("DSV3_KERNELS")
    for seq_len, expected in ((64, ("matmul", False)), (8192, ("fused", True))):
        same = load_config(None, TINY + ["model.v_head_dim=24", f"data.seq_len={seq_len}", "model.max_seq_len=8192"])
        assert planned_activations(same, 2, cpu=True)[1:] == expected


def test_plan_of_precision_auto(monkeypatch):
    """``train.precision=auto`` plans GPUs in bf16 and a CPU run in the precision this CPU trains
    faster in (forced here), saying so; the rest of the report is that precision's."""

    def without_auto_line(text: str) -> str:
        return "\n".join(line for line in text.splitlines() if not line.startswith("precision   "))

    cfg = load_config(None, ["train.precision=auto"])
    gpu = plan(cfg, 2, 80)
    assert "\nprecision   train.precision=auto: bf16 on cuda\n" in gpu
    assert without_auto_line(gpu) == plan(load_config(None, ["train.precision=bf16"]), 2, 80)
    assert cfg.train.precision == "auto"  # the caller's config is left as it was
    for forced in ("fp32", "bf16"):
        monkeypatch.setenv("DSV3_KERNELS", f"precision={forced}")
        monkeypatch.setattr(kernels, "_made", {})
        text = plan(cfg, 1, None, cpu=True, host_memory_gib=24)
        assert f"\nprecision   train.precision=auto: {forced} on cpu (" in text
        fixed = plan(load_config(None, [f"train.precision={forced}"]), 1, None, cpu=True, host_memory_gib=24)
        assert without_auto_line(text) == fixed
