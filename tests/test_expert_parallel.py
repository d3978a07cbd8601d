"""Expert parallelism (parallel.ep): the split does not change the numbers, checkpoints hold
every expert, and impossible layouts fail at start-up."""

import json
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, assert_same_metrics, read_metrics as metrics, run_dsv3, tiny_overrides

COMMON = {"train.steps": 4, "ckpt.every": 2, "ckpt.keep_last": 2, "train.eval_every": 2, "train.sample_tokens": 4}


@pytest.fixture(scope="module")
def reference(corpus_dir, data_cache, tmp_path_factory):
    """One process, no expert parallelism: the numbers every layout must reproduce."""
    out = tmp_path_factory.mktemp("ep") / "ref"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON)])
    return out


def train_ep(corpus_dir, data_cache, out, nproc, ep=2, **extra):
    """``dsv3 train`` with parallel.ep=ep on ``nproc`` processes, same global batch as the reference."""
    mbs = 4 // nproc
    args = ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON, **{
        "parallel.micro_batch_size": mbs, "parallel.ep": ep, **extra})]
    proc = run_dsv3(args, nproc=nproc)
    assert f"expert parallelism ep={ep}: {8 // ep} of 8 routed experts per rank" in proc.stdout
    # rank 0 allocates its own expert blocks only (the model is built on the meta device)
    import torch

    from dsv3.config import load_config
    from dsv3.model import Transformer

    with torch.device("meta"):
        model = Transformer(load_config(None, args[2:]).model)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert f"parameters allocated on rank 0: {total - experts + experts // ep:,}\n" in proc.stdout
    return args


def test_ep2_zero0_matches_ep1_and_checkpoint_holds_every_expert(reference, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "ep2"
    train_ep(corpus_dir, data_cache, out, nproc=2, **{"parallel.zero_stage": 0})
    assert_same_metrics(metrics(out), metrics(reference))
    from safetensors import safe_open

    ck = out / "checkpoints" / "step_0000004"
    with safe_open(str(ck / "model.safetensors"), "pt") as a, \
            safe_open(str(reference / "checkpoints" / "step_0000004" / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in b.keys():
            assert a.get_slice(key).get_shape() == b.get_slice(key).get_shape(), key
        assert a.get_slice("layers.1.mlp.experts.gate_proj").get_shape()[0] == 8
        bias = "layers.1.mlp.gate.e_score_correction_bias"  # global loads -> the same bias updates
        assert a.get_tensor(bias).abs().sum() > 0 and a.get_tensor(bias).equal(b.get_tensor(bias))
    # DeepSpeed's per-expert files: every expert of every MoE layer once, under its global index
    assert sorted(p.name for p in ck.glob("layer_*_expert_*")) == sorted(
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(8))
    from dsv3 import load_model

    model = load_model(out)
    assert model.layers[1].mlp.experts.gate_proj.shape[0] == 8
    proc = run_dsv3(["generate", "--ckpt", str(out), "--prompt", "def f(", "--max-new-tokens", "4",
                     "--temperature", "0"])
    assert "def f(" in proc.stdout


@pytest.fixture(scope="module")
def ep2_zero1(reference, corpus_dir, data_cache, tmp_path_factory):
    """ep=2 on 2 processes under ZeRO-1: (run dir, its arguments)."""
    out = tmp_path_factory.mktemp("ep") / "ep2"
    return out, train_ep(corpus_dir, data_cache, out, nproc=2, **{"parallel.zero_stage": 1})


def rewind(src, dst, tag="step_0000002"):
    """Copy run ``src`` to ``dst`` as if it had been interrupted right after saving ``tag``."""
    shutil.copytree(src, dst)
    ck = dst / "checkpoints"
    for later in ck.glob("step_*"):
        if later.name > tag:
            shutil.rmtree(later)
    (ck / "latest").write_text(tag + "\n")
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= int(tag[5:])))
    return dst


def test_ep2_zero1_matches_ep1_and_resumes_bitwise(ep2_zero1, reference, tmp_path):
    out, args = ep2_zero1
    full = metrics(out)
    assert_same_metrics(full, metrics(reference))
    # resume from step 2 as an interrupted run would: same layout -> bit for bit the same log
    again = rewind(out, tmp_path / "again")
    proc = run_dsv3([a.replace(str(out), str(again)) for a in args], nproc=2)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert metrics(again) == full


@pytest.mark.parametrize("nproc, ep, zero", [(1, 1, 0), (4, 4, 1)])
def test_ep2_checkpoint_resumes_with_another_ep(ep2_zero1, reference, corpus_dir, data_cache, tmp_path, nproc, ep,
                                                zero):
    """E=2 -> E=1 (one process, plain AdamW) and E=2 -> E=4 (four processes, ZeRO-1 partitions): weights,
    AdamW moments and step count come from the layout-free optimizer state, so the steps after the
    resume match the uninterrupted single-process run (to float rounding: another summation order)."""
    out = rewind(ep2_zero1[0], tmp_path / "resharded")
    args = ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON, **{
        "parallel.micro_batch_size": 4 // nproc, "parallel.ep": ep, "parallel.zero_stage": zero})]
    proc = run_dsv3(args, nproc=nproc)
    assert f"at step 2 (saved with pp=1 ep=2 dp=2, now pp=1 ep={ep} dp={nproc})" in proc.stdout
    got = metrics(out)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert_same_metrics(got[3:], metrics(reference)[3:])


def test_checkpoint_without_ep_resumes_with_ep2(reference, corpus_dir, data_cache, tmp_path):
    """E=1 -> E=2: the single-process fp32 checkpoint (AdamW state in DeepSpeed's model-states file)
    is split into expert blocks on resume."""
    out = rewind(reference, tmp_path / "run")
    args = ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON, **{
        "parallel.micro_batch_size": 2, "parallel.ep": 2})]
    proc = run_dsv3(args, nproc=2)
    assert "at step 2 (saved with pp=1 ep=1 dp=1, now pp=1 ep=2 dp=2)" in proc.stdout
    assert_same_metrics(metrics(out)[3:], metrics(reference)[3:])


