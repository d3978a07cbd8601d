"""Config loading, overrides and validation: every bad value is one clear DsvError line."""

import math
from pathlib import Path

import pytest
import torch

from dsv3.config import Config, load_config
from dsv3.errors import DsvError
from dsv3.model import Transformer, count_parameters

ROOT = Path(__file__).resolve().parents[2]


def error_of(overrides, path=None):
    with pytest.raises(DsvError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_tiny_yaml_equals_defaults():
    assert load_config(ROOT / "configs" / "tiny.yaml") == Config()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_parses_and_builds_on_meta(name):
    cfg = load_config(ROOT / "configs" / name)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_parameters(model)
    assert counts["main"] > 0 and counts["activated"] <= counts["main"]


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.steps=50",
            "train.lr=1e-3",
            "data.source=/x",
            "parallel.zero_stage=1",
            "train.precision=bf16",
            "model.q_lora_rank=32",
        ],
    )
    assert (cfg.train.steps, cfg.train.lr, cfg.data.source, cfg.parallel.zero_stage) == (50, 1e-3, "/x", 1)
    assert cfg.model.q_lora_rank == 32 and cfg.train.precision == "bf16"
    assert load_config(None, ["data.source=null"]).data.source is None


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.stepz=5"], "unknown config key train.stepz; did you mean train.steps?"),
        (["trian.steps=5"], "unknown config section 'trian'"),
        (["train.steps=many"], "train.steps='many' has the wrong type; expected int"),
        (["train.steps"], "is not KEY=VALUE"),
        (
            ["model.n_expert_groups=3"],
            "n_routed_experts=8 is not divisible into model.n_expert_groups=3; choose n_expert_groups in [1, 2, 4, 8]",
        ),
        (["model.n_limited_groups=3"], "n_limited_groups=3 must be between 1 and model.n_expert_groups=2"),
        (["model.n_activated_experts=5"], "n_activated_experts=5 must be between 1 and the 4 experts"),
        (["model.qk_rope_head_dim=15"], "qk_rope_head_dim=15 must be even"),
        (["model.n_dense_layers=9"], "n_dense_layers=9 exceeds model.n_layers=4"),
        (["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_seq_len=1024"),
        (["train.precision=fp16"], "train.precision='fp16' is not supported; use fp32, bf16 or auto"),
        (["model.n_expert_groups=8", "model.n_limited_groups=4"], "leaves 1 expert per group"),
    ],
)
def test_validation_messages(overrides, needle):
    assert needle in error_of(overrides)


def test_mscale_all_dim_defaults_to_mscale():
    """Configs written before ``model.mscale_all_dim`` existed load unchanged (None = mscale)."""
    v2 = load_config(ROOT / "configs" / "deepseek_v2_lite_16b.yaml").model
    assert (v2.mscale, v2.mscale_all_dim) == (0.707, None)
    assert load_config(None, ["model.mscale_all_dim=1"]).model.mscale_all_dim == 1.0
    assert load_config(None, ["model.mscale_all_dim=null"]).model.mscale_all_dim is None
    msg = error_of(["model.rope_factor=40", "model.mscale_all_dim=-5"])
    assert msg.startswith("model.mscale_all_dim=-5.0 makes YaRN's magnitude")


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n  dim: :\n")
    assert "is not valid YAML" in error_of([], bad)
    assert "does not exist" in error_of([], tmp_path / "nope.yaml")
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    assert "must be a YAML mapping" in error_of([], notmap)


def test_lr_schedule_by_hand_and_the_warmup_warning():
    from dsv3.config import TrainConfig
    from dsv3.training.schedule import lr_at, schedule_warning

    t = TrainConfig(lr=1e-3, warmup_steps=4, steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, t) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # cosine over steps 4..9 (span 5) from 1e-3 to 1e-4: step 4 + 2.5 is half way (5.5e-4)
    assert lr_at(4, t) == pytest.approx(1e-3) and lr_at(9, t) == pytest.approx(1e-4)
    assert lr_at(6, t) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 2 / 5)))
    assert schedule_warning(t) is None
    short = TrainConfig(lr=3e-3, warmup_steps=30, steps=20)
    assert schedule_warning(short) == (
        "warning: train.warmup_steps=30 > train.steps=20: the learning rate ends at "
        "2.00e-03, never reaching train.lr=0.003 nor decaying; lower train.warmup_steps"
    )
    assert lr_at(0, TrainConfig(lr=1e-3, warmup_steps=1, steps=1)) == 1e-3
    assert schedule_warning(TrainConfig(lr=1e-3, warmup_steps=1, steps=1)) == (
        "warning: train.warmup_steps=train.steps=1: the learning rate reaches train.lr=0.001 only at the last step "
        "and never decays; lower train.warmup_steps"
    )


def test_a_pipeline_partition_without_pipeline_stages_is_an_error():
    with pytest.raises(
        DsvError,
        match=r"^parallel.pp_partition='1,1' splits blocks over pipeline stages but "
        r"parallel.pp=1; set parallel.pp to the number of stages, or drop pp_partition$",
    ):
        load_config(None, ["parallel.pp_partition=1,1"])
    assert load_config(None, ["parallel.pp_partition=4"]).parallel.pp_partition == "4"  # one stage of all 4 blocks
    assert load_config(None, ["parallel.pp=2", "parallel.pp_partition=1,3"]).parallel.pp == 2


def test_overrides_may_come_before_between_and_after_options(capsys):
    from dsv3.cli import main

    assert main(["train", "train.steps=2", "--check", "1", "parallel.pp=2"]) == 2  # the override after --check counts
    assert "parallel.pp=2 does not divide the 1 process(es)" in capsys.readouterr().err
    assert main(["train", "parallel.pp=2", "--check", "2", "model.n_layers=4"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["train", "--check", "1", "train.steps=2", "--nope"])
    assert exc.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_an_empty_prompt_is_one_error_line(capsys):
    from dsv3.cli import main

    assert main(["generate", "--ckpt", "unused", "--prompt", ""]) == 2
    assert capsys.readouterr().err == "dsv3: error: --prompt is empty; give the text to continue\n"
