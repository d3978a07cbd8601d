"""Memory a rank holds, counted from the tensors (dsv3.parallel.memory), against numbers computed
by hand; the plan's ZeRO partition rules; the layout specs of dsv3 bench memory."""

from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from torch import nn

from dsv3.bench.memory import DEFAULT_LAYOUTS, MemoryLayout, parse_layout
from dsv3.config import load_config
from dsv3.errors import DsvError
from dsv3.model import Transformer
from dsv3.parallel import ds_internals
from dsv3.parallel.layout import balanced_counts
from dsv3.parallel.memory import held_bytes, reset_peak_rss, rss_bytes
from dsv3.plan.costs import static_bytes, zero_held_elements
from dsv3.plan.layouts import Layout, ModelParts, plan_layout

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_model()
# 2 MoE layers (block 1 and the MTP module) x 8 experts x SwiGLU (3 x 64 x 32)
TINY_EXPERTS = 2 * 8 * 3 * 64 * 32


@pytest.fixture(scope="module")
def tiny_step(one_torch_thread):
    """A tiny model after one AdamW step (fp32), its optimizer and its parameter counts."""
    torch.manual_seed(0)
    model = Transformer(load_config(None, TINY).model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, ids)
    (out.lm_loss_sum + out.mtp_loss_sum.sum()).backward()
    opt.step()
    return model, opt


def test_fp32_model_and_adamw_by_hand(tiny_step):
    model, opt = tiny_step
    count = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    held = held_bytes(model, opt)
    assert held.parameters == count
    assert held.weights == 4 * count
    assert held.gradients == 4 * count
    # two fp32 moments per element, and AdamW's step counter (one fp32 scalar per tensor)
    assert held.optimizer == 8 * count + 4 * tensors
    assert held.expert_weights == 4 * TINY_EXPERTS
    assert held.expert_optimizer == 8 * TINY_EXPERTS
    assert held.buffers == sum(b.numel() * b.element_size() for b in model.buffers())
    assert held.other == 0


def test_views_of_one_flat_buffer_count_once_with_padding():
    flat = torch.zeros(1000)  # 4000 bytes, of which 3 x 300 elements are used
    module = nn.Module()
    for i in range(3):
        module.register_parameter(f"w{i}", nn.Parameter(flat[i * 300 : (i + 1) * 300]))
    module.w0.grad = torch.zeros(300)
    held = held_bytes(module)
    assert held.weights == 4000 and held.gradients == 1200 and held.parameters == 900


def test_bf16_weights_and_meta_parameters():
    module = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    module.register_parameter("absent", nn.Parameter(torch.empty(100, device="meta")))
    assert held_bytes(module).weights == 2 * 16 * 8


def test_resident_memory_and_its_peak_restart():
    now, peak = rss_bytes()
    assert 0 < now <= peak
    if reset_peak_rss():
        now2, peak2 = rss_bytes()
        assert peak2 <= max(peak, now2 + 64 * 2**20)


def test_zero_partitions_by_hand():
    # ZeRO-1 over 2 ranks halves the optimizer bytes; ZeRO-0 keeps AdamW's 8 bytes in fp32
    assert static_bytes(1000, 0, dp=2, ep=1, zero_stage=1, precision="bf16").optimizer == 12 * 500
    assert static_bytes(1000, 0, dp=1, ep=1, zero_stage=0, precision="fp32").optimizer == 8 * 1000
    # from the reduction to the update ZeRO-1 keeps only its gradient partition, as ZeRO-2 does
    assert static_bytes(1000, 0, dp=2, ep=1, zero_stage=1, precision="fp32").grads == 4 * 500
    # experts: ep=2 over 4 ranks leaves 2 expert-data-parallel ranks
    assert static_bytes(0, 400, dp=4, ep=2, zero_stage=1).optimizer == 12 * 200
    # bf16 pipeline at ZeRO-0 (BF16_Optimizer): bf16 .grad + an accumulation buffer, partitioned master
    pipe = static_bytes(1000, 0, dp=2, ep=1, zero_stage=0, precision="bf16", pipeline=True)
    assert (pipe.grads, pipe.optimizer) == (4 * 1000, 12 * 500)
    # whole tensors overlapping a rank's slice: [10, 10, 10] in slices of 16 (padded to 32)
    assert [zero_held_elements([10, 10, 10], 2, r) for r in (0, 1)] == [20, 20]
    assert zero_held_elements([8, 8], 2, 0) == 8 and zero_held_elements([8, 8], 2) == 8
    assert zero_held_elements([30], 1, 0) == 30 and zero_held_elements([], 2, 1) == 0


def test_plan_stage_split_is_the_trainers():
    for cfg in (load_config(None, TINY + ["model.n_layers=3"]), load_config(ROOT / "configs" / "bench_memory.yaml")):
        with torch.device("meta"):
            model = Transformer(cfg.model)
        parts = ModelParts.of(model)
        for pp in (2, 3):
            assert parts.stage_counts(pp) == [int(c) for c in balanced_counts(model, pp)]
        assert parts.stage_counts(2, "1,2") == [1, 2]  # parallel.pp_partition as given


