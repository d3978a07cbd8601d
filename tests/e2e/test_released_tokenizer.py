"""Released-model tokenizers through the CLI, and exports that transformers chats with as they are:

* a folder made by ``save_pretrained`` (byte-level BPE tokenizer with a DeepSeek-style chat
  template, a tiny DeepSeek-V3 model) -> ``convert --from-hf`` -> ``sft`` (the loss falls) ->
  ``chat`` -> ``convert --to-hf`` -> transformers gives the same chat ids and the same greedy reply;
* pre-training with an existing 129k-entry tokenizer (uint32 shards), and the bad inputs.
"""

import json
import shutil
from pathlib import Path

import pytest
from helpers import (
    DS_EOS,
    byte_level_bpe,
    chat_jsonl,
    hf_config,
    random_hf_model,
    run_dsv3,
    save_pretrained_tokenizer,
    tiny_overrides,
    transformers_reply,
    write_released_tokenizer,
)

transformers = pytest.importorskip("transformers")

QUESTION = "What does the function json.dumps do?"
SFT = {
    "data.seq_len": 128,
    "train.steps": 8,
    "ckpt.every": 8,
    "train.eval_every": 8,
    "train.eval_batches": 1,
    "train.warmup_steps": 1,
    "train.lr": 3e-3,
    "parallel.micro_batch_size": 4,
    "train.log_every": 1,
    "train.sample_tokens": 6,
}


def _sft(init_from, out, data_cache, **extra):
    over = {
        "train.init_from": str(init_from),
        "train.out_dir": str(out),
        "data.cache_dir": str(data_cache),
        **SFT,
        **extra,
    }
    return run_dsv3(["sft", "--config", "configs/sft_tiny.yaml", *[f"{k}={v}" for k, v in over.items()]])


@pytest.fixture(scope="module")
def released_ckpt(tmp_path_factory):
    """save_pretrained folder (tokenizer with chat template + tiny DeepSeek-V3) imported into dsv3."""
    root = tmp_path_factory.mktemp("released")
    tk = byte_level_bpe(600)
    src = save_pretrained_tokenizer(tk, root / "release")
    vocab = tk.get_vocab_size(with_added_tokens=True)
    random_hf_model(hf_config(vocab_size=vocab, max_position_embeddings=256), seed=5).save_pretrained(src)
    assert (src / "chat_template.jinja").is_file() and (src / "tokenizer.json").is_file()
    run_dsv3(["convert", "--from-hf", str(src), "--out", str(root / "imported")])
    return src, root / "imported"


def test_released_model_fine_tunes_chats_and_exports_to_transformers(released_ckpt, data_cache, tmp_path):
    from dsv3 import load_tokenizer
    from dsv3.chat_format import chat_stop_ids, encode_chat

    src, imported = released_ckpt
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (imported / name).read_bytes() == (src / name).read_bytes()
    run = tmp_path / "sft"
    proc = _sft(imported, run, data_cache)
    assert "----- sample -----" in proc.stdout
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0], vals  # fine-tuning lowered the loss on held-out replies
    assert (run / "tokenizer.json").is_file()
    assert (run / "checkpoints" / "step_0000008" / "chat_template.jinja").is_file()

    got = chat_jsonl(run, 12, QUESTION)
    tok = load_tokenizer(run)
    messages = [{"role": "user", "content": QUESTION}]
    export = tmp_path / "export"
    run_dsv3(["convert", "--to-hf", str(run), "--out", str(export)])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # the tokenizer as it is
        assert (export / name).read_bytes() == (src / name).read_bytes()
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == chat_stop_ids(tok) and gen["eos_token_id"][0] == tok.special_ids[DS_EOS]
    ids, new, reply = transformers_reply(export, messages, 12)
    assert ids == encode_chat(tok, messages)
    assert len(new) == got["tokens"] and tok.decode(reply) == got["reply"]

    # plain generation with the released tokenizer: the prompt starts with BOS as the tokenizer says
    proc = run_dsv3(["generate", "--ckpt", str(run), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "5"])
    assert proc.stdout.startswith("def ")


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory):
    """A byte-level BPE of DeepSeek's size: 128000 BPE entries (about 1000 learned on a few
    standard-library files, the rest merges of learned pieces) + 815 added special tokens."""
    tk = byte_level_bpe(1000, bpe_size=128000, placeholders=813)
    assert tk.get_vocab_size(with_added_tokens=True) == 128815
    return write_released_tokenizer(tk, tmp_path_factory.mktemp("big"))


def test_pretraining_with_an_existing_129k_tokenizer(big_tokenizer, corpus_dir, data_cache, tmp_path):
    import numpy as np

    from dsv3.tokenizer_files import open_tokenizer

    out = tmp_path / "run"
    base = tiny_overrides(corpus_dir, data_cache, out, **{"train.steps": 2, "ckpt.every": 2, "train.eval_every": 0})
    base = [o for o in base if not o.startswith("model.vocab_size=")]
    # the tokenizer does not fit the default 512 rows: one line naming the fix
    proc = run_dsv3(
        ["prepare", "--config", "configs/tiny.yaml", *base, f"data.tokenizer={big_tokenizer}", "model.vocab_size=512"],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "set model.vocab_size=128815" in proc.stderr
    proc = run_dsv3(["train", *base, f"data.tokenizer={big_tokenizer / 'tokenizer.json'}", "model.vocab_size=129280"])
    assert "----- sample -----" in proc.stdout
    prepared = Path(next(x for x in proc.stdout.splitlines() if x.startswith("prepared ")).split()[1].rstrip(":"))
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["tokenizer_vocab_size"] == 128815 and meta["vocab_size"] == 129280
    shard = meta["shards"]["train"][0]
    data = np.fromfile(prepared / shard["file"], dtype="<u4")
    assert len(data) == shard["n_tokens"] and int(data.max()) < 128815
    tok = open_tokenizer(big_tokenizer)
    assert tok.add_bos and data[0] == tok.bos_id  # documents start with BOS, as this tokenizer's texts do
    ends = np.load(prepared / shard["index"])
    assert data[ends[0] - 1] == tok.eos_id and data[ends[0]] == tok.bos_id
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_bad_tokenizers_and_templates_are_one_line_errors(released_ckpt, corpus_dir, data_cache, tmp_path):
    def one_line(proc, needle):
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dsv3: error: ") and needle in lines[0], proc.stderr

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(
        '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a"', encoding="utf-8"
    )
    base = [o for o in tiny_overrides(corpus_dir, data_cache, tmp_path / "run") if o.startswith("data.")]
    proc = run_dsv3(
        ["prepare", "--config", "configs/tiny.yaml", *base, f"data.tokenizer={bad / 'tokenizer.json'}"], check=False
    )
    one_line(proc, "does not parse")
    # a chat template without an assistant marker: sft cannot find the replies
    _, imported = released_ckpt
    marker_less = tmp_path / "marker_less"
    shutil.copytree(imported, marker_less)
    (marker_less / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}", encoding="utf-8"
    )
    proc = run_dsv3(
        [
            "sft",
            "--config",
            "configs/sft_tiny.yaml",
            f"train.init_from={marker_less}",
            f"train.out_dir={tmp_path / 'sft'}",
            f"data.cache_dir={data_cache}",
            "data.seq_len=64",
        ],
        check=False,
    )
    one_line(proc, "has no assistant marker")
