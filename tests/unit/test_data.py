"""Data pipeline: corpus loading, prepare (cache, key, files), packed windows, sample order."""

from __future__ import annotations

import json
import os
import pickle
import random
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import data_pipeline.prepare as prep
from data_pipeline.corpus import default_corpus_files, load_corpus, resolve_source
from data_pipeline.dataset import PackedDataset, load_meta
from data_pipeline.prepare import cache_root, data_key, is_val, prepare, prepared_path, val_offset
from data_pipeline.sampling import global_sample_indices, rank_micro_batches
from data_pipeline.tasks import iter_documents
from dsv3.config import DataConfig, load_config
from dsv3.errors import DsvError
from dsv3.tokenizer import Tokenizer

WORDS = (
    "alpha beta gamma delta value result items index count name data node self other key path "
    "size total buffer config token start end parse build check update append"
).split()


def write_corpus(folder: Path, n_docs: int = 12, seed: int = 0) -> list[Path]:
    """A small mixed corpus: .py, .txt and .md files, some in a subfolder."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    paths = []
    for i in range(n_docs):
        ext = (".py", ".txt", ".md")[i % 3]
        where = folder / "sub" if i % 4 == 0 else folder
        lines = []
        for _ in range(rng.randint(15, 30)):
            a, b = rng.sample(WORDS, 2)
            lines.append(
                f"def {a}_{i}(x):\n    return {b}(x) + {rng.randint(0, 999)}\n"
                if ext == ".py"
                else " ".join(rng.choice(WORDS) for _ in range(12)) + ".\n"
            )
        path = where / f"doc{i:02d}{ext}"
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(path)
    return paths


def make_cfg(source: Path | str | None, cache: Path, **over) -> object:
    values = {
        "data.source": str(source) if source is not None else "",
        "data.cache_dir": str(cache),
        "model.vocab_size": 400,
        "data.seq_len": 32,
        "data.val_fraction": 0.2,
        "data.num_proc": 1,
        "data.tokenizer_sample_size": 5000,
        "train.seed": 7,
    }
    values.update(over)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    write_corpus(root / "corpus")
    cfg = make_cfg(root / "corpus", root / "cache", **{"data.num_proc": 2, "data.shard_mb": 0.004})
    out = prepare(cfg, progress=False)
    return cfg, out


# ----------------------------------------------------------------------------- prepare


def split_docs(cfg, out):
    """(train, val) documents by the split rule, from the folder's task plan."""
    tasks = json.loads((out / "plan.json").read_text())["tasks"]
    train, val = [], []
    for t, task in enumerate(tasks):
        u = val_offset(t, cfg.data.val_fraction, cfg.train.seed)
        for j, doc in enumerate(iter_documents(task)):
            (val if is_val(j, u, cfg.data.val_fraction) else train).append(doc)
    return tasks, train, val


def test_prepare_files_and_meta(prepared):
    cfg, out = prepared
    assert out.parent == cache_root(cfg.data) / "prepared" and out.name == data_key(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "plan.json", "shards", "tokenizer.model"]
    meta = load_meta(out)
    tok = Tokenizer.load(out / "tokenizer.model")
    docs = load_corpus(cfg.data.source, cache_dir=out.parent.parent / "hf_datasets")["text"]
    assert len(docs) == 12
    tasks, train, val = split_docs(cfg, out)
    assert len(tasks) >= 4 and meta["n_tasks"] == len(tasks)  # 4 KB tasks of ~1 KB files
    assert sorted(train + val) == sorted(docs) and val[0] == docs[0]  # task 0's first document is held out
    assert meta["n_docs"] == {"train": len(train), "val": len(val)}
    assert meta["n_tokens"]["train"] + meta["n_tokens"]["val"] == sum(len(tok.encode(d)) + 1 for d in docs)
    assert (meta["dtype"], meta["eos_id"], meta["bos_id"], meta["pad_id"]) == ("uint16", 3, 2, 0)
    assert meta["vocab_size"] == 400 and meta["tokenizer_vocab_size"] == tok.vocab_size <= 400
    assert meta["key"] == out.name and meta["seq_len"] == 32
    for split, split_docs_ in (("train", train), ("val", val)):
        expected = [t for d in split_docs_ for t in tok.encode(d, eos=True)]
        stored = np.concatenate([np.fromfile(out / sh["file"], dtype="<u2") for sh in meta["shards"][split]])
        assert stored.tolist() == expected
        assert meta["n_tokens"][split] == len(expected)
        # the document index: end offset of every document, per shard
        ends = np.concatenate(
            [
                np.load(out / sh["index"]) + sum(x["n_tokens"] for x in meta["shards"][split][:k])
                for k, sh in enumerate(meta["shards"][split])
            ]
        )
        assert ends.tolist() == np.cumsum([len(tok.encode(d)) + 1 for d in split_docs_]).tolist()
    PackedDataset(out, "train", 32).verify()
    PackedDataset(out, "val", 32).verify()


