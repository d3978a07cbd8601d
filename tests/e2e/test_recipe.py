"""The V3 recipe's schedules end to end: a run whose batch grows, whose lambda, gamma and
learning rate change over tokens, logs each value where the config says; stopped mid-ramp by
SIGTERM it resumes bit for bit, on two processes from the one-process checkpoint, and with
pipeline stages it computes the same."""

import shutil
import signal

import pytest
from helpers import assert_same_metrics, launch, read_metrics, run_dsv3, tiny_overrides, wait_for_step

# final batch 12 (4 x 3 per process) of 64 tokens; the ramp 4 -> 8 -> 12 over 3072 tokens:
# 4 for steps 0-5, 8 for steps 6-8, 12 from step 9. Tokens before steps 0-9: 0, 256, ...,
# 1280, 1536, 2048, 2560, 3072. lambda 0.1 from step 7, gamma 0 from step 8; lr warmup
# (steps 0-1), constant (2-6), cosine (7-8), tail (9).
RECIPE = {
    "train.steps": 10,
    "ckpt.every": 50,
    "train.eval_every": 5,
    "parallel.grad_accum": 3,
    "train.batch_ramp": "{start: 4, tokens: 3072}",
    "train.lr_schedule": "[{type: warmup, until_step: 2, lr: 3.0e-3}, {type: constant, until_tokens: 2048}, "
    "{type: cosine, until_tokens: 3072, lr: 3.0e-4}, {type: constant, lr: 1.0e-4}]",
    "train.mtp_lambda_schedule": "[[0, 0.3], [2048, 0.1]]",
    "train.bias_update_speed_schedule": "[[0, 1.0e-3], [2560, 0]]",
}
SCHEDULED = ("global_batch", "lr", "mtp_lambda", "bias_update_speed", "tokens")


@pytest.fixture(scope="module")
def recipe_runs(corpus_dir, data_cache, tmp_path_factory):
    """The uninterrupted run, and a run stopped by SIGTERM mid-ramp (a copy of its folder
    kept before it resumes)."""
    root = tmp_path_factory.mktemp("recipe")
    ref = root / "ref"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, ref, **RECIPE)])
    out = root / "stopped"
    args = ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **RECIPE)]
    proc = launch(args)
    wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-2000:]
    stopped = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    copy = root / "stopped-copy"
    shutil.copytree(out, copy)
    return ref, out, args, copy, stopped


def test_the_scheduled_values_change_where_the_config_says(recipe_runs, corpus_dir, data_cache):
    from dsv3.config import load_config
    from dsv3.training.schedule import Schedules

    ref = recipe_runs[0]
    recs = [r for r in read_metrics(ref) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 11))
    sched = Schedules(load_config(None, tiny_overrides(corpus_dir, data_cache, ref, **RECIPE)), 1)
    for r in recs:
        want = sched.values(r["step"] - 1)
        assert {k: r[k] for k in ("global_batch", "lr", "mtp_lambda", "bias_update_speed")} == want, r["step"]
        assert r["tokens"] == sched.batch.tokens(r["step"])
        assert r["loss"] == pytest.approx(
            r["lm_loss"] + r["mtp_lambda"] * r["mtp_loss"] + 1e-4 * r["balance_loss"], rel=1e-9
        )
    by = {k: [r[k] for r in recs] for k in SCHEDULED}
    assert by["global_batch"] == [4] * 6 + [8] * 3 + [12]
    assert by["tokens"] == [256, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072, 3840]
    assert by["mtp_lambda"] == [0.3] * 7 + [0.1] * 3
    assert by["bias_update_speed"] == [1e-3] * 8 + [0.0] * 2
    assert by["lr"][:7] == pytest.approx([1.5e-3] + [3e-3] * 6) and by["lr"][7] == 3e-3
    assert by["lr"][8] == pytest.approx(3e-4 + 2.7e-3 * 0.5) and by["lr"][9] == 1e-4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ref / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("schedule/global_batch")] == by["global_batch"]
    assert [e.value for e in acc.Scalars("schedule/mtp_lambda")] == pytest.approx(by["mtp_lambda"])
    assert [e.value for e in acc.Scalars("schedule/bias_update_speed")] == pytest.approx(by["bias_update_speed"])


def test_sigterm_mid_ramp_then_resume_is_bitwise_identical(recipe_runs):
    ref, out, args, _, stopped = recipe_runs
    assert 2 <= stopped < 9  # inside the ramp
    run_dsv3(args)
    assert read_metrics(out) == read_metrics(ref)


@pytest.mark.distributed
@pytest.mark.distributed
def test_two_processes_resume_the_one_process_checkpoint_mid_ramp(recipe_runs, corpus_dir, data_cache):
    ref, _, _, copy, stopped = recipe_runs
    proc = run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(corpus_dir, data_cache, copy, **RECIPE, **{"parallel.micro_batch_size": 2}),
        ],
        nproc=2,
    )
    assert f"at step {stopped} (saved with 1 process(es), now 2)" in proc.stdout
    got, want = read_metrics(copy), read_metrics(ref)
    assert_same_metrics(got, want, rel=1e-5, abs_tol=1e-7)
    assert [{k: r.get(k) for k in SCHEDULED} for r in got] == [{k: r.get(k) for k in SCHEDULED} for r in want]


@pytest.mark.distributed
@pytest.mark.distributed
def test_pipeline_stages_follow_the_ramp_and_lambda(recipe_runs, corpus_dir, data_cache, tmp_path):
    """pp=2: the stages run as many micro-batches as the step's batch holds, the last stage's
    loss takes the step's lambda; the same numbers as one process."""
    ref = recipe_runs[0]
    out = tmp_path / "pp2"
    run_dsv3(
        ["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **RECIPE, **{"parallel.pp": 2})], nproc=2
    )
    got, want = read_metrics(out), read_metrics(ref)
    assert_same_metrics(got, want, rel=1e-5, abs_tol=1e-7)
    assert [{k: r.get(k) for k in SCHEDULED} for r in got] == [{k: r.get(k) for k in SCHEDULED} for r in want]
