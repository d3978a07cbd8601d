"""Data pipeline at corpus scale: resumable and multi-node prepare, streamed task readers,
document-aware packing, the loader position over stop-and-resume, blending."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

import data_pipeline.prepare as prep
import data_pipeline.shards as shards
from data_pipeline.dataset import (
    IGNORE_INDEX,
    PackedDataset,
    blend_index,
    document_attention_mask,
    document_positions,
    load_meta,
)
from data_pipeline.prepare import prepare
from data_pipeline.sampling import check_loader_state, global_sample_indices, loader_state, rank_micro_batches
from data_pipeline.tasks import iter_documents, plan_tasks
from dsv3.config import ModelConfig, load_config
from dsv3.errors import DsvError
from dsv3.model import Transformer

WORDS = "alpha beta gamma delta value result items index count name data node self other key".split()


def write_docs(folder, n, seed=0, prefix="doc"):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(10)) + ".\n" for _ in range(rng.randint(10, 25))]
        (folder / f"{prefix}{i:02d}.txt").write_text("".join(lines), encoding="utf-8")
    return folder


def cfg_for(source, cache, **over):
    values = {
        "data.source": source,
        "data.cache_dir": str(cache),
        "model.vocab_size": 400,
        "data.seq_len": 16,
        "data.val_fraction": 0.2,
        "data.num_proc": 1,
        "data.tokenizer_sample_size": 5000,
        "train.seed": 3,
        "data.shard_mb": 0.003,
    }
    values.update(over)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def shard_digests(out):
    meta = load_meta(out)
    return {s: [(sh["file"], sh["sha256"], sh["n_docs"]) for sh in meta["shards"][s]] for s in ("train", "val")}


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- prepare


def test_prepare_resumes_and_splits_over_nodes(tmp_path, monkeypatch, capfd):
    src = write_docs(tmp_path / "c", 16)
    ref = prepare(cfg_for(str(src), tmp_path / "ref", **{"data.num_proc": 2}), progress=True)
    err = capfd.readouterr().err
    assert "docs/s" in err and "MB/s" in err and "tokens/s" in err
    n_tasks = load_meta(ref)["n_tasks"]
    assert n_tasks >= 4

    # interrupted after two tasks: the rerun only does the rest, and the result is identical
    cfg = cfg_for(str(src), tmp_path / "cache")
    real, ran = shards.run_task, []

    def flaky(t, *args, **kwargs):
        if len(ran) == 2:
            raise KeyboardInterrupt
        ran.append(t)
        return real(t, *args, **kwargs)

    monkeypatch.setattr(shards, "run_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    assert not (prep.prepared_path(cfg) / "meta.json").exists()
    first = list(ran)
    ran.clear()
    monkeypatch.setattr(shards, "run_task", lambda t, *a, **k: (ran.append(t), real(t, *a, **k))[1])
    out = prepare(cfg, progress=False)
    assert sorted(first + ran) == list(range(n_tasks)) and not set(first) & set(ran)
    assert shard_digests(out) == shard_digests(ref)

    # two nodes: each a disjoint half of the tasks, the last one merges
    cfg = cfg_for(str(src), tmp_path / "nodes")
    ran.clear()
    part = prepare(cfg, progress=False, rank=0, world=2)
    assert not (part / "meta.json").exists() and ran == list(range(0, n_tasks, 2))
    ran.clear()
    assert prepare(cfg, progress=False, rank=1, world=2) == part
    assert ran == list(range(1, n_tasks, 2)) and shard_digests(part) == shard_digests(ref)
    assert (part / "tokenizer.model").read_bytes() == (ref / "tokenizer.model").read_bytes()


def test_prepare_skips_damaged_task_outputs(tmp_path, monkeypatch):
    src = write_docs(tmp_path / "c", 8)
    cfg = cfg_for(str(src), tmp_path / "cache")
    real, ran = shards.run_task, []

    def stop_at_merge(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_merge", stop_at_merge)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    work = prep.prepared_path(cfg).with_name(prep.data_key(cfg) + ".partial")
    shard = sorted((work / "shards").glob("train-*.bin"))[1]
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated: its task must run again
    monkeypatch.undo()
    monkeypatch.setattr(shards, "run_task", lambda t, *a, **k: (ran.append(t), real(t, *a, **k))[1])
    out = prepare(cfg, progress=False)
    assert ran == [int(shard.name.split("-")[1].split(".")[0])]
    PackedDataset(out, "train", 16).verify()


def test_large_text_file_and_jsonl_ranges(tmp_path, monkeypatch):
    import data_pipeline.tasks as tasks_mod

    monkeypatch.setattr(tasks_mod, "TEXT_PIECE_BYTES", 300)
    rng = random.Random(1)
    paras = [
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 4)))
        for _ in range(120)
    ]
    text = "\n\n".join(paras) + "\n"
    big = tmp_path / "big.txt"
    big.write_text(text, encoding="utf-8")
    plan = plan_tasks(str(big), 1000)
    assert len(plan) == -(-len(text.encode()) // 1000) and all(t["kind"] == "textsplit" for t in plan)
    docs = [d for t in plan for d in iter_documents(t)]
    assert "".join(docs) == text  # no byte lost or repeated across tasks and pieces
    assert all(d.endswith("\n\n") for d in docs[:-1]) and max(len(d) for d in docs) < 300 + 200

    rows = [
        {"text": f"record {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))} for i in range(200)
    ]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    plan = plan_tasks(str(jl), 700)
    assert len(plan) > 5
    assert [d for t in plan for d in iter_documents(t)] == [r["text"] for r in rows]
    # records without the text (null or missing) are skipped, whole file or split alike ...
    part = tmp_path / "part.jsonl"
    part.write_text('{"text": "ok"}\n{"body": "x"}\n{"text": null}\n{"text": "end"}\n', encoding="utf-8")
    for shard in (1000, 10):
        assert [d for t in plan_tasks(str(part), shard) for d in iter_documents(t)] == ["ok", "end"]
    # ... but a file without the column is an error naming it
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n{"body": "y"}\n', encoding="utf-8")
    for shard in (1000, 10):
        with pytest.raises(DsvError) as e:
            [d for t in plan_tasks(str(bad), shard) for d in iter_documents(t)]
        assert str(bad) in one_line(e) and "'text'" in one_line(e) and "body" in one_line(e)
        assert "data.text_field" in one_line(e)


def test_mixed_kind_plan_and_readers(tmp_path):
    """Small files of one reader are grouped (text / json / parquet through datasets), large
    ones split; documents come in file order with the same text whatever the plan."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_bytes(b"line one\r\nline two\rthree\n")
    (src / "b.md").write_bytes(b"  \n\t\n")  # whitespace only: dropped
    (src / "b[1].py").write_bytes(b"x = 1\n")  # glob characters in the name
    (src / "c.jsonl").write_text('{"text": "j1", "n": 1}\n\n{"text": "j2\\r\\n", "n": 2}\n', encoding="utf-8")
    with gzip.open(src / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "gz1"}\n{"text": "gz2"}\n')
    (src / "e.json").write_text('[{"text": "arr1"}, {"text": "arr2"}]', encoding="utf-8")
    pq.write_table(pa.table({"id": [1, 2], "text": ["pq1", "pq2"]}), src / "f.parquet")
    big_rows = [f"big row {i} " + "w" * 40 for i in range(30)]
    pq.write_table(pa.table({"text": big_rows}), src / "g.parquet", row_group_size=5)
    big_jl = [f"record {i} " + "v" * 30 for i in range(40)]
    (src / "h.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in big_jl), encoding="utf-8")
    (src / "i.txt").write_text("last file\n", encoding="utf-8")
    expected = (
        ["line one\nline two\nthree\n", "x = 1\n", "j1", "j2\r\n", "gz1", "gz2", "arr1", "arr2", "pq1", "pq2"]
        + big_rows
        + big_jl
        + ["last file\n"]
    )
    plan = plan_tasks(str(src), 1000)
    kinds = [t["kind"] for t in plan]
    assert kinds[:3] == ["files", "json_files", "parquet_files"]
    assert plan[0]["files"] == [str(src / n) for n in ("a.txt", "b.md", "b[1].py")]
    assert plan[1]["files"] == [str(src / n) for n in ("c.jsonl", "d.jsonl.gz", "e.json")]
    assert plan[2]["files"] == [str(src / "f.parquet")]
    assert set(kinds[3:-1]) == {"parquet", "jsonl"} and kinds[-1] == "files"
    assert kinds.count("jsonl") == -(-(src / "h.jsonl").stat().st_size // 1000) >= 2
    assert [d for t in plan for d in iter_documents(t)] == expected
    # one task per file kind when everything fits: the same documents
    whole = plan_tasks(str(src), 10**6)
    assert [t["kind"] for t in whole] == ["files", "json_files", "parquet_files", "json_files", "files"]
    assert [d for t in whole for d in iter_documents(t)] == expected

    (src / "z.txt").write_bytes(b"ok \xff\n")
    with pytest.raises(DsvError) as e:
        [d for t in plan_tasks(str(src), 10**6) for d in iter_documents(t)]
    assert "z.txt" in one_line(e) and "UTF-8" in one_line(e) and "offset 3" in one_line(e)


def test_prepare_compressed_jsonl_equals_uncompressed(tmp_path):
    import gzip

    rng = random.Random(5)
    rows = "".join(
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))), "id": i}) + "\n"
        for i in range(60)
    )
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    (plain / "docs.jsonl").write_text(rows, encoding="utf-8")
    with gzip.open(packed / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(rows)
    ref = prepare(cfg_for(str(plain), tmp_path / "c1", **{"data.shard_mb": 1}), progress=False)
    out = prepare(cfg_for(str(packed), tmp_path / "c2", **{"data.shard_mb": 1}), progress=False)
    assert sum(load_meta(out)["n_docs"].values()) == 60
    assert shard_digests(out) == shard_digests(ref)
    assert (out / "tokenizer.model").read_bytes() == (ref / "tokenizer.model").read_bytes()


# ----------------------------------------------------------------------------- document-aware packing


def test_document_positions_mask_and_labels():
    eos = 3
    x = torch.tensor([[10, 11, 3, 12, 13, 14, 3, 15], [3, 20, 21, 22, 23, 24, 25, 26]])
    pos = document_positions(x, eos)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    m = document_attention_mask(pos)
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
    seg = [0, 0, 0, 1, 1, 1, 1, 2]
    want = [[s <= t and seg[s] == seg[t] for s in range(8)] for t in range(8)]
    assert m[0, 0].tolist() == want


def tiny_model_cfg():
    return ModelConfig(
        vocab_size=64,
        dim=32,
        inter_dim=48,
        moe_inter_dim=16,
        n_layers=2,
        n_dense_layers=1,
        n_heads=2,
        n_routed_experts=4,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=1,
        n_limited_groups=1,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        max_seq_len=32,
        mtp_depth=1,
    )


def test_document_aware_packing_isolates_documents(one_torch_thread):
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg())
    model.init_weights(seed=0)
    model.eval()
    eos = 3
    a, b, c = [10, 11, 12, 13, eos], [20, 21, 22, eos], [30, 31, 32, 33, 34, 35]
    window = torch.tensor([a + b + c + [40]])  # seq_len + 1 tokens
    inputs, labels = window[:, :-1], window[:, 1:].clone()
    pos = document_positions(inputs, eos)
    labels[inputs == eos] = IGNORE_INDEX
    assert labels[0, 4].item() == IGNORE_INDEX and labels[0, 8].item() == IGNORE_INDEX  # next doc's first token
    assert labels[0, 3].item() == eos  # predicting a document's own EOS is kept
    mask = document_attention_mask(pos)
    with torch.no_grad():
        logits = model(inputs, attn_mask=mask, position_ids=pos)
        # another document b' of the same length in the middle: a and c keep their logits
        b2 = [50, 51, 52, eos]
        other = torch.tensor([a + b2 + c])
        logits2 = model(other, attn_mask=document_attention_mask(document_positions(other, eos)), position_ids=pos)
        assert torch.allclose(logits[0, :5], logits2[0, :5], atol=1e-6, rtol=0)
        assert torch.allclose(logits[0, 9:], logits2[0, 9:], atol=1e-6, rtol=0)
        assert not torch.allclose(logits[0, 5:9], logits2[0, 5:9], atol=1e-3)
        # each document's logits equal those of the document alone
        alone_c = model(torch.tensor([c]))
        assert torch.allclose(logits[0, 9:], alone_c[0], atol=1e-5, rtol=0)
        alone_b = model(torch.tensor([b]))
        assert torch.allclose(logits[0, 5:9], alone_b[0], atol=1e-5, rtol=0)
        # plain causal packing does leak across documents
        plain = model(inputs)
        assert not torch.allclose(plain[0, 9:], alone_c[0], atol=1e-3)
        # training forward: MTP depth 1 loses the targets that cross a document boundary
        out = model(inputs, labels, attn_mask=mask, position_ids=pos)
        assert out.lm_tokens.item() == 15 - 2
        assert out.mtp_tokens.tolist() == [(14 - 2) - 2]  # positions 3, 7 also cross (EOS ahead)
        from dsv3.model import label_counts

        assert label_counts(labels, 1, pos)[1:].tolist() == out.mtp_tokens.tolist()  # the trainer's normalizer
        out_b = model(
            other,
            torch.where(labels == IGNORE_INDEX, labels, torch.tensor([a + b2 + c + [40]])[:, 1:]),
            attn_mask=document_attention_mask(pos),
            position_ids=pos,
        )
        assert out.lm_loss_sum.item() != out_b.lm_loss_sum.item()


