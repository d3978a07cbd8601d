"""Checkpoints and fault tolerance: signals, exact resume, corrupt checkpoints, layout changes,
the non-finite guard and failed saves."""

import json
import shutil
import signal
import subprocess

import pytest
import torch
from helpers import launch, run_dsv3, run_script, tiny_overrides, wait_for_step
from helpers import read_metrics as metrics


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def test_signal_mid_run_then_resume_is_bitwise_identical(corpus_dir, data_cache, tmp_path):
    extra = {"train.steps": 30, "ckpt.every": 50, "train.eval_every": 10}
    ref = tmp_path / "ref"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, ref, **extra)])
    out = tmp_path / "run"
    args = ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **extra)]
    proc = launch(args)
    wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("dsv3:")][-1]
    assert "stopped by signal at step" in line and "run the same command again" in line
    stopped = int(line.split("at step ")[1].split()[0])
    assert 5 <= stopped < 30
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    run_dsv3(args)
    assert metrics(out) == metrics(ref)
    # TensorBoard: each step once, increasing, across the interruption
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/lm")]
    assert steps == sorted(set(steps)) and steps[-1] == 30 and len(steps) == 30


@pytest.mark.distributed
def test_two_process_signal_to_one_rank_and_resume(corpus_dir, data_cache, tmp_path):
    extra = {
        "train.steps": 16,
        "ckpt.every": 50,
        "train.eval_every": 8,
        "parallel.micro_batch_size": 2,
        "parallel.zero_stage": 1,
    }
    ref = tmp_path / "ref"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, ref, **extra)], nproc=2)
    out = tmp_path / "run"
    args = ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **extra)]
    proc = launch(args, nproc=2)
    wait_for_step(out, 3, proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    import os

    os.kill(max(workers), signal.SIGUSR1)  # one rank only
    proc.communicate(timeout=240)
    assert proc.returncode != 0  # torchrun reports the workers' exit code 75 as a failure
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert 3 <= int(tag.split("_")[1]) < 16
    run_dsv3(args, nproc=2)
    assert metrics(out) == metrics(ref)


@pytest.mark.distributed
def test_resume_with_a_different_process_count(corpus_dir, data_cache, tmp_path):
    extra = {"train.steps": 6, "ckpt.every": 3, "train.eval_every": 3, "parallel.zero_stage": 1}
    ref = tmp_path / "ref"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, ref, **extra)])
    out = tmp_path / "run"
    two = tiny_overrides(corpus_dir, data_cache, out, **extra, **{"parallel.micro_batch_size": 2})
    run_script("stop_after.py", ["3", *two], nproc=2)
    manifest = json.loads((out / "checkpoints" / "step_0000003" / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["processes"], manifest["parallel"]) == (
        2,
        2,
        {"pp": 1, "ep": 1, "zero_stage": 1},
    )
    proc = run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **extra)])
    # ZeRO-1 partitions of 2 ranks: the per-parameter state (through DeepSpeed's universal format)
    assert "at step 3 (saved with pp=1 ep=1 dp=2, now pp=1 ep=1 dp=1)" in proc.stdout
    got, want = metrics(out), metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "lm_loss", "val_loss", "lr"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-3), (a["step"], key)
    # the loader position is checked: another global batch would see another sample stream
    other = tiny_overrides(corpus_dir, data_cache, out, **{**extra, "train.steps": 9, "parallel.micro_batch_size": 2})
    proc = run_dsv3(["train", "--no-sample", *other], check=False)
    assert proc.returncode == 2 and "global batch of 4 samples (now 2)" in proc.stderr, proc.stderr[-2000:]


def test_half_written_and_corrupt_checkpoints_fall_back(corpus_dir, data_cache, tmp_path):
    extra = {"train.steps": 9, "ckpt.every": 3, "train.eval_every": 3, "ckpt.keep_last": 5}
    ref = tmp_path / "ref"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, ref, **extra)])
    out = tmp_path / "run"
    args = ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **extra)]
    run_script("stop_after.py", ["6", *args[2:]])
    ck = out / "checkpoints"
    assert ck.joinpath("latest").read_text().strip() == "step_0000006"
    # a save of step 9 that died half way: files but no manifest, latest not moved
    half = ck / "step_0000009"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    # and the latest checkpoint damaged on disk after it was written
    weights = ck / "step_0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # with every checkpoint damaged the run refuses to start over on top of them
    dead = tmp_path / "dead"
    shutil.copytree(out, dead)
    first = dead / "checkpoints" / "step_0000003" / "model.safetensors"
    first.write_bytes(first.read_bytes()[:100])
    before = {p: p.stat().st_size for p in dead.rglob("*") if p.is_file()}
    proc = run_dsv3([a.replace(str(out), str(dead)) for a in args], check=False)
    assert proc.returncode == 2
    assert [x for x in proc.stderr.splitlines() if x.startswith("dsv3:")] == [
        f"dsv3: error: none of the 2 checkpoint(s) in {dead / 'checkpoints'} is usable (see the warnings above); "
        "move that folder away to start the run over, or set train.out_dir to a new folder"
    ]
    assert {p: p.stat().st_size for p in dead.rglob("*") if p.is_file()} == before
    proc = run_dsv3(args)
    assert f"checkpoint {ck / 'step_0000009'} was never completed" in proc.stdout
    assert "checkpoint" in proc.stdout and "step_0000006 is unusable" in proc.stdout
    assert "resumed from" in proc.stdout and "step_0000003 at step 3" in proc.stdout
    assert metrics(out) == metrics(ref)