def test_prepare_cache_hit(prepared, monkeypatch):
    cfg, out = prepared
    mtime = (out / "meta.json").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("cache hit must not retrain or retokenize")

    monkeypatch.setattr(prep, "train_tokenizer", boom)
    monkeypatch.setattr(prep, "run_tasks", boom)
    t0 = time.perf_counter()
    assert prepare(cfg, progress=False) == out
    assert time.perf_counter() - t0 < 2.0
    assert (out / "meta.json").stat().st_mtime_ns == mtime


def test_key_changes(prepared, tmp_path):
    cfg, out = prepared
    src = cfg.data.source
    base = data_key(cfg)
    assert data_key(make_cfg(src, cache_root(cfg.data), **{"data.num_proc": 1, "data.shard_mb": 0.004})) == base
    assert data_key(make_cfg(src, cache_root(cfg.data), **{"data.shard_mb": 0.008})) != base
    assert data_key(make_cfg(src, cache_root(cfg.data), **{"data.seq_len": 64})) != base
    assert data_key(make_cfg(src, cache_root(cfg.data), **{"model.vocab_size": 512})) != base
    assert data_key(make_cfg(src, cache_root(cfg.data), **{"train.seed": 8})) != base
    assert data_key(make_cfg(src, cache_root(cfg.data), **{"data.val_fraction": 0.1})) != base
    # editing a file changes the key
    copy = tmp_path / "c"
    write_corpus(copy)
    k1 = data_key(make_cfg(copy, tmp_path))
    f = copy / "doc01.txt"
    f.write_text(f.read_text() + "one more line\n")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert data_key(make_cfg(copy, tmp_path)) != k1
    assert prepared_path(make_cfg(copy, tmp_path)).name == data_key(make_cfg(copy, tmp_path))


