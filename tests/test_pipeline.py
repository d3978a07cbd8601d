"""Pipeline parallelism (parallel.pp): stages do not change the numbers, the tied embedding
stays bitwise equal on its two stages, checkpoints resume across pp, bad layouts fail early."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, assert_same_metrics as assert_metrics, read_metrics as metrics, run_dsv3, tiny_overrides

# global batch 8 = micro-batch 4 x 2 micro-batches; the 2-layer tiny model has one dense and one MoE block
COMMON = {"train.steps": 6, "ckpt.every": 3, "train.eval_every": 3, "parallel.micro_batch_size": 4,
          "parallel.grad_accum": 2, "train.precision": "fp32"}

# runs a pp=2 training in-process and checks, after every optimizer step, that the two copies of
# the tied embedding (first stage, last stage) are bitwise equal and moved
TIED_CHECK = """
import json, sys
import torch, torch.distributed as dist
from dsv3.config import load_config
from dsv3.training.trainer import Trainer

t = Trainer(load_config(None, sys.argv[1:]))
start = t.model.embed_tokens.weight.detach().clone()
checks = []
plain = t.train_step

def step(s):
    rec = plain(s)
    w = t.model.embed_tokens.weight.detach().clone()
    ws = [torch.empty_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(ws, w)
    checks.append({"equal": all(torch.equal(ws[0], x) for x in ws), "moved": not torch.equal(w, start)})
    return rec

t.train_step = step
held = sorted(n for n, p in t.model.named_parameters() if not p.is_meta)
t.run()
if dist.get_rank() == 0:
    open(t.out_dir / "tied_checks.json", "w").write(json.dumps({"checks": checks, "held": held}))
"""


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
    script = out.parent / "tied_check.py"
    script.write_text(TIED_CHECK)
    args = tiny_overrides(corpus_dir, data_cache, out, **COMMON, **{"parallel.pp": 2})
    import os

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "pipeline parallelism: 2 stages x 1 data-parallel replica(s) (stage 0: blocks 0-0; stage 1: blocks 1-1" \
        in proc.stdout
    assert "ZeRO-2/3 are not available with pipelines" in proc.stdout
    return out


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


def test_checkpoint_resumes_from_pp2_at_pp1(reference, pp2, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "to_pp1"
    shutil.copytree(pp2, out)
    rewind(out)
    proc = run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON)])
    assert "resumed from" in proc.stdout and "(saved with pp=2 ep=1 dp=1, now pp=1 ep=1 dp=1)" in proc.stdout
    assert_same_metrics(metrics(out), metrics(reference))


def test_checkpoint_resumes_from_pp1_at_pp2(reference, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "to_pp2"
    shutil.copytree(reference, out)
    rewind(out)
    proc = run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON,
                                                             **{"parallel.pp": 2})], nproc=2)
    assert "(saved with pp=1 ep=1 dp=1, now pp=2 ep=1 dp=1)" in proc.stdout
    assert_same_metrics(metrics(out), metrics(reference))


def test_zero1_pipeline_with_activation_checkpointing_and_resume_chain(reference, corpus_dir, data_cache, tmp_path):
    """ZeRO-1 + per-block activation checkpointing at pp=2 reproduces the reference; its step-3
    checkpoint resumes at pp=1 (ZeRO-1), whose step-4 checkpoint resumes at pp=2 again (through
    DeepSpeed's universal checkpoint)."""
    zero1 = {**COMMON, "parallel.zero_stage": 1}
    b = tmp_path / "b"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, b, **zero1, **{
        "parallel.pp": 2, "parallel.activation_checkpointing": True})], nproc=2)
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
    proc = run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, d, **zero1, **{
        "parallel.pp": 2})], nproc=2)
    assert "resumed from" in proc.stdout and "at step 4 (saved with pp=1 ep=1 dp=1, now pp=2 ep=1 dp=1)" in proc.stdout
    assert_same_metrics(metrics(d), metrics(reference))


def test_pp2_by_ep2_on_four_processes_matches_one_process_and_resumes_at_pp1(reference, corpus_dir, data_cache,
                                                                         tmp_path):
    """pp=2 x ep=2 (2 replicas per stage, each holding 4 of the 8 experts) against one process;
    its checkpoint holds whole experts and resumes without pipelines or expert parallelism."""
    out = tmp_path / "pp2ep2"
    args = tiny_overrides(corpus_dir, data_cache, out, **{**COMMON, "parallel.micro_batch_size": 2, "parallel.pp": 2,
                                                          "parallel.ep": 2})
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


def test_init_from_on_pp2_by_ep2_reads_only_the_ranks_weights(reference, corpus_dir, data_cache, tmp_path):
    """train.init_from a Hugging Face folder (the reference exported in several shards) with
    pp=2 x ep=2: each rank reads only its stage (and expert rows), and the step-0 validation loss
    is the saved model's (the reference's last one)."""
    from dsv3.checkpoint import export_hf, resolve_checkpoint

    hf = tmp_path / "hf"
    export_hf(resolve_checkpoint(reference), hf, max_shard_bytes=400_000)
    assert len(list(hf.glob("*.safetensors"))) > 2
    out = tmp_path / "init"
    args = tiny_overrides(corpus_dir, data_cache, out, **{**COMMON, "parallel.micro_batch_size": 2, "parallel.pp": 2,
                                                          "parallel.ep": 2, "train.steps": 1})
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


