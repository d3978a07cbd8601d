"""End to end: prepare -> train -> checkpoint -> resume -> generate, through the CLI."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import ROOT, TIMING, run_dsv3, run_script, tiny_overrides


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def stop_after(overrides, step):
    """Train until ``step`` then save and stop, as an interrupted run would."""
    run_script("stop_after.py", [str(step), *overrides])


@pytest.fixture(scope="module")
def trained(corpus_dir, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    proc = run_dsv3(["train", *tiny_overrides(corpus_dir, data_cache, out)])
    return out, proc


def test_run_directory_contents(trained):
    out, proc = trained
    assert (out / "config.yaml").is_file() and (out / "tokenizer.model").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    for step in ("step_0000003", "step_0000006"):
        assert (out / "checkpoints" / step / "model.safetensors").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    recs = read_metrics(out)
    steps = [r["step"] for r in recs]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    for r in recs[1:]:
        for key in ("loss", "lm_loss", "mtp_loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
            assert key in r, key
        assert r["tokens"] == r["step"] * 4 * 64
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.3 * r["mtp_loss"] + 1e-4 * r["balance_loss"], rel=1e-9)
    assert "val_loss" in recs[0] and "val_loss" in recs[3] and "val_loss" in recs[6]
    assert recs[6]["lm_loss"] < recs[1]["lm_loss"]
    assert "----- sample -----" in proc.stdout


def test_resume_is_exact(trained, corpus_dir, data_cache, tmp_path):
    """Resumed from step 4, the run logs what the uninterrupted one did, bit for bit; also when
    the machine's kernel record now names other kernels: the resumed run takes the kernels
    recorded in the checkpoint (kernels.json) over the record."""
    from dsv3.model import kernels

    full, _ = trained
    out = tmp_path / "resumed"
    overrides = tiny_overrides(corpus_dir, data_cache, out)
    stop_after(overrides, 4)  # checkpoints at 3 (ckpt.every) and 4 (the stop)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    saved = json.loads((out / "checkpoints" / "step_0000004" / "kernels.json").read_text())
    ops = {key.split(" | ")[0] for key in saved}
    assert {"attention", "experts", "optimizer"} <= ops and all(e["choice"] in e["ms"] for e in saved.values())
    other = {"attention": "sdpa", "experts": "bmm", "optimizer": "foreach"}  # none is the fixed rule
    record = tmp_path / "other-kernels.json"
    swapped = {k: {"choice": other[k.split(" | ")[0]]} for k in saved if k.split(" | ")[0] in other}
    record.write_text(json.dumps({kernels._machine(): swapped}))
    run_dsv3(["train", "--no-sample", *overrides], env={"DSV3_KERNEL_CACHE": str(record)})
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(full))


def test_generate_reproducible(trained):
    out, _ = trained
    greedy = ["generate", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    a, b = run_dsv3(greedy).stdout, run_dsv3(greedy).stdout
    assert a == b and a.startswith("def ")
    sampled = [
        "generate",
        "--ckpt",
        str(out / "checkpoints" / "step_0000003"),
        "--prompt",
        "import",
        "--max-new-tokens",
        "12",
        "--seed",
        "7",
    ]
    assert run_dsv3(sampled).stdout == run_dsv3(sampled).stdout


def one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dsv3: error: ")
    return lines[0]


def test_bad_input_errors(tmp_path, data_cache):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 5\n")
    assert "not valid YAML" in one_line_error(run_dsv3(["train", "--config", str(bad)], check=False))
    missing = tmp_path / "no-such-corpus"
    msg = one_line_error(
        run_dsv3(
            ["train", f"data.source={missing}", f"data.cache_dir={data_cache}", f"train.out_dir={tmp_path / 'r'}"],
            check=False,
        )
    )
    assert str(missing) in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n\n")
    msg = one_line_error(
        run_dsv3(
            [
                "prepare",
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                f"data.source={empty}",
                f"data.cache_dir={data_cache}",
            ],
            check=False,
        )
    )
    assert "empty" in msg
    assert "does not exist" in one_line_error(
        run_dsv3(["generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "x"], check=False)
    )


def test_convert_round_trip_through_cli(trained, tmp_path):
    out, _ = trained
    hf, back = tmp_path / "hf", tmp_path / "back"
    run_dsv3(["convert", "--to-hf", str(out), "--out", str(hf)])
    assert (hf / "config.json").is_file()
    run_dsv3(["convert", "--from-hf", str(hf), "--out", str(back)])
    greedy = ["--prompt", "class ", "--max-new-tokens", "10", "--temperature", "0"]
    texts = {run_dsv3(["generate", "--ckpt", str(p), *greedy]).stdout for p in (out, hf, back)}
    assert len(texts) == 1
    msg = one_line_error(run_dsv3(["convert", "--to-hf", str(out), "--out", str(hf)], check=False))
    assert str(hf) in msg


def test_bf16_zero1_trains(corpus_dir, data_cache, tmp_path):
    out = tmp_path / "bf16"
    # train.precision=auto on a machine where bf16 measured faster (forced here): the run is bf16
    proc = run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(
                corpus_dir,
                data_cache,
                out,
                **{
                    "train.precision": "auto",
                    "parallel.zero_stage": 1,
                    "train.steps": 4,
                    "ckpt.every": 4,
                    "train.eval_every": 4,
                },
            ),
        ],
        env={"DSV3_KERNELS": "precision=bf16"},
    )
    assert "train.precision=auto: bf16 on cpu (" in proc.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == "bf16"
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert all(0 < r["grad_norm"] < 100 for r in recs[1:])
    assert recs[4]["val_loss"] < recs[0]["val_loss"]
    from dsv3 import load_model

    model = load_model(out)
    assert next(model.parameters()).dtype == torch.float32
    bias = model.moe_gates()[0].e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().max() > 0  # updated every step, kept in fp32
    # ZeRO-0 in bf16 (DeepSpeed's unfused optimizer, which steps once at start-up to create the
    # Adam state) takes the same 4 AdamW updates: the same losses, step count 4
    zero0 = tmp_path / "bf16-zero0"
    proc = run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(
                corpus_dir,
                data_cache,
                zero0,
                **{
                    "train.precision": "bf16",
                    "parallel.zero_stage": 0,
                    "train.steps": 4,
                    "ckpt.every": 2,
                    "train.eval_every": 4,
                },
            ),
        ],
        env={"DSV3_KERNELS": "precision=fp32"},  # as if fp32 measured faster: told so, still bf16
    )
    assert "train.precision=bf16 runs slower than fp32 on this CPU; train.precision=fp32 (or auto)" in proc.stdout
    for a, b in zip(read_metrics(zero0), recs):
        assert a["loss" if "loss" in b else "val_loss"] == pytest.approx(
            b["loss" if "loss" in b else "val_loss"], rel=2e-5
        ), (a, b)
    states = torch.load(zero0 / "checkpoints" / "step_0000004" / "mp_rank_00_model_states.pt", weights_only=False)[
        "optimizer"
    ]["optimizer_state_dict"]["state"]
    assert {float(st["step"]) for st in states.values()} == {4.0}
    # its step-2 checkpoint resumes under ZeRO-1 (the fp32 copies and moments of DeepSpeed's
    # unfused optimizer, by parameter) and continues as the ZeRO-1 run
    again = tmp_path / "zero0-to-zero1"
    shutil.copytree(zero0, again)
    shutil.rmtree(again / "checkpoints" / "step_0000004")
    (again / "checkpoints" / "latest").write_text("step_0000002\n")
    (again / "metrics.jsonl").write_text("")
    proc = run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(
                corpus_dir,
                data_cache,
                again,
                **{
                    "train.precision": "bf16",
                    "parallel.zero_stage": 1,
                    "train.steps": 4,
                    "ckpt.every": 4,
                    "train.eval_every": 4,
                },
            ),
        ]
    )
    assert "at step 2; ZeRO stage 0 -> 1" in proc.stdout
    got = read_metrics(again)
    assert [r["step"] for r in got] == [3, 4]
    for a, b in zip(got, recs[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5), (a, b)
    assert got[-1]["val_loss"] == pytest.approx(recs[-1]["val_loss"], rel=2e-5)


def test_generate_warns_about_a_step_folder_without_manifest(trained, tmp_path):
    """A step folder whose save never completed still loads, with one warning line."""
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out / "checkpoints" / "step_0000003", run / "checkpoints" / "step_0000003")
    (run / "checkpoints" / "step_0000003" / "manifest.json").unlink()
    folder = run / "checkpoints" / "step_0000003"
    proc = run_dsv3(["generate", "--ckpt", str(folder), "--prompt", "def", "--max-new-tokens", "2"])
    assert proc.stderr.splitlines() == [
        f"warning: checkpoint {folder} is incomplete or damaged: it was never completed (no manifest.json)"
    ]
    assert run_dsv3(["generate", "--ckpt", str(out), "--prompt", "def", "--max-new-tokens", "2"]).stderr == ""


def test_tensorboard_events_match_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "loss/total",
        "loss/lm",
        "loss/mtp",
        "loss/balance",
        "loss/val",
        "optim/lr",
        "optim/grad_norm",
        "perf/tokens_per_s",
        "perf/data_loading_share",
        "perf/model_tflops",
        "perf/peak_memory_mib",
        "moe/load_max_over_mean",
        "moe/layer0",
        "moe/layer1",
    } <= tags  # 1 main MoE layer + 1 MTP layer
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config as text
    assert {"moe_load/layer0", "moe_load/layer1"} <= set(acc.Tags()["histograms"])
    assert {"moe_bias_spread/layer0", "moe_bias_spread/layer1"} <= tags
    spread = acc.Scalars("moe_bias_spread/layer0")
    assert [e.step for e in spread] == [1, 2, 3, 4, 5, 6]
    assert spread[0].value == pytest.approx(0.002, abs=1e-6)  # one update of +-gamma from zero
    events = acc.Scalars("loss/lm")
    recs = [r for r in read_metrics(out) if "lm_loss" in r]
    assert [e.step for e in events] == [r["step"] for r in recs]
    assert [e.value for e in events] == pytest.approx([r["lm_loss"] for r in recs], rel=1e-6)


def test_compiled_training_matches_eager(trained, corpus_dir, data_cache, tmp_path):
    """train.compile=true (torch.compile inside the DeepSpeed engine; the routed experts stay
    in one graph on CPU) logs the same numbers as the eager run of the `trained` fixture."""
    from helpers import assert_same_metrics
    from helpers import read_metrics as metrics_only

    full, _ = trained
    out = tmp_path / "compiled"
    proc = run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(corpus_dir, data_cache, out, **{"train.steps": 3, "train.compile": "true"}),
        ]
    )
    assert "runs through torch.compile" in proc.stdout
    want = [r for r in metrics_only(full) if r["step"] <= 3]
    assert_same_metrics(metrics_only(out), want, rel=1e-5, abs_tol=1e-6)
