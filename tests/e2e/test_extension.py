"""Context extension (V3 report §4.3): a run that continues from weights takes their model
section except the rope / length fields it sets explicitly; other changes are refused with one
line naming the field; dsv3 eval reports the loss per position range."""

import json

import pytest
from helpers import read_metrics, run_dsv3, tiny_overrides

from dsv3.config import CONTEXT_FIELDS, ModelConfig, extend_model, load_config
from dsv3.errors import DsvError


def test_load_config_records_the_keys_it_was_given(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  rope_factor: 4.0\ntrain:\n  steps: 5\n")
    cfg = load_config(f, ["data.seq_len=128", "model.max_seq_len=2048"])
    assert cfg.given == {"model.rope_factor", "train.steps", "data.seq_len", "model.max_seq_len"}
    assert load_config(None).given == frozenset() and "given" not in cfg.to_dict()


def test_extend_model_takes_only_the_context_fields():
    saved = ModelConfig(dim=64, max_seq_len=256, rope_theta=5000.0)
    cfg = load_config(
        None,
        [
            "model.max_seq_len=1024",
            "model.rope_factor=4",
            "model.original_seq_len=256",
            "model.dim=64",
            "model.init_std=0.5",
            "data.seq_len=1024",
        ],
    )
    out = extend_model(saved, cfg, "runs/x")
    assert (out.max_seq_len, out.rope_factor, out.original_seq_len) == (1024, 4.0, 256)
    assert (out.dim, out.rope_theta, out.n_layers, out.init_std) == (64, 5000.0, saved.n_layers, saved.init_std)
    assert set(CONTEXT_FIELDS) == {
        "max_seq_len",
        "rope_factor",
        "original_seq_len",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
    }
    # keys left out come from the weights, whatever the config's defaults say
    assert (
        extend_model(
            saved, load_config(None, ["model.rope_factor=2", "model.original_seq_len=128"]), "runs/x"
        ).max_seq_len
        == 256
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.dim=128"],
            "model.dim=128 differs from the 64 of train.init_from=runs/x: the weights fix the "
            "architecture, and only the context-extension fields (max_seq_len, rope_factor, "
            "original_seq_len, beta_fast, beta_slow, mscale, mscale_all_dim) may change; drop model.dim "
            "from the config",
        ),
        (["model.rope_theta=10000"], "model.rope_theta=10000.0 differs from the 5000.0 of train.init_from=runs/x"),
        (
            ["model.max_seq_len=128", "data.seq_len=128"],
            "model.max_seq_len=128 is below the 256 of train.init_from=runs/x; a context extension keeps or raises it",
        ),
        (
            ["model.rope_factor=4", "model.max_seq_len=1024"],
            "model.original_seq_len=4096 exceeds model.max_seq_len=1024",
        ),
    ],
)
def test_changes_that_are_not_an_extension_are_refused(overrides, message):
    saved = ModelConfig(dim=64, max_seq_len=256, rope_theta=5000.0)
    with pytest.raises(DsvError) as e:
        extend_model(saved, load_config(None, overrides), "runs/x")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_extension_run_from_a_finished_run_and_dsv3_eval(corpus_dir, data_cache, tmp_path):
    base = tmp_path / "base"
    run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(corpus_dir, data_cache, base, **{"train.steps": 2, "train.eval_every": 0, "ckpt.every": 2}),
        ]
    )
    ext = tmp_path / "ext"
    # every model key of tiny_overrides is given and equals the weights' (allowed); the context grows 2x
    args = tiny_overrides(
        corpus_dir,
        data_cache,
        ext,
        **{
            "train.init_from": base,
            "data.seq_len": 128,
            "model.rope_factor": 2,
            "model.original_seq_len": 64,
            "train.steps": 2,
            "train.eval_every": 2,
            "ckpt.every": 2,
            "parallel.micro_batch_size": 2,
            "train.lr_schedule": "[{type: constant, lr: 3.0e-4}]",
        },
    )
    proc = run_dsv3(["train", "--check", "1", *args])
    assert "fine for 1 process(es)" in proc.stdout
    proc = run_dsv3(["train", "--no-sample", *args])
    assert (
        f"context extension of {base}: model.rope_factor 1.0 -> 2.0, model.original_seq_len 4096 -> 64" in proc.stdout
    )
    resolved = (ext / "config.yaml").read_text()
    assert "rope_factor: 2.0" in resolved and "original_seq_len: 64" in resolved
    recs = read_metrics(ext)
    assert [r["step"] for r in recs] == [0, 1, 2] and all(r["lr"] == 3e-4 for r in recs[1:])
    out = json.loads(run_dsv3(["eval", "--ckpt", str(ext), "--ranges", "2", "--windows", "8", "--json"]).stdout)
    assert (out["seq_len"], out["windows"], out["rope_factor"]) == (128, 8, 2.0)
    assert [r["positions"] for r in out["ranges"]] == ["0-63", "64-127"]
    assert out["loss"] == pytest.approx(sum(r["loss"] for r in out["ranges"]) / 2, rel=1e-6)
    # an architecture change is refused before anything starts, by --check and by the run itself
    bad = [*args, "model.n_heads=4"]
    for cmd in (["train", "--check", "1", *bad], ["train", "--no-sample", *bad]):
        proc = run_dsv3(cmd, check=False)
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("dsv3: error: model.n_heads=4 differs from the 2 of train.init_from=")
