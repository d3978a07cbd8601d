"""The schedules of the V3 recipe against hand-computed values: the batch-size ramp and its
sample accounting, the piecewise-constant MTP lambda and bias update speed, the phased
learning rate, their validation, and the shipped recipe configs."""

import json
import math
from pathlib import Path

import pytest

from data_pipeline.sampling import check_loader_state, loader_state, rank_micro_batches, stream_indices
from dsv3.config import load_config
from dsv3.config_schedules import BatchRamp
from dsv3.errors import DsvError
from dsv3.training.schedule import BatchSchedule, Schedules, lr_at, schedule_table

ROOT = Path(__file__).resolve().parents[2]

# final 12 sequences of 64 tokens, micro-batches of 4: the ramp 4 -> 12 in K = 2 intervals of
# 768 tokens (12 samples): 4 per step while < 12 samples are consumed (steps 0-2: 0, 4, 8), 8
# while < 24 (steps 3-4: 12, 20), then 12 (step 5 on: 28, 40, ...)
RAMP = BatchRamp(start=4, tokens=1536)
BATCHES = [4, 4, 4, 8, 8, 12, 12, 12]
CONSUMED = [0, 4, 8, 12, 20, 28, 40, 52]


def cfg_with(*overrides, mbs=4, accum=3, steps=8):
    return load_config(
        None,
        [
            f"parallel.micro_batch_size={mbs}",
            f"parallel.grad_accum={accum}",
            "data.seq_len=64",
            f"train.steps={steps}",
            *overrides,
        ],
    )


def one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- the batch ramp


def test_batch_ramp_by_hand():
    b = BatchSchedule(12, 64, RAMP, granule=4)
    assert [b.batch(s) for s in range(8)] == BATCHES
    assert [b.consumed(s) for s in range(8)] == CONSUMED
    assert [b.tokens(s) for s in range(8)] == [64 * c for c in CONSUMED]
    assert (b.ramp_end_step, b.intervals, b.increment) == (5, 2, 4)
    assert b.consumed(100) == 28 + 95 * 12
    # the first step that starts with at least T tokens consumed
    assert [b.first_step_at(t) for t in (0, 1, 256, 257, 768, 1536, 1792, 1793)] == [0, 1, 1, 2, 3, 5, 5, 6]
    assert b.state() == {"start": 4, "increment": 4, "tokens": 1536}
    # an explicit increment of 8: K = 1 interval of 1536 tokens (24 samples): 4 per step until 24
    c = BatchSchedule(12, 64, BatchRamp(start=4, tokens=1536, increment=8), granule=4)
    assert [c.batch(s) for s in range(8)] == [4] * 6 + [12, 12]
    # no ramp: a constant batch
    d = BatchSchedule(12, 64)
    assert [d.batch(s) for s in range(3)] == [12] * 3 and d.consumed(5) == 60 and d.state() is None


def test_v3_batch_ramp_by_hand():
    """3072 -> 15360 by 128 over 469B tokens of 4096: 96 intervals of 469e9 / 96 tokens =
    1,192,830.2 samples; the first ends after ceil(1192831 / 3072) = 389 steps of 3072."""
    b = BatchSchedule(15360, 4096, BatchRamp(start=3072, tokens=469_000_000_000), granule=128)
    assert b.intervals == 96 and b.batch(0) == 3072
    assert (b.batch(388), b.batch(389), b.consumed(389)) == (3072, 3200, 389 * 3072)
    end = b.ramp_end_step
    assert b.batch(end - 1) == 3072 + 95 * 128 and b.batch(end) == 15360
    assert b.tokens(end - 1) < 469e9 <= b.tokens(end)