def test_batch_documents_from_a_prepared_folder(tmp_path):
    out = prepare(cfg_for(str(write_docs(tmp_path / "c", 10)), tmp_path / "cache"), progress=False)
    ds = PackedDataset(out, "train", 16)
    tokens = ds.tokens
    i = next(
        k
        for k in range(len(ds))
        if (tokens[k * 16 + 1 : k * 16 + 15] == ds.eos_id).any() and tokens[k * 16] != ds.eos_id
    )
    inputs, labels, pos = ds.batch_documents([i])
    x = torch.from_numpy(tokens[i * 16 : i * 16 + 17])
    assert inputs[0].tolist() == x[:-1].tolist()
    e = int((x[:-1] == ds.eos_id).nonzero()[0])
    assert labels[0, e].item() == IGNORE_INDEX and labels[0, e - 1].item() == ds.eos_id
    assert pos[0, e + 1].item() == 0 and pos[0, e].item() == e
    assert (labels[0] != IGNORE_INDEX).sum().item() == 16 - int((x[:-1] == ds.eos_id).sum())


# ----------------------------------------------------------------------------- sample stream and resume


def rank_stream(steps, gb, n, seed, dp, accum):
    """Per step: (hash of the step's samples in global order, hash of each rank's micro-batches)."""
    mbs = gb // (dp * accum)
    out = []
    for step in steps:
        idx = global_sample_indices(step, gb, n, seed)
        parts = [rank_micro_batches(idx, r, dp, mbs, accum) for r in range(dp)]
        assert len({sum(len(m) for m in p) for p in parts}) == 1  # every rank the same count
        flat = [i for m in range(accum) for r in range(dp) for i in parts[r][m]]
        out.append((digest(flat), tuple(digest([i for m in p for i in m]) for p in parts)))
    return out


