"""Throughput of the data pipeline (``dsv3 bench data`` calls :func:`bench_data`).

Measured on the corpus of ``cfg`` (``data.source``; the first ``max_mb`` MB of its documents):

* ``sentencepiece``: raw ``SentencePieceProcessor.encode`` of the documents, one thread,
  64 documents per call, results dropped (no Python work per token) - the limit for
  tokenization on one core;
* ``prepare``: :func:`data_pipeline.prepare.run_task` on the same documents in one process:
  reading the files, the split, encoding, EOS, writing shards, indices and checksums -
  tokens/s per core;
* ``datasets.map``: a plain ``datasets.Dataset.map`` tokenization of the same documents
  (batched, one process, ids as lists in Arrow), the common baseline;
* ``loader``: samples and tokens per second of :class:`data_pipeline.dataset.PackedDataset`
  with the run's global batch (sample order, rank split, memory-mapped reads; plain and
  document-aware), against the tokens per second one training step of the configured model
  consumes on this machine (forward + backward of one micro-batch, timed).

Each timing is the best of ``repeats`` runs (the machine may be shared).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_data(
    cfg, max_mb: float = 16.0, repeats: int = 3, loader_steps: int = 50, train_steps: int = 2
) -> dict[str, Any]:
    """Measure prepare, tokenizer and loader throughput (module docstring).

    Args:
        cfg: a run config; its data is prepared first if needed (for the tokenizer and the
            loader).
        max_mb: text used for the tokenization measurements.
        repeats: timings per measurement (the best is kept).
        loader_steps: optimizer steps of samples read for the loader measurement.
        train_steps: timed forward+backward passes for the training consumption (0 = skip).

    Returns:
        A flat dict: ``text_mb``, ``docs``, ``tokens``, ``sentencepiece_tokens_per_s``,
        ``prepare_tokens_per_s_per_core``, ``prepare_over_sentencepiece`` (time ratio, 1.0 =
        as fast as the limit), ``datasets_map_tokens_per_s``, ``loader_samples_per_s``,
        ``loader_tokens_per_s``, ``loader_doc_aware_tokens_per_s``, ``train_tokens_per_s``,
        ``loader_over_train``.

    Raises:
        DsvError: as :func:`data_pipeline.prepare.prepare`.
    """
    import datasets
    import sentencepiece as spm

    from data_pipeline.corpus import progress_bars
    from data_pipeline.dataset import PackedDataset
    from data_pipeline.prepare import parse_sources, prepare, run_task, token_dtype
    from data_pipeline.sampling import global_sample_indices, rank_micro_batches
    from data_pipeline.tasks import iter_documents, plan_tasks
    from dsv3.errors import DsvError
    from dsv3.tokenizer import Tokenizer

    folder = prepare(cfg, progress=False)
    model_path = folder / "tokenizer.model"
    if not model_path.is_file():
        raise DsvError(
            "dsv3 bench data measures dsv3's sentencepiece tokenizer, but data.tokenizer names a "
            "tokenizer.json; unset data.tokenizer to benchmark the pipeline"
        )
    tok = Tokenizer.load(model_path)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    d = cfg.data

    # the first max_mb MB of documents, as whole tasks of size max_mb / 4
    limit = int(max_mb * 2**20)
    tasks, docs, size = [], [], 0
    for src, _ in parse_sources(d.source):
        for task in plan_tasks(src, max(1, limit // 4), text_field=d.text_field):
            if size >= limit:
                break
            tasks.append(task)
            for text in iter_documents(task, d.text_field):
                docs.append(text)
                size += len(text.encode("utf-8"))
    n_tokens = sum(len(x) + 1 for x in sp.encode(docs, num_threads=1))
    out: dict[str, Any] = {"text_mb": round(size / 1e6, 2), "docs": len(docs), "tokens": n_tokens}

    ds = datasets.Dataset.from_dict({"text": docs})

    def encode(batch):
        return {"ids": [ids + [tok.eos_id] for ids in sp.encode(batch["text"], num_threads=1)]}

    with tempfile.TemporaryDirectory() as tmp, progress_bars(False):

        def run_prepare() -> None:
            for t, task in enumerate(tasks):
                run_task(
                    t,
                    task,
                    tok,
                    Path(tmp),
                    token_dtype(cfg.model.vocab_size),
                    d.val_fraction,
                    cfg.train.seed,
                    d.text_field,
                    None,
                )

        def raw() -> None:  # batches of 64 documents, results dropped: the fastest way to call it
            for i in range(0, len(docs), 64):
                sp.encode(docs[i : i + 64], num_threads=1)

        runs = {
            "sp": raw,
            "prepare": run_prepare,
            "map": lambda: ds.map(
                encode,
                batched=True,
                batch_size=64,
                remove_columns=["text"],
                keep_in_memory=True,
                load_from_cache_file=False,
            ),
        }
        best = {k: float("inf") for k in runs}
        for _ in range(repeats):  # interleaved, so a busy moment of the machine hits all three alike
            for k, fn in runs.items():
                best[k] = min(best[k], _best(fn, 1))
    out["sentencepiece_tokens_per_s"] = round(n_tokens / best["sp"])
    out["prepare_tokens_per_s_per_core"] = round(n_tokens / best["prepare"])
    out["prepare_over_sentencepiece"] = round(best["prepare"] / best["sp"], 3)
    out["datasets_map_tokens_per_s"] = round(n_tokens / best["map"])

    # loader: one rank's share of every step, read from the memory-mapped shards
    train = PackedDataset(folder, "train", d.seq_len)
    p = cfg.parallel
    gb = p.micro_batch_size * p.grad_accum
    n = len(train)

    def load(doc_aware: bool) -> None:
        for step in range(loader_steps):
            idx = global_sample_indices(step, gb, n, cfg.train.seed)
            for mb in rank_micro_batches(idx, 0, 1, p.micro_batch_size, p.grad_accum):
                train.batch_documents(mb) if doc_aware else train.batch_xy(mb)

    t_load = _best(lambda: load(False), repeats)
    t_doc = _best(lambda: load(True), repeats)
    out["loader_samples_per_s"] = round(loader_steps * gb / t_load)
    out["loader_tokens_per_s"] = round(loader_steps * gb * d.seq_len / t_load)
    out["loader_doc_aware_tokens_per_s"] = round(loader_steps * gb * d.seq_len / t_doc)

    if train_steps:
        out["train_tokens_per_s"] = round(_train_tokens_per_s(cfg, train, train_steps))
        out["loader_over_train"] = round(out["loader_tokens_per_s"] / max(out["train_tokens_per_s"], 1), 1)
    return out


def _train_tokens_per_s(cfg, train, steps: int) -> float:
    """Tokens per second of forward + backward of one micro-batch of the configured model."""
    import torch

    from dsv3.model import Transformer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer(cfg.model).to(dev)
    model.init_weights(seed=0)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model.to(dtype)
    inputs, labels = train.batch_xy(list(range(min(cfg.parallel.micro_batch_size, len(train)))))
    inputs, labels = inputs.to(dev), labels.to(dev)

    def step() -> None:
        out = model(inputs, labels)
        (out.lm_loss_sum / out.lm_tokens.clamp(min=1)).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    t = _best(step, steps)
    return inputs.numel() / t


if __name__ == "__main__":
    import sys

    from dsv3.config import load_config

    args = sys.argv[1:]
    config = None
    if args and args[0] == "--config":
        config, args = args[1], args[2:]
    print(json.dumps(bench_data(load_config(config, args)), indent=2))
