"""Pipeline parallelism (parallel.pp): stages do not change the numbers, the tied embedding
stays bitwise equal on its two stages, checkpoints resume across pp, bad layouts fail early."""

import json
import shutil

import pytest
from helpers import assert_same_metrics as assert_metrics
from helpers import read_metrics as metrics
from helpers import run_dsv3, run_script, tiny_overrides

# global batch 8 = micro-batch 4 x 2 micro-batches; the 2-layer tiny model has one dense and one MoE block
COMMON = {
    "train.steps": 6,
    "ckpt.every": 3,
    "train.eval_every": 3,
    "parallel.micro_batch_size": 4,
    "parallel.grad_accum": 2,
    "train.precision": "fp32",
}


def assert_same_metrics(got, want):
    """Pipelines: agreement within 1e-5, relative or absolute (the issue's bound)."""
    assert_metrics(got, want, rel=1e-5, abs_tol=1e-5)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def rewind(run_dir, tag="step_0000003"):
    """Make ``tag`` the checkpoint a restart resumes from (as if the run had stopped there)."""
    ck = run_dir / "checkpoints"
    for other in ck.glob("step_*"):
        if other.name != tag:
            shutil.rmtree(other)
    (ck / "latest").write_text(tag + "\n")


@pytest.fixture(scope="module")
def reference(corpus_dir, data_cache, tmp_path_factory):
    """One process, one stage: the numbers every pipeline layout must reproduce."""
    out = tmp_path_factory.mktemp("pp") / "ref"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON)])
    return out


@pytest.fixture(scope="module")
def pp2(corpus_dir, data_cache, tmp_path_factory):
    """pp=2 on 2 processes (one replica), with the tied-embedding check after every step."""
    out = tmp_path_factory.mktemp("pp") / "pp2"
    args = tiny_overrides(corpus_dir, data_cache, out, **COMMON, **{"parallel.pp": 2})
    proc = run_script("tied_check.py", args, nproc=2)
    assert (
        "pipeline parallelism: 2 stages x 1 data-parallel replica(s) (stage 0: blocks 0-0; stage 1: blocks 1-1"
        in proc.stdout
    )
    assert "ZeRO-2/3 are not available with pipelines" in proc.stdout
    return out


@pytest.mark.distributed
def test_pp2_matches_pp1_and_tied_embedding_stays_equal(reference, pp2):
    got, want = metrics(pp2), metrics(reference)
    assert len([r for r in want if "loss" in r]) == 6
    assert_same_metrics(got, want)
    got = json.loads((pp2 / "tied_checks.json").read_text())
    checks = got["checks"]
    # the first stage holds the embedding and block 0 only
    assert got["held"] and all(n.startswith(("embed_tokens.", "layers.0.")) for n in got["held"])
    assert "embed_tokens.weight" in got["held"] and any(n.startswith("layers.0.") for n in got["held"])
    assert len(checks) == 6 and all(c["equal"] for c in checks) and all(c["moved"] for c in checks)
    # the saved weights are the whole model under the single-process names, equal to pp=1's
    a, b = weights(pp2 / "checkpoints" / "step_0000006"), weights(reference / "checkpoints" / "step_0000006")
    assert sorted(a) == sorted(b)
    for key in b:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key


@pytest.mark.distributed
def test_checkpoint_resumes_from_pp2_at_pp1(reference, pp2, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "to_pp1"
    shutil.copytree(pp2, out)
    rewind(out)
    proc = run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON)])
    assert "resumed from" in proc.stdout and "(saved with pp=2 ep=1 dp=1, now pp=1 ep=1 dp=1)" in proc.stdout
    assert_same_metrics(metrics(out), metrics(reference))


@pytest.mark.distributed
def test_checkpoint_resumes_from_pp1_at_pp2(reference, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "to_pp2"
    shutil.copytree(reference, out)
    rewind(out)
    proc = run_dsv3(
        ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON, **{"parallel.pp": 2})], nproc=2
    )
    assert "(saved with pp=1 ep=1 dp=1, now pp=2 ep=1 dp=1)" in proc.stdout
    assert_same_metrics(metrics(out), metrics(reference))


@pytest.mark.distributed
def test_zero1_pipeline_with_activation_checkpointing_and_resume_chain(reference, corpus_dir, data_cache, tmp_path):
    """ZeRO-1 + per-block activation checkpointing at pp=2 reproduces the reference; its step-3
    checkpoint resumes at pp=1 (ZeRO-1), whose step-4 checkpoint resumes at pp=2 again (through
    DeepSpeed's universal checkpoint)."""
    zero1 = {**COMMON, "parallel.zero_stage": 1}
    b = tmp_path / "b"
    run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(
                corpus_dir, data_cache, b, **zero1, **{"parallel.pp": 2, "parallel.activation_checkpointing": True}
            ),
        ],
        nproc=2,
    )
    assert_same_metrics(metrics(b), metrics(reference))

    c = tmp_path / "c"
    shutil.copytree(b, c)
    rewind(c)
    proc = run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, c, **{**zero1, "ckpt.every": 2})])
    assert "(saved with pp=2 ep=1 dp=1, now pp=1 ep=1 dp=1)" in proc.stdout
    assert_same_metrics(metrics(c), metrics(reference))
    assert any((c / "checkpoints" / "step_0000004").glob("zero_pp_rank_*optim_states.pt"))

    d = tmp_path / "d"
    shutil.copytree(c, d)
    rewind(d, "step_0000004")
    proc = run_dsv3(
        ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, d, **zero1, **{"parallel.pp": 2})], nproc=2
    )
    assert "resumed from" in proc.stdout and "at step 4 (saved with pp=1 ep=1 dp=1, now pp=2 ep=1 dp=1)" in proc.stdout
    assert_same_metrics(metrics(d), metrics(reference))


