"""dsv3 plan under ZeRO-Offload / ZeRO-Infinity: device, host and disk bytes worked out by hand,
the refused combinations, the proposals with offloading and the resident memory of a CPU run."""

from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from dsv3.cli import main
from dsv3.config import load_config
from dsv3.errors import DsvError
from dsv3.model import Transformer
from dsv3.parallel.engine import deepspeed_config, zero_settings
from dsv3.plan import (
    GIB,
    PROCESS_BASELINE_BYTES,
    Layout,
    ModelParts,
    check_offload,
    largest_sub_group,
    offload_seconds,
    offload_traffic,
    place_states,
    plan,
    plan_layout,
    propose,
    static_bytes,
    unswapped_elements,
)

ROOT = Path(__file__).resolve().parents[2]
LITE = ROOT / "configs" / "deepseek_v2_lite_16b.yaml"
LITE_PARAMS = 16_299_726_848  # main + MTP (dsv3 plan's "total")
LITE_LARGEST = 102_400 * 2048  # its largest parameter: the embedding (and the head)
TINY = tiny_model(
    **{"data.seq_len": "64", "train.precision": "bf16"}
)  # the 2-layer model of tests/helpers.py (tiny_overrides)
P = 1000  # parameters of the rank's partition (dp = 1: the whole model)
# ZeRO-3: bf16 gathered parameters, up to stage3_max_live_parameters (1e9 elements), here the whole stage (1e9)
GATHERED = 2 * 1e9
BUCKET = 2 * 5e8  # ZeRO-3: bf16 reduce bucket of DeepSpeed's default 5e8 elements


def _place(zero, opt="none", par="none", precision="bf16", m=4, stage=1e9, cpu=False, **kw):
    mem = static_bytes(P, 0, 1, 1, zero, precision)
    mem.activations = 500.0
    return place_states(mem, P, stage, 300, zero, precision, m, opt, par, cpu, **kw)


def test_zero_1_2_bytes_by_hand():
    # no offload: 2 + 2 + 12 bytes per parameter on the device (ZeRO paper §3.1), nothing elsewhere
    pl = _place(2)
    assert pl.device == {"weights": 2000, "gradients": 2000, "optimizer": 12000, "activations": 500}
    assert pl.host == {} and pl.disk == {}
    # optimizer on the host: fp32 partition, its fp32 .grad, the two moments, the bf16 copy-back
    # buffer, and with 4 micro-batches per step a bf16 accumulation buffer
    # buffer, with 4 micro-batches per step a bf16 accumulation buffer, and two bf16 staging
    # buffers of the largest parameter (here 100 elements); ZeRO-2 sends each reduced bucket to
    # the host's fp32 gradients and keeps only the bf16 reduce bucket (5e8 elements) on the device
    pl = _place(2, "cpu", largest_param=100)
    assert pl.device == {"weights": 2000, "gradients": 0, "optimizer": 0, "activations": 500, "reduce bucket": BUCKET}
    assert pl.host == {
        "fp32 master weights": 4000,
        "fp32 gradients": 4000,
        "Adam moments": 8000,
        "weight copy-back buffer": 2000,
        "gradient accumulation": 2000,
        "gradient staging buffers": 2 * 2 * 100,
    }
    assert pl.host_total == 20 * P + 400 and pl.disk == {}
    # ZeRO-1 keeps the gradients on the device; a CPU run makes only the written part of the bucket resident
    assert _place(1, "cpu").device["gradients"] == 2000
    assert _place(2, "cpu", stage=P, cpu=True).device["reduce bucket"] == 2 * P
    assert _place(1, "cpu", m=1).host_total == 18 * P  # one micro-batch: no accumulation buffer
    # fp32 training: the copy-back and accumulation buffers are fp32 too
    assert _place(2, "cpu", precision="fp32").host_total == (4 + 4 + 8 + 4 + 4) * P