def test_plan_of_ep2_halves_the_expert_bytes():
    cfg = load_config(None, TINY + ["train.precision=fp32", "parallel.zero_stage=1"])
    with torch.device("meta"):
        parts = ModelParts.of(Transformer(cfg.model))
    one = plan_layout(cfg, parts, Layout(2, 1, 1, 1, 2, 1, False), dp_rank=0).memory
    two = plan_layout(cfg, parts, Layout(2, 1, 2, 1, 2, 1, False), dp_rank=0).memory
    assert one.weights - two.weights == 4 * TINY_EXPERTS / 2


def test_layout_specs():
    lay = parse_layout("procs=2,ep=2,zero=1,precision=bf16,ckpt=true,parallel.offload_optimizer=cpu")
    assert lay == MemoryLayout(
        2,
        [
            "parallel.ep=2",
            "parallel.zero_stage=1",
            "train.precision=bf16",
            "parallel.activation_checkpointing=true",
            "parallel.offload_optimizer=cpu",
        ],
    )
    assert parse_layout(lay.name()) == lay
    assert parse_layout("zero=2").processes == 1
    assert all(parse_layout(s).processes in (1, 2) for s in DEFAULT_LAYOUTS)
    with pytest.raises(DsvError, match="not KEY=VALUE"):
        parse_layout("procs=2,ep")
    with pytest.raises(DsvError, match="positive integer"):
        parse_layout("procs=0")


@pytest.fixture(scope="module")
def zero3_process(one_torch_thread):
    """This process as a world of one (gloo), for DeepSpeed engines built in-process; the process
    group and the launcher variables it set are removed afterwards, and ``F.linear``, which a
    ZeRO-3 engine replaces for the rest of the process (DeepSpeed's ``memory_efficient_linear``),
    is put back for the tests that run after these in the same process."""
    import os

    import torch.distributed as dist
    import torch.nn.functional as F

    linear = F.linear

    from dsv3.parallel.distributed import init_distributed

    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    started_here = not dist.is_initialized()
    init_distributed()
    yield
    F.linear = linear
    if started_here and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _zero3_held(extra: list[str]):
    """A tiny bf16 model under DeepSpeed ZeRO-3 on one process, measured between the backward pass
    and the update of its second step; returns (HeldBytes, parameter count, parameter tensors,
    bytes of the optimizer's tensor step counters)."""
    from dsv3.parallel.engine import build_engine

    cfg = load_config(None, TINY + ["train.precision=bf16", "parallel.zero_stage=3", *extra])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    n, tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    engine, opt = build_engine(model, cfg, 1)
    ids = torch.randint(0, 512, (2, 64))
    for step in range(2):
        out = engine(ids, ids)
        engine.backward(out.lm_loss_sum + out.mtp_loss_sum.sum())
        if step == 1:
            # DeepSpeed's ZeRO-3 skips an update now and then (it reports an overflow): the Adam
            # state is then created here as a resumed run creates it, zero moments and a tensor step
            ds_internals.create_zero3_state(engine.optimizer, 1)
            held = held_bytes(engine.module, engine.optimizer, engine)
            steps = sum(4 for st in opt.state.values() if torch.is_tensor(st.get("step")))
            return held, n, tensors, steps
        engine.step()


@pytest.mark.distributed
def test_zero3_cpu_offload_by_hand(zero3_process):
    held, n, tensors, steps = _zero3_held(["parallel.offload_optimizer=cpu", "parallel.offload_param=cpu"])
    assert held.parameters == n and held.weights == 2 * n and held.gathered == 0
    # bf16 gradient partition, its fp32 copy (the .grad of the fp32 partition), one gradient norm per
    # parameter tensor (fp64) and, once an update computed it, the fp32 global norm
    assert held.gradients - held.holders.get("gradients:_global_grad_norm", 0) == 2 * n + 4 * n + 8 * tensors
    # fp32 partition and moments; DeepSpeed's CPU Adam counts steps in a Python int (a created state: a tensor)
    assert held.optimizer == 12 * n + steps


@pytest.mark.distributed
def test_zero3_partitions_by_hand(zero3_process):
    held, n, _, steps = _zero3_held([])
    # one rank holds every parameter's partition (ds_tensor, bf16); nothing gathered between backward and update
    assert held.parameters == n and held.weights == 2 * n and held.gathered == 0
    assert held.expert_weights == 2 * TINY_EXPERTS
    # the bf16 gradient partition (and, once an update computed it, DeepSpeed's fp64 global norm)
    assert held.gradients - held.holders.get("gradients:_global_grad_norm", 0) == 2 * n
    # fp32 partition + two moments, and torch AdamW's fp32 step counter per optimizer group (decay, no decay)
    assert held.optimizer == 12 * n + steps and steps == 2 * 4
    # the reduce bucket, allocated whole: 5e8 bf16 elements
    assert held.buckets == 2 * 5e8 and held.swap == 0