def test_batch_ramp_must_fit_the_layout():
    with pytest.raises(DsvError) as e:
        BatchSchedule(16, 64, BatchRamp(start=6, tokens=1000), granule=4)
    assert one_line(e) == (
        "train.batch_ramp.start=6 is not a whole number of micro-batches on every data-parallel "
        "rank (parallel.micro_batch_size x data-parallel size = 4); use a multiple of 4 such as "
        "4 or 8"
    )
    with pytest.raises(DsvError) as e:
        BatchSchedule(16, 64, BatchRamp(start=4, tokens=1000, increment=2), granule=4)
    assert "train.batch_ramp.increment=2 is not a whole number" in one_line(e)
    with pytest.raises(DsvError) as e:
        BatchSchedule(16, 64, BatchRamp(start=32, tokens=1000), granule=4)
    assert "train.batch_ramp.start=32 exceeds the final global batch 16" in one_line(e)


def test_ramp_sample_accounting_every_sample_once_per_epoch():
    """Steps of growing size read the stream in consecutive stretches: every epoch (a block of
    n samples) is a permutation, nothing is seen twice or skipped, whatever the ramp."""
    n, seed = 50, 3
    b = BatchSchedule(12, 64, RAMP, granule=4)
    steps = [stream_indices(b.consumed(s), b.batch(s), n, seed) for s in range(20)]
    assert [len(x) for x in steps] == [b.batch(s) for s in range(20)]
    flat = [i for x in steps for i in x]
    assert flat == stream_indices(0, len(flat), n, seed)
    for e in range(len(flat) // n):
        assert sorted(flat[e * n : (e + 1) * n]) == list(range(n)), e
    assert flat[:n] != flat[n : 2 * n]  # epochs reshuffle
    # the ranks' micro-batches of a step cover it exactly, for 1 x 4 and 2 x 2 (same granule)
    for s in range(20):
        idx = steps[s]
        for dp, mbs in ((1, 4), (2, 2)):
            k = b.batch(s) // (mbs * dp)
            parts = [m for r in range(dp) for m in rank_micro_batches(idx, r, dp, mbs, k)]
            assert sorted(i for m in parts for i in m) == sorted(idx)


def test_the_stream_does_not_depend_on_the_process_count():
    one = Schedules(cfg_with("train.batch_ramp={start: 4, tokens: 1536}", mbs=4), 1)
    two = Schedules(cfg_with("train.batch_ramp={start: 4, tokens: 1536}", mbs=2), 2)
    assert [one.batch.batch(s) for s in range(8)] == [two.batch.batch(s) for s in range(8)] == BATCHES
    assert [one.batch.consumed(s) for s in range(8)] == [two.batch.consumed(s) for s in range(8)] == CONSUMED


def test_loader_state_records_and_checks_the_ramp():
    b = BatchSchedule(12, 64, RAMP, granule=4)
    state = json.loads(json.dumps(loader_state(4, 12, 50, 1, "k", consumed=b.consumed(4), batch_ramp=b.state())))
    assert (state["consumed_samples"], state["epoch"], state["batch_ramp"]) == (
        20,
        0,
        {"start": 4, "increment": 4, "tokens": 1536},
    )
    check_loader_state(state, 4, 12, 50, 1, "k", "ckpt", consumed=20, batch_ramp=b.state())
    other = BatchSchedule(12, 64, BatchRamp(start=8, tokens=1536), granule=4)
    for ramp, consumed in ((other.state(), other.consumed(4)), (None, 48)):
        with pytest.raises(DsvError) as e:
            check_loader_state(state, 4, 12, 50, 1, "k", "ckpt", consumed=consumed, batch_ramp=ramp)
        assert "checkpoint ckpt used the batch ramp {start: 4, increment: 4, tokens: 1536} (now" in one_line(e)
    with pytest.raises(DsvError) as e:  # a checkpoint without a ramp, resumed with one
        check_loader_state(
            loader_state(4, 12, 50, 1, "k"), 4, 12, 50, 1, "k", "ckpt", consumed=20, batch_ramp=b.state()
        )
    assert "used the batch ramp none (now {start: 4" in one_line(e)
    with pytest.raises(DsvError) as e:
        check_loader_state(state, 4, 12, 50, 1, "k", "ckpt", consumed=21, batch_ramp=b.state())
    assert "inconsistent" in one_line(e)


# ----------------------------------------------------------------------------- lambda and gamma


def test_piecewise_constants_over_tokens_by_hand():
    """Tokens before steps 0-7: 0, 256, 512, 768, 1280, 1792, 2560, 3328."""
    s = Schedules(
        cfg_with(
            "train.batch_ramp={start: 4, tokens: 1536}",
            "train.mtp_lambda_schedule=[[0, 0.3], [1500, 0.1]]",
            "train.bias_update_speed_schedule=[[0, 1.0e-3], [2560, 0]]",
        ),
        1,
    )
    assert [s.mtp_lambda(i) for i in range(8)] == [0.3] * 5 + [0.1] * 3
    assert [s.bias_update_speed(i) for i in range(8)] == [1e-3] * 6 + [0.0] * 2
    plain = Schedules(cfg_with("train.mtp_lambda=0.2", "train.bias_update_speed=0.01"), 1)
    assert (plain.mtp_lambda(5), plain.bias_update_speed(5), plain.batch.batch(5)) == (0.2, 0.01, 12)
    assert plain.values(0) == {
        "global_batch": 12,
        "lr": lr_at(0, plain.t),
        "mtp_lambda": 0.2,
        "bias_update_speed": 0.01,
    }


# ----------------------------------------------------------------------------- the learning rate


def test_lr_phases_over_steps_by_hand():
    s = Schedules(
        cfg_with(
            "train.lr_schedule=[{type: warmup, until_step: 4, lr: 1.0e-3}, {type: constant, "
            "until_step: 6}, {type: cosine, until_step: 10, lr: 1.0e-4}, {type: constant, lr: 5.0e-5}]",
            steps=12,
        ),
        1,
    )
    got = [s.lr(i) for i in range(12)]
    cos = [1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    want = [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, *cos, 5e-5, 5e-5]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[6] == 1e-3 and got[8] == pytest.approx(5.5e-4)
    # after the last phase's end its value stays; a linear phase
    t = Schedules(
        cfg_with(
            "train.lr_schedule=[{type: constant, until_step: 2, lr: 1.0e-3}, "
            "{type: linear, until_step: 6, lr: 2.0e-4}]",
            steps=9,
        ),
        1,
    )
    assert [t.lr(i) for i in range(9)] == pytest.approx([1e-3, 1e-3, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4, 2e-4, 2e-4])


def test_lr_phases_over_tokens_by_hand():
    """With the ramp of BATCHES the tokens before steps 0-8 are 0, 256, 512, 768, 1280, 1792,
    2560, 3328, 4096."""
    s = Schedules(
        cfg_with(
            "train.batch_ramp={start: 4, tokens: 1536}",
            "train.lr_schedule=[{type: warmup, until_tokens: 512, lr: 1.0e-3}, {type: cosine, "
            "until_tokens: 2560, lr: 1.0e-4}, {type: linear, lr: 0}]",
            steps=9,
        ),
        1,
    )
    # warmup: the tokens after the step over 512 (steps 0-1); cosine from step 2 (512 tokens) to
    # step 6 (2560): (tokens - 512) / 2048; linear to the last step 8: (step - 6) / 2
    cos = [1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * f)) for f in (0, 0.125, 0.375, 0.625)]
    want = [5e-4, 1e-3, *cos, 1e-4, 5e-5, 0.0]
    assert [s.lr(i) for i in range(9)] == pytest.approx(want, rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("warmup, steps", [(30, 800), (2, 6), (1, 1), (5, 6), (3, 40)])
def test_lr_schedule_reproduces_the_default_warmup_cosine_exactly(warmup, steps):
    base = cfg_with(f"train.warmup_steps={warmup}", "train.lr=3.0e-3", "train.min_lr_ratio=0.1", steps=steps)
    phased = cfg_with(
        f"train.lr_schedule=[{{type: warmup, until_step: {warmup}, lr: 3.0e-3}}, "
        f"{{type: cosine, lr: {3.0e-3 * 0.1!r}}}]",
        steps=steps,
    )
    a, b = Schedules(base, 1), Schedules(phased, 1)
    assert (
        [a.lr(i) for i in range(steps)]
        == [b.lr(i) for i in range(steps)]
        == [lr_at(i, base.train) for i in range(steps)]
    )


def test_lr_phase_ending_before_the_previous_one_is_refused():
    cfg = cfg_with("train.lr_schedule=[{type: warmup, until_step: 5}, {type: constant, until_tokens: 1000}]")
    with pytest.raises(DsvError) as e:
        Schedules(cfg, 1)  # 1000 tokens = step 2 at 12 x 64 per step
    assert one_line(e) == (
        "train.lr_schedule[1] (constant) ends at until_tokens=1,000 (step 2), before the previous "
        "phase ends (step 5); give the phases in order with increasing ends"
    )


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "train.batch_ramp={start: 4}",
            "train.batch_ramp needs tokens; write it like train.batch_ramp={start: 3072, tokens: 469.0e+9}",
        ),
        ("train.batch_ramp={start: 4, tokens: 100, size: 2}", "train.batch_ramp has an unknown key 'size'"),
        ("train.batch_ramp={start: 0, tokens: 100}", "train.batch_ramp.start=0 must be positive"),
        ("train.batch_ramp={start: 4, tokens: many}", "train.batch_ramp.tokens='many' must be a number"),
        ("train.batch_ramp=[4, 100]", "train.batch_ramp=[4, 100] must be a mapping"),
        (
            "train.mtp_lambda_schedule=[[5, 0.3]]",
            "train.mtp_lambda_schedule starts at 5 tokens; its first entry must start at 0 tokens",
        ),
        (
            "train.mtp_lambda_schedule=[[0, 0.3], [0, 0.1]]",
            "train.mtp_lambda_schedule entry 1 starts at 0 tokens, not after entry 0",
        ),
        ("train.bias_update_speed_schedule=[[0, -1]]", "train.bias_update_speed_schedule[0][1]=-1 must be >= 0"),
        (
            "train.mtp_lambda_schedule=[0.3]",
            "train.mtp_lambda_schedule entry 0 (0.3) is not a [from_tokens, value] pair",
        ),
        (
            "train.mtp_lambda_schedule=0.3",
            "train.mtp_lambda_schedule=0.3 must be a non-empty list of [from_tokens, value] pairs",
        ),
        ("train.lr_schedule=[{type: cosine, until_step: 5}]", "train.lr_schedule[0] (cosine) needs lr"),
        (
            "train.lr_schedule=[{type: warmup}]",
            "train.lr_schedule[0] (warmup) needs an end, until_step or until_tokens",
        ),
        (
            "train.lr_schedule=[{type: constant}, {type: constant, until_step: 5}]",
            "only the last phase may run to the end of training",
        ),
        (
            "train.lr_schedule=[{type: warm, until_step: 5}]",
            "train.lr_schedule[0].type='warm' must be one of warmup, constant, cosine, linear",
        ),
        (
            "train.lr_schedule=[{type: constant, until_step: 5, until_tokens: 9}]",
            "has both until_step and until_tokens",
        ),
        (
            "train.lr_schedule=[{type: constant, until_step: 5}, {type: constant, until_step: 3}]",
            "train.lr_schedule[1] ends at until_step=3, not after an earlier phase's 5",
        ),
        (
            "train.lr_schedule=[{type: constant, until_step: 5, lr: 1e-3, decay: 2}]",
            "train.lr_schedule[0] has an unknown key 'decay'",
        ),
    ],
)
def test_schedule_validation_is_one_line_naming_the_key(override, needle):
    with pytest.raises(DsvError) as e:
        load_config(None, [override])
    assert needle in one_line(e)


