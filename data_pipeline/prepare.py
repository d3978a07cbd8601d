"""``dsv3 prepare``: corpus -> tokenizer -> packed token files, cached by content key.

The prepared folder ``<cache>/prepared/<key>/`` holds

* ``tokenizer.model`` - the sentencepiece model (see :mod:`dsv3.tokenizer`);
* ``train.bin`` / ``val.bin`` - all documents of the split, each followed by EOS, as one
  flat little-endian array of ``uint16`` ids (``uint32`` when vocab_size > 65536);
* ``meta.json`` - sizes, dtype, special ids and checksums; written last, so a folder with
  ``meta.json`` is complete.

``<key>`` hashes everything that shapes these files (source content fingerprint, vocab
size, tokenizer sample size, seed, seq_len, val_fraction, text_field, format versions), so
changing any of them prepares a new folder and an unchanged config is a cache hit. The
folder is built under a temporary name and renamed into place at the end; an interrupted
run leaves no folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np

from data_pipeline.corpus import describe_source, load_corpus, progress_bars, source_fingerprint
from dsv3.config import Config, DataConfig
from dsv3.errors import DsvError
from dsv3.tokenizer import TOKENIZER_VERSION, Tokenizer, train_tokenizer

#: Bumped whenever the layout or content rules of a prepared folder change.
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def cache_root(data_cfg: DataConfig) -> Path:
    """Root of the dsv3 cache: ``data.cache_dir``, else ``$DSV3_CACHE``, else ``~/.cache/dsv3``."""
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    env = os.environ.get("DSV3_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dsv3"


def hf_cache_dir(data_cfg: DataConfig) -> Path:
    """Where ``datasets`` keeps its own cache for dsv3: ``<cache_root>/hf_datasets``."""
    return cache_root(data_cfg) / "hf_datasets"


def token_dtype(vocab_size: int) -> str:
    """Numpy dtype name of stored ids: ``"uint16"`` if vocab_size <= 65536 else ``"uint32"``."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def data_key(cfg: Config, fingerprint: dict[str, Any] | None = None) -> str:
    """The 16-hex-digit key of the prepared folder for ``cfg``.

    Args:
        cfg: the run config.
        fingerprint: ``source_fingerprint(cfg.data.source)`` if already computed.

    Raises:
        DsvError: the source does not exist (see :func:`data_pipeline.corpus.resolve_source`).
    """
    d = cfg.data
    parts = {
        "format_version": FORMAT_VERSION,
        "tokenizer_version": TOKENIZER_VERSION,
        "source": fingerprint if fingerprint is not None else source_fingerprint(d.source),
        "vocab_size": cfg.model.vocab_size,
        "tokenizer_sample_size": d.tokenizer_sample_size,
        "seed": cfg.train.seed,
        "seq_len": d.seq_len,
        "val_fraction": d.val_fraction,
        "text_field": d.text_field,
        "tokenizer": _file_sha256(given_tokenizer(d)) if d.tokenizer else None,
    }
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def given_tokenizer(d: DataConfig) -> Path:
    """The sentencepiece file named by ``data.tokenizer`` (a file, run dir or checkpoint folder).

    Raises:
        DsvError: nothing usable at that path.
    """
    p = Path(d.tokenizer).expanduser()
    for cand in (p, p / "tokenizer.model"):
        if cand.is_file():
            return cand
    raise DsvError(f"data.tokenizer={d.tokenizer} is not a sentencepiece model file nor a folder holding "
                   "tokenizer.model; point it at one, or leave it unset to train a tokenizer on the corpus")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepared_path(cfg: Config) -> Path:
    """``<cache_root>/prepared/<key>`` for ``cfg`` (it may not exist yet)."""
    return cache_root(cfg.data) / "prepared" / data_key(cfg)


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` is a complete prepared folder (its ``meta.json`` exists)."""
    return (Path(folder) / "meta.json").is_file()


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Choose validation documents deterministically.

    Args:
        n_docs: number of documents (>= 2).
        val_fraction: share held out; rounded, clamped to at least 1 val and 1 train doc.
        seed: permutation seed.

    Returns:
        ``(train_indices, val_indices)``, each sorted ascending.

    Raises:
        DsvError: fewer than 2 documents.
    """
    if n_docs < 2:
        raise DsvError(f"the corpus has {n_docs} document(s) but needs at least 2 (one for training, one for "
                       "validation); add files, or use a .jsonl file with one document per line")
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n_docs)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


class _EncodeDocs:
    """``Dataset.map`` function: text batch -> ids (+EOS) and UTF-8 sizes.

    Holds only the model path; each worker process loads the tokenizer on first use.
    """

    def __init__(self, model_path: Path):
        self.model_path = str(model_path)
        self._tok: Tokenizer | None = None

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.model_path, self._tok = state["model_path"], None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self._tok is None:
            self._tok = Tokenizer.load(self.model_path)
        texts = batch["text"]
        return {"ids": self._tok.encode_batch(texts, eos=True, num_threads=1),
                "n_bytes": [len(t.encode("utf-8")) for t in texts]}


def _iter_texts(ds: datasets.Dataset, batch_size: int = 256) -> Iterator[str]:
    for batch in ds.iter(batch_size=batch_size):
        yield from batch["text"]


def _write_bin(tokens: datasets.Dataset, path: Path, dtype: str) -> tuple[int, int, str]:
    """Stream the ``ids`` column into ``path``; returns (n_tokens, n_text_bytes, sha256)."""
    digest = hashlib.sha256()
    n_tokens = n_bytes = 0
    np_dtype = np.dtype(dtype).newbyteorder("<")
    with open(path, "wb") as f:
        for table in tokens.with_format("arrow").iter(batch_size=4096):
            n_bytes += int(np.asarray(table.column("n_bytes").to_numpy()).sum())
            for chunk in table.column("ids").chunks:
                arr = chunk.flatten().to_numpy(zero_copy_only=False).astype(np_dtype, copy=False)
                data = arr.tobytes()
                f.write(data)
                digest.update(data)
                n_tokens += arr.size
        f.flush()
        os.fsync(f.fileno())
    return n_tokens, n_bytes, digest.hexdigest()


def prepare(cfg: Config, progress: bool = True) -> Path:
    """Build (or find in the cache) the prepared data for ``cfg``.

    Steps: load the corpus (:func:`data_pipeline.corpus.load_corpus`); hold out
    ``data.val_fraction`` of the documents (:func:`split_documents`, seed ``train.seed``);
    train the tokenizer on the training documents (``model.vocab_size``,
    ``data.tokenizer_sample_size``, seed ``train.seed``); tokenize both splits with
    ``data.num_proc`` processes; write ``train.bin``, ``val.bin``, ``tokenizer.model`` and
    finally ``meta.json``.

    Args:
        cfg: the run config (``data``, ``model.vocab_size`` and ``train.seed`` are used).
        progress: print a one-line summary to stdout, and show ``datasets`` progress bars
            for tokenization when stderr is a terminal (so logs and errors stay clean).

    Returns:
        The prepared folder ``<cache_root>/prepared/<key>/``; returned immediately if it
        already exists and is complete.

    Raises:
        DsvError: any corpus problem (see ``load_corpus``), fewer than 2 documents, or a
            split with fewer than ``data.seq_len + 1`` tokens.
    """
    d = cfg.data
    fingerprint = source_fingerprint(d.source)
    key = data_key(cfg, fingerprint)
    out = cache_root(d) / "prepared" / key
    if is_prepared(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=out.parent))
    start = time.perf_counter()
    try:
        with progress_bars(progress and getattr(sys.stderr, "isatty", lambda: False)()):
            ds = load_corpus(d.source, d.text_field, cache_dir=hf_cache_dir(d))
            train_idx, val_idx = split_documents(len(ds), d.val_fraction, cfg.train.seed)
            parts = {"train": ds.select(train_idx, keep_in_memory=True),
                     "val": ds.select(val_idx, keep_in_memory=True)}

            t0 = time.perf_counter()
            if d.tokenizer:
                shutil.copyfile(given_tokenizer(d), build / "tokenizer.model")
                tok = Tokenizer.load(build / "tokenizer.model")
                if tok.vocab_size > cfg.model.vocab_size:
                    raise DsvError(f"data.tokenizer has {tok.vocab_size} pieces but model.vocab_size is "
                                   f"{cfg.model.vocab_size}; use a matching tokenizer or raise model.vocab_size")
            else:
                tok = train_tokenizer(_iter_texts(parts["train"]), cfg.model.vocab_size, build / "tokenizer.model",
                                      d.tokenizer_sample_size, seed=cfg.train.seed)
            t_tokenizer = time.perf_counter() - t0

            t0 = time.perf_counter()
            dtype = token_dtype(cfg.model.vocab_size)
            encode = _EncodeDocs(build / "tokenizer.model")
            features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32")),
                                          "n_bytes": datasets.Value("int64")})
            stats: dict[str, dict[str, Any]] = {}
            for split, part in parts.items():
                tokens = part.map(
                    encode, batched=True, batch_size=64, remove_columns=["text"], features=features,
                    num_proc=max(1, min(d.num_proc, len(part))), load_from_cache_file=False,
                    cache_file_name=str(build / f"tokens_{split}.arrow"),
                    new_fingerprint=f"dsv3-{key}-{split}-{time.time_ns()}", desc=f"tokenizing {split}")
                n_tokens, n_bytes, sha = _write_bin(tokens, build / f"{split}.bin", dtype)
                stats[split] = {"n_docs": len(part), "n_tokens": n_tokens, "n_bytes": n_bytes, "sha256": sha}
                del tokens
            for f in build.glob("tokens_*.arrow"):
                f.unlink()
            t_tokenize = time.perf_counter() - t0

        need = d.seq_len + 1
        if stats["val"]["n_tokens"] < need:
            raise DsvError(f"the validation split has {stats['val']['n_tokens']} tokens but one sample needs "
                           f"data.seq_len+1={need}; lower data.seq_len or raise data.val_fraction")
        if stats["train"]["n_tokens"] < need:
            raise DsvError(f"the training split has {stats['train']['n_tokens']} tokens but one sample needs "
                           f"data.seq_len+1={need}; lower data.seq_len or use a larger corpus")

        meta = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "source": describe_source(d.source),
            "vocab_size": cfg.model.vocab_size,
            "tokenizer_vocab_size": tok.vocab_size,
            "seq_len": d.seq_len,
            "dtype": dtype,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "pad_id": tok.pad_id,
            "n_docs": {s: stats[s]["n_docs"] for s in SPLITS},
            "n_tokens": {s: stats[s]["n_tokens"] for s in SPLITS},
            "n_bytes": {s: stats[s]["n_bytes"] for s in SPLITS},
            "sha256": {f"{s}.bin": stats[s]["sha256"] for s in SPLITS},
            "text_field": d.text_field,
            "val_fraction": d.val_fraction,
            "tokenizer_sample_size": d.tokenizer_sample_size,
            "seed": cfg.train.seed,
            "source_fingerprint": fingerprint,
            "seconds": {"tokenizer": round(t_tokenizer, 3), "tokenize": round(t_tokenize, 3)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with open(build / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(build, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.replace(build, out)
        except OSError:
            if not is_prepared(out):  # not a concurrent prepare of the same key: a real error
                raise
            shutil.rmtree(build, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise

    if progress:
        n_tok = sum(meta["n_tokens"].values())
        n_bytes = sum(meta["n_bytes"].values())
        print(f"prepared {out}: {sum(meta['n_docs'].values())} documents "
              f"({meta['n_docs']['train']} train / {meta['n_docs']['val']} val), {n_tok:,} tokens "
              f"({meta['n_tokens']['train']:,} / {meta['n_tokens']['val']:,}), {n_bytes / 1e6:.1f} MB text, "
              f"{n_tok / max(n_bytes, 1):.3f} tokens/byte, vocab {tok.vocab_size}, "
              f"{time.perf_counter() - start:.1f}s (tokenizer {t_tokenizer:.1f}s, tokenize {t_tokenize:.1f}s)",
              flush=True)
    return out
