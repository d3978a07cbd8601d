"""Helpers shared by the tests: the repository root, a tiny model's overrides, running the
``dsv3`` command (under torchrun for several processes), a random dsv3 checkpoint, and
reading / comparing ``metrics.jsonl``. Fixtures are in ``conftest.py``."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
# metrics.jsonl fields that measure the machine, not the training (excluded from equality checks)
TIMING = {"tokens_per_s", "step_time_s", "tflops", "data_share", "peak_mem_mib", "mfu"}
# the logged values two layouts of the same run must agree on
METRIC_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens", "val_loss")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
HF_VOCAB = 128  # vocabulary of the tiny transformers models
CORPUS_FILES = ["argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "json/__init__.py",
                "heapq.py", "bisect.py", "fractions.py", "shlex.py", "string.py", "colorsys.py", "csv.py"]


def tiny_overrides(corpus: Path, cache: Path, out_dir: Path, **extra) -> list[str]:
    """Overrides for a 2-layer model with every DeepSeek-V3 part (MLA, MoE, MTP) that runs fast."""
    base = {
        "data.source": str(corpus), "data.cache_dir": str(cache), "data.seq_len": 64, "data.num_proc": 1,
        "model.vocab_size": 512, "model.dim": 64, "model.inter_dim": 128, "model.moe_inter_dim": 32,
        "model.n_layers": 2, "model.n_heads": 2, "model.kv_lora_rank": 16, "model.qk_nope_head_dim": 16,
        "model.qk_rope_head_dim": 8, "model.v_head_dim": 16, "model.max_seq_len": 128,
        "train.steps": 6, "train.log_every": 1, "train.eval_every": 3, "train.eval_batches": 2,
        "train.warmup_steps": 2, "train.out_dir": str(out_dir), "ckpt.every": 3,
        "parallel.micro_batch_size": 4, "train.sample_tokens": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


SCRIPTS = ROOT / "tests" / "scripts"  # the programs the tests start (under torchrun for several processes)


def _launch(target: list[str], args: list[str], nproc: int, timeout: int, check: bool,
            env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
               **(env or {}))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    else:
        cmd = [sys.executable, *target]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(target + args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def run_dsv3(args: list[str], nproc: int = 1, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the dsv3 CLI in a subprocess (under torchrun when nproc > 1)."""
    return _launch(["-m", "dsv3"], args, nproc, timeout, check)


def run_script(name: str, args: list[str], nproc: int = 1, timeout: int = 300, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/NAME`` with ``args`` (under torchrun when nproc > 1), one thread per
    process when several, from the repository root; ``env`` adds environment variables."""
    return _launch([str(SCRIPTS / name)], args, nproc, timeout, check, env)


def dsv3_checkpoint(folder: Path, mcfg, seed: int = 0):
    """Write a dsv3 checkpoint folder (model.safetensors + config.yaml) of a random model;
    returns the model (eval mode).

    Norm weights are random too (1 + 0.3 N(0, 1)) and so are the routing biases: with unit
    weights a norm applied twice is the same as once, which would hide which hidden state the
    MTP modules read, and zero biases would hide a bias that was not loaded.
    """
    import torch
    from safetensors.torch import save_file

    from dsv3.config import Config, save_config
    from dsv3.model import Transformer

    model = Transformer(mcfg)
    model.init_weights(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.moe_gates():
            gate.e_score_correction_bias.uniform_(-0.3, 0.3, generator=g)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    save_config(Config(model=mcfg), folder / "config.yaml")
    return model.eval()


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` without the machine-dependent TIMING keys."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def assert_same_metrics(got: list[dict], want: list[dict], rel: float = 1e-5, abs_tol: float = 1e-7) -> None:
    """Same logged steps, and every METRIC_KEYS value of ``want`` matched within ``rel`` / ``abs_tol``."""
    import pytest

    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in METRIC_KEYS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=rel, abs=abs_tol), (b["step"], key, a[key], b[key])


# transformers (the test extra) is imported inside each function
def hf_config(**kw):
    """A tiny transformers ``DeepseekV3Config``: dim 64, 8 experts of which 2 active, 64 positions."""
    from transformers import DeepseekV3Config

    base = dict(
        vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64,
        routed_scaling_factor=2.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    base.update(kw)
    return DeepseekV3Config(**base)


def random_hf_model(cfg, seed: int):
    """transformers' DeepseekV3ForCausalLM of ``cfg`` with unit-scale random weights, random norm
    weights and routing biases (eager attention, eval mode)."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # unit-scale activations: std = fan_in ** -0.5
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.3, 0.3)
    return model


def hf_load(path: Path):
    """(transformers' model loaded from ``path`` in eval mode, its loading info)."""
    from transformers import DeepseekV3ForCausalLM

    model, info = DeepseekV3ForCausalLM.from_pretrained(str(path), output_loading_info=True,
                                                        attn_implementation="eager")
    return model.eval(), info
