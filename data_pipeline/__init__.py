"""Data pipeline: corpus loading, ``dsv3 prepare`` and packed training samples.

Modules:

* :mod:`data_pipeline.corpus` - find and load a corpus as a ``datasets.Dataset`` of documents;
* :mod:`data_pipeline.tasks` - split a corpus into tokenization tasks, stream their documents;
* :mod:`data_pipeline.prepare` - corpus -> tokenizer -> token shards (parallel, resumable, cached);
* :mod:`data_pipeline.dataset` - :class:`PackedDataset` windows, document-aware packing,
  blending, the sample order and the loader position;
* :mod:`data_pipeline.bench` - prepare and loader throughput.

The names below are importable from the package directly; modules are imported on first
use, so ``from data_pipeline import PackedDataset`` does not import ``datasets``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "default_corpus_files": "corpus",
    "load_corpus": "corpus",
    "cache_root": "prepare",
    "prepare": "prepare",
    "prepared_path": "prepare",
    "FORMAT_VERSION": "prepare",
    "PackedDataset": "dataset",
    "load_meta": "dataset",
    "global_sample_indices": "dataset",
    "stream_indices": "dataset",
    "rank_micro_batches": "dataset",
    "document_positions": "dataset",
    "document_attention_mask": "dataset",
    "loader_state": "dataset",
    "check_loader_state": "dataset",
    "blend_index": "dataset",
    "plan_tasks": "tasks",
    "iter_documents": "tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f"data_pipeline.{module}"), name)
