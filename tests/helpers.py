"""Helpers shared by the tests: the repository root, a tiny model's overrides, running the
``dsv3`` command (under torchrun for several processes), a random dsv3 checkpoint,
reading / comparing ``metrics.jsonl``, tiny transformers models, a released-style byte-level
BPE tokenizer with a chat template, and chatting through ``dsv3 chat`` / transformers.
Fixtures are in ``conftest.py``."""

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
CORPUS_FILES = [
    "argparse.py",
    "textwrap.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/__init__.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "shlex.py",
    "string.py",
    "colorsys.py",
    "csv.py",
]


#: the 2-layer model with every DeepSeek-V3 part (MLA, MoE, MTP) that the tests train: dense
#: block 0, MoE block 1 (8 routed experts), one MTP module
TINY_MODEL = {
    "model.vocab_size": 512,
    "model.dim": 64,
    "model.inter_dim": 128,
    "model.moe_inter_dim": 32,
    "model.n_layers": 2,
    "model.n_heads": 2,
    "model.kv_lora_rank": 16,
    "model.qk_nope_head_dim": 16,
    "model.qk_rope_head_dim": 8,
    "model.v_head_dim": 16,
    "model.max_seq_len": 128,
}


def tiny_model(**extra) -> list[str]:
    """:data:`TINY_MODEL` with ``data.seq_len=64`` as ``KEY=VALUE`` overrides (for configs built
    in process), ``extra`` (dotted keys) added or replacing."""
    return [f"{k}={v}" for k, v in {**TINY_MODEL, "data.seq_len": 64, **extra}.items()]


def tiny_overrides(corpus: Path, cache: Path, out_dir: Path, **extra) -> list[str]:
    """Overrides for a 2-layer model with every DeepSeek-V3 part (MLA, MoE, MTP) that runs fast."""
    base = {
        "data.source": str(corpus),
        "data.cache_dir": str(cache),
        "data.seq_len": 64,
        "data.num_proc": 1,
        **TINY_MODEL,
        "train.steps": 6,
        "train.log_every": 1,
        "train.eval_every": 3,
        "train.eval_batches": 2,
        "train.warmup_steps": 2,
        "train.out_dir": str(out_dir),
        "ckpt.every": 3,
        "parallel.micro_batch_size": 4,
        "train.sample_tokens": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


SCRIPTS = ROOT / "tests" / "scripts"  # the programs the tests start (under torchrun for several processes)


def _launch(
    target: list[str], args: list[str], nproc: int, timeout: int, check: bool, env: dict | None = None
) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
        **(env or {}),
    )
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    else:
        cmd = [sys.executable, *target]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(target + args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def run_dsv3(
    args: list[str], nproc: int = 1, timeout: int = 300, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the dsv3 CLI in a subprocess (under torchrun when nproc > 1); ``env`` adds
    environment variables."""
    return _launch(["-m", "dsv3"], args, nproc, timeout, check, env)


def run_script(
    name: str, args: list[str], nproc: int = 1, timeout: int = 300, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/NAME`` with ``args`` (under torchrun when nproc > 1), one thread per
    process when several, from the repository root; ``env`` adds environment variables."""
    return _launch([str(SCRIPTS / name)], args, nproc, timeout, check, env)


def launch(args: list[str], nproc: int = 1) -> subprocess.Popen:
    """Start the dsv3 CLI in the background (under torchrun when nproc > 1), with the thread
    settings of :func:`run_dsv3` (so numbers match runs made with it bit for bit)."""
    target = (
        ["-m", "dsv3"]
        if nproc == 1
        else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "dsv3"]
    )
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")
    )
    return subprocess.Popen(
        [sys.executable, *target, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Block until ``run_dir/metrics.jsonl`` records ``step`` (AssertionError if the process ends first
    or ``timeout`` seconds pass)."""
    import time

    deadline = time.time() + timeout
    f = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if f.is_file() and any(json.loads(x).get("step", -1) >= step for x in f.read_text().splitlines() if x):
            return
        time.sleep(0.02)
    stderr = proc.stderr.read()[-2000:] if proc.poll() is not None else ""
    raise AssertionError(f"step {step} never logged; stderr: {stderr}")


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


def rewind(src: Path, dst: Path, tag: str = "step_0000002") -> Path:
    """Copy run ``src`` to ``dst`` as if it had been interrupted right after saving ``tag``."""
    import shutil

    shutil.copytree(src, dst)
    ck = dst / "checkpoints"
    for later in ck.glob("step_*"):
        if later.name > tag:
            shutil.rmtree(later)
    (ck / "latest").write_text(tag + "\n")
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= int(tag[5:])))
    return dst


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
        vocab_size=HF_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=64,
        routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
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

    model, info = DeepseekV3ForCausalLM.from_pretrained(
        str(path), output_loading_info=True, attn_implementation="eager"
    )
    return model.eval(), info


# ---------------------------------------------------------------- released-model tokenizers
# A byte-level BPE tokenizer in the style of DeepSeek's releases, built here with the tokenizers
# library (no download): full-width special tokens, BOS added by the post-processor, and a chat
# template in DeepSeek's format (system text after BOS, <｜User｜> / <｜Assistant｜> turns, a reply
# ended by <｜end▁of▁sentence｜>).
DS_BOS, DS_EOS, DS_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
DS_USER, DS_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
DS_CHAT_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- set ns.system = ns.system + message['content'] -%}
    {%- endif -%}
{%- endfor -%}
{{ bos_token }}{{ ns.system }}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{ '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' -%}
        {{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<｜Assistant｜>' }}
{%- endif -%}
"""
TOKENIZER_TEXTS = ["textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "heapq.py"]


def byte_level_bpe(vocab_size: int = 600, bpe_size: int | None = None, placeholders: int = 0):
    """A ``tokenizers.Tokenizer``: byte-level BPE trained on a few standard-library files to
    ``vocab_size`` entries (BOS, EOS, padding at ids 0, 1, 2; digits pre-split in runs of up to
    3), the special chat markers ``<｜User｜>`` and ``<｜Assistant｜>`` added after the vocabulary,
    and a post-processor that starts a text with BOS.

    ``bpe_size``: grow the BPE vocabulary to this size with merges of learned pieces (pairs of
    the most frequent pieces, appended after the learned merges, so the trained ones keep their
    priority), which is how a vocabulary of DeepSeek's size (128000 BPE entries) is made quickly
    from a small corpus. ``placeholders``: that many more special tokens
    (``<｜place▁holder▁no▁N｜>``), as in DeepSeek's releases.
    """
    import json as _json

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [(STDLIB / n).read_text(encoding="utf-8") for n in TOKENIZER_TEXTS]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DS_BOS, DS_EOS, DS_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    if bpe_size:
        spec = _json.loads(tk.to_str())
        vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
        pieces = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if p not in (DS_BOS, DS_EOS, DS_PAD)]
        done = False
        for a in pieces:
            for b in pieces:
                if len(vocab) >= bpe_size:
                    done = True
                    break
                if a + b not in vocab:
                    vocab[a + b] = len(vocab)
                    merges.append([a, b])
            if done:
                break
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in (DS_BOS, DS_EOS, DS_PAD)]
        tk = Tokenizer.from_str(_json.dumps(spec))
    extra = [DS_USER, DS_ASSISTANT] + [f"<｜place▁holder▁no▁{i}｜>" for i in range(placeholders)]
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra])
    tk.post_processor = processors.TemplateProcessing(
        single=f"{DS_BOS} $A", pair=f"{DS_BOS} $A {DS_BOS} $B", special_tokens=[(DS_BOS, 0)]
    )
    return tk


