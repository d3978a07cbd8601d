"""Data parallelism under torchrun (gloo): the layout does not change the training numbers."""

import json

import pytest
from helpers import run_dsv3, run_script, tiny_overrides

KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens")


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.distributed
def test_two_process_data_parallel_matches_single_process(corpus_dir, data_cache, tmp_path):
    common = {"train.steps": 4, "ckpt.every": 4, "train.eval_every": 4, "train.sample_tokens": 4}
    single = tmp_path / "single"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, single, **common)])
    accum = tmp_path / "accum"
    run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(
                corpus_dir, data_cache, accum, **common, **{"parallel.micro_batch_size": 2, "parallel.grad_accum": 2}
            ),
        ]
    )
    dp2 = tmp_path / "dp2"
    proc = run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(
                corpus_dir, data_cache, dp2, **common, **{"parallel.micro_batch_size": 2, "parallel.zero_stage": 1}
            ),
        ],
        nproc=2,
    )
    assert "2 process(es)" in proc.stdout
    ref = metrics(single)
    for other in (metrics(accum), metrics(dp2)):
        assert sorted(other) == sorted(ref)
        for step, rec in ref.items():
            for key in KEYS + ("val_loss",):
                if key in rec:
                    assert other[step][key] == pytest.approx(rec[key], rel=2e-5, abs=1e-6), (step, key)
    assert (dp2 / "checkpoints" / "step_0000004" / "model.safetensors").is_file()


@pytest.mark.parametrize("started", [False, True])
def test_entry_point_skips_finalization_after_joining_a_process_group(started):
    """A process that joined a process group ends without interpreter finalization (where a
    gloo worker thread still releasing the last collective's tensors aborts the process),
    keeping main()'s exit code; any other process exits normally."""
    proc = run_script("exit_probe.py", [str(started)], timeout=120, check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.split() == (["ran"] if started else ["ran", "finalized"])
