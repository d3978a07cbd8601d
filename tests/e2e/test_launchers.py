"""launch/torchrun.sh, launch/deepspeed.sh and launch/accelerate.sh with 2 CPU processes give the same training
numbers as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, run_dsv3, tiny_overrides

KEYS = ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "val_loss")


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def launch(script, overrides):
    env = dict(os.environ, NPROC="2", OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / script), "--no-sample", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert "built successfully" not in proc.stdout  # DeepSpeed's notice on every start is dropped
    return proc


EXTRA = {"train.steps": 3, "ckpt.every": 3, "train.eval_every": 3, "parallel.micro_batch_size": 2}


@pytest.fixture(scope="module")
def single(corpus_dir, data_cache, tmp_path_factory):
    """One process with the launchers' global batch (2 x 2): the run each launcher must reproduce."""
    out = tmp_path_factory.mktemp("launchers") / "single"
    run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(corpus_dir, data_cache, out, **{**EXTRA, "parallel.micro_batch_size": 4}),
        ]
    )
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "accelerate.sh"])
def test_launcher_two_cpu_processes(script, single, corpus_dir, data_cache, tmp_path):
    launch(script, tiny_overrides(corpus_dir, data_cache, tmp_path / "dp2", **EXTRA))
    got, want = metrics(tmp_path / "dp2"), metrics(single)
    assert sorted(got) == sorted(want) == [0, 1, 2, 3]
    for step, rec in want.items():
        for key in KEYS:
            if key in rec:
                assert got[step][key] == pytest.approx(rec[key], rel=2e-5, abs=1e-6), (script, step, key)


@pytest.mark.parametrize(
    "script,env,override,world",
    [
        ("torchrun.sh", {"NPROC": "2"}, "parallel.pp=3", 2),
        (
            "accelerate.sh",
            {"NPROC": "2", "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
            "parallel.pp=3",
            4,
        ),
        # the hostfile's slots (2 + 1; the commented line does not count) give the process count
        ("deepspeed.sh", {"DS_HOSTFILE": "hostfile"}, "parallel.ep=2", 3),
    ],
)
def test_launcher_rejects_a_bad_layout_before_starting(script, env, override, world, tmp_path):
    """An impossible layout ends with one error line and exit code 2, before any process starts
    (no per-rank copies of the line, no launcher report)."""
    (tmp_path / "hostfile").write_text("node-a slots=2\n# node-c slots=8\nnode-b slots=1\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env)
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / script), "--no-sample", override],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3: error: parallel."), proc.stderr[-3000:]
    assert f" {world} process" in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "accelerate.sh"])
def test_launcher_rejects_a_bad_process_count(script, tmp_path):
    env = dict(os.environ, NPROC="0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr == "dsv3: error: NPROC=0 is not a process count; set NPROC to 1 or more\n"
