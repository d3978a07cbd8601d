"""A real single-node SLURM (slurmctld + slurmd + munged on localhost, temporary config):
slurm/train.sbatch trains, and SIGUSR1 before the time limit saves, requeues and resumes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, tiny_overrides

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
pytestmark = pytest.mark.skipif(
    any(shutil.which(d) is None for d in DAEMONS) or os.geteuid() != 0,
    reason="needs root and Debian's slurm-wlm + munge (.ci/run installs them: apt-get install slurm-wlm munge)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Start munged, slurmctld and slurmd with a private config; yield the environment for sbatch."""
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir()
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (d / "munge").chmod(0o700)
    sock = d / "munge" / "sock"
    subprocess.run(
        [
            "munged",
            "--force",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--log-file={d}/munged.log",
            f"--pid-file={d}/munged.pid",
            f"--seed-file={d}/munged.seed",
        ],
        check=True,
    )
    host = socket.gethostname()
    (d / "slurm.conf").write_text(f"""ClusterName=dsv3test
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = dict(
        os.environ,
        SLURM_CONF=str(d / "slurm.conf"),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        PYTHONUNBUFFERED="1",
    )
    subprocess.run(["slurmctld", "-i"], env=env, check=True)
    subprocess.run(["slurmd"], env=env, check=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
        if out == "idle":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"slurmd never became idle: {(d / 'slurmctld.log').read_text()[-2000:]}")
    yield env
    subprocess.run(["scancel", "--user=root"], env=env)
    for pidfile in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
        try:
            os.kill(int((d / pidfile).read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def sbatch(env, workdir, args, nproc=2):
    env = dict(env, NPROC_PER_NODE=str(nproc), OMP_NUM_THREADS="1")
    (workdir / "logs").mkdir(exist_ok=True)  # SLURM opens --output before the script runs
    out = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={workdir}", str(ROOT / "slurm" / "train.sbatch"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().split(";")[0]


def job_field(env, job, field):
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    for token in text.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return None


def wait_job(env, job, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(env, job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", None):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {job_field(env, job, 'JobState')} after {timeout} s")


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_sbatch_two_task_run(slurm, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    job = sbatch(
        slurm,
        tmp_path,
        [
            "--no-sample",
            *tiny_overrides(
                corpus_dir,
                data_cache,
                out,
                **{"parallel.micro_batch_size": 2, "train.steps": 4, "ckpt.every": 4, "train.eval_every": 4},
            ),
        ],
    )
    state = wait_job(slurm, job)
    log = (tmp_path / "logs" / f"dsv3-train-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "2 process(es)" in log
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert list((tmp_path / "logs" / job).rglob("*.log"))  # one log file per rank


def test_sbatch_bad_layout_fails_with_one_line(slurm, tmp_path):
    """An impossible layout fails the job with one error line before torchrun starts."""
    job = sbatch(slurm, tmp_path, ["--no-sample", "parallel.pp=3"])
    assert wait_job(slurm, job) == "FAILED"
    assert job_field(slurm, job, "ExitCode") == "2:0"
    log = (tmp_path / "logs" / f"dsv3-train-{job}.out").read_text()
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert errors == [
        "dsv3: error: parallel.pp=3 does not divide the 2 process(es); run a multiple of 3 processes "
        "or choose a pp that divides 2"
    ], log
    assert "torchrun" not in log and "rendezvous" in log


@pytest.mark.distributed
def test_usr1_saves_requeues_and_resumes(slurm, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    steps = 40
    job = sbatch(
        slurm,
        tmp_path,
        [
            "--no-sample",
            *tiny_overrides(
                corpus_dir,
                data_cache,
                out,
                **{"parallel.micro_batch_size": 2, "train.steps": steps, "ckpt.every": 100, "train.eval_every": 20},
            ),
        ],
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        f = out / "metrics.jsonl"
        if f.is_file() and any(r.get("step", 0) >= 3 for r in metrics(out)):
            break
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    # SLURM holds a requeued job back for a while before it may start; let it start sooner, but
    # a few seconds after the requeue: slurmd refuses credentials issued within the second the
    # old one was revoked ("Job credential revoked")
    deadline = time.time() + 240
    while time.time() < deadline and job_field(slurm, job, "Restarts") in (None, "0"):
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+5"], env=slurm, capture_output=True)
    state = wait_job(slurm, job, timeout=400)
    log = (tmp_path / "logs" / f"dsv3-train-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "requeueing job" in log and "resumed from" in log, log[-3000:]
    assert int(job_field(slurm, job, "Restarts")) == 1
    recs = [r for r in metrics(out) if "lm_loss" in r]
    assert [r["step"] for r in recs] == list(range(1, steps + 1))  # every step exactly once
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:07d}"