def test_a_damaged_optimizer_state_file_makes_a_checkpoint_unusable(tmp_path):
    """Every safetensors file the manifest lists must read, not only the weights."""
    from safetensors.torch import save_file

    from dsv3.checkpoint import checkpoint_problem

    save_file({"w": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    save_file({"w/fp32": torch.ones(4)}, str(tmp_path / "layout_free.safetensors"))
    files = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    (tmp_path / "manifest.json").write_text(json.dumps({"step": 3, "files": files}))
    assert checkpoint_problem(tmp_path) is None
    state = tmp_path / "layout_free.safetensors"
    state.write_bytes(b"X" * 48 + state.read_bytes()[48:])  # same size, header destroyed
    assert checkpoint_problem(tmp_path) == "layout_free.safetensors is unreadable (SafetensorError)"


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_guard(corpus_dir, data_cache, tmp_path, policy):
    out = tmp_path / policy
    args = [
        "train",
        "--no-sample",
        *tiny_overrides(
            corpus_dir,
            data_cache,
            out,
            **{"train.steps": 5, "ckpt.every": 2, "train.eval_every": 0, "train.nonfinite": policy},
        ),
    ]
    proc = run_script("nan_at_step.py", ["model", "3", *args], check=False)
    recs = metrics(out)
    step3 = [r for r in recs if r["step"] == 3][0]
    assert step3["skipped"] is True
    if policy == "stop":
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert (
            "non-finite loss or gradient at step 3" in proc.stderr
            and "last good checkpoint is step_0000002" in proc.stderr
        )
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
        assert all(r["loss"] == r["loss"] for r in recs if r["step"] != 3)  # finite elsewhere
        import torch

        # the skipped update never reached AdamW: after 4 steps its step count is 3
        state = torch.load(out / "checkpoints" / "step_0000004" / "mp_rank_00_model_states.pt", weights_only=False)
        assert {float(v["step"]) for v in state["optimizer"]["state"].values()} == {3.0}


def test_failed_save_keeps_previous_checkpoint(corpus_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_0000004").write_text("a file where the folder should go")
    args = [
        "train",
        "--no-sample",
        *tiny_overrides(corpus_dir, data_cache, out, **{"train.steps": 6, "ckpt.every": 2, "train.eval_every": 0}),
    ]
    proc = run_dsv3(args, check=False)
    assert proc.returncode == 2
    line = [x for x in proc.stderr.splitlines() if x.startswith("dsv3:")][-1]
    assert "could not write checkpoint" in line and "previous checkpoint step_0000002 is intact" in line
    free = shutil.disk_usage(out).free / 2**20
    got = float(line.split("; its disk has ")[1].split(" MiB free)")[0].replace(",", ""))
    assert abs(got - free) < max(1024, 0.01 * free), (got, free)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_bf16_resume_is_bitwise_identical(corpus_dir, data_cache, tmp_path):
    extra = {
        "train.steps": 4,
        "ckpt.every": 10,
        "train.eval_every": 2,
        "train.precision": "bf16",
        "parallel.zero_stage": 1,
    }
    ref = tmp_path / "ref"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, ref, **extra)])
    out = tmp_path / "run"
    args = tiny_overrides(corpus_dir, data_cache, out, **extra)
    run_script("stop_after.py", ["2", *args])
    run_dsv3(["train", "--no-sample", *args])
    assert metrics(out) == metrics(ref)


def test_atomic_writes_get_the_permissions_of_a_plain_file(tmp_path):
    """Files written through a temp file + rename (config.yaml, manifest.json, latest, ...) are
    readable by others as plainly created files are, not private like the temp file."""
    import os

    from dsv3.fileio import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