def test_zero_3_bytes_by_hand():
    pl = _place(3)
    assert pl.device == {
        "weights": 2000,
        "gradients": 2000,
        "optimizer": 12000,
        "activations": 500,
        "gathered parameters": GATHERED,
        "reduce bucket": BUCKET,
    }
    assert pl.host == {} and pl.disk == {}
    # a CPU run only touches the part of the reduce bucket it fills; gathering is capped by the model
    cpu = _place(3, stage=P, cpu=True)
    assert cpu.device["reduce bucket"] == 2 * P and cpu.device["gathered parameters"] == 2 * P
    # fp32 ZeRO-3 updates the fp32 partitions in place: moments only
    assert _place(3, precision="fp32").device["optimizer"] == 8 * P

    # optimizer on the host: gradients accumulate there (bf16 flat partition), fp32 copy, its
    # fp32 gradients and the moments: 2 + 4 + 4 + 8 = 18 bytes per parameter
    pl = _place(3, "cpu")
    assert pl.device["weights"] == 2000 and pl.device["gradients"] == 0 and pl.device["optimizer"] == 0
    assert pl.host == {
        "gradient partition": 2000,
        "fp32 master weights": 4000,
        "fp32 gradients": 4000,
        "Adam moments": 8000,
    }
    # optimizer on NVMe: 16 bytes per parameter on disk; the host keeps the bf16 gradient
    # partition, one fp32 gradient buffer and 4 fp32 swap buffers of the largest sub-group (= P),
    # and the fp32 copies of one reduce bucket's gradients on their way to disk (all P here)
    pl = _place(3, "nvme")
    assert pl.disk == {"fp32 master weights": 4000, "fp32 gradients": 4000, "Adam moments": 8000}
    assert pl.host == {
        "gradient partition": 2000,
        "fp32 gradient buffer": 4000,
        "optimizer swap buffers": 16000,
        "fp32 gradient copies": 4000,
    }
    # the engine's sub-groups under nvme optimizer offload are 1e8 elements (P is smaller: one sub-group)
    assert _place(3, "nvme", sub_group_size=None).host == pl.host
    small = _place(3, "nvme", sub_group_size=100)  # sub-groups of 100 elements: buffers of 100
    assert small.host["fp32 gradient buffer"] == 400 and small.host["optimizer swap buffers"] == 1600
    assert _place(3, "nvme", sub_group=150).host["optimizer swap buffers"] == 16 * 150  # as DeepSpeed cut it
    # parameters on the host: the bf16 partition leaves the device
    pl = _place(3, "cpu", "cpu")
    assert pl.device["weights"] == 0 and pl.host["parameter partition"] == 2000 and pl.host_total == 20 * P
    # parameters on NVMe: files of the partition; the host keeps up to 1e9 elements (all of P)
    # and 5 swap buffers of 1e8 bf16 elements
    pl = _place(3, "nvme", "nvme")
    assert pl.disk_total == 16 * P + 2 * P
    assert pl.host["parameter partition"] == 2000 and pl.host["parameter swap buffers"] == 2 * 5 * 1e8
    assert pl.host_total == (2 + 4 + 16 + 4 + 2) * P + 1e9
    # a parameter larger than 1e8 elements: the engine sizes each of the 5 swap buffers to hold it
    big = _place(3, "nvme", "nvme", largest_param=3e8)
    assert big.host["parameter swap buffers"] == 2 * 5 * 3e8
    pl = _place(3, "none", "nvme")
    assert pl.device["weights"] == 0 and pl.device["gradients"] == 2000 and pl.device["optimizer"] == 12000
    assert pl.disk == {"parameter partition": 2000}


def test_largest_sub_group_as_deepspeed_cuts():
    # one group under the limit stays whole; a bigger one is cut after the parameter that reaches it
    assert largest_sub_group([[30, 20], [5]], 1, 100) == 50
    assert largest_sub_group([[60, 50, 30, 80, 10]], 1, 100) == 110  # [60, 50], [30, 80], [10]
    assert largest_sub_group([[60, 50, 30, 80, 10]], 2, 50) == 55  # halves: [30, 25], [15, 40], [5]
    assert largest_sub_group([[7]], 2, 100) == 4  # ceil(7 / 2)


def test_offload_traffic_by_hand():
    m = 4  # micro-batches per step, bf16
    # ZeRO-2: each micro-batch's gradients go out, from the 2nd on the sum comes back first, the
    # last also fills the fp32 gradients; the weights return. ZeRO-1 reduces at the last only.
    assert offload_traffic(P, 2, "bf16", m, False, "cpu") == ((1 + 2 * (m - 2) + 3 + 1) * 2 * P, 0)
    assert offload_traffic(P, 1, "bf16", m, False, "cpu") == (4 * 2 * P, 0)
    assert offload_traffic(P, 2, "bf16", 1, False, "cpu") == offload_traffic(P, 1, "bf16", 1, True, "cpu") == (4 * P, 0)
    assert offload_traffic(P, 3, "bf16", m, False, "cpu") == ((m + 1) * 2 * P, 0)  # accumulates on the host
    assert offload_traffic(P, 3, "bf16", m, False, "nvme") == ((m + 1) * 2 * P, 32 * P)
    assert offload_traffic(P, 3, "bf16", m, True, "none", "cpu") == (3 * m * 2 * P, 0)  # fwd, bwd, recompute
    assert offload_traffic(P, 3, "bf16", m, False, "none", "cpu") == (2 * m * 2 * P, 0)
    assert offload_traffic(P, 3, "bf16", m, False, "none", "nvme") == (2 * m * 2 * P, 0)  # all kept in host
    big = 3e9  # 2e9 elements beyond the 1e9 kept in host memory: read per crossing, written once
    assert offload_traffic(big, 3, "bf16", 1, False, "none", "nvme") == (2 * 2 * big, 3 * 2 * 2e9)
    assert offload_traffic(P, 2, "bf16", m, True) == (0, 0)
    assert offload_seconds(25e9, 3e9) == 2.0  # 25 GB/s host link, 3 GB/s NVMe