@pytest.mark.distributed
def test_pp2_by_ep2_on_four_processes_matches_one_process_and_resumes_at_pp1(
    reference, corpus_dir, data_cache, tmp_path
):
    """pp=2 x ep=2 (2 replicas per stage, each holding 4 of the 8 experts) against one process;
    its checkpoint holds whole experts and resumes without pipelines or expert parallelism."""
    out = tmp_path / "pp2ep2"
    args = tiny_overrides(
        corpus_dir, data_cache, out, **{**COMMON, "parallel.micro_batch_size": 2, "parallel.pp": 2, "parallel.ep": 2}
    )
    proc = run_dsv3(["train", "--no-sample", *args], nproc=4)
    assert "expert parallelism ep=2: 4 of 8 routed experts per rank" in proc.stdout
    # rank 0 (stage 0: embedding and the dense block 0) never allocates the other stage
    import torch

    from dsv3.config import load_config
    from dsv3.model import Transformer

    with torch.device("meta"):
        model = Transformer(load_config(None, args).model)
    held = model.embed_tokens.weight.numel() + sum(p.numel() for p in model.layers[0].parameters())
    assert f"parameters allocated on rank 0: {held:,}\n" in proc.stdout
    assert "2 stages x 2 data-parallel replica(s)" in proc.stdout
    assert_same_metrics(metrics(out), metrics(reference))
    a, b = weights(out / "checkpoints" / "step_0000006"), weights(reference / "checkpoints" / "step_0000006")
    assert sorted(a) == sorted(b) and a["layers.1.mlp.experts.gate_proj"].shape[0] == 8
    for key in b:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key
    rewind(out)
    proc = run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON)])
    assert "(saved with pp=2 ep=2 dp=2, now pp=1 ep=1 dp=1)" in proc.stdout
    assert_same_metrics(metrics(out), metrics(reference))


@pytest.mark.distributed
def test_init_from_on_pp2_by_ep2_reads_only_the_ranks_weights(reference, corpus_dir, data_cache, tmp_path):
    """train.init_from a Hugging Face folder (the reference exported in several shards) with
    pp=2 x ep=2: each rank reads only its stage (and expert rows), and the step-0 validation loss
    is the saved model's (the reference's last one)."""
    from dsv3.checkpoint import export_hf, resolve_checkpoint

    hf = tmp_path / "hf"
    export_hf(resolve_checkpoint(reference), hf, max_shard_bytes=400_000)
    assert len(list(hf.glob("*.safetensors"))) > 2
    out = tmp_path / "init"
    args = tiny_overrides(
        corpus_dir,
        data_cache,
        out,
        **{**COMMON, "parallel.micro_batch_size": 2, "parallel.pp": 2, "parallel.ep": 2, "train.steps": 1},
    )
    proc = run_dsv3(["train", "--no-sample", f"train.init_from={hf}", *args], nproc=4)
    assert f"initialized weights from {hf}" in proc.stdout
    import torch

    from dsv3.config import load_config
    from dsv3.model import Transformer

    with torch.device("meta"):
        model = Transformer(load_config(None, args).model)
    held = model.embed_tokens.weight.numel() + sum(p.numel() for p in model.layers[0].parameters())
    assert f"parameters allocated on rank 0: {held:,}\n" in proc.stdout
    saved = [r["val_loss"] for r in metrics(reference) if "val_loss" in r][-1]
    first = metrics(out)[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(saved, rel=1e-5)


@pytest.mark.distributed
def test_nonfinite_loss_on_the_last_stage_skips_the_update_on_every_stage(corpus_dir, data_cache, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "nan"
    args = tiny_overrides(
        corpus_dir,
        data_cache,
        out,
        **{"train.steps": 4, "ckpt.every": 4, "train.eval_every": 0, "train.nonfinite": "skip", "parallel.pp": 2},
    )
    run_script("nan_at_step.py", ["pipeline", "3", "train", "--no-sample", *args], nproc=2)
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r.get("skipped", False) for r in recs] == [False, False, True, False]
    # neither stage's AdamW took the skipped update: 3 steps after 4
    with safe_open(str(out / "checkpoints" / "step_0000004" / "layout_free.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "3"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"parallel.pp": 2, "parallel.zero_stage": 2},
            "parallel.zero_stage=2 is not available with pipeline parallelism (parallel.pp=2)",
        ),
        ({"parallel.pp": 2}, "parallel.pp=2 does not divide the 1 process(es)"),
    ],
)
def test_impossible_pipeline_layouts_fail_at_start(overrides, message, corpus_dir, data_cache, tmp_path):
    proc = run_dsv3(
        ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, tmp_path / "x", **overrides)], check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
