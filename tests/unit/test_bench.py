"""``dsv3 bench``: result files, the transformers peer, the decode cache size, host syncs.

Speed itself is measured by the benchmark, not asserted here (timings on a shared machine
are noise); these tests check that the figures are computed from the right quantities.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from unittest import mock

import pytest
import torch
from helpers import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3 import bench
from dsv3.cli import main
from dsv3.config import load_config
from dsv3.errors import DsvError
from dsv3.hardware import HOST_ALLOCATOR, device_name
from dsv3.model import flops_per_token, kernels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = tiny_model(**{"data.seq_len": "32", "parallel.micro_batch_size": "2"})


def test_bench_train_writes_result(tmp_path, capsys):
    rc = main(["bench", "train", "--steps", "2", "--reps", "1", "--out-dir", str(tmp_path), *TINY])
    assert rc == 0
    files = list(tmp_path.glob("train-tiny-fp32-*.json"))
    assert len(files) == 1
    r = json.loads(files[0].read_text())
    cfg = load_config(None, TINY)
    assert r["tokens_per_step"] == 2 * 32 and r["batch"] == 2 and r["seq_len"] == 32
    assert r["flops_per_token"] == flops_per_token(cfg.model, 32)
    assert set(r["results"]) == {"dsv3", "dsv3+ckpt"}
    for row in r["results"].values():
        assert len(row) >= 6 and row["step_time_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(64 / row["step_time_s"])
        assert row["model_tflops"] == pytest.approx(r["flops_per_token"] * row["tokens_per_s"] / 1e12)
        assert row["mfu"] == pytest.approx(row["model_tflops"] / r["peak_tflops"]["fp32"])
    assert r["peak_tflops"]["fp32"] > 0 and r["peak_tflops"]["bf16"] > 0
    assert r["machine"]["torch"] == torch.__version__ and r["machine"]["torch_threads"] == 1
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert r["machine"]["host_allocator"] == (HOST_ALLOCATOR if glibc else None)
    # the kernels chosen by measurement, with the candidates' timings
    (attn,) = [v for k, v in r["kernels"].items() if k.startswith("attention | float32 train 2x2x32 24/16")]
    assert attn["choice"] in attn["ms"] and set(attn["ms"]) == {"flash", "sdpa", "matmul"}
    (adamw,) = [v for k, v in r["kernels"].items() if k.startswith("optimizer | float32 ")]
    assert adamw["choice"] in adamw["ms"] and set(adamw["ms"]) == {"fused", "foreach"}
    # activation checkpointing keeps only block inputs for the backward pass
    assert 0 < r["results"]["dsv3+ckpt"]["activation_mib"] < 0.5 * r["results"]["dsv3"]["activation_mib"]
    out = capsys.readouterr().out
    assert "dsv3+ckpt" in out and "tokens_per_s" in out and f"wrote {files[0]}" in out


def test_vs_hf_ratio_and_parity(tmp_path):
    """The peer has dsv3's weights (logits equal at step 0) and the ratio uses its fastest setting."""
    pytest.importorskip("transformers")
    cfg = load_config(None, TINY)
    assert bench.hf_parity(cfg) < 1e-4
    r = bench.bench_train(cfg, "fp32", vs_hf=True, steps=1, reps=1, warmup=0, checkpointing=False, profile=True)
    assert r["profile"]["side"] == "dsv3" and r["profile"]["phases"]["forward"]["matmul_flops"] > 0
    hf_rows = {k: v for k, v in r["results"].items() if k.startswith("hf:")}
    assert set(hf_rows) == {f"hf:fp32:{e}" for e in bench.HF_EXPERTS}
    best = max(hf_rows.values(), key=lambda v: v["tokens_per_s"])
    assert r["hf_tokens_per_s"] == best["tokens_per_s"]
    assert r["speedup_vs_hf"] == pytest.approx(r["results"]["dsv3"]["tokens_per_s"] / best["tokens_per_s"])
    assert r["hf_parity_max_abs_logit_diff"] < 1e-4
    assert r["model"]["mtp_depth"] == 0 and r["notes"]  # transformers has no MTP: both run without it


def test_compiled_bench_compiles_the_peers_too(monkeypatch):
    """``--compile`` compares compiled against compiled: every transformers side goes through
    ``torch.compile`` as well as dsv3's model, and its name says so (the compiler replaced by
    a recorder here: the sides run eagerly)."""
    pytest.importorskip("transformers")
    compiled = []

    def record(model, *args, **kwargs):
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", record)
    cfg = load_config(None, TINY)
    r = bench.bench_train(cfg, "fp32", vs_hf=True, compile_model=True, steps=1, reps=1, warmup=0)
    assert r["compile"] is True
    assert set(r["results"]) == {"dsv3"} | {f"hf:fp32:{e}:compiled" for e in bench.HF_EXPERTS}  # no checkpointing side
    assert compiled == ["Transformer"] + ["DeepseekV3ForCausalLM"] * len(bench.HF_EXPERTS)
    assert r["hf_best"].endswith(":compiled")


