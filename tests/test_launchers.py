"""launch/torchrun.sh, launch/deepspeed.sh and launch/accelerate.sh with 2 CPU processes give the same training
numbers as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_dsv3, tiny_overrides

KEYS = ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "val_loss")


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def launch(script, overrides):
    env = dict(os.environ, NPROC="2", OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), "--no-sample", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    return proc


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "accelerate.sh"])
def test_launcher_two_cpu_processes(script, corpus_dir, data_cache, tmp_path):
    extra = {"train.steps": 3, "ckpt.every": 3, "train.eval_every": 3, "parallel.micro_batch_size": 2}
    launch(script, tiny_overrides(corpus_dir, data_cache, tmp_path / "dp2", **extra))
    single = tmp_path / "single"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, single,
                                                      **{**extra, "parallel.micro_batch_size": 4})])
    got, want = metrics(tmp_path / "dp2"), metrics(single)
    assert sorted(got) == sorted(want) == [0, 1, 2, 3]
    for step, rec in want.items():
        for key in KEYS:
            if key in rec:
                assert got[step][key] == pytest.approx(rec[key], rel=2e-5, abs=1e-6), (script, step, key)