def test_ep2_dp2_zero2_four_processes_matches_ep1(reference, corpus_dir, data_cache, tmp_path):
    """ep=2 x 2 expert-data-parallel replicas: ZeRO-2 partitions each expert block (optimizer state
    and gradients) over its 2 replicas and the other parameters over all 4 ranks."""
    out = tmp_path / "ep2dp2"
    train_ep(corpus_dir, data_cache, out, nproc=4, **{"parallel.zero_stage": 2})
    assert_same_metrics(metrics(out), metrics(reference))


def test_ep4_four_processes_matches_ep1(reference, corpus_dir, data_cache, tmp_path):
    """Every rank holds 2 of the 8 experts; no expert data parallelism."""
    out = tmp_path / "ep4"
    train_ep(corpus_dir, data_cache, out, nproc=4, ep=4, **{"parallel.zero_stage": 1})
    assert_same_metrics(metrics(out), metrics(reference))


UNIT = r"""
import sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
torch.set_num_threads(1)
from dsv3.config import ModelConfig
from dsv3.model.moe import MoE
from dsv3.parallel.expert_parallel import apply_expert_parallel, clip_grad_norm_, is_expert_param

rank, world = dist.get_rank(), dist.get_world_size()
cfg = ModelConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2,
                  n_limited_groups=1, n_shared_experts=1, route_scale=2.5)


def build(bias):
    gen = torch.Generator().manual_seed(0)
    m = MoE(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        m.gate.e_score_correction_bias.copy_(bias)
    return m


def inputs(r):
    gen = torch.Generator().manual_seed(100 + r)
    n = 5 + 2 * r  # a different number of tokens on each rank
    return torch.randn(1, n, cfg.dim, generator=gen), torch.randn(1, n, cfg.dim, generator=gen)


def check(bias, name):
    # reference: one unsplit layer over the tokens of every rank
    ref = build(bias)
    xs = [inputs(r)[0].requires_grad_() for r in range(world)]
    outs = [ref(x) for x in xs]
    sum((y * inputs(r)[1]).sum() for r, (y, _) in enumerate(outs)).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)

    m = build(bias)
    apply_expert_parallel(m, world)
    x, c = inputs(rank)
    x.requires_grad_()
    y, aux = m(x)
    assert torch.allclose(y, outs[rank][0], atol=1e-5, rtol=1e-5), (name, (y - outs[rank][0]).abs().max())
    assert torch.equal(aux.load, outs[rank][1].load)
    (y * c).sum().backward()
    assert torch.allclose(x.grad, xs[rank].grad, atol=1e-5, rtol=1e-5), (name, "input gradient")
    ex = m.experts
    got = dict(m.named_parameters())
    for n, p in ref.named_parameters():
        g = got[n].grad
        if is_expert_param(got[n]):  # local block: already summed over the tokens of every rank
            want = p.grad[ex.first_expert:ex.first_expert + ex.num_local_experts]
        else:  # replicated: data-parallel sum
            dist.all_reduce(g)
            want = p.grad
        assert torch.allclose(g, want, atol=1e-5, rtol=1e-5), (name, n, (g - want).abs().max())
    norm = clip_grad_norm_(m.parameters(), 1e9)
    assert torch.allclose(norm, ref_norm, rtol=1e-5), (name, norm, ref_norm)
    expert_sq = sum(float(p.grad.pow(2).sum()) for p in m.parameters() if is_expert_param(p))
    sys.stdout.write(f"rank {rank} {name}: experts {ex.first_expert}..{ex.first_expert + ex.num_local_experts - 1} "
                     f"received {'no' if expert_sq == 0 else 'some'} tokens\n")
    sys.stdout.flush()
    return expert_sq


check(torch.zeros(cfg.n_routed_experts), "balanced")
bias = torch.zeros(cfg.n_routed_experts)
bias[: cfg.n_routed_experts // world] = 100.0  # route every token to the experts of rank 0
sq = check(bias, "all to rank 0")
assert (sq == 0) == (rank != 0), (rank, sq)

# built on the meta device: the split allocates nothing, then only this rank's block is allocated,
# with the values the unsplit layer has (per-expert seeds of the global expert indices)
from dsv3.model.init import allocated_elements, init_module_, materialize_

full = MoE(cfg)
init_module_(full, 3, 0.02)
with torch.device("meta"):
    lazy = MoE(cfg)
apply_expert_parallel(lazy, world)
assert allocated_elements(lazy) == 0
n = materialize_(lazy, "cpu", 3, 0.02)
assert n == 8 * 32 + 3 * 32 * 16 + 3 * 4 * 16 * 32 == allocated_elements(lazy), n  # gate, shared, 4 of 8 experts
first = lazy.experts.first_expert
for w in ("gate_proj", "up_proj", "down_proj"):
    p = getattr(lazy.experts, w)
    assert is_expert_param(p) and torch.equal(p, getattr(full.experts, w)[first:first + 4]), w
assert torch.equal(lazy.gate.weight, full.gate.weight) and torch.equal(lazy.shared_experts.up_proj.weight,
                                                                       full.shared_experts.up_proj.weight)

# saved in the unsplit layout: each rank writes its own expert rows and half of each replicated
# tensor into one file, which equals the unsplit layer's state dict; nothing is gathered
from safetensors.torch import load_file
from dsv3.checkpoint.safetensors_io import SafetensorsLayout
from dsv3.parallel.unsplit_save import save_weights

pieces = []
plain_write = SafetensorsLayout.write
SafetensorsLayout.write = lambda self, fd, piece: pieces.append(piece) or plain_write(self, fd, piece)
path = sys.argv[1] + "/moe.safetensors"
assert save_weights(path, lazy, [n for n, _ in lazy.named_parameters()], 0, (rank, world), {}) is None
saved = load_file(path)
assert sorted(saved) == sorted(full.state_dict())
for k, v in full.state_dict().items():
    assert torch.equal(saved[k], v), k
for piece in pieces:
    if piece.key.startswith("experts."):  # exactly this rank's 4 of 8 experts
        row = getattr(full.experts, piece.key.split(".")[1])[0].numel()
        assert (piece.start, piece.values.numel()) == (first * row, 4 * row), piece.key
    elif piece.key != "gate.e_score_correction_bias":  # buffers: rank 0 writes them whole
        n = full.state_dict()[piece.key].numel()
        assert (piece.start, piece.values.numel()) == (rank * n // 2, (rank + 1) * n // 2 - rank * n // 2), piece.key
replicated = [v.numel() for k, v in full.state_dict().items() if k.split(".")[0] in ("gate", "shared_experts")
              and k != "gate.e_score_correction_bias"]
assert sum(p.values.numel() for p in pieces) == sum((rank + 1) * n // 2 - rank * n // 2 for n in replicated) \
    + 3 * 4 * 16 * 32 + (rank == 0) * 8  # + 4 experts' 3 matrices, + the routing biases on rank 0
print(f"rank {rank} OK", flush=True)
dist.barrier()
dist.destroy_process_group()  # a rank leaving while the other still talks aborts gloo at exit
"""