def write_released_tokenizer(tk, folder: Path, template: str | None = DS_CHAT_TEMPLATE, **config) -> Path:
    """Write ``tk`` as a released model ships it: ``tokenizer.json`` and a ``tokenizer_config.json``
    naming the special tokens (as DeepSeek's: ``LlamaTokenizerFast``, ``add_bos_token``) with the
    chat template; ``config`` adds or replaces keys (None removes one). Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "LlamaTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {
            "__type": "AddedToken",
            "content": DS_BOS,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        },
        "eos_token": {
            "__type": "AddedToken",
            "content": DS_EOS,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": DS_PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 16384,
        "legacy": True,
        "chat_template": template,
    }
    cfg.update(config)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return folder


def save_pretrained_tokenizer(tk, folder: Path, template: str = DS_CHAT_TEMPLATE) -> Path:
    """Write ``tk`` with transformers' ``save_pretrained`` (tokenizer.json, tokenizer_config.json,
    chat_template.jinja), special tokens in DeepSeek's style. Returns ``folder``."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=DS_BOS, eos_token=DS_EOS, pad_token=DS_PAD, chat_template=template
    )
    hf.save_pretrained(str(folder))
    return folder


def chat_jsonl(run, n: int, text: str) -> dict:
    """``dsv3 chat --temperature 0 --jsonl`` on one user message: its JSON reply line."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsv3",
            "chat",
            "--ckpt",
            str(run),
            "--temperature",
            "0",
            "--max-new-tokens",
            str(n),
            "--jsonl",
        ],
        input=json.dumps({"content": text}) + "\n",
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONUNBUFFERED="1"),
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return json.loads(proc.stdout)


def transformers_reply(export, messages, n: int):
    """(chat ids of transformers' AutoTokenizer for ``messages`` with the generation prompt, the
    ids transformers' greedy ``generate`` appends, those ids without a final stop id)."""
    import torch
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    auto = AutoTokenizer.from_pretrained(str(export))
    ids = auto.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    model = DeepseekV3ForCausalLM.from_pretrained(str(export), attn_implementation="eager").eval()
    stops = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
        )
    new = out[0, len(ids) :].tolist()
    return ids, new, (new[:-1] if new and new[-1] in stops else new)