def test_yaml_number_forms_are_accepted():
    cfg = load_config(
        None,
        [
            "train.mtp_lambda_schedule=[[0, 0.3], [10.0e12, 0.1], [1.1e+13, 0.05]]",
            "train.batch_ramp={start: 8, tokens: 469e9}",
        ],
    )
    s = Schedules(cfg, 1)
    assert s.mtp[1:] == [(10_000_000_000_000, 0.1), (11_000_000_000_000, 0.05)]
    assert s.batch.ramp == BatchRamp(start=8, tokens=469_000_000_000)


# ----------------------------------------------------------------------------- the shipped recipes


def test_recipe_tiny_passes_through_every_phase_in_60_steps():
    cfg = load_config(ROOT / "configs" / "recipe_tiny.yaml")
    s = Schedules(cfg, 1)
    vals = [s.values(i) for i in range(60)]
    batch = [v["global_batch"] for v in vals]
    assert batch == [2] * 11 + [4] * 6 + [6] * 3 + [8] * 40  # the ramp over the first third
    assert s.batch.tokens(60) == 98_304 and s.batch.tokens(44) == 65_536 and s.batch.tokens(54) == 86_016
    assert [v["mtp_lambda"] for v in vals] == [0.3] * 44 + [0.1] * 16
    assert [v["bias_update_speed"] for v in vals] == [1e-3] * 54 + [0.0] * 6
    lr = [v["lr"] for v in vals]
    assert lr[:5] == pytest.approx([6e-4, 1.2e-3, 1.8e-3, 2.4e-3, 3e-3])  # warmup
    assert lr[5:44] == [3e-3] * 39  # constant until 65,536 tokens
    assert lr[44] == 3e-3 and all(a > b for a, b in zip(lr[44:54], lr[45:54])) and lr[53] > 3e-4  # cosine
    assert lr[54:57] == [3e-4] * 3 and lr[57:] == [1e-4] * 3  # the two tails
    # two processes with micro-batches of 1 keep the global batch, hence every value
    two = Schedules(load_config(ROOT / "configs" / "recipe_tiny.yaml", ["parallel.micro_batch_size=1"]), 2)
    assert [two.values(i) for i in range(60)] == vals
    assert s.warnings() == []