@pytest.mark.parametrize("precision,size", [("fp32", 4), ("bf16", 2)])
def test_decode_cache_bytes_per_token(precision, size):
    cfg = load_config(None, TINY)
    r = bench.bench_decode(cfg, precision, batches=(1, 2), prompt_len=4, new_tokens=3, reps=1)
    m = cfg.model
    assert (
        r["cache_bytes_per_token"] == (m.kv_lora_rank + m.qk_rope_head_dim) * m.n_layers * size == (16 + 8) * 2 * size
    )
    assert r["tokens_per_s_b1"] > 0 and r["tokens_per_s_b2"] > 0
    assert r["results"]["dsv3@b2"]["tokens_per_s"] == pytest.approx(2 * 3 / r["results"]["dsv3@b2"]["seconds"])


def test_precision_auto_benchmarks_the_faster_precision(tmp_path, capsys, monkeypatch):
    """``--precision auto`` benchmarks the precision this CPU measured faster (forced here to
    fp32): the result file, its precision and notes say which, the command keeps ``auto``."""
    monkeypatch.setenv("DSV3_KERNELS", "precision=fp32")
    monkeypatch.setattr(kernels, "_made", {})
    args = ["bench", "decode", "--precision", "auto", "--reps", "1", "--out-dir", str(tmp_path), *TINY]
    assert main(args) == 0
    (path,) = tmp_path.glob("decode-tiny-*.json")
    r = json.loads(path.read_text())
    assert path.name.startswith("decode-tiny-fp32-") and r["precision"] == "fp32"
    assert "--precision auto" in r["command"] and r["cache_bytes_per_token"] == (16 + 8) * 2 * 4
    note = f"--precision=auto: fp32 on {device_name(torch.device('cpu'))}"
    assert note in r["notes"] and capsys.readouterr().out.startswith(note + "\n")


class SyncCounter(TorchDispatchMode):
    """Counts ops that make the host wait for the device on a GPU: reading a value
    (``.item()``, ``.tolist()``, ``int(t)``, ``if t:``) and ops whose output size depends on
    the data (``nonzero``, ``bincount``, ``repeat_interleave`` without ``output_size``...)."""

    SYNCING = {
        "_local_scalar_dense",
        "nonzero",
        "bincount",
        "masked_select",
        "unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "repeat_interleave",
    }

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _one_step_syncs(precision: str) -> list[str]:
    """Host reads of one step with the kernels a GPU runs (the fixed rules: nothing is measured
    there; on CPU the measured padded-bmm experts may read their block size, and bf16 experts
    pad their rows (dsv3.model.grouped.padded_rows) to a size read from the data, which is free)."""
    with mock.patch.dict(os.environ, {"DSV3_KERNELS": "rules"}), mock.patch("dsv3.model.moe.padded_rows", lambda *a: 0):
        return _count_syncs(precision)


def _count_syncs(precision: str) -> list[str]:
    cfg = load_config(None, TINY)
    model = bench.build_dsv3(cfg, torch.device("cpu"), precision)
    side = bench.Side(
        "dsv3", model, bench.make_optimizer(model, cfg, precision, master=True), bench.dsv3_loss(cfg), 1.0
    )
    ((x, y),) = bench.synthetic_batches(cfg, 2, 32, 1, torch.device("cpu"))
    side.step(x, y)  # first step: lazily created optimizer state
    with SyncCounter() as counter:
        side.step(x, y)
    return counter.seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_has_no_host_sync(precision):
    """Forward, backward, clipping and the AdamW update read no device value on the host."""
    assert _one_step_syncs(precision) == []


def test_sync_counter_sees_the_padded_expert_path(monkeypatch):
    """The counter does catch a sync: the padded-bmm expert path sizes its block from the data."""
    from dsv3.model import grouped

    monkeypatch.setattr(grouped, "HAS_GROUPED_MM", False)
    assert "_local_scalar_dense" in _one_step_syncs("fp32")