def test_refused_combinations():
    check_offload(3, 1, 1, "nvme", "nvme")
    check_offload(1, 1, 1, "cpu", "none")
    with pytest.raises(DsvError, match="offloading needs parallel.zero_stage >= 1"):
        check_offload(0, 1, 1, "cpu", "none")
    with pytest.raises(DsvError, match="offload_optimizer=nvme needs parallel.zero_stage=3"):
        check_offload(2, 1, 1, "nvme", "none")
    with pytest.raises(DsvError, match="offload_param=cpu needs parallel.zero_stage=3"):
        check_offload(2, 1, 1, "cpu", "cpu")
    with pytest.raises(DsvError, match="zero_stage=3 needs parallel.ep=1 and parallel.pp=1 \\(got ep=2, pp=1\\)"):
        check_offload(3, 2, 1, "none", "none")
    with pytest.raises(DsvError, match="got ep=1, pp=2"):
        check_offload(3, 1, 2, "cpu", "none")
    with pytest.raises(DsvError, match="offload_optimizer='disk' is unknown"):
        check_offload(2, 1, 1, "disk", "none")
    cfg = load_config(None, TINY)
    with torch.device("meta"):
        parts = ModelParts.of(Transformer(cfg.model))
    with pytest.raises(DsvError, match="needs parallel.zero_stage=3"):
        plan_layout(cfg, parts, Layout(2, 1, 1, 2, 4, 3, True, "nvme"))
    with pytest.raises(DsvError, match="--gpus-per-node 3 must divide --gpus 2"):
        plan_layout(cfg, parts, Layout(2, 1, 1, 2, 4, 3, True), gpus_per_node=3)
    # the configured keys, when the config has them
    cfg.parallel.zero_stage = 0
    cfg.parallel.offload_optimizer = "cpu"
    with pytest.raises(DsvError, match="offloading needs parallel.zero_stage >= 1"):
        plan(cfg, 1, 80)


