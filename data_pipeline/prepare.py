"""``dsv3 prepare``: corpus -> tokenizer -> token shards, in parallel, resumable, cached by key.

Steps (see ``data_pipeline/README.md`` for the folder layout):

1. **Plan.** The source (or each corpus of a blend) is split into tasks of about
   ``data.shard_mb`` MB of input (:mod:`data_pipeline.tasks`); nothing is loaded.
2. **Tokenizer.** Trained once, on training documents streamed from the tasks in a seeded
   order until ``10 * data.tokenizer_sample_size`` chunks were seen (sentencepiece keeps a
   uniform sample of ``tokenizer_sample_size`` of them), or taken from ``data.tokenizer``: a
   sentencepiece model, or a released model's ``tokenizer.json`` (with its
   ``tokenizer_config.json`` and chat template), whose files are saved into the folder as they
   are; it must not have more ids than ``model.vocab_size`` (:func:`check_vocab_size`).
3. **Tasks.** Each task streams its documents, encodes them with the tokenizer in batches
   (``data.num_proc`` worker processes on this node) and writes, for each split, one token
   shard ``shards/<split>-<task>.bin`` (little-endian uint16, uint32 when vocab_size >
   65536; every document followed by EOS, and preceded by BOS for a tokenizer whose own
   post-processor starts a text with it), its document index ``<split>-<task>.idx.npy``
   (int64 end offset of every document) and finally a record ``task-<task>.json`` with
   sizes and sha256 checksums. A task whose record exists and whose shards verify is skipped,
   so an interrupted prepare continues where it stopped. With several nodes
   (``data.prepare_world`` > 1, or a SLURM job array), node ``r`` runs tasks ``t`` with
   ``t % world == r``.
4. **Merge.** When every task has its record, ``meta.json`` (shard list, totals, checksums,
   blend) is written and the work folder ``<key>.partial`` is renamed to ``<key>``: a folder
   without ``.partial`` always holds complete data.

The train/validation split is by document: document ``j`` of task ``t`` is held out when
``floor((j+1)f + u_t) > floor(j f + u_t)`` with ``f = data.val_fraction`` and ``u_t`` a
seeded uniform offset per task (``1 - f`` for task 0, so the first document always goes to
validation): every task holds out ``f`` of its documents, spread evenly, whatever the number of
tasks or nodes.

``<key>`` hashes everything that shapes the data (source fingerprints and weights, vocab
size, tokenizer sample size, seed, seq_len, val_fraction, text_field, shard_mb, format
versions); ``num_proc`` and the node split do not change it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.corpus import describe_source, source_fingerprint
from data_pipeline.shards import SPLITS, Progress, is_val, run_tasks, shard_names, task_done, val_offset
from data_pipeline.tasks import iter_documents, plan_tasks
from dsv3.config import Config, DataConfig
from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_text
from dsv3.tokenizer import MODEL_FILE, TOKENIZER_VERSION, train_tokenizer, training_chunks
from dsv3.tokenizer_files import find_tokenizer, open_tokenizer

#: Bumped whenever the layout or content rules of a prepared folder change.
FORMAT_VERSION = 3  # 3: whole json/parquet files grouped into tasks (a new plan)
#: Text per sentencepiece call in a task (characters); bounds a worker's memory.
ENCODE_BATCH_CHARS = 1 << 20


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


def parse_sources(source: Any) -> list[tuple[str | None, float]]:
    """``data.source`` as a list of ``(source, weight)`` corpora.

    A single source (None, ``""``, a path or hub name) is one corpus of weight 1. A blend is
    a list of mappings ``{path: <source>, weight: <positive number>}``; weights are
    relative (normalized when sampling).

    Raises:
        DsvError: a list entry that is not such a mapping, or a weight that is not positive.
    """
    if not isinstance(source, list):
        return [(source, 1.0)]
    if not source:
        raise DsvError("data.source is an empty list; give a path, or a list of {path: ..., weight: ...}")
    out = []
    for i, item in enumerate(source):
        if not (isinstance(item, dict) and set(item) == {"path", "weight"} and isinstance(item.get("path"), str)):
            keys = sorted(set(item) - {"path", "weight"}) if isinstance(item, dict) else []
            missing = sorted({"path", "weight"} - set(item)) if isinstance(item, dict) else []
            what = (
                f"unknown key(s) {', '.join(keys)}"
                if keys
                else f"missing {', '.join(missing)}"
                if missing
                else "not a mapping with a string path"
            )
            raise DsvError(
                f"data.source[{i}]={item!r} is not a corpus entry ({what}); write each as "
                "{path: <file, folder or hub name>, weight: <number>}"
            )
        w = item["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise DsvError(f"data.source[{i}].weight={w!r} must be a positive number")
        out.append((item["path"], float(w)))
    return out


def data_key(cfg: Config, fingerprint: list[dict[str, Any]] | None = None) -> str:
    """The 16-hex-digit key of the prepared folder for ``cfg``.

    Args:
        cfg: the run config.
        fingerprint: :func:`source_fingerprint` of each corpus, if already computed.

    Raises:
        DsvError: a source that does not exist (see :func:`data_pipeline.corpus.resolve_source`).
    """
    d = cfg.data
    sources = parse_sources(d.source)
    if fingerprint is None:
        fingerprint = [source_fingerprint(s) for s, _ in sources]
    parts = {
        "format_version": FORMAT_VERSION,
        "tokenizer_version": TOKENIZER_VERSION,
        "source": fingerprint[0] if len(sources) == 1 else [[f, w] for f, (_, w) in zip(fingerprint, sources)],
        "vocab_size": cfg.model.vocab_size,
        "tokenizer_sample_size": d.tokenizer_sample_size,
        "seed": cfg.train.seed,
        "seq_len": d.seq_len,
        "val_fraction": d.val_fraction,
        "text_field": d.text_field,
        "shard_mb": d.shard_mb,
        "tokenizer": open_tokenizer(given_tokenizer(d)).fingerprint if d.tokenizer else None,
    }
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def given_tokenizer(d: DataConfig) -> Path:
    """The tokenizer named by ``data.tokenizer``: a sentencepiece ``.model`` file, a
    ``tokenizer.json`` file, or a folder holding either (a model folder, a run dir or
    checkpoint folder); :func:`dsv3.tokenizer_files.open_tokenizer` opens the result.

    Raises:
        DsvError: nothing usable at that path.
    """
    p = Path(d.tokenizer).expanduser()
    found = p if p.is_file() else find_tokenizer(p) if p.is_dir() else None
    if found is None:
        raise DsvError(
            f"data.tokenizer={d.tokenizer} is neither a tokenizer file (tokenizer.model, tokenizer.json) "
            "nor a folder holding one; point it at one, or leave it unset to train a tokenizer on the "
            "corpus"
        )
    return found


def check_vocab_size(tok, vocab_size: int, what: str) -> None:
    """Refuse a tokenizer with more ids than the model's embedding has rows.

    Raises:
        DsvError: ``tok.vocab_size > vocab_size``; the message names the setting to change.
    """
    if tok.vocab_size > vocab_size:
        raise DsvError(
            f"{what} has {tok.vocab_size} entries but model.vocab_size is {vocab_size}; set "
            f"model.vocab_size={tok.vocab_size} (or larger) or use a tokenizer that fits"
        )


def prepared_path(cfg: Config) -> Path:
    """``<cache_root>/prepared/<key>`` for ``cfg`` (it may not exist yet)."""
    return cache_root(cfg.data) / "prepared" / data_key(cfg)


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` is a complete prepared folder (its ``meta.json`` exists)."""
    return (Path(folder) / "meta.json").is_file()


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_texts(tasks: list[dict], d: DataConfig, seed: int, cache_dir: str, count: dict) -> Iterator[str]:
    """Training documents for the tokenizer: tasks in a seeded order, validation documents
    skipped, until ``10 * tokenizer_sample_size`` trainer chunks were produced. ``count``
    receives the numbers of documents read (``"docs"``) and yielded (``"train"``)."""
    budget = 10 * d.tokenizer_sample_size
    seen = 0
    for t in np.random.default_rng(seed).permutation(len(tasks)).tolist():
        u = val_offset(t, d.val_fraction, seed)
        for j, text in enumerate(iter_documents(tasks[t], d.text_field, cache_dir)):
            count["docs"] += 1
            if is_val(j, u, d.val_fraction):
                continue
            count["train"] += 1
            yield text
            seen += sum(1 for _ in training_chunks(text))
            if seen >= budget:
                return


