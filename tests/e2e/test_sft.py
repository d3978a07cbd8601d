"""dsv3 sft: conversations -> assistant-only loss, from a pre-trained run, through the CLI."""

import json

import pytest
import torch
from helpers import run_dsv3, tiny_overrides


@pytest.fixture(scope="module")
def pretrained(corpus_dir, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(corpus_dir, data_cache, out, **{"train.steps": 2, "ckpt.every": 2, "train.eval_every": 0}),
        ]
    )
    return out


def sft_overrides(data_cache, pretrained, out, **extra):
    base = {
        "train.init_from": str(pretrained),
        "train.out_dir": str(out),
        "data.cache_dir": str(data_cache),
        "data.seq_len": 64,
        "train.steps": 3,
        "ckpt.every": 3,
        "train.eval_every": 3,
        "train.eval_batches": 1,
        "train.warmup_steps": 1,
        "parallel.micro_batch_size": 4,
        "train.log_every": 1,
        "train.sample_tokens": 6,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_sft_on_stdlib_docstrings_trains_on_replies_only(pretrained, data_cache, tmp_path):
    out = tmp_path / "sft"
    proc = run_dsv3(["sft", "--config", "configs/sft_tiny.yaml", *sft_overrides(data_cache, pretrained, out)])
    assert "conversations" in proc.stdout and "----- sample -----" in proc.stdout
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    # step-0 validation loss = the pre-trained model's loss on the reply tokens alone, by hand
    from data_pipeline.chat_data import ChatDataset
    from dsv3 import load_model, load_tokenizer
    from dsv3.chat_format import chat_labels

    prepared = next(p for p in (data_cache / "prepared").glob("chat-*") if (p / "meta.json").is_file())
    val = ChatDataset(prepared, "val")
    n = min(len(val), 4)
    ids, labels = val.batch_xy(range(n))
    model, tok = load_model(pretrained), load_tokenizer(pretrained)
    # the stored labels are exactly chat_labels' (assistant content and its <|end|> only)
    kept = labels[labels != -100]
    assert len(kept) > 0 and (labels != -100).sum() < (ids != tok.pad_id).sum() / 2
    with torch.no_grad():
        logits = model(ids)
    mask = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    assert recs[0]["val_loss"] == pytest.approx(ce.item(), rel=1e-5)
    first = [int(x) for x in ids[0] if x != tok.pad_id]
    ref_ids, ref_labels = chat_labels(tok, [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}])
    assert ref_labels[-1] == -100 and ref_ids[0] == tok.bos_id == first[0]
    # the checkpoint records which prepared conversations it trained on: a resume on others is refused
    saved = json.loads((out / "checkpoints" / "step_0000003" / "manifest.json").read_text())["data"]
    assert saved["data_key"].startswith("chat-") and (data_cache / "prepared" / saved["data_key"]).is_dir()
    proc = run_dsv3(
        [
            "sft",
            "--config",
            "configs/sft_tiny.yaml",
            *sft_overrides(data_cache, pretrained, out, **{"data.seq_len": 96, "train.steps": 5}),
        ],
        check=False,
    )
    assert proc.returncode == 2 and "was trained on other prepared data" in proc.stderr, proc.stderr[-2000:]


def test_sft_errors(pretrained, data_cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        + "\n"
    )
    proc = run_dsv3(
        [
            "sft",
            "--config",
            "configs/sft_tiny.yaml",
            *sft_overrides(data_cache, pretrained, tmp_path / "o", **{"data.source": str(bad)}),
        ],
        check=False,
    )
    assert proc.returncode == 2
    line = [x for x in proc.stderr.splitlines() if x.startswith("dsv3:")][-1]
    assert "conversation 0" in line and "no assistant message" in line
    proc = run_dsv3(["sft", "--config", "configs/sft_tiny.yaml", "train.init_from=null"], check=False)
    assert proc.returncode == 2 and "needs train.init_from" in proc.stderr


def test_sft_model_export_chats_in_transformers_like_dsv3_chat(pretrained, data_cache, tmp_path):
    """The export of a fine-tuned model with dsv3's own tokenizer writes tokenizer_config.json
    (special tokens, a chat template that renders dsv3's chat format) and generation_config.json
    (EOS ids = the chat stop ids, <|end|> first): transformers' AutoTokenizer gives dsv3's chat
    ids and its greedy generate the reply of dsv3 chat --temperature 0."""
    pytest.importorskip("transformers")
    from helpers import chat_jsonl, transformers_reply

    from dsv3 import load_tokenizer
    from dsv3.chat_format import END_ID, chat_stop_ids, encode_chat

    run = tmp_path / "sft"
    run_dsv3(
        [
            "sft",
            "--config",
            "configs/sft_tiny.yaml",
            "--no-sample",
            *sft_overrides(data_cache, pretrained, run, **{"train.eval_every": 0}),
        ]
    )
    question = "What does the function json.dumps do?"
    got = chat_jsonl(run, 10, question)
    export = tmp_path / "export"
    run_dsv3(["convert", "--to-hf", str(run), "--out", str(export)])
    tok = load_tokenizer(run)
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == chat_stop_ids(tok) and gen["eos_token_id"][0] == END_ID
    cfg = json.loads((export / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<s>", "</s>", "<pad>")
    messages = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "It encodes."},
        {"role": "user", "content": question},
    ]
    ids, _, _ = transformers_reply(export, messages, 1)
    assert ids == encode_chat(tok, messages)
    ids, new, reply = transformers_reply(export, messages[1:2], 10)
    assert ids == encode_chat(tok, messages[1:2])
    assert len(new) == got["tokens"] and tok.decode(reply) == got["reply"]
