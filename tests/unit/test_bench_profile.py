"""``dsv3 bench train --profile`` (the per-operator breakdown) and the ``machine`` of every result.

FLOPs are checked against hand counts; times only for consistency (groups add up to their
phase, phases to the profiled step), never for speed.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

from dsv3 import bench
from dsv3.bench.profile import OTHER_GAP, PHASES, matmul_flops
from dsv3.cli import main
from dsv3.config import load_config
from dsv3.hardware import CPU_FEATURES, machine_info, parse_cpuinfo
from dsv3.model import flops_per_token

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# model.mtp_depth=0: the MTP block sees T-1 positions, flops_per_token counts T: left out for an exact count
TINY = tiny_model(**{"model.mtp_depth": "0", "data.seq_len": "32", "parallel.micro_batch_size": "2"})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_profile_phases_flops_and_groups(precision, monkeypatch):
    monkeypatch.setenv("DSV3_KERNELS", "rules")  # the FLOPs below are those of the fixed kernels
    cfg = load_config(None, TINY)
    r = bench.bench_train(cfg, precision, steps=1, reps=1, checkpointing=False, profile=True)
    p = r["profile"]
    assert p["side"] == "dsv3" and p["steps"] == 1 and p["peak_tflops"] == r["peak_tflops"][precision]
    assert len(p["profiled_walls_ms"]) == 3 and p["wall_ms"] == min(p["profiled_walls_ms"])  # the least disturbed
    # the phases make up the profiled step, and every phase's groups make up the phase
    assert p["step_ms"] == pytest.approx(sum(p["phases"][ph]["time_ms"] for ph in PHASES))
    assert 0 < p["step_ms"] <= 1.02 * p["wall_ms"]  # within the step (a lower bound would depend on load)
    for ph in PHASES:
        groups = [g for g in p["matmuls"] + p["others"] if g["phase"] == ph]
        assert sum(g["time_ms"] for g in groups) == pytest.approx(p["phases"][ph]["time_ms"], rel=1e-6)
    assert sum(g["share"] for g in p["matmuls"] + p["others"]) == pytest.approx(1.0)
    assert {g["op"] for g in p["others"] if g["phase"] == "optimizer"} >= {"aten::_fused_adamw_"}
    assert p["phases"]["optimizer"]["matmul_flops"] == 0

    # forward matmul FLOPs = flops_per_token / 3 (forward only) x tokens, except that in fp32 the
    # attention pads v from v_head_dim 16 to the q/k head dim 24 for the flash kernel (bf16 at
    # 32 tokens runs the math kernel, unpadded): 8 more columns per head, causal half, 2 layers
    B, T, H, layers = 2, 32, 2, 2
    pad = 8 if precision == "fp32" else 0
    expected = flops_per_token(cfg.model, T) / 3 * B * T + layers * 2 * B * H * T * T * pad / 2
    assert p["phases"]["forward"]["matmul_flops"] == expected

    # grouping by shape: one row for the o_proj of both layers, (B, T, H dv) x (dim, H dv)^T
    fwd = {(g["op"], json.dumps(g["shapes"])): g for g in p["matmuls"] if g["phase"] == "forward"}
    assert len(fwd) == len([g for g in p["matmuls"] if g["phase"] == "forward"])  # keys are unique
    o_proj = fwd[("aten::linear", "[[2, 32, 32], [64, 32]]")]
    assert o_proj["count"] == layers and o_proj["flops"] == layers * 2 * (B * T) * 32 * 64
    assert o_proj["dtype"] == {"fp32": "float", "bf16": "BFloat16"}[precision]
    # the experts' gate and up projections: B T K = 128 routed rows, one grouped product each
    experts = fwd[("aten::_grouped_mm", "[[128, 64], [8, 64, 32], [8]]")]
    assert experts["count"] == 2 and experts["flops"] == 2 * 2 * 128 * 64 * 32
    # recorded operator calls per call: a linear layer a product and its views; on CPU a
    # grouped product one product, views and copies per group (8 here)
    assert 2 <= o_proj["ops_per_call"] < 8 * 3 <= experts["ops_per_call"]
    for g in p["matmuls"]:
        assert g["tflops"] == pytest.approx(g["flops"] / (g["time_ms"] * 1e-3) / 1e12)
        assert g["of_peak"] == pytest.approx(g["tflops"] / p["peak_tflops"])
    # the backward of a product is two products of the same size
    assert p["phases"]["backward"]["matmul_flops"] >= 2 * expected


def test_matmul_flops_by_hand():
    assert matmul_flops("aten::mm", [[3, 4], [4, 5]]) == 2 * 3 * 4 * 5
    assert matmul_flops("aten::addmm", [[5], [3, 4], [4, 5], [], []]) == 2 * 3 * 4 * 5
    assert matmul_flops("aten::bmm", [[2, 3, 4], [2, 4, 5]]) == 2 * 2 * 3 * 4 * 5
    assert matmul_flops("aten::matmul", [[7, 2, 3, 4], [4, 5]]) == 2 * 14 * 3 * 4 * 5
    assert matmul_flops("aten::linear", [[2, 6, 4], [5, 4], []]) == 2 * 12 * 4 * 5
    assert matmul_flops("aten::_grouped_mm", [[10, 4], [3, 4, 5], [3]]) == 2 * 10 * 4 * 5
    assert matmul_flops("aten::_grouped_mm", [[5, 10], [10, 4], [3]]) == 2 * 5 * 10 * 4  # weight gradient
    sdpa = "aten::scaled_dot_product_attention"  # (q, k, v, mask, dropout, is_causal, scale, gqa)
    q, v = [1, 2, 8, 6], [1, 2, 8, 4]
    full = 2 * 2 * 8 * 8 * (6 + 4)
    assert matmul_flops(sdpa, [q, q, v], [None, None, None, None, 0.0, False, None, False]) == full
    assert matmul_flops(sdpa, [q, q, v], [None, None, None, None, 0.0, True, None, False]) == full / 2
    back = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"  # (grad, q, k, v, out, lse, dropout, causal)
    assert matmul_flops(back, [q, q, q, v, q, q[:3]], [None] * 6 + [0.0, True]) == full
    assert matmul_flops("aten::add", [[3, 4], [3, 4]]) == 0.0


def test_profile_cli_writes_file_next_to_result(tmp_path, capsys):
    args = ["--precision", "bf16", "--steps", "1", "--reps", "1", "--profile", "--out-dir", str(tmp_path)]
    assert main(["bench", "train", *args, *TINY]) == 0
    (prof_file,) = tmp_path.glob("*.profile.json")
    (result_file,) = [f for f in tmp_path.glob("train-tiny-bf16-*.json") if f != prof_file]
    assert prof_file.name == result_file.stem + ".profile.json"
    r, p = json.loads(result_file.read_text()), json.loads(prof_file.read_text())
    assert "profile" not in r and r["profile_file"] == prof_file.name and "--profile" in r["command"]
    assert p["result_file"] == result_file.name and p["precision"] == "bf16" and p["config"] == "tiny"
    assert p["machine"] == r["machine"] and p["model_flops_per_step"] == r["flops_per_token"] * 64
    assert any(g["op"] == OTHER_GAP for g in p["others"])
    out = capsys.readouterr().out
    assert "top matrix products" in out and f"wrote {prof_file}" in out and "backward" in out


def test_profile_is_refused_for_other_kinds(capsys):
    assert main(["bench", "decode", "--profile", *TINY]) == 2
    assert "--profile" in capsys.readouterr().err


def test_parse_cpuinfo():
    block = "processor : {i}\nmodel name : Some CPU 9000\nphysical id : {p}\ncore id : {c}\nflags : fpu avx2 {x}\n"
    text = "\n".join(block.format(i=i, p=i // 4, c=(i % 4) // 2, x="avx512f amx_tile") for i in range(8))
    info = parse_cpuinfo(text)
    assert info == {"model": "Some CPU 9000", "flags": {"fpu", "avx2", "avx512f", "amx_tile"}, "physical_cores": 4}
    assert parse_cpuinfo("processor : 0\nflags : sse2\n") == {"model": None, "flags": {"sse2"}, "physical_cores": None}


def test_machine_info():
    m = machine_info()
    assert set(m["cpu_features"]) == set(CPU_FEATURES) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert m["torch"] == torch.__version__ and m["torch_threads"] == torch.get_num_threads() == 1
    assert m["logical_cpus"] >= m["usable_cpus"] >= 1
    assert (m["gpu"] is None) == (not torch.cuda.is_available())
    assert m["cpu_dispatch"] == torch.backends.cpu.get_cpu_capability()


def test_profile_counts_the_matmul_attention(monkeypatch):
    """With the attention as two matrix products (a measured choice on CPU), the profile counts
    both full (T x T) products: the causal half the flash kernel skips is computed and counted."""
    monkeypatch.setenv("DSV3_KERNELS", "attention=matmul,experts=grouped_mm")
    cfg = load_config(None, TINY)
    r = bench.bench_train(cfg, "bf16", steps=1, reps=1, checkpointing=False, profile=True)
    B, T, H, layers, dk, dv = 2, 32, 2, 2, 24, 16
    expected = flops_per_token(cfg.model, T) / 3 * B * T + layers * 2 * B * H * T * T * (dk + dv) / 2
    assert r["profile"]["phases"]["forward"]["matmul_flops"] == expected