NAN_AT_STEP_3 = """
import sys, torch
import dsv3.parallel.pipeline as P
plain = P.HeadLayer.forward
calls = {"n": 0}
def forward(self, inputs):
    lm_sum, mtp, balance, tokens = plain(self, inputs)
    if torch.is_grad_enabled():
        calls["n"] += 1
        if calls["n"] == 3:  # the 3rd training micro-batch = optimizer step 3
            lm_sum = lm_sum * float("nan")
    return lm_sum, mtp, balance, tokens
P.HeadLayer.forward = forward
from dsv3.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_nonfinite_loss_on_the_last_stage_skips_the_update_on_every_stage(corpus_dir, data_cache, tmp_path):
    import os

    from safetensors import safe_open

    out = tmp_path / "nan"
    script = tmp_path / "nan.py"
    script.write_text(NAN_AT_STEP_3)
    args = tiny_overrides(corpus_dir, data_cache, out, **{"train.steps": 4, "ckpt.every": 4, "train.eval_every": 0,
                                                          "train.nonfinite": "skip", "parallel.pp": 2})
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "train", "--no-sample", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r.get("skipped", False) for r in recs] == [False, False, True, False]
    # neither stage's AdamW took the skipped update: 3 steps after 4
    with safe_open(str(out / "checkpoints" / "step_0000004" / "layout_free.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "3"


@pytest.mark.parametrize("overrides, message", [
    ({"parallel.pp": 2, "parallel.zero_stage": 2},
     "parallel.zero_stage=2 is not available with pipeline parallelism (parallel.pp=2)"),
    ({"parallel.pp": 2}, "parallel.pp=2 does not divide the 1 process(es)"),
])
def test_impossible_pipeline_layouts_fail_at_start(overrides, message, corpus_dir, data_cache, tmp_path):
    proc = run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, tmp_path / "x", **overrides)],
                    check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr


def test_stage_split_checks():
    from dsv3.config import load_config
    from dsv3.errors import DsvError
    from dsv3.parallel.layout import check_pipeline as check_layout

    def cfg(**kw):
        return load_config(None, [f"{k}={v}" for k, v in {"model.n_layers": 4, **kw}.items()])

    assert check_layout(cfg(**{"parallel.pp": 2}), 4) is None  # by parameter count, decided later
    assert check_layout(cfg(**{"parallel.pp": 2, "parallel.pp_partition": "3,1"}), 2) == [3, 1]
    with pytest.raises(DsvError, match=r"parallel.pp=5 stages but the model has only model.n_layers=4 blocks"):
        check_layout(cfg(**{"parallel.pp": 5}), 5)
    with pytest.raises(DsvError, match=r"parallel.pp_partition='2,1' must be .* sum to model.n_layers=4 \(e.g. 2,2\)"):
        check_layout(cfg(**{"parallel.pp": 2, "parallel.pp_partition": "2,1"}), 2)
    with pytest.raises(DsvError, match=r"parallel.pp=2 does not divide the 3 process\(es\)"):
        check_layout(cfg(**{"parallel.pp": 2}), 3)
    with pytest.raises(DsvError, match=r"data.document_aware=true is not available with pipeline parallelism"):
        check_layout(cfg(**{"parallel.pp": 2, "data.document_aware": True}), 2)


def test_pipeline_with_ep_and_zero1_needs_a_moe_block_on_every_stage():
    """DeepSpeed's ZeRO optimizer reduces one gradient norm per optimizer group over the stages; a
    stage without MoE layers has no expert group and the run would hang: refused up front."""
    from dsv3.config import load_config
    from dsv3.errors import DsvError
    from dsv3.parallel.layout import check_launch

    def check(*extra):
        return check_launch(load_config(None, ["parallel.pp=2", "parallel.ep=2", "model.n_layers=4", *extra]), 4)

    with pytest.raises(DsvError, match=r"pipeline stage 0 holds only dense blocks \(0-0\), but with parallel.ep=2 and "
                                       r"ZeRO stage 1 every stage needs a MoE block .*; set "
                                       r"parallel.pp_partition=2,2 or parallel.zero_stage=0$"):
        check("parallel.zero_stage=1", "parallel.pp_partition=1,3")
    with pytest.raises(DsvError, match=r"blocks \(0-0\).*; set parallel.zero_stage=0$"):  # no split leaves MoE on both
        check("parallel.zero_stage=1", "model.n_layers=2")
    assert check("parallel.zero_stage=1") is None  # split by parameters: blocks 0-2 and 3
    assert check("parallel.zero_stage=1", "parallel.pp_partition=2,2") == [2, 2]
    assert check("parallel.zero_stage=0", "parallel.pp_partition=1,3") == [1, 3]
