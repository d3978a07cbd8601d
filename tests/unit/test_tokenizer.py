"""Tokenizer: exact round trips, fixed special ids, digits, indentation, long lines, errors."""

from __future__ import annotations

import pickle
import random

import pytest

from dsv3.errors import DsvError
from dsv3.tokenizer import CHUNK_BYTES, Tokenizer, train_tokenizer, training_chunks

LONG_WORD = "qzxjvkw"  # appears only inside one very long line of the training corpus

WORDS = (
    "value result items index count name data node self other key path size total "
    "buffer config token start end parse build check update append return"
).split()


def python_like(rng: random.Random, n_funcs: int) -> str:
    """Deterministic Python-looking source with 4-space indentation."""
    out = []
    for _ in range(n_funcs):
        a, b, c = rng.sample(WORDS, 3)
        out.append(
            f"def {a}_{b}(self, {c}, count=0):\n"
            f'    """Return the {b} of {c}."""\n'
            f"    for item in {c}:\n"
            f"        if item is None:\n"
            f"            continue\n"
            f"        count += len(item)\n"
            f"    return self.{a}({c}, count)\n\n"
        )
    return "".join(out)


def prose(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + ".\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    docs = [python_like(rng, 40) for _ in range(6)] + [prose(rng, 400) for _ in range(4)]
    docs.append("\t".join(["tab"] * 200) + "\n" + "日本語のテキストです。" * 30 + "\n")
    docs.append((LONG_WORD + " ") * 7000)  # one ~56k-char line, far above the trainer's sentence limit
    return train_tokenizer(iter(docs), 512, tmp_path_factory.mktemp("tok") / "tok.model", sample_size=10_000, seed=0)


NASTY = [
    "",
    " ",
    "\n",
    "\n\n\n",
    "x",
    "def f(x):\n\tif x:\n\t\treturn  x  \n\n",
    "    leading spaces and trailing   ",
    "a\r\nb\r\n\r\n",
    "中文字符和日本語のテキスト，한국어",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇯🇵",
    "e\u0301 a\u0308 combining \u0338",
    "control \x00\x01\x07\x1b[31m\x7f\x0b\x0c\x1c\x85\u2028\u2029",
    "\ufeffbom \u200bzero-width \u00a0nbsp",
    "visible space \u2581 and \u2581\u2581 and \n\u2581\u2581\u2581\u2581x",
    "<s>not special</s><pad><unk> <0x41>",
    "chat <|user|>hi<|end|><|assistant|>ok<|end|>",
    "  ⁇  ",
    "\U0010ffff\U0001f600",
    "x" * 50_000,
    ("word " * 10_000).strip(),
    "x = 1234567890\n",
    "\n" + " " * 30 + "deep\n" + "\t" * 9 + "tabs",
]


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x20000) if not 0xD800 <= c <= 0xDFFF]
    for _ in range(50):
        text = "".join(rng.choice(alphabet) if rng.random() < 0.3 else rng.choice(" \n\tab{}") for _ in range(200))
        assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode(tok):
    texts = NASTY[:12]
    assert tok.encode_batch(texts, eos=True) == [tok.encode(t, eos=True) for t in texts]
    assert tok.encode_batch(texts, bos=True, num_threads=-1) == [tok.encode(t, bos=True) for t in texts]


def test_special_ids(tok):
    expected = {
        "<pad>": 0,
        "<unk>": 1,
        "<s>": 2,
        "</s>": 3,
        "<|system|>": 4,
        "<|user|>": 5,
        "<|assistant|>": 6,
        "<|end|>": 7,
    }
    assert tok.special_ids == expected
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    for piece, i in expected.items():
        assert tok.id_to_piece(i) == piece
    # role strings in text map to their ids; pad/bos/eos never come from text
    assert tok.encode("<|user|>") == [5]
    assert 2 not in tok.encode("<s>") and 3 not in tok.encode("</s>")


def test_decode_drops_control_and_keeps_roles(tok):
    hi = tok.encode("hi")
    assert tok.decode([0, 2, *hi, 3, 0]) == "hi"
    assert tok.decode([4, *hi, 7]) == "<|system|>hi<|end|>"
    assert tok.decode([*hi, tok.vocab_size, 10**6, -1]) == "hi"  # out-of-vocabulary ids are skipped


