"""bench/gpu.sh without a GPU: its commands parse and load their configs, and its harness
(per-step time limit, overall budget, results handed back under $OUT) works, driven by a
stand-in interpreter."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from dsv3.cli import parse_args
from dsv3.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")


def _dry_run(*args: str) -> list[list[str]]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def _check_dsv3(argv: list[str]) -> None:
    """One ``python3 -m dsv3 ...`` line: parsed as the CLI parses it, its config loaded."""
    assert argv[1:3] == ["-m", "dsv3"], argv
    args = parse_args(argv[3:])
    if args.command in ("bench", "train"):
        cfg = load_config(str(ROOT / args.config), args.overrides)
        assert cfg.model.dim > 0
    if args.command == "bench":
        assert args.precision == "bf16" and not (args.compile and args.cuda_graph)
    if args.command == "generate":
        assert args.prompt == "def " and args.temperature == 0


def test_default_steps_in_order_and_each_parses():
    lines = _dry_run()
    assert lines[0][1:3] == ["-m", "pytest"] and lines[0][-1] == "tests/unit/test_graph_decode.py"
    assert (ROOT / lines[0][-1]).is_file()
    rest = lines[1:]
    for argv in rest:
        _check_dsv3(argv)
    kinds = [(a[3], a[4] if a[3] == "bench" else "", a[a.index("--config") + 1] if "--config" in a else "")
             for a in rest]  # fmt: skip
    assert kinds[:4] == [
        ("bench", "train", "configs/bench.yaml"),
        ("bench", "train", "configs/bench_1b.yaml"),
        ("bench", "decode", "configs/bench.yaml"),
        ("bench", "decode", "configs/bench.yaml"),
    ]
    assert [k[0] for k in kinds[4:7]] == ["train", "generate", "generate"]
    assert ["--cuda-graph" in a for a in rest[5:7]] == [False, True]
    assert all("--compile" in a for a in rest[-2:]) and not any("--compile" in a for a in rest[:-2])
    assert any("--vs" in a and "configs/bench.yaml" in a for a in rest[:1])


def test_one_config_suite_passes_overrides():
    lines = _dry_run("--config", "configs/tiny.yaml", "train.seed=3")
    assert len(lines) == 5
    for argv in lines:
        _check_dsv3(argv)
        assert argv[-3:] == ["--config", "configs/tiny.yaml", "train.seed=3"]
        assert load_config(str(ROOT / "configs/tiny.yaml"), ["train.seed=3"]).train.seed == 3


STAND_IN = """#!/usr/bin/env bash
# stands in for python3: passes the checks, writes one result per bench command, hangs in one
case "$*" in
  -c*) exit 0 ;;
  *"-m pytest"*) echo "1 passed" ;;
  *"bench train --config configs/bench_1b.yaml"*) echo "hanging"; exec sleep 60 ;;
  *"-m dsv3 bench"*) n=$(($(ls bench | grep -c '^result-') + 1)); f="bench/result-$n.json"
    echo '{"n": '"$n"'}' > "$f"; echo "wrote $f" ;;
  *) echo "ran $*" ;;
esac
"""


def test_time_limits_and_results_under_out(tmp_path):
    (tmp_path / "bench").mkdir()
    shutil.copy(SCRIPT, tmp_path / "bench" / "gpu.sh")
    (tmp_path / "bench" / "old.json").write_text("{}")  # an earlier run's: not handed back
    fake = tmp_path / "python3"
    fake.write_text(STAND_IN)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "STEP_S": "2", "BUDGET_S": "2"}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"  # no nvidia-smi there: the script goes on
    r = subprocess.run(
        ["bash", str(tmp_path / "bench" / "gpu.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1, r.stdout + r.stderr
    log = (out / "gpu.log").read_text()
    assert log == r.stdout  # everything printed, also kept under $OUT
    # the first three steps ran; the hanging one was stopped after STEP_S, and the budget
    # (already spent by then) skipped every later step, which are named
    assert "1 passed" in log and "wrote bench/result-1.json" in log and "hanging" in log
    failed = log.split("FAILED:\n", 1)[1].splitlines()
    assert len(failed) == 1
    assert failed[0].endswith("bench_1b.yaml --precision bf16 --steps 5 --reps 2 (exit 124, over 2 s)")
    skipped = log.split("SKIPPED (2 s had passed):\n", 1)[1].split("FAILED:", 1)[0].splitlines()
    assert len(skipped) == 9 and "--vs hf" in skipped[0] and skipped[-1].endswith("--compile")
    started = [line for line in log.splitlines() if line.startswith("== ")]
    assert len(started) == 3 and "ran " not in log  # nothing after the budget ran
    with tarfile.open(out / "gpu-results.tar.gz") as tar:
        assert tar.getnames() == ["bench/result-1.json"]
        assert tar.extractfile("bench/result-1.json").read() == b'{"n": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["gpu-results.tar.gz", "gpu.log"]


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--bogus"], {}, "unknown argument --bogus (takes --config CFG"),
        (["--config"], {}, "--config needs a config file"),
        (["--config", "configs/nope.yaml"], {}, "no config file configs/nope.yaml"),
        (["--dry-run"], {"STEP_S": "abc"}, "STEP_S must be a whole number of seconds (got 'abc')"),
        (["--dry-run"], {"BUDGET_S": "0"}, "BUDGET_S must be a whole number of seconds (got '0')"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(args, env, message, tmp_path):
    """One line naming the problem, exit 2, before the GPU check (here no GPU: it would say so)."""
    fake = tmp_path / "python3"
    fake.write_text("#!/usr/bin/env bash\necho ran >&2\nexit 1\n")
    fake.chmod(0o755)
    r = subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, "PYTHON": str(fake), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"bench/gpu.sh: {message}" + r.stderr.split(message, 1)[1] and r.stderr.count("\n") == 1


def test_help_prints_the_usage():
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.startswith("The benchmarks on one CUDA GPU") and "--dry-run" in r.stdout and "STEP_S" in r.stdout