def test_v3_recipe_config_and_its_plan():
    cfg = load_config(ROOT / "configs" / "deepseek_v3_671b.yaml")
    s = Schedules(cfg, 2048 // 16)
    steps = cfg.train.steps
    b = s.batch
    assert (b.batch(0), b.final) == (3072, 15360)
    assert b.tokens(steps - 1) < 14.8e12 <= b.tokens(steps)  # 14.8T tokens
    assert s.lr(0) == pytest.approx(2.2e-4 / 2000) and s.lr(1999) == pytest.approx(2.2e-4)
    ten = b.first_step_at(10e12)
    assert b.tokens(ten - 1) < 10e12 <= b.tokens(ten)
    assert (s.lr(ten - 1), s.mtp_lambda(ten - 1), s.mtp_lambda(ten)) == (2.2e-4, 0.3, 0.1)
    cos_end = b.first_step_at(14.3e12)
    assert s.lr(cos_end - 1) == pytest.approx(2.2e-5, rel=1e-3) and s.lr(cos_end) == 2.2e-5
    assert (s.bias_update_speed(cos_end - 1), s.bias_update_speed(cos_end)) == (1e-3, 0.0)
    assert s.lr(b.first_step_at(14.633e12) - 1) == 2.2e-5 and s.lr(steps - 1) == 7.3e-6
    table = "\n".join(schedule_table(cfg, 128))
    assert f"train.steps={steps:,} consume 14.8T tokens" in table
    assert "ramp 3,072 -> 15,360 (+128 every 4.885B tokens)" in table
    assert "cosine 0.00022 -> 2.2e-05" in table and "constant 7.3e-06" in table
