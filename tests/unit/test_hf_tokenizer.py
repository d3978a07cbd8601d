"""Released-model tokenizers (tokenizer.json + tokenizer_config.json + chat template): ids equal
transformers' AutoTokenizer, streaming decode of byte-level pieces, chat ids and SFT labels from
the model's own template, stop ids, bad input; and the export of dsv3's own tokenizer, whose
chat template gives the ids of dsv3's chat format in transformers."""

from __future__ import annotations

import io
import json
import pickle
import shutil

import pytest
from helpers import DS_ASSISTANT, DS_BOS, DS_EOS, DS_USER, STDLIB, byte_level_bpe, write_released_tokenizer

from dsv3.chat import StreamDecoder, chat_loop
from dsv3.chat_format import chat_labels, chat_stop_ids, encode_chat
from dsv3.errors import DsvError
from dsv3.hf_tokenizer import HFTokenizer
from dsv3.model import IGNORE_INDEX
from dsv3.tokenizer_files import open_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What does bisect.insort do?\nIn one line."},
    {"role": "assistant", "content": "It inserts an item into a sorted list, keeping it sorted. 😀"},
    {"role": "user", "content": "And heapq.heappush? 中文 é"},
    {"role": "assistant", "content": "  It pushes onto a heap; 123456 items max."},
]
TEXTS = [
    "",
    " ",
    "hello world",
    "def f(x):\n    return x  \n\n",
    "  leading and trailing  ",
    "a\r\nb\tc",
    "中文字符和日本語のテキスト",
    "emoji 😀👍🏽 👨‍👩‍👧",
    "digits 1234567 and 3.14159",
    "control \x00\x07\x1b[31m",
    f"text with {DS_USER} inside and {DS_EOS} too",
    "lone surrogate \ud800 here",
]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A folder as DeepSeek ships it: tokenizer.json + tokenizer_config.json with the template."""
    return write_released_tokenizer(byte_level_bpe(600), tmp_path_factory.mktemp("released"))


@pytest.fixture(scope="module")
def tok(released):
    return open_tokenizer(released)


@pytest.fixture(scope="module")
def auto(released):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(released))


def test_ids_equal_autotokenizer(tok, auto):
    assert isinstance(tok, HFTokenizer) and tok.kind == "tokenizer.json"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)
    assert tok.vocab_size == len(auto) and tok.special_ids[DS_USER] == auto.convert_tokens_to_ids(DS_USER)
    assert tok.add_bos  # the post-processor starts a text with BOS, as AutoTokenizer.encode(text) does
    stdlib = (STDLIB / "argparse.py").read_text(encoding="utf-8")[:20000]
    for text in TEXTS + [stdlib]:
        clean = text.replace("\ud800", "\ufffd")
        assert tok.encode(text) == auto.encode(clean, add_special_tokens=False), text
        assert tok.encode(text, bos=tok.add_bos) == auto.encode(clean), text
        assert tok.encode_batch([text, text], num_threads=2) == [tok.encode(text)] * 2
        if DS_USER not in text:
            assert tok.decode(tok.encode(text)) == clean
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id, 10**6]) == "hi"
    assert tok.decode(tok.encode(f"a{DS_USER}b")) == f"a{DS_USER}b"
    assert pickle.loads(pickle.dumps(tok)).encode(stdlib[:500]) == tok.encode(stdlib[:500])
    assert tok.id_to_piece(tok.encode(" the")[0]).startswith("Ġ")
    assert tok.piece_to_id(DS_USER) == tok.special_ids[DS_USER]


def test_streaming_byte_level_pieces_never_prints_a_broken_character(tok):
    text = "a😀b 中文 é! 👨‍👩‍👧 ok"
    ids = tok.encode(text)
    assert len(ids) > 12  # the emoji and CJK characters are split into byte pieces
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert "😀" in pieces  # emitted whole once its last byte arrived


def test_chat_ids_equal_apply_chat_template(tok, auto):
    for n in range(1, len(CONVERSATION) + 1):
        for prompt in (True, False):
            want = auto.apply_chat_template(CONVERSATION[:n], add_generation_prompt=prompt, return_dict=False)
            assert encode_chat(tok, CONVERSATION[:n], add_generation_prompt=prompt) == want, (n, prompt)
    assert tok.render_chat(CONVERSATION[:2], add_generation_prompt=True) == (
        f"{DS_BOS}You answer briefly.{DS_USER}What does bisect.insort do?\nIn one line.{DS_ASSISTANT}"
    )
    # generation stops at the end-of-turn token (= EOS here) and at the turn markers, never at BOS
    assert chat_stop_ids(tok) == [tok.eos_id, tok.special_ids[DS_USER], tok.special_ids[DS_ASSISTANT]]


def test_sft_labels_cover_exactly_the_assistant_turns(tok):
    ids, labels = chat_labels(tok, CONVERSATION)
    assert ids == encode_chat(tok, CONVERSATION, add_generation_prompt=False) and len(labels) == len(ids)
    trained = [i + 1 for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert all(labels[i - 1] == ids[i] for i in trained)
    # the trained positions are the two replies, each followed by its end-of-turn token
    runs, start = [], None
    for i in range(len(ids) + 1):
        if i in trained and start is None:
            start = i
        elif i not in trained and start is not None:
            runs.append((start, i))
            start = None
    assert [tok.decode(ids[a : b - 1]) for a, b in runs] == [CONVERSATION[2]["content"], CONVERSATION[4]["content"]]
    assert [ids[b - 1] for a, b in runs] == [tok.eos_id, tok.eos_id]
    assert [ids[a - 1] for a, b in runs] == [tok.special_ids[DS_ASSISTANT]] * 2  # the marker itself is not trained
    with pytest.raises(DsvError, match="no assistant message"):
        chat_labels(tok, CONVERSATION[:2])


def _with_template(tk_dir, tmp_path, name, template):
    out = tmp_path / name
    shutil.copytree(tk_dir, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return open_tokenizer(out)


def test_templates_the_replies_cannot_be_found_in_are_refused(released, tmp_path):
    # no assistant marker: the generation prompt adds nothing
    bare = _with_template(
        released,
        tmp_path,
        "bare",
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}",
    )
    for call in (lambda t: chat_labels(t, CONVERSATION), lambda t: chat_stop_ids(t)):
        with pytest.raises(DsvError, match="has no assistant marker") as exc:
            call(bare)
        assert "\n" not in str(exc.value)
    # earlier turns rendered differently once later ones exist: not turn by turn
    moving = _with_template(
        released,
        tmp_path,
        "moving",
        "{{ bos_token }}{% for m in messages %}{{ '<｜' + m['role'] + '｜>' + m['content'] }}"
        "{% if loop.last %}{{ messages | length }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}",
    )
    with pytest.raises(DsvError, match="turn by turn"):
        chat_labels(moving, CONVERSATION)
    broken = _with_template(released, tmp_path, "broken", "{% for m in messages %}{{ m['content'] }")
    with pytest.raises(DsvError, match="does not compile"):
        encode_chat(broken, CONVERSATION)
    raising = _with_template(released, tmp_path, "raising", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DsvError, match="roles must alternate"):
        encode_chat(raising, CONVERSATION)
    none = _with_template(released, tmp_path, "none", None)
    with pytest.raises(DsvError, match="has no chat template"):
        chat_stop_ids(none)


def test_generation_blocks_mark_the_replies(released, tmp_path):
    """A template with {% generation %} blocks (as transformers' assistant masks use): exactly the
    tokens inside them are trained, here the reply and a trailing newline after its end token."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<｜Assistant｜>{% generation %}"
        "{{ m['content'] }}<｜end▁of▁sentence｜>\n{% endgeneration %}{% else %}<｜User｜>{{ m['content'] }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
    )
    tok = _with_template(released, tmp_path, "gen", template)
    msgs = CONVERSATION[1:3]
    ids, labels = chat_labels(tok, msgs)
    trained = [ids[i + 1] for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == msgs[1]["content"] + "\n"  # EOS decodes to nothing
    assert tok.eos_id in trained
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tmp_path / "gen"))
    out = auto.apply_chat_template(msgs, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m] == trained


