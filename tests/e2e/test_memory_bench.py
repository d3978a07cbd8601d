"""dsv3 bench memory on a tiny model: real trainer steps in 1 and 2 processes, what each rank holds
against dsv3 plan (within 5%), and where the expert state lives under expert parallelism + ZeRO."""

import json

import pytest
from helpers import run_dsv3, tiny_overrides

from dsv3.bench.memory import bench_memory

pytestmark = pytest.mark.e2e
STATES = ("weights", "gradients", "optimizer")
# 2 MoE layers (block 1 and the MTP module) x 8 experts x SwiGLU (3 x dim 64 x moe_inter_dim 32)
EXPERTS = 2 * 8 * 3 * 64 * 32


def _overrides(corpus_dir, data_cache, tmp_path):
    return tiny_overrides(corpus_dir, data_cache, tmp_path / "run", **{"parallel.micro_batch_size": 2})


def _assert_agree(entry):
    assert "error" not in entry, entry.get("error")
    for rank in entry["ranks"]:
        for k in STATES:
            measured, planned = rank["measured"][f"{k}_bytes"], rank["planned"][f"{k}_bytes"]
            assert measured == pytest.approx(planned, rel=0.05), (entry["name"], rank["rank"], k)


@pytest.mark.distributed
def test_expert_parallel_zero_partitions_the_expert_state(corpus_dir, data_cache, tmp_path):
    """ep=2 halves each rank's expert weights and optimizer state; ZeRO-1 partitions the experts'
    optimizer state over their expert-data-parallel group (with ep=2 on 4 processes groups of
    2: a quarter per rank), and the state of every expert element lives on exactly one rank:
    never duplicated."""
    layouts = ["procs=4,ep=2,zero=1,precision=fp32"]
    result = bench_memory(None, _overrides(corpus_dir, data_cache, tmp_path), layouts, steps=2, progress=lambda _: 0)
    (ep2x2,) = result["layouts"]
    _assert_agree(ep2x2)
    ranks = [r["measured"] for r in ep2x2["ranks"]]
    # fp32 master + two moments (12 bytes) of every expert element, once over all ranks
    assert sum(m["expert_optimizer_bytes"] for m in ranks) == 12 * EXPERTS
    for m in ranks:
        assert m["expert_weights_bytes"] == 4 * EXPERTS // 2  # each rank holds its 4 of 8 experts
        assert m["expert_optimizer_bytes"] == 12 * EXPERTS // 4  # half of its experts' state
        # every fp32 weight but the experts of the other EP rank (ZeRO-1 keeps whole weights)
        assert m["weights_bytes"] == 4 * result["model"]["parameters"] - 2 * EXPERTS


@pytest.mark.distributed
def test_bench_memory_command_plan_agrees(corpus_dir, data_cache, tmp_path):
    """The command's JSON: required shape, the machine, and plan = measurement within 5% for a
    bf16 pipeline at ZeRO-0 on 2 processes, ZeRO-3 and ZeRO-2 with the optimizer on the host (the
    single-process ZeRO 0-2 counts are checked in process, tests/unit/test_memory.py)."""
    layouts = [
        "procs=2,pp=2,zero=0,precision=bf16",
        "procs=1,zero=3,precision=bf16",
        "procs=1,zero=2,precision=bf16,offload_optimizer=cpu",
    ]
    out = tmp_path / "bench"
    args = ["bench", "memory", "--config", "configs/tiny.yaml", "--out-dir", str(out), "--layouts", ";".join(layouts)]
    proc = run_dsv3([*args, *_overrides(corpus_dir, data_cache, tmp_path)], timeout=300)
    (path,) = out.glob("memory-tiny-bf16-*.json")  # every layout bf16
    result = json.loads(path.read_text())
    assert "AMD" in proc.stdout or "cpu" in proc.stdout
    assert result["machine"]["cpu_model"] and "avx512_bf16" in result["machine"]["cpu_features"]
    assert [e["name"] for e in result["layouts"]] == layouts
    for entry in result["layouts"]:
        _assert_agree(entry)
        assert len(entry["ranks"]) == entry["processes"]
        for rank in entry["ranks"]:
            for side in ("measured", "planned"):
                assert all(f"{k}_bytes" in rank[side] for k in (*STATES, "peak_rss"))
            p = rank["planned"]
            if "terms" in p:  # ZeRO-3 / offload: every resident term of dsv3 plan --cpu
                resident = sum(v for k, v in p["terms"].items() if k != "process baseline")
                assert p["peak_rss_bytes"] == resident + p["baseline_rss_bytes"]
            else:
                assert p["peak_rss_bytes"] == (
                    p["static_bytes"] + p["activations_bytes"] + p["a2a_buffers_bytes"] + p["baseline_rss_bytes"]
                )
    params = result["model"]["parameters"]
    # the pipeline's bf16 optimizer keeps a second bf16 gradient buffer: 4 bytes per parameter
    for rank in result["layouts"][0]["ranks"]:
        assert rank["measured"]["gradients_bytes"] == pytest.approx(2 * rank["measured"]["weights_bytes"], abs=8)
    # ZeRO-3 on one process: the bf16 partitions of every parameter, the bf16 gradient partition (and
    # DeepSpeed's fp64 global norm), fp32 partition + moments + one fp32 step counter per optimizer group
    z3 = result["layouts"][1]["ranks"][0]["measured"]
    assert (z3["weights_bytes"], z3["gradients_bytes"]) == (2 * params, 2 * params + 8)
    assert z3["optimizer_bytes"] == 12 * params + 8 and z3["buckets_bytes"] == 2 * 5e8
    # ZeRO-2 with the optimizer on the host: bf16 weights + the bf16 copy-back buffer; fp32 gradients on
    # the host and two bf16 staging buffers of the largest parameter (the 512 x 64 embedding)
    z2 = result["layouts"][2]["ranks"][0]["measured"]
    assert z2["weights_bytes"] == 4 * params and z2["optimizer_bytes"] == 12 * params
    assert z2["gradients_bytes"] - 4 * params - 2 * 2 * 512 * 64 < 1024  # + per-tensor norms
