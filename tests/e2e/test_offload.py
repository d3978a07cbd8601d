"""ZeRO-Offload, ZeRO-3 and ZeRO-Infinity (parallel.offload_optimizer / offload_param /
offload_dir, parallel.zero_stage=3): the same numbers as ZeRO-0, the same weights file, exact
resumes, and checkpoints that resume with and without offload."""

import pytest
from helpers import assert_same_metrics, rewind, run_dsv3, tiny_overrides
from helpers import read_metrics as metrics

# moe_inter_dim 64: the larger AdamW group holds 343,552 fp32 elements (1.3 MiB), above the 1 MiB
# from which DeepSpeed swaps an optimizer sub-group to nvme, so the nvme test really swaps
COMMON = {
    "train.steps": 4,
    "ckpt.every": 2,
    "ckpt.keep_last": 2,
    "train.eval_every": 2,
    "train.sample_tokens": 4,
    "model.moe_inter_dim": 64,
}
CPU = {"parallel.offload_optimizer": "cpu"}


@pytest.fixture(scope="module")
def reference(corpus_dir, data_cache, tmp_path_factory):
    """One process, ZeRO-0, no offload: the numbers every other run must reproduce."""
    out = tmp_path_factory.mktemp("offload") / "ref"
    run_dsv3(["train", "--no-sample", *tiny_overrides(corpus_dir, data_cache, out, **COMMON)])
    return out


def train(corpus_dir, data_cache, out, nproc=1, **extra):
    """``dsv3 train`` with ``extra`` on ``nproc`` processes (the reference's global batch); its arguments."""
    args = [
        "train",
        "--no-sample",
        *tiny_overrides(corpus_dir, data_cache, out, **COMMON, **{"parallel.micro_batch_size": 4 // nproc, **extra}),
    ]
    run_dsv3(args, nproc=nproc)
    return args


def resume(src, dst, args, nproc=1, **extra):
    """Rewind run ``src`` to step 2 into ``dst`` and resume it with ``args`` plus ``extra``."""
    rewind(src, dst)
    args = [a.replace(str(src), str(dst)) for a in args] + [f"{k}={v}" for k, v in extra.items()]
    proc = run_dsv3(args, nproc=nproc)
    assert f"resumed from {dst / 'checkpoints' / 'step_0000002'}" in proc.stdout
    return metrics(dst)


def assert_same_weights(run, ref, tol=2e-5):
    """model.safetensors of the last step: the same keys, shapes and dtypes, values within ``tol``
    (float rounding: DeepSpeed clips the gradients where ZeRO-0's trainer does, with its own
    arithmetic, and AdamW's normalized update carries such differences to every weight)."""
    from safetensors.torch import load_file

    a = load_file(run / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(ref / "checkpoints" / "step_0000004" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert (a[key] - b[key]).abs().max().item() <= tol, key


def test_cpu_offload_zero1_matches_and_resumes_with_and_without_offload(reference, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "cpu"
    args = train(corpus_dir, data_cache, out, **{"parallel.zero_stage": 1, **CPU})
    full = metrics(out)
    assert_same_metrics(full, metrics(reference))
    assert_same_weights(out, reference)
    assert resume(out, tmp_path / "again", args) == full  # same settings: bit for bit
    # written with offload, resumed without (torch AdamW reads DeepSpeed's CPU Adam state)
    assert_same_metrics(resume(out, tmp_path / "plain", args, **{"parallel.offload_optimizer": "none"}), full)


@pytest.mark.distributed
def test_cpu_offload_zero2_with_ep2_matches_and_resumes_bitwise(reference, corpus_dir, data_cache, tmp_path):
    out = tmp_path / "ep2"
    args = train(corpus_dir, data_cache, out, nproc=2, **{"parallel.zero_stage": 2, "parallel.ep": 2, **CPU})
    full = metrics(out)
    assert_same_metrics(full, metrics(reference))
    assert_same_weights(out, reference)
    assert resume(out, tmp_path / "again", args, nproc=2) == full


@pytest.fixture(scope="module")
def zero3(corpus_dir, data_cache, tmp_path_factory):
    """ZeRO-3 on 2 processes: (run dir, its arguments)."""
    out = tmp_path_factory.mktemp("offload") / "zero3"
    return out, train(corpus_dir, data_cache, out, nproc=2, **{"parallel.zero_stage": 3})


@pytest.mark.distributed
def test_zero3_matches_zero0_saves_the_same_weights_and_resumes(zero3, reference, tmp_path):
    out, args = zero3
    full = metrics(out)
    assert_same_metrics(full, metrics(reference))
    assert_same_weights(out, reference)  # gathered from each rank's partition, in the unsplit layout
    assert resume(out, tmp_path / "again", args, nproc=2) == full
    # written without offload, resumed with it (DeepSpeed's CPU Adam reads torch AdamW's state)
    assert_same_metrics(resume(out, tmp_path / "cpu", args, nproc=2, **CPU), full)


def test_zero_infinity_nvme_matches_zero3_and_resumes(zero3, reference, corpus_dir, data_cache, tmp_path):
    from dsv3.errors import DsvError
    from dsv3.parallel.layout import check_async_io

    try:
        check_async_io()  # AsyncIOBuilder().is_compatible()
    except DsvError as exc:
        pytest.skip(str(exc))
    nvme = {
        "parallel.zero_stage": 3,
        "parallel.offload_optimizer": "nvme",
        "parallel.offload_param": "nvme",
        "parallel.offload_dir": str(tmp_path / "swap"),
    }
    out = tmp_path / "nvme"
    args = train(corpus_dir, data_cache, out, **nvme)
    full = metrics(out)
    assert_same_metrics(full, metrics(zero3[0]))
    assert_same_metrics(full, metrics(reference))
    assert_same_weights(out, reference)
    swap = tmp_path / "swap" / "zero_stage_3"  # DeepSpeed's swap folders; the run removes its files at the end
    assert (swap / "optimizer").is_dir() and any(swap.glob("*params")) and not any(swap.rglob("*.swp"))
    assert resume(out, tmp_path / "again", args) == full  # with every sub-group swapped out at the start


def test_offload_refusal_at_check(tmp_path):
    proc = run_dsv3(["train", "--check", "2", "parallel.zero_stage=1", "parallel.offload_param=cpu"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "dsv3: error: parallel.offload_param=cpu needs parallel.zero_stage=3 (ZeRO-1 keeps every weight on "
        "each rank); set zero_stage=3 or offload_param=none"
    )