def _wait_for(work: Path, what: str, timeout: float) -> None:
    """Wait until the prepare folder ``work`` holds a tokenizer."""
    t0 = time.monotonic()
    while find_tokenizer(work) is None:
        if time.monotonic() - t0 > timeout:
            raise DsvError(
                f"waited {timeout:.0f}s for {what} (in {work}); start prepare rank 0 first, or raise "
                "DSV3_PREPARE_WAIT (seconds)"
            )
        time.sleep(1.0)


# ----------------------------------------------------------------------------- main entry


def prepare_rank_world(d: DataConfig) -> tuple[int, int]:
    """This node's (rank, world) for ``dsv3 prepare``: ``data.prepare_rank``/``prepare_world``,
    else a SLURM job array's ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``, else (0, 1).

    Raises:
        DsvError: a rank outside ``[0, world)``.
    """
    rank, world = d.prepare_rank, d.prepare_world
    if rank is None and world is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        rank = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        world = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    rank, world = rank or 0, world or 1
    if not 0 <= rank < world:
        raise DsvError(f"data.prepare_rank={rank} must be in [0, data.prepare_world={world})")
    return rank, world


def prepare(cfg: Config, progress: bool = True, rank: int = 0, world: int = 1) -> Path:
    """Build (or find in the cache) the prepared data for ``cfg`` (module docstring).

    Args:
        cfg: the run config (``data``, ``model.vocab_size`` and ``train.seed`` are used).
        progress: print progress (docs/s, MB/s, tokens/s) to stderr and a summary to stdout.
        rank, world: this node's share of the tasks (:func:`prepare_rank_world`); rank 0
            trains the tokenizer, the others wait for it.

    Returns:
        The prepared folder ``<cache_root>/prepared/<key>/``. With ``world`` > 1 it exists
        only once the last node has finished its tasks (that node merges).

    Raises:
        DsvError: any corpus problem, fewer than 2 documents, or a split with fewer than
            ``data.seq_len + 1`` tokens (the work folder is then deleted).
    """
    d = cfg.data
    sources = parse_sources(d.source)
    fingerprint = [source_fingerprint(s) for s, _ in sources]
    key = data_key(cfg, fingerprint)
    out = cache_root(d) / "prepared" / key
    if is_prepared(out):
        return out
    work = out.with_name(key + ".partial")
    shards = work / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    start = time.perf_counter()
    cache_dir = str(hf_cache_dir(d))
    try:
        tasks = []
        for c, (src, _) in enumerate(sources):
            tasks += plan_tasks(src, d.shard_mb * 2**20, corpus=c, text_field=d.text_field, cache_dir=cache_dir)
        if rank == 0 and not (work / "plan.json").is_file():
            atomic_write_text(work / "plan.json", json.dumps({"key": key, "tasks": tasks}, indent=1))

        t0 = time.perf_counter()
        if rank == 0 and find_tokenizer(work) is None:
            if d.tokenizer:
                tok = open_tokenizer(given_tokenizer(d))
                check_vocab_size(tok, cfg.model.vocab_size, f"the tokenizer data.tokenizer={d.tokenizer}")
                tok.save(work)
            else:
                count = {"docs": 0, "train": 0}
                try:
                    train_tokenizer(
                        _tokenizer_texts(tasks, d, cfg.train.seed, cache_dir, count),
                        cfg.model.vocab_size,
                        work / MODEL_FILE,
                        d.tokenizer_sample_size,
                        seed=cfg.train.seed,
                    )
                except DsvError:
                    if count["train"]:
                        raise
                    _check_documents(count["docs"], d.source)
                    raise
        elif rank != 0:
            _wait_for(work, "the tokenizer written by prepare rank 0", float(os.environ.get("DSV3_PREPARE_WAIT", 7200)))
        model = find_tokenizer(work)
        tok = open_tokenizer(model)
        t_tokenizer = time.perf_counter() - t0

        t0 = time.perf_counter()
        dtype = token_dtype(cfg.model.vocab_size)
        mine = [t for t in range(len(tasks)) if t % world == rank]
        todo = [(t, tasks[t]) for t in mine if task_done(shards, t) is None]
        prog = Progress(progress, len(mine), len(mine) - len(todo))
        if progress and len(todo) < len(mine):
            print(
                f"prepare: {len(mine) - len(todo)} of {len(mine)} tasks already done in {work}; continuing", flush=True
            )
        args = {
            "model": str(model),
            "shards": str(shards),
            "dtype": dtype,
            "val_fraction": d.val_fraction,
            "seed": cfg.train.seed,
            "text_field": d.text_field,
            "cache_dir": cache_dir,
        }
        run_tasks(todo, args, d.num_proc, prog)
        if todo and prog.tty:
            prog.show(final=True)
        t_tokenize = time.perf_counter() - t0

        records = [task_done(shards, t, verify=False) for t in range(len(tasks))]
        missing = sum(r is None for r in records)
        if missing:
            if progress:
                print(
                    f"prepare: this node's tasks are done; {missing} of {len(tasks)} tasks are still running on "
                    "other nodes (the node that finishes last writes meta.json)",
                    flush=True,
                )
            return out
        meta = _merge(cfg, key, sources, fingerprint, tasks, records, tok, dtype)
        meta["seconds"] = {"tokenizer": round(t_tokenizer, 3), "tokenize": round(t_tokenize, 3)}
        try:
            atomic_write_text(work / "meta.json", json.dumps(meta, indent=2))
            os.replace(work, out)
        except OSError:
            if not is_prepared(out):  # not a concurrent prepare of the same key: a real error
                raise
            shutil.rmtree(work, ignore_errors=True)
    except DsvError:
        if world == 1:
            shutil.rmtree(work, ignore_errors=True)  # bad input or settings: nothing worth resuming
        raise

    if progress:
        n_tok = sum(meta["n_tokens"].values())
        n_bytes = sum(meta["n_bytes"].values())
        print(
            f"prepared {out}: {sum(meta['n_docs'].values())} documents "
            f"({meta['n_docs']['train']} train / {meta['n_docs']['val']} val), {n_tok:,} tokens "
            f"({meta['n_tokens']['train']:,} / {meta['n_tokens']['val']:,}), {n_bytes / 1e6:.1f} MB text, "
            f"{n_tok / max(n_bytes, 1):.3f} tokens/byte, vocab {tok.vocab_size}, {len(tasks)} shards, "
            f"{time.perf_counter() - start:.1f}s (tokenizer {t_tokenizer:.1f}s, tokenize {t_tokenize:.1f}s)",
            flush=True,
        )
        if len(sources) > 1:
            print(
                "blend: "
                + ", ".join(
                    f"{c['source']} {c['share']:.1%} of samples ({c['tokens']:,} tokens per epoch, "
                    f"weight {c['weight']:.3g})"
                    for c in meta["blend"]
                ),
                flush=True,
            )
    return out