def test_digits_are_split(tok):
    ids = tok.encode("31415926535")
    assert [tok.decode([i]) for i in ids] == list("31415926535")


def test_indentation_is_compact(tok):
    # each newline + indentation run (up to 24 spaces) is exactly one token
    for n in (2, 4, 8, 12, 16, 24):
        assert len(tok.encode("\n" + " " * n)) == 1
    assert len(tok.encode("\n\t\t")) == 1
    code = python_like(random.Random(123), 3)
    ids = tok.encode(code)
    n_lines = code.count("\n")
    # measured: a newline plus its indentation never costs more than one token per line
    ws_tokens = [i for i in ids if tok.decode([i]).strip(" \t") in ("", "\n") and "\n" in tok.decode([i])]
    assert len(ws_tokens) <= n_lines
    # measured 0.26 tokens/char for this text with a 512-piece vocabulary
    assert len(ids) <= 0.30 * len(code)
    # a bare newline is a learned piece, not a byte-fallback token
    assert [tok.id_to_piece(i) for i in tok.encode("\n")] == ["\n"]


def test_long_line_contributes(tok):
    # the word occurs only inside a 56k-character line; it must still have been learned
    assert len(tok.encode(LONG_WORD)) == 1


def test_training_chunks_cover_text():
    text = "a\n" * 20 + "b" * (3 * CHUNK_BYTES) + "\n" + "é" * CHUNK_BYTES + "\nend"
    chunks = list(training_chunks(text))
    assert "".join(chunks) == text
    assert all(0 < len(c.encode()) <= CHUNK_BYTES for c in chunks)


def test_deterministic_and_atomic(tmp_path):
    rng = random.Random(5)
    docs = [python_like(rng, 10) for _ in range(3)]
    a = train_tokenizer(iter(docs), 400, tmp_path / "a.model", sample_size=1000, seed=3)
    b = train_tokenizer(iter(docs), 400, tmp_path / "b.model", sample_size=1000, seed=3)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temp files left
    assert a.vocab_size <= 400 and a.encode("def x") == b.encode("def x")


def test_pickle_and_load(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("def f():\n    pass\n") == tok.encode("def f():\n    pass\n")
    loaded = Tokenizer.load(tok.path)
    assert loaded.vocab_size == tok.vocab_size and loaded.path == tok.path


def test_surrogates_replaced(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_id_to_piece_range(tok):
    with pytest.raises(IndexError):
        tok.id_to_piece(tok.vocab_size)


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_load_errors(tmp_path):
    with pytest.raises(DsvError) as e:
        Tokenizer.load(tmp_path / "missing.model")
    assert "does not exist" in _one_line_error(e)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01 definitely not a model")
    with pytest.raises(DsvError) as e:
        Tokenizer.load(bad)
    assert "corrupt" in _one_line_error(e)


def test_train_errors(tmp_path):
    with pytest.raises(DsvError) as e:
        train_tokenizer(iter(["some text"]), 200, tmp_path / "t.model", sample_size=100)
    assert "too small" in _one_line_error(e)
    with pytest.raises(DsvError) as e:
        train_tokenizer(iter([]), 512, tmp_path / "t.model", sample_size=100)
    _one_line_error(e)
    assert not (tmp_path / "t.model").exists()


def test_a_corpus_error_during_training_keeps_its_own_message(tmp_path):
    """An error of the corpus reader (e.g. a file that is not UTF-8) reaches the user as is, not
    wrapped in sentencepiece's error with the advice for a too-small corpus."""

    def texts():
        yield "def f(x):\n    return x\n" * 200
        raise DsvError("file a.txt is not valid UTF-8 (bad byte at offset 3); re-encode it as UTF-8")

    with pytest.raises(DsvError) as exc:
        train_tokenizer(texts(), 512, tmp_path / "t.model", sample_size=1000)
    assert str(exc.value) == "file a.txt is not valid UTF-8 (bad byte at offset 3); re-encode it as UTF-8"
    assert not (tmp_path / "t.model").exists()