def digest(ids):
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


@pytest.mark.parametrize("stop,dp_after", [(7, 2), (7, 4), (5, 1), (10, 4)])
def test_stop_and_resume_stream_equals_uninterrupted(stop, dp_after):
    # 25 steps of 8 over 50 samples: four epochs; dp 2 x accum 2 before the stop, dp_after ranks
    # with the same global batch after it; steps 6 and 12 straddle epoch boundaries
    n, gb, seed, steps = 50, 8, 9, 25
    uninterrupted = rank_stream(range(steps), gb, n, seed, dp=2, accum=2)
    state = loader_state(stop, gb, n, seed, "k")
    state = json.loads(json.dumps(state))  # as stored in a checkpoint
    check_loader_state(state, stop, gb, n, seed, "k", "ckpt")
    resumed = rank_stream(range(stop), gb, n, seed, dp=2, accum=2) + rank_stream(
        range(state["consumed_samples"] // gb, steps), gb, n, seed, dp=dp_after, accum=8 // (2 * dp_after) or 1
    )
    assert len(resumed) == len(uninterrupted) == steps
    assert [g for g, _ in resumed] == [g for g, _ in uninterrupted]  # the global stream, batch by batch
    if dp_after == 2:  # same layout: every rank's batches too
        assert resumed == uninterrupted


def test_resume_exactly_at_an_epoch_boundary():
    n, gb, seed = 40, 8, 2  # 5 steps per epoch
    full = [global_sample_indices(s, gb, n, seed) for s in range(15)]
    state = loader_state(5, gb, n, seed, None)
    assert (state["epoch"], state["epoch_offset"]) == (1, 0)
    assert sorted(i for s in full[:5] for i in s) == list(range(n))
    assert sorted(i for s in full[5:10] for i in s) == list(range(n))
    assert [i for s in full[5:10] for i in s] != [i for s in full[:5] for i in s]  # epochs reshuffle
    assert [global_sample_indices(s, gb, n, seed) for s in range(5, 15)] == full[5:]


def test_loader_state_mismatch_errors():
    state = loader_state(4, 8, 50, 1, "abc")
    for args, word in [
        ((4, 16, 50, 1, "abc"), "global batch"),
        ((4, 8, 50, 2, "abc"), "train.seed"),
        ((4, 8, 51, 1, "abc"), "other prepared data"),
        ((4, 8, 50, 1, "xyz"), "other prepared data"),
        ((4, 8, 50, 2, "xyz"), "train.seed"),  # a new seed also changes the key: named first
        ((5, 8, 50, 1, "abc"), "inconsistent"),
    ]:
        with pytest.raises(DsvError) as e:
            check_loader_state(state, *args, where="ckpt")
        assert word in one_line(e)
    check_loader_state(None, 4, 16, 50, 1, "abc", "ckpt")  # checkpoints from before loader state


def test_equal_batches_on_every_rank_with_uneven_shards(tmp_path):
    # documents of very different sizes: shards of uneven length
    d = tmp_path / "c"
    write_docs(d, 6)
    (d / "zz_long.txt").write_text(" ".join(WORDS * 60) + "\n")
    out = prepare(cfg_for(str(d), tmp_path / "cache"), progress=False)
    sizes = [sh["n_tokens"] for sh in load_meta(out)["shards"]["train"]]
    assert len(sizes) >= 3 and max(sizes) > 2 * min(sizes)
    ds = PackedDataset(out, "train", 16)
    n = len(ds)
    for dp in (1, 2, 3):
        gb, accum = 6, 1
        counts = {r: 0 for r in range(dp)}
        seen = []
        for step in range(3 * n // gb + 2):  # several epochs, last one partial
            idx = global_sample_indices(step, gb, n, 0)
            for r in range(dp):
                mbs = rank_micro_batches(idx, r, dp, gb // dp, accum)
                counts[r] += len(mbs)
                batch = ds.batch(mbs[0])
                assert batch.shape == (gb // dp, 17)
                seen += mbs[0]
        assert len(set(counts.values())) == 1  # no rank runs out before another
        assert sorted(seen[: 3 * n]) == sorted(list(range(n)) * 3)  # each epoch is a permutation


# ----------------------------------------------------------------------------- blending


def test_blend_index_shares_and_determinism():
    corpus, window = blend_index([100, 20, 30], [0.5, 0.3, 0.2], seed=1)
    assert len(corpus) == 150
    assert np.bincount(corpus).tolist() == [75, 45, 30]
    # evenly spread: every prefix is within one sample of the target per corpus
    for k in (10, 50, 99):
        got = np.bincount(corpus[:k], minlength=3)
        assert np.all(np.abs(got - k * np.array([0.5, 0.3, 0.2])) <= 1.01)
    # corpus 1 (20 windows, 45 samples) repeats every window, 2 or 3 times
    assert sorted(set(window[corpus == 1].tolist())) == list(range(20))
    c2, w2 = blend_index([100, 20, 30], [0.5, 0.3, 0.2], seed=1)
    assert np.array_equal(c2, corpus) and np.array_equal(w2, window)
    assert not np.array_equal(blend_index([100, 20, 30], [0.5, 0.3, 0.2], seed=2)[1], window)


def test_prepare_blended_sources(tmp_path, capsys):
    a = write_docs(tmp_path / "a", 10, seed=1, prefix="a")
    b = write_docs(tmp_path / "b", 6, seed=2, prefix="b")
    source = json.dumps([{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}])
    out = prepare(cfg_for(source, tmp_path / "cache"), progress=True)
    assert "blend:" in capsys.readouterr().out
    meta = load_meta(out)
    blend = meta["blend"]
    assert [c["source"] for c in blend] == [str(a), str(b)] and abs(blend[0]["share"] - 0.75) < 0.01
    assert sum(c["samples"] for c in blend) == len(PackedDataset(out, "train", 16))
    ds = PackedDataset(out, "train", 16)
    # a sample of corpus b holds corpus b's tokens
    per = {
        c: np.concatenate(
            [np.fromfile(out / sh["file"], dtype="<u2") for sh in meta["shards"]["train"] if sh["corpus"] == c]
        )
        for c in (0, 1)
    }
    for i in range(0, len(ds), 7):
        c, w = ds.locate(i)
        assert ds[i].tolist() == per[c][w * 16 : w * 16 + 17].tolist()
    got = np.bincount([ds.locate(i)[0] for i in range(len(ds))])
    assert got.tolist() == [c["samples"] for c in blend]
    with pytest.raises(DsvError) as e:
        prepare(cfg_for(json.dumps([{"path": str(a), "weight": 0}]), tmp_path / "cache"), progress=False)
    assert "weight" in one_line(e)


def test_train_document_aware(corpus_dir, data_cache, tmp_path):
    from helpers import run_dsv3, tiny_overrides

    out = tmp_path / "run"
    run_dsv3(
        [
            "train",
            "--no-sample",
            *tiny_overrides(
                corpus_dir, data_cache, out, **{"train.steps": 2, "train.eval_every": 2, "data.document_aware": "true"}
            ),
        ]
    )
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "lm_loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r) and any("val_loss" in r for r in recs)


def test_prepare_rank_world(monkeypatch, tmp_path):
    from data_pipeline.prepare import prepare_rank_world

    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)
    assert prepare_rank_world(cfg_for("", tmp_path).data) == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert prepare_rank_world(cfg_for("", tmp_path).data) == (1, 3)
    assert prepare_rank_world(cfg_for("", tmp_path, **{"data.prepare_rank": 2, "data.prepare_world": 4}).data) == (2, 4)
    with pytest.raises(DsvError) as e:
        prepare_rank_world(cfg_for("", tmp_path, **{"data.prepare_rank": 4, "data.prepare_world": 4}).data)
    assert "data.prepare_rank=4" in one_line(e)
    with pytest.raises(DsvError) as e:
        cfg_for(json.dumps([{"path": "a"}]), tmp_path, **{"data.format": "chat"})
    assert "data.source" in one_line(e)


def test_blend_entries_need_a_path_and_a_positive_weight():
    from data_pipeline.prepare import parse_sources

    assert parse_sources("a") == [("a", 1.0)]
    assert parse_sources([{"path": "a", "weight": 3}, {"path": "b", "weight": 0.5}]) == [("a", 3.0), ("b", 0.5)]
    with pytest.raises(DsvError, match=r"data.source\[1\]=.* is not a corpus entry \(missing weight\)"):
        parse_sources([{"path": "a", "weight": 1}, {"path": "b"}])
    with pytest.raises(DsvError, match=r"not a corpus entry \(unknown key\(s\) wieght\)"):
        parse_sources([{"path": "a", "wieght": 1}])
    with pytest.raises(DsvError, match=r"data.source\[0\].weight=0 must be a positive number"):
        parse_sources([{"path": "a", "weight": 0}])