def test_per_node_totals_of_a_layout():
    cfg = load_config(None, TINY)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parts = ModelParts.of(model)
    n = sum(p.numel() for p in model.parameters())
    # ZeRO-3, dp = 2, optimizer on the host: 18 bytes per parameter of the half each rank holds
    sp = plan_layout(cfg, parts, Layout(2, 1, 1, 3, 4, 3, True, "cpu"))
    assert sp.gpus_per_node == 2 and sp.placement.host_total == pytest.approx(18 * n / 2)
    assert sp.host_per_node == pytest.approx(2 * (18 * n / 2 + PROCESS_BASELINE_BYTES))
    one = plan_layout(cfg, parts, Layout(2, 1, 1, 3, 4, 3, True, "nvme", "cpu"), gpus_per_node=1)
    # the tiny model's sub-groups hold under 1 MiB of fp32 each: DeepSpeed swaps none of them
    assert one.disk_per_node == 0 and unswapped_elements(parts.groups, 2) >= n / 2
    # ZeRO-3 cuts sub-groups within the trainer's parameter groups: the largest is the half of the
    # decaying matrices that a rank holds, ceil(numel / 2) of each
    S = sum(-(-p.numel() // 2) for p in model.parameters() if p.ndim >= 2)
    assert largest_sub_group(parts.groups, 2) == S
    # bf16 gradient partition, fp32 weights, gradients and moments kept on the host, fp32 gradient
    # copies, bf16 parameter partition: (2 + 16 + 4 + 2) bytes per parameter of the half; 20 S of buffers
    assert one.host_per_node == pytest.approx(PROCESS_BASELINE_BYTES + (2 + 16 + 4 + 2) * n / 2 + 20 * S)


def test_v2_lite_on_one_80gb_gpu_fits_with_the_optimizer_offloaded():
    cfg = load_config(LITE)
    with torch.device("meta"):
        parts = ModelParts.of(Transformer(cfg.model))
    # without offloading nothing fits: 16 bytes per parameter are 243 GiB
    fitting, _ = propose(cfg, parts, 1, 80)
    assert fitting and all(sp.layout.offloads and sp.device_total <= 80 * GIB for sp in fitting)
    best = fitting[0]
    L = best.layout
    # ZeRO-1 sends the gradients to the host once per step (ZeRO-2 twice per micro-batch, ZeRO-3 once
    # per micro-batch); with checkpointing its bf16 weights and gradients fit on the GPU
    assert (L.zero_stage, L.offload_optimizer, L.offload_param, L.micro_batches, L.checkpointing) == (
        1,
        "cpu",
        "none",
        16,
        True,
    )
    # host: 4 + 4 + 8 + 2 + 2 bytes per parameter (dp = 1: the partition is the whole model), two bf16
    # staging buffers of the largest parameter (the 102400 x 2048 embedding), the process
    assert best.host_per_node == 20 * LITE_PARAMS + 2 * 2 * LITE_LARGEST + PROCESS_BASELINE_BYTES
    device = best.placement.device
    assert device["weights"] == device["gradients"] == 2 * LITE_PARAMS and device["optimizer"] == 0
    assert best.device_total == 4 * LITE_PARAMS + device["activations"] <= 80 * GIB
    assert best.disk_per_node == 0
    zero3 = next(sp for sp in fitting if sp.layout.zero_stage == 3)  # next: ZeRO-3, 18 bytes per parameter
    assert zero3.layout.offload_optimizer == "cpu" and zero3.host_per_node == 18 * LITE_PARAMS + PROCESS_BASELINE_BYTES
    # a 64 GiB host takes only NVMe offload: the host keeps the gradient partition and the swap buffers
    fitting, _ = propose(cfg, parts, 1, 80, host_memory_gib=64)
    best = fitting[0]
    assert best.layout.offload_optimizer == "nvme"
    # the engine runs nvme optimizer offload with sub-groups of 1e8: the largest is the first ~1e8
    # elements of the decaying matrices (DeepSpeed closes a sub-group after the parameter reaching 1e8)
    S = largest_sub_group(parts.groups, 1, 1e8)
    assert 1e8 <= S < 1e8 + max(n for _, n, _ in parts.tensors)
    assert S == largest_sub_group([[n for _, n, d in parts.tensors if d >= 2]], 1, 1e8)
    # the host: bf16 gradients, 4S + 16S fp32 gradient and swap buffers, fp32 copies of one 5e8 bucket,
    # and the no-decay group (137,216 norm weights: one sub-group under 1 MiB of fp32, not swapped) in fp32
    # with its gradients and moments
    K = unswapped_elements(parts.groups, 1, 1e8)
    assert K == sum(parts.groups[1]) == 137_216
    assert best.host_per_node == 2 * LITE_PARAMS + 20 * S + 4 * 5e8 + 16 * K + PROCESS_BASELINE_BYTES
    assert best.disk_per_node == 16 * (LITE_PARAMS - K)
    assert propose(cfg, parts, 1, 80, host_memory_gib=64, disk_gib=100)[0] == []
    # with enough GPUs a layout without offloading fits and comes first
    fitting, _ = propose(cfg, parts, 8, 80)
    assert not fitting[0].layout.offloads and any(sp.layout.offloads for sp in fitting)


def test_cli_v2_lite_proposal_and_limits(capsys):
    assert main(["plan", "--config", str(LITE), "--gpus", "1", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    host = (20 * LITE_PARAMS + 4 * LITE_LARGEST + PROCESS_BASELINE_BYTES) / GIB
    assert "does NOT fit in 80 GiB" in out and "layouts fit in 80 GiB per GPU" in out
    assert "parallel.zero_stage=1" in out and "parallel.activation_checkpointing=true" in out
    assert "parallel.offload_optimizer=cpu parallel.offload_param=none" in out
    assert f"(needs {host:,.1f} GiB of host memory per node)" in out
    args = ["plan", "--config", str(LITE), "--gpus", "1", "--gpu-memory-gib", "80", "--host-memory-gib", "64"]
    assert main(args + ["--disk-gib", "100"]) == 0
    out = capsys.readouterr().out
    assert "no layout fits in 80 GiB per GPU, 64 GiB host memory per node, 100 GiB disk per node" in out
    assert main(["plan", "--config", str(LITE), "--cpu", "--propose"]) == 2
    assert "--propose --cpu needs --host-memory-gib" in capsys.readouterr().err


def test_cpu_run_resident_memory_by_term():
    cfg = load_config(None, TINY + ["parallel.zero_stage=3", "parallel.micro_batch_size=2", "parallel.grad_accum=1"])
    cfg.parallel.offload_optimizer = "nvme"  # the keys of the trainer's config, set as it will
    cfg.parallel.offload_param = "none"
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parts = ModelParts.of(model)
    n = sum(p.numel() for p in model.parameters())
    S = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    sp = plan_layout(cfg, parts, Layout(1, 1, 1, 3, 2, 1, False, "nvme"), cpu=True)
    act = sp.memory.activations
    r = sp.resident
    # one process holds everything: the baseline, bf16 weights, activations, the gathered
    # parameters (the whole model), the written part of the reduce bucket (the whole model), and
    # on the host side the bf16 gradient partition, one fp32 gradient buffer, 4 fp32 swap
    # buffers (one sub-group: the decaying matrices S) and the fp32 gradient copies; the
    # optimizer state stays in host memory too: no sub-group reaches the 1 MiB DeepSpeed swaps
    assert r == {
        "process baseline": PROCESS_BASELINE_BYTES,
        "weights": 2 * n,
        "gradients": 0,
        "optimizer": 0,
        "activations": act,
        "gathered parameters": 2 * n,
        "reduce bucket": 2 * n,
        "gradient partition": 2 * n,
        "fp32 gradient buffer": 4 * S,
        "optimizer swap buffers": 16 * S,
        "fp32 gradient copies": 4 * n,
        "fp32 master weights": 4 * n,  # sub-groups under 1 MiB of fp32 stay in host memory
        "fp32 gradients": 4 * n,
        "Adam moments": 8 * n,
    }
    assert sp.peak_resident == sum(r.values()) == PROCESS_BASELINE_BYTES + act + 28 * n + 20 * S
    assert sp.init_peak == PROCESS_BASELINE_BYTES + 4 * n  # the model materialized in fp32 first
    assert sp.disk_per_node == 0  # nothing swapped
    text = plan(cfg, 1, None, cpu=True)
    assert "memory/process (GiB, CPU run" in text and "optimizer swap buffers" in text
    assert f"peak per process          {sp.peak_resident / GIB:>9,.2f}" in text
    assert "fp32 master weights" in text


def test_cli_cpu_plan(capsys):
    tiny = str(ROOT / "configs" / "tiny.yaml")
    assert main(["plan", "--config", tiny, "--cpu", "--gpus", "2", "--host-memory-gib", "24"] + TINY) == 0
    out = capsys.readouterr().out
    assert "layout      2 processes:" in out and "total per node" in out and "of 24: fits" in out
    assert "(2 processes per node)" in out
    assert main(["plan", "--config", tiny, "--cpu", "--gpus", "2", "--gpus-per-node", "1"] + TINY) == 0
    assert "(1 process per node)" in capsys.readouterr().out


def test_plan_uses_the_settings_the_engine_writes():
    cfg = load_config(
        None, TINY + ["parallel.zero_stage=3", "parallel.offload_optimizer=nvme", "parallel.offload_dir=/tmp"]
    )
    cfg.parallel.offload_param = "nvme"
    zero = deepspeed_config(cfg, 1, largest_param=3e8)["zero_optimization"]
    assert zero["sub_group_size"] == 1e8 and zero["stage3_param_persistence_threshold"] == 0
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_max_live_parameters"]) == (
        5e8,
        5e7,
        1e9,
    )
    assert zero["offload_optimizer"]["buffer_count"] == 4
    assert (zero["offload_param"]["buffer_count"], zero["offload_param"]["buffer_size"]) == (5, 3e8)
    assert zero["offload_param"]["max_in_cpu"] == 1e9
    z = zero_settings("nvme", 3e8)
    assert (z.sub_group_size, z.param_swap_buffers, z.param_swap_buffer_size) == (1e8, 5, 3e8)
    assert zero_settings("cpu").sub_group_size == zero_settings("none").sub_group_size == 1e9
    assert zero_settings("none", 10).param_swap_buffer_size == 1e8
    cfg.parallel.offload_optimizer = "cpu"
    assert deepspeed_config(cfg, 1)["zero_optimization"]["sub_group_size"] == 1e9
    cfg.parallel.zero_stage = 0
    cfg.parallel.offload_optimizer = cfg.parallel.offload_param = "none"
    assert deepspeed_config(cfg, 1)["zero_optimization"] == {"stage": 0}