def test_master_weight_adamw_keeps_small_updates():
    """bf16 weights with fp32 masters: updates below bf16 resolution accumulate in the master."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = bench.MasterWeightAdamW([{"params": [w], "weight_decay": 0.0}], lr=1e-4)
    for _ in range(10):
        w.grad = torch.ones_like(w)
        opt.step()
        opt.zero_grad()
    master = opt.master_params[0]
    assert master.dtype == torch.float32
    assert master[0].item() == pytest.approx(1 - 10 * 1e-4, rel=1e-4)  # Adam's first steps move by ~lr
    assert torch.equal(w, master.to(torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    popt = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(10):
        plain.grad = torch.ones_like(plain)
        popt.step()
    assert torch.equal(plain, torch.ones_like(plain))  # pure bf16 loses every one of those updates


@pytest.mark.parametrize("forced", ["fused", "foreach"])
def test_bench_optimizers_take_the_chosen_adamw(forced, monkeypatch, tmp_path):
    """Both sides' AdamW runs the implementation chosen for the dtype its update runs in: fp32
    for dsv3's masters of bf16 weights, bf16 for transformers' pure bf16 weights."""
    from dsv3.model import kernels

    monkeypatch.setenv("DSV3_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.setattr(kernels, "_made", {})
    model = torch.nn.Linear(64, 32).to(torch.bfloat16)
    cfg = load_config(None, TINY)
    other = {"fused": "foreach", "foreach": "fused"}[forced]
    kernels.preload({"optimizer | float32 4096 in 2": {"choice": forced}})
    kernels.preload({"optimizer | bfloat16 4096 in 2": {"choice": other}})
    master = bench.make_optimizer(model, cfg, "bf16", master=True)
    assert isinstance(master, bench.MasterWeightAdamW) and master.optimizer.defaults[forced] is True
    pure = bench.make_optimizer(model, cfg, "bf16", master=False)
    assert isinstance(pure, torch.optim.AdamW) and pure.defaults[other] is True


def test_sides_that_would_not_fit_the_device_are_left_out():
    notes = []
    room = bench.runs.side_room(100 * 2**30, 10**9, "bf16", notes)  # states within 75 GiB (80.5 GB); dsv3: 20 GB
    assert room("dsv3+ckpt", "bf16", True)  # 40 GB
    assert room("hf:fp32:eager", "fp32", False)  # 56
    assert room("hf:fp32:grouped_mm", "fp32", False)  # 72
    assert room("hf:bf16:eager", "bf16", False)  # 80
    assert not room("hf:bf16:grouped_mm", "bf16", False)  # 88: left out, and not counted
    assert not room("dsv3+ckpt", "fp32", True)  # 96
    assert notes[0] == "hf:bf16:grouped_mm left out: its model state (7.5 GiB) would not fit beside the others"
    assert len(notes) == 2
    assert bench.runs.side_room(None, 10**12, "bf16", notes)("dsv3+ckpt", "bf16", True)  # CPU: no limit


def test_bad_input():
    cfg = load_config(None, TINY)
    with pytest.raises(DsvError, match="precision"):
        bench.bench_train(cfg, "fp16")
    with pytest.raises(DsvError, match="max_seq_len"):
        bench.bench_decode(cfg, prompt_len=100, new_tokens=100)


def test_bench_data_missing_module_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "data_pipeline.bench", None)  # import fails
    assert main(["bench", "data", "--out-dir", str(tmp_path), *TINY]) == 2
    assert "data_pipeline.bench" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bench_data_writes_what_the_pipeline_reports(monkeypatch, tmp_path, capsys):
    import sys
    import types

    fake = types.ModuleType("data_pipeline.bench")
    fake.bench_data = lambda cfg: {"tokens_per_s": 123.0, "seq_len": cfg.data.seq_len}
    monkeypatch.setitem(sys.modules, "data_pipeline.bench", fake)
    assert main(["bench", "data", "--out-dir", str(tmp_path), *TINY]) == 0
    (f,) = tmp_path.glob("data-tiny-data-*.json")
    r = json.loads(f.read_text())
    assert r["tokens_per_s"] == 123.0 and r["seq_len"] == 32 and r["kind"] == "data"
    assert set(r["machine"]) >= {"cpu_model", "cpu_features", "logical_cpus", "torch_threads", "torch", "gpu"}
    assert "tokens_per_s" in capsys.readouterr().out


def test_peak_tflops_auto_config():
    assert load_config(None, ["train.peak_tflops=auto"]).train.peak_tflops == "auto"
    assert load_config(None, ["train.peak_tflops=312"]).train.peak_tflops == 312.0
    with pytest.raises(DsvError, match="peak_tflops"):
        load_config(None, ["train.peak_tflops=fast"])


ALLOCATOR_PROBE = """
import ctypes, json, sys
import torch
from dsv3.hardware import tune_host_allocator

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def mapped_by(nbytes):  # regions mmapped while a tensor of nbytes lives
    before = libc.mallinfo2().hblks
    t = torch.empty(nbytes, dtype=torch.uint8)
    t.fill_(1)
    n = libc.mallinfo2().hblks - before
    del t
    return n

first = mapped_by(4 << 20)
settings = tune_host_allocator() if sys.argv[1] == "tune" else None
big = mapped_by(16 << 20)
print(json.dumps({"settings": settings, "first": first, "big": big}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_host_allocator_serves_tensors_from_the_heap():
    """glibc maps a fresh region for every allocation above its (adaptive) threshold: a 4 MiB
    tensor at first, 16 MiB after that; tuned, a 16 MiB tensor comes from the heap. The user's
    own malloc settings (MALLOC_* variables, GLIBC_TUNABLES) leave glibc alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def probe(mode, **extra):
        out = subprocess.run(
            [sys.executable, "-c", ALLOCATOR_PROBE, mode], env={**env, **extra}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    plain, tuned = probe("plain"), probe("tune")
    assert plain["settings"] is None and tuned["settings"] == HOST_ALLOCATOR
    assert plain["first"] == tuned["first"] == 1  # glibc's default: a 4 MiB tensor is mmapped
    assert plain["big"] == 1 and tuned["big"] == 0  # 16 MiB: above glibc's raised threshold, below ours
    assert probe("tune", MALLOC_TRIM_THRESHOLD_="0")["settings"] is None
    assert probe("tune", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")["settings"] is None
