"""Expert parallelism (parallel.ep): the split does not change the numbers, checkpoints hold
every expert, and impossible layouts fail at start-up."""

import pytest
from helpers import assert_same_metrics, rewind, run_dsv3, run_script, tiny_overrides
from helpers import read_metrics as metrics

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
    args = [
        "train",
        "--no-sample",
        *tiny_overrides(
            corpus_dir, data_cache, out, **COMMON, **{"parallel.micro_batch_size": mbs, "parallel.ep": ep, **extra}
        ),
    ]
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


@pytest.mark.distributed
def test_ep2_zero0_matches_ep1_and_checkpoint_holds_every_expert(reference, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "ep2"
    train_ep(corpus_dir, data_cache, out, nproc=2, **{"parallel.zero_stage": 0})
    assert_same_metrics(metrics(out), metrics(reference))
    from safetensors import safe_open

    ck = out / "checkpoints" / "step_0000004"
    with (
        safe_open(str(ck / "model.safetensors"), "pt") as a,
        safe_open(str(reference / "checkpoints" / "step_0000004" / "model.safetensors"), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        for key in b.keys():
            assert a.get_slice(key).get_shape() == b.get_slice(key).get_shape(), key
        assert a.get_slice("layers.1.mlp.experts.gate_proj").get_shape()[0] == 8
        bias = "layers.1.mlp.gate.e_score_correction_bias"  # global loads -> the same bias updates
        assert a.get_tensor(bias).abs().sum() > 0 and a.get_tensor(bias).equal(b.get_tensor(bias))
    # DeepSpeed's per-expert files: every expert of every MoE layer once, under its global index
    assert sorted(p.name for p in ck.glob("layer_*_expert_*")) == sorted(
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(8)
    )
    from dsv3 import load_model

    model = load_model(out)
    assert model.layers[1].mlp.experts.gate_proj.shape[0] == 8
    proc = run_dsv3(
        ["generate", "--ckpt", str(out), "--prompt", "def f(", "--max-new-tokens", "4", "--temperature", "0"]
    )
    assert "def f(" in proc.stdout


@pytest.fixture(scope="module")
def ep2_zero1(reference, corpus_dir, data_cache, tmp_path_factory):
    """ep=2 on 2 processes under ZeRO-1: (run dir, its arguments)."""
    out = tmp_path_factory.mktemp("ep") / "ep2"
    return out, train_ep(corpus_dir, data_cache, out, nproc=2, **{"parallel.zero_stage": 1})


@pytest.mark.distributed
def test_ep2_zero1_matches_ep1_and_resumes_bitwise(ep2_zero1, reference, tmp_path):
    out, args = ep2_zero1
    full = metrics(out)
    assert_same_metrics(full, metrics(reference))
    # resume from step 2 as an interrupted run would: same layout -> bit for bit the same log
    again = rewind(out, tmp_path / "again")
    proc = run_dsv3([a.replace(str(out), str(again)) for a in args], nproc=2)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert metrics(again) == full


@pytest.mark.distributed
@pytest.mark.parametrize("nproc, ep, zero", [(1, 1, 0), (4, 4, 1)])
def test_ep2_checkpoint_resumes_with_another_ep(
    ep2_zero1, reference, corpus_dir, data_cache, tmp_path, nproc, ep, zero
):
    """E=2 -> E=1 (one process, plain AdamW) and E=2 -> E=4 (four processes, ZeRO-1 partitions): weights,
    AdamW moments and step count come from the layout-free optimizer state, so the steps after the
    resume match the uninterrupted single-process run (to float rounding: another summation order)."""
    out = rewind(ep2_zero1[0], tmp_path / "resharded")
    args = [
        "train",
        "--no-sample",
        *tiny_overrides(
            corpus_dir,
            data_cache,
            out,
            **COMMON,
            **{"parallel.micro_batch_size": 4 // nproc, "parallel.ep": ep, "parallel.zero_stage": zero},
        ),
    ]
    proc = run_dsv3(args, nproc=nproc)
    assert f"at step 2 (saved with pp=1 ep=2 dp=2, now pp=1 ep={ep} dp={nproc})" in proc.stdout
    got = metrics(out)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert_same_metrics(got[3:], metrics(reference)[3:])


@pytest.mark.distributed
def test_checkpoint_without_ep_resumes_with_ep2(reference, corpus_dir, data_cache, tmp_path):
    """E=1 -> E=2: the single-process fp32 checkpoint (AdamW state in DeepSpeed's model-states file)
    is split into expert blocks on resume."""
    out = rewind(reference, tmp_path / "run")
    args = [
        "train",
        "--no-sample",
        *tiny_overrides(corpus_dir, data_cache, out, **COMMON, **{"parallel.micro_batch_size": 2, "parallel.ep": 2}),
    ]
    proc = run_dsv3(args, nproc=2)
    assert "at step 2 (saved with pp=1 ep=1 dp=1, now pp=1 ep=2 dp=2)" in proc.stdout
    assert_same_metrics(metrics(out)[3:], metrics(reference)[3:])


@pytest.mark.distributed
def test_ep2_dp2_zero2_four_processes_matches_ep1(reference, corpus_dir, data_cache, tmp_path):
    """ep=2 x 2 expert-data-parallel replicas: ZeRO-2 partitions each expert block (optimizer state
    and gradients) over its 2 replicas and the other parameters over all 4 ranks."""
    out = tmp_path / "ep2dp2"
    train_ep(corpus_dir, data_cache, out, nproc=4, **{"parallel.zero_stage": 2})
    assert_same_metrics(metrics(out), metrics(reference))


@pytest.mark.distributed
def test_ep4_four_processes_matches_ep1(reference, corpus_dir, data_cache, tmp_path):
    """Every rank holds 2 of the 8 experts; no expert data parallelism."""
    out = tmp_path / "ep4"
    train_ep(corpus_dir, data_cache, out, nproc=4, ep=4, **{"parallel.zero_stage": 1})
    assert_same_metrics(metrics(out), metrics(reference))


@pytest.mark.distributed
def test_ep_layer_matches_unsplit_layer_including_a_rank_without_tokens(tmp_path):
    """Forward / backward / norm of a split layer equal the unsplit layer's; a layer built on the
    meta device allocates only the local experts, with the unsplit layer's initial values; saving
    it writes the unsplit state dict, each rank its own expert rows and half of the rest."""
    proc = run_script("ep_unit.py", [str(tmp_path)], nproc=2)
    assert "rank 0 OK" in proc.stdout and "rank 1 OK" in proc.stdout
    assert "rank 1 all to rank 0: experts 4..7 received no tokens" in proc.stdout


@pytest.mark.parametrize(
    "ep, message",
    [
        (2, "parallel.ep=2 does not divide the 1 process(es)"),
        (3, "model.n_routed_experts=8 is not divisible by parallel.ep=3"),
    ],
)
def test_impossible_layout_is_one_line_exit_2(corpus_dir, data_cache, tmp_path, ep, message):
    proc = run_dsv3(
        ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, tmp_path / "run", **{"parallel.ep": ep})],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("dsv3:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