def test_bad_tokenizer_files_are_one_line_errors(released, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ', encoding="utf-8")
    for target in (bad, bad / "tokenizer.json"):
        with pytest.raises(DsvError, match="does not parse") as exc:
            open_tokenizer(target)
        assert "\n" not in str(exc.value)
    no_eos = tmp_path / "no_eos"
    tk = byte_level_bpe(400)
    tk.save(str(tmp_path / "plain.json"))
    no_eos.mkdir()  # EOS renamed to a name nobody knows, and no config naming it
    text = (tmp_path / "plain.json").read_text(encoding="utf-8")
    (no_eos / "tokenizer.json").write_text(text.replace(DS_EOS, "<｜stop｜>"), encoding="utf-8")
    with pytest.raises(DsvError, match="names no end-of-sequence token"):
        open_tokenizer(no_eos)
    # a bare tokenizer.json without its config: the well-known names still give BOS and EOS
    bare = open_tokenizer(tmp_path / "plain.json")
    assert (bare.bos_id, bare.eos_id, bare.pad_id, bare.chat_template) == (0, 1, 1, None)
    wrong = write_released_tokenizer(tk, tmp_path / "wrong", eos_token="<eos-that-is-not-there>")
    with pytest.raises(DsvError, match="eos_token '<eos-that-is-not-there>'"):
        open_tokenizer(wrong)
    with pytest.raises(DsvError, match="holds no tokenizer"):
        open_tokenizer(tmp_path)


def test_chat_loop_with_a_released_tokenizer(tok, tmp_path):
    """The chat loop stops at the template's end-of-turn ids and prints the decoded reply."""
    import torch

    from dsv3.config import ModelConfig
    from dsv3.generation import generate
    from dsv3.model import Transformer

    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        dim=32,
        inter_dim=64,
        moe_inter_dim=16,
        n_layers=2,
        n_heads=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_seq_len=128,
        mtp_depth=0,
        init_std=0.2,
    )
    model = Transformer(cfg)
    model.init_weights(seed=1)
    with torch.no_grad():  # make the end-of-turn token likely, so a reply ends before the limit
        model.lm_head.weight[tok.eos_id] += 0.5 * model.norm(model.embed_tokens.weight).mean(0)
    model.eval()
    out = io.StringIO()
    chat_loop(
        model,
        tok,
        system="Be brief.",
        max_new_tokens=20,
        temperature=0,
        stdin=io.StringIO("hello 😀\n"),
        stdout=out,
        stderr=io.StringIO(),
        interactive=False,
    )
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello 😀"}]
    ids = generate(model, encode_chat(tok, msgs), 20, temperature=0, eos_ids=chat_stop_ids(tok))
    reply = ids[:-1] if ids[-1] in chat_stop_ids(tok) else ids
    assert out.getvalue() == tok.decode(reply) + "\n"


def test_dsv3_tokenizer_export_gives_dsv3_chat_ids_in_transformers(tmp_path):
    """dsv3's own sentencepiece tokenizer with the tokenizer_config.json an export writes:
    transformers' AutoTokenizer encodes text and chats exactly as dsv3 does."""
    from transformers import AutoTokenizer

    from dsv3.checkpoint.hf_export import dsv3_tokenizer_config
    from dsv3.tokenizer import train_tokenizer

    texts = [(STDLIB / n).read_text(encoding="utf-8") for n in ("textwrap.py", "shlex.py", "bisect.py")]
    sp = train_tokenizer(texts, 512, tmp_path / "tokenizer.model", sample_size=2000)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dsv3_tokenizer_config(1024)), encoding="utf-8")
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS[:-3] + [texts[0][:5000]]:
        assert sp.encode(text) == auto.encode(text, add_special_tokens=False), text
    for n in range(1, len(CONVERSATION) + 1):
        for prompt in (True, False):
            want = auto.apply_chat_template(CONVERSATION[:n], add_generation_prompt=prompt, return_dict=False)
            assert encode_chat(sp, CONVERSATION[:n], add_generation_prompt=prompt) == want
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        auto.apply_chat_template([{"role": "tool", "content": "x"}])