def test_ep_layer_matches_unsplit_layer_including_a_rank_without_tokens(tmp_path):
    """Forward / backward / norm of a split layer equal the unsplit layer's; a layer built on the
    meta device allocates only the local experts, with the unsplit layer's initial values; saving
    it writes the unsplit state dict, each rank its own expert rows and half of the rest."""
    script = tmp_path / "ep_unit.py"
    script.write_text(UNIT)
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "rank 0 OK" in proc.stdout and "rank 1 OK" in proc.stdout
    assert "rank 1 all to rank 0: experts 4..7 received no tokens" in proc.stdout


@pytest.mark.parametrize("ep, message", [
    (2, "parallel.ep=2 does not divide the 1 process(es)"),
    (3, "model.n_routed_experts=8 is not divisible by parallel.ep=3"),
])
def test_impossible_layout_is_one_line_exit_2(corpus_dir, data_cache, tmp_path, ep, message):
    proc = run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, tmp_path / "run",
                                                             **{"parallel.ep": ep})], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("dsv3:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_check_launch_accepts_ep():
    from dsv3.config import load_config
    from dsv3.parallel.layout import check_launch
    from dsv3.errors import DsvError

    check_launch(load_config(None, ["parallel.ep=2"]), 2)
    with pytest.raises(DsvError, match="zero_stage=3"):
        check_launch(load_config(None, ["parallel.ep=2", "parallel.zero_stage=3"]), 2)


def test_layout_messages_name_the_data_parallel_size_and_working_ep_values():
    from dsv3.errors import DsvError
    from dsv3.parallel.layout import check_expert_parallel as check_layout

    with pytest.raises(DsvError, match=r"^parallel.ep=4 does not divide the 2 process\(es\); run a multiple of 4 "
                                       r"processes or choose ep in \[1, 2\]$"):
        check_layout(4, 8, 2)
    # 2 processes, pp=2: the data-parallel size is 1, so ep=2 needs 4 processes
    with pytest.raises(DsvError, match=r"^parallel.ep=2 does not divide the data-parallel size 1 \(2 processes / "
                                       r"parallel.pp=2\); run a multiple of 4 processes or choose ep in \[1\]$"):
        check_layout(2, 8, 1, pp=2)
    with pytest.raises(DsvError, match=r"n_routed_experts=8 is not divisible by parallel.ep=3; choose ep in \[1, 2\]$"):
        check_layout(3, 8, 6)
    check_layout(2, 8, 6)