def test_prepare_jsonl_and_no_leftovers(tmp_path):
    rng = random.Random(3)
    rows = [{"content": " ".join(rng.choice(WORDS) for _ in range(60)), "id": i} for i in range(10)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = make_cfg(src, tmp_path / "cache", **{"data.text_field": "content", "data.seq_len": 16})
    out = prepare(cfg, progress=False)
    meta = load_meta(out)
    tok = Tokenizer.load(out / "tokenizer.model")
    assert sum(meta["n_docs"].values()) == 10
    assert sum(meta["n_tokens"].values()) == sum(len(tok.encode(r["content"])) + 1 for r in rows)
    # only the finished folder (no temp build folders) under prepared/
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_prepare_errors(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("just one document here\n")
    with pytest.raises(DsvError) as e:
        prepare(make_cfg(one, tmp_path / "cache"), progress=False)
    assert "at least 2" in one_line(e)
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("tiny\n")
    (small / "b.txt").write_text("also tiny\n")
    with pytest.raises(DsvError) as e:
        prepare(make_cfg(small, tmp_path / "cache"), progress=False)
    msg = one_line(e)
    assert "data.seq_len" in msg and "data.val_fraction" in msg
    # failed builds leave nothing that looks prepared
    assert not any((p / "meta.json").exists() for p in (tmp_path / "cache" / "prepared").iterdir())
    assert not list((tmp_path / "cache" / "prepared").iterdir())


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV3_CACHE", str(tmp_path / "env"))
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert cache_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("DSV3_CACHE")
    assert cache_root(DataConfig()) == Path.home() / ".cache" / "dsv3"


def test_split_rule():
    for t in range(5):
        u = val_offset(t, 0.02, 1)
        val = [j for j in range(1000) if is_val(j, u, 0.02)]
        assert len(val) == 20  # exactly f of every 1000 documents, one in each run of 50
        assert all(b - a == 50 for a, b in zip(val, val[1:]))
    assert is_val(0, val_offset(0, 0.02, 1), 0.02)  # the first document of task 0 always validates
    assert not is_val(1, val_offset(0, 0.02, 1), 0.02)
    assert val_offset(3, 0.02, 1) == val_offset(3, 0.02, 1) != val_offset(3, 0.02, 2)


# ----------------------------------------------------------------------------- corpus


def test_load_corpus_folder(tmp_path):
    paths = write_corpus(tmp_path / "c", n_docs=5)
    (tmp_path / "c" / "blank.txt").write_text("  \n\n")
    (tmp_path / "c" / "notes.csv").write_text("ignored,file\n")
    (tmp_path / "c" / ".hidden").mkdir()
    (tmp_path / "c" / ".hidden" / "x.txt").write_text("hidden folders are skipped")
    ds = load_corpus(str(tmp_path / "c"), cache_dir=tmp_path / "hf")
    assert ds.column_names == ["text"]
    by_name = {p.resolve(): p.read_text() for p in paths}
    assert sorted(ds["text"]) == sorted(by_name.values())
    assert ds["text"] == [by_name[p] for p in sorted(by_name)]  # sorted path order


def test_load_corpus_mixed_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mix"
    folder.mkdir()
    (folder / "a.txt").write_text("text file\n")
    (folder / "b.jsonl").write_text(
        json.dumps({"text": "json row 1"}) + "\n" + json.dumps({"text": "json row 2"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["parquet row"], "n": [1]}), folder / "c.parquet")
    ds = load_corpus(str(folder), cache_dir=tmp_path / "hf")
    assert ds["text"] == ["text file\n", "json row 1", "json row 2", "parquet row"]
    assert load_corpus(str(folder / "c.parquet"), cache_dir=tmp_path / "hf")["text"] == ["parquet row"]


def test_corpus_errors(tmp_path, monkeypatch):
    hf = tmp_path / "hf"
    with pytest.raises(DsvError) as e:
        load_corpus(str(tmp_path / "nope" / "corpus.txt"), cache_dir=hf)
    assert "does not exist" in one_line(e)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n\t\n")
    (empty / "b.md").write_text("")
    with pytest.raises(DsvError) as e:
        load_corpus(str(empty), cache_dir=hf)
    assert "no text" in one_line(e)

    nofiles = tmp_path / "nofiles"
    nofiles.mkdir()
    (nofiles / "x.bin").write_bytes(b"\x00")
    with pytest.raises(DsvError) as e:
        load_corpus(str(nofiles), cache_dir=hf)
    assert "no " in one_line(e)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "good.txt").write_text("fine text\n")
    (bad / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(DsvError) as e:
        load_corpus(str(bad), cache_dir=hf)
    msg = one_line(e)
    assert "latin1.txt" in msg and "UTF-8" in msg

    js = tmp_path / "rows.jsonl"
    js.write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(DsvError) as e:
        load_corpus(str(js), text_field="text", cache_dir=hf)
    msg = one_line(e)
    assert "'text'" in msg and "body" in msg and "id" in msg and "data.text_field" in msg

    # a name that is not a path is tried as a hub dataset; offline, that fails fast
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DsvError) as e:
        load_corpus("someone/no-such-dataset", cache_dir=hf)
    assert "neither an existing file/folder nor a loadable dataset" in one_line(e)


def test_default_corpus_files():
    files = default_corpus_files()
    assert len(files) > 100 and files == sorted(files)
    names = {f.name for f in files}
    assert "os.py" in names
    for f in files:
        assert f.suffix == ".py"
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(f.parts)
    assert resolve_source(None) == ("default", files)
    assert resolve_source("")[0] == "default"


def test_load_default_corpus(tmp_path):
    ds = load_corpus(None, cache_dir=tmp_path / "hf")
    assert 0 < len(ds) <= len(default_corpus_files())
    assert any("def " in t for t in ds.select(range(20))["text"])


# ----------------------------------------------------------------------------- packed windows


def test_packed_windows(prepared):
    _, out = prepared
    tokens = PackedDataset(out, "train", 32).tokens
    for seq_len in (32, 7):
        ds = PackedDataset(out, "train", seq_len)
        assert len(ds) == (len(tokens) - 1) // seq_len
        for i in (0, 1, len(ds) // 2, len(ds) - 1):
            x = ds[i]
            assert x.dtype == torch.int64 and x.shape == (seq_len + 1,)
            assert x.tolist() == tokens[i * seq_len : i * seq_len + seq_len + 1].tolist()
        assert ds[-1].tolist() == ds[len(ds) - 1].tolist()
        b = ds.batch([3, 0, 3])
        assert b.shape == (3, seq_len + 1) and b.dtype == torch.int64
        assert torch.equal(b[0], ds[3]) and torch.equal(b[1], ds[0])
        with pytest.raises(IndexError):
            ds[len(ds)]
    clone = pickle.loads(pickle.dumps(PackedDataset(out, "val", 32)))
    assert clone[0].tolist() == PackedDataset(out, "val", 32)[0].tolist()


def test_packed_corruption(prepared, tmp_path):
    import shutil

    _, out = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / load_meta(copy)["shards"]["val"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DsvError) as e:
        PackedDataset(copy, "val", 32)
    msg = one_line(e)
    assert str(shard) in msg and "truncated" in msg

    flipped = bytearray(data)
    flipped[0] ^= 1
    shard.write_bytes(bytes(flipped))
    ds = PackedDataset(copy, "val", 32)  # size is right, content is not
    with pytest.raises(DsvError) as e:
        ds.verify()
    assert str(shard) in one_line(e) and "sha256" in one_line(e)

    flipped[2:4] = (65535).to_bytes(2, "little")  # an id outside the vocabulary: caught when read
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DsvError) as e:
        PackedDataset(copy, "val", 32)[0]
    assert str(shard) in one_line(e) and "corrupt" in one_line(e)

    with pytest.raises(DsvError) as e:
        PackedDataset(tmp_path / "nothing", "train", 32)
    assert "dsv3 prepare" in one_line(e)


# ----------------------------------------------------------------------------- sample order


def test_sample_indices_independent_of_ranks():
    mbs, accum, n = 2, 3, 53
    for step in range(12):
        merged = {}
        for dp in (1, 2, 4):
            gb = mbs * accum * 4  # same global batch for every layout
            idx = global_sample_indices(step, gb, n, seed=11)
            mb = mbs * 4 // dp
            parts = [rank_micro_batches(idx, r, dp, mb, accum) for r in range(dp)]
            # micro-batch m of all ranks together is one contiguous slice of the step's indices
            flat = [i for m in range(accum) for r in range(dp) for i in parts[r][m]]
            assert flat == idx
            merged[dp] = sorted(flat)
        assert merged[1] == merged[2] == merged[4]


def test_sample_indices_epochs():
    n, gb, seed = 10, 4, 5
    stream = [i for s in range(10) for i in global_sample_indices(s, gb, n, seed)]
    for e in range(4):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(epoch) == list(range(n))  # each epoch is a permutation
        assert epoch == torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
    # step 2 covers positions 8..11: the end of epoch 0 and the start of epoch 1
    p0 = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    p1 = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    assert global_sample_indices(2, gb, n, seed) == p0[8:] + p1[:2]
    # a global batch larger than the dataset spans several epochs
    assert global_sample_indices(0, 25, n, seed) == stream[:25]
    assert global_sample_indices(3, gb, n, seed) == global_sample_indices(3, gb, n, seed)
    assert global_sample_indices(0, gb, n, seed + 1) != global_sample_indices(0, gb, n, seed)


def test_rank_micro_batches_layout_and_checks():
    idx = list(range(100, 112))  # dp 2, mbs 3, accum 2
    assert rank_micro_batches(idx, 0, 2, 3, 2) == [[100, 101, 102], [106, 107, 108]]
    assert rank_micro_batches(idx, 1, 2, 3, 2) == [[103, 104, 105], [109, 110, 111]]
    with pytest.raises(ValueError):
        rank_micro_batches(idx, 0, 2, 3, 3)
    with pytest.raises(ValueError):
        rank_micro_batches(idx, 2, 2, 3, 2)
    with pytest.raises(DsvError):
        global_sample_indices(0, 4, 0, 0)