def _check_documents(n_docs: int, source: Any) -> None:
    """Raise the one-line error for a corpus with no text or a single document."""
    if n_docs == 0:
        raise DsvError(
            f"data.source={describe_source(source) if not isinstance(source, list) else source} contains no "
            "text (all documents are empty or whitespace); point data.source at a non-empty corpus"
        )
    if n_docs < 2:
        raise DsvError(
            f"the corpus has {n_docs} document(s) but needs at least 2 (one for training, one for "
            "validation); add files, or use a .jsonl file with one document per line"
        )


def _merge(cfg: Config, key: str, sources, fingerprint, tasks, records, tok, dtype: str) -> dict[str, Any]:
    """``meta.json`` content from the finished task records (checks the split sizes)."""
    d = cfg.data
    shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for t, rec in enumerate(records):
        names = shard_names(t)
        for s in SPLITS:
            info = rec["splits"][s]
            if info["n_tokens"]:
                shards[s].append(
                    {
                        "file": f"shards/{names[f'{s}.bin']}",
                        "index": f"shards/{names[f'{s}.idx']}",
                        "corpus": rec["corpus"],
                        **info,
                    }
                )
    total = {s: {k: sum(x[k] for x in shards[s]) for k in ("n_docs", "n_tokens", "n_bytes")} for s in SPLITS}
    _check_documents(total["train"]["n_docs"] + total["val"]["n_docs"], d.source)
    need = d.seq_len + 1
    for s, fix in (("val", "raise data.val_fraction"), ("train", "use a larger corpus")):
        if total[s]["n_tokens"] < need:
            raise DsvError(
                f"the {'validation' if s == 'val' else 'training'} split has {total[s]['n_tokens']} tokens "
                f"but one sample needs data.seq_len+1={need}; lower data.seq_len or {fix}"
            )
    corpora = []
    for c, (src, w) in enumerate(sources):
        corpora.append(
            {
                "source": describe_source(src),
                "weight": w,
                "fingerprint": fingerprint[c],
                "n_tokens": {s: sum(x["n_tokens"] for x in shards[s] if x["corpus"] == c) for s in SPLITS},
                "n_docs": {s: sum(x["n_docs"] for x in shards[s] if x["corpus"] == c) for s in SPLITS},
            }
        )
    for c in corpora:
        if len(corpora) > 1 and c["n_tokens"]["train"] < need:
            raise DsvError(
                f"corpus {c['source']} of the blend has {c['n_tokens']['train']} training tokens, fewer "
                f"than one sample (data.seq_len+1={need}); remove it from data.source or lower data.seq_len"
            )
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": corpora[0]["source"] if len(corpora) == 1 else [c["source"] for c in corpora],
        "vocab_size": cfg.model.vocab_size,
        "tokenizer_vocab_size": tok.vocab_size,
        "seq_len": d.seq_len,
        "dtype": dtype,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "n_docs": {s: total[s]["n_docs"] for s in SPLITS},
        "n_tokens": {s: total[s]["n_tokens"] for s in SPLITS},
        "n_bytes": {s: total[s]["n_bytes"] for s in SPLITS},
        "shards": shards,
        "corpora": corpora,
        "n_tasks": len(tasks),
        "shard_mb": d.shard_mb,
        "text_field": d.text_field,
        "val_fraction": d.val_fraction,
        "tokenizer_sample_size": d.tokenizer_sample_size,
        "seed": cfg.train.seed,
        "source_fingerprint": fingerprint[0] if len(corpora) == 1 else fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if len(corpora) > 1:
        from data_pipeline.dataset import blend_report

        meta["blend"] = blend_report(meta, d.seq_len, cfg.train.seed)
    return meta
