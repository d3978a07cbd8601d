"""One tokenization task of ``dsv3 prepare`` and the processes that run the tasks.

A task (:mod:`data_pipeline.tasks`) streams its documents, encodes them in batches and writes,
for each split, a token shard and its document index, then a record with sizes and sha256
checksums (:func:`run_task`); :func:`task_done` says whether a task's files are complete and
intact. The train/validation split rule is :func:`val_offset` / :func:`is_val` (see
:mod:`data_pipeline.prepare`). :func:`run_tasks` runs the tasks on ``data.num_proc`` worker
processes and shows their progress.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
import zlib
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.tasks import iter_documents, task_bytes
from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_text
from dsv3.tokenizer_files import open_tokenizer

SPLITS = ("train", "val")
#: characters of text encoded per batch
ENCODE_BATCH_CHARS = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def val_offset(task_index: int, val_fraction: float, seed: int) -> float:
    """``u_t`` of the split rule (module docstring): ``1 - f`` for task 0, else a seeded uniform."""
    if task_index == 0:
        return 1.0 - val_fraction
    return zlib.crc32(f"{seed}:{task_index}".encode()) / 2**32


def is_val(j: int, u: float, val_fraction: float) -> bool:
    """Whether document ``j`` of a task with offset ``u`` is held out for validation."""
    return int((j + 1) * val_fraction + u) > int(j * val_fraction + u)


# ----------------------------------------------------------------------------- one task


def shard_names(t: int) -> dict[str, str]:
    """The file names of task ``t``: its record, and per split its token shard and document index."""
    names = {"record": f"task-{t:05d}.json"}
    for s in SPLITS:
        names[f"{s}.bin"] = f"{s}-{t:05d}.bin"
        names[f"{s}.idx"] = f"{s}-{t:05d}.idx.npy"
    return names


def task_done(shards: Path, t: int, verify: bool = True) -> dict[str, Any] | None:
    """The record of task ``t`` if it is finished and its files are intact, else None.

    Intact: every shard and index exists with the recorded size and, when ``verify``,
    the recorded sha256.
    """
    names = shard_names(t)
    try:
        rec = json.loads((shards / names["record"]).read_text(encoding="utf-8"))
        for s in SPLITS:
            info = rec["splits"][s]
            path = shards / names[f"{s}.bin"]
            if path.stat().st_size != info["n_tokens"] * rec["itemsize"]:
                return None
            ends = np.load(shards / names[f"{s}.idx"])
            if len(ends) != info["n_docs"] or (len(ends) and int(ends[-1]) != info["n_tokens"]):
                return None
            if verify and file_sha256(path) != info["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec


class _Counter:
    """Progress counts of one process, flushed to a queue (or a callback) now and then."""

    def __init__(self, sink):
        self.sink = sink
        self.pending = np.zeros(3, dtype=np.int64)  # docs, bytes, tokens
        self.last = time.monotonic()

    def add(self, docs: int, nbytes: int, tokens: int, force: bool = False) -> None:
        self.pending += (docs, nbytes, tokens)
        now = time.monotonic()
        if self.sink is not None and (force or now - self.last > 0.5):
            self.sink(("progress", *self.pending.tolist()))
            self.pending[:] = 0
            self.last = now


def _encode_flat(tok, texts: list[str], eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``texts``; returns (all ids with EOS after each document, lengths incl. EOS). A
    tokenizer with ``add_bos`` also starts each document with BOS."""
    ids = tok.encode_batch(texts, bos=tok.add_bos, num_threads=1)
    lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lens.sum()), dtype=dtype)
    ends = np.cumsum(lens)
    mask = np.ones(len(flat), dtype=bool)
    mask[ends - 1] = False
    flat[mask] = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(mask.sum()))
    flat[ends - 1] = eos
    return flat, lens


def run_task(
    t: int,
    task: dict[str, Any],
    tok,
    shards: Path,
    dtype: str,
    val_fraction: float,
    seed: int,
    text_field: str,
    cache_dir: str | None,
    counter: _Counter | None = None,
) -> dict[str, Any]:
    """Tokenize task ``t`` into its shards and record (see the module docstring).

    Every file is written under a temporary name and renamed; the record is written last.

    Returns:
        The task record: ``{"task", "corpus", "itemsize", "splits": {split: {"n_docs",
        "n_tokens", "n_bytes", "sha256"}}}``.

    Raises:
        DsvError: unreadable input (see :func:`data_pipeline.tasks.iter_documents`).
    """
    names = shard_names(t)
    np_dtype = np.dtype(dtype).newbyteorder("<")
    u = val_offset(t, val_fraction, seed)
    tmp = {s: shards / f".{names[f'{s}.bin']}.tmp" for s in SPLITS}
    files = {s: open(tmp[s], "wb") for s in SPLITS}
    digests = {s: hashlib.sha256() for s in SPLITS}
    lens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    n_bytes = {s: 0 for s in SPLITS}
    j = 0
    try:

        def flush(batch: dict[str, list[str]]) -> None:
            for s, texts in batch.items():
                if not texts:
                    continue
                flat, ln = _encode_flat(tok, texts, tok.eos_id, np_dtype)
                data = flat.tobytes()
                files[s].write(data)
                digests[s].update(data)
                lens[s].append(ln)
                nb = sum(len(x.encode("utf-8")) for x in texts)
                n_bytes[s] += nb
                if counter is not None:
                    counter.add(len(texts), nb, len(flat))
                texts.clear()

        batch: dict[str, list[str]] = {s: [] for s in SPLITS}
        chars = 0
        for text in iter_documents(task, text_field, cache_dir):
            batch["val" if is_val(j, u, val_fraction) else "train"].append(text)
            j += 1
            chars += len(text)
            if chars >= ENCODE_BATCH_CHARS:
                flush(batch)
                chars = 0
        flush(batch)
        splits = {}
        for s in SPLITS:
            files[s].flush()
            os.fsync(files[s].fileno())
            files[s].close()
            ln = np.concatenate(lens[s]) if lens[s] else np.zeros(0, dtype=np.int64)
            ends = np.cumsum(ln).astype(np.int64)
            idx_tmp = shards / f".{names[f'{s}.idx']}.tmp.npy"
            np.save(idx_tmp, ends)
            os.replace(idx_tmp, shards / names[f"{s}.idx"])
            os.replace(tmp[s], shards / names[f"{s}.bin"])
            splits[s] = {
                "n_docs": int(len(ln)),
                "n_tokens": int(ends[-1]) if len(ends) else 0,
                "n_bytes": n_bytes[s],
                "sha256": digests[s].hexdigest(),
            }
    finally:
        for s in SPLITS:
            files[s].close()
            tmp[s].unlink(missing_ok=True)
    rec = {"task": t, "corpus": task["corpus"], "itemsize": np_dtype.itemsize, "splits": splits}
    atomic_write_text(shards / names["record"], json.dumps(rec, indent=1))
    if counter is not None:
        counter.add(0, 0, 0, force=True)
    return rec


# worker-process state (set by the pool initializer)
_W: dict[str, Any] = {}


def _worker_init(queue, args) -> None:
    _W["queue"], _W["args"] = queue, args
    _W["tok"] = open_tokenizer(args["model"])


def _worker_run(item: tuple[int, dict]) -> tuple[str, Any]:
    t, task = item
    a = _W["args"]
    try:
        rec = run_task(
            t,
            task,
            _W["tok"],
            Path(a["shards"]),
            a["dtype"],
            a["val_fraction"],
            a["seed"],
            a["text_field"],
            a["cache_dir"],
            _Counter(_W["queue"].put),
        )
        return "done", rec
    except DsvError as exc:
        return "error", str(exc)


# ----------------------------------------------------------------------------- progress


class Progress:
    """docs/s, MB/s and tokens/s of a running prepare: a redrawn line on a terminal, a plain
    line every ``every`` seconds otherwise (stderr), nothing when disabled."""

    def __init__(self, enabled: bool, n_tasks: int, done_tasks: int, every: float = 10.0):
        self.enabled = enabled
        self.tty = enabled and getattr(sys.stderr, "isatty", lambda: False)()
        self.n_tasks, self.done = n_tasks, done_tasks
        self.every = 0.5 if self.tty else every
        self.counts = np.zeros(3, dtype=np.int64)
        self.start = self.last = time.perf_counter()

    def add(self, docs: int, nbytes: int, tokens: int) -> None:
        self.counts += (docs, nbytes, tokens)
        if time.perf_counter() - self.last >= self.every:
            self.show()

    def task_done(self) -> None:
        self.done += 1
        if self.done == self.n_tasks or time.perf_counter() - self.last >= self.every:
            self.show()

    def line(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        docs, nbytes, tokens = self.counts.tolist()
        return (
            f"tokenizing: tasks {self.done}/{self.n_tasks}, {docs:,} docs, {nbytes / 1e6:.1f} MB, "
            f"{tokens:,} tokens | {docs / dt:,.0f} docs/s, {nbytes / 1e6 / dt:.2f} MB/s, {tokens / dt:,.0f} tokens/s"
        )

    def show(self, final: bool = False) -> None:
        self.last = time.perf_counter()
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + self.line() + ("\n" if final else ""))
        else:
            sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()


def run_tasks(todo: list[tuple[int, dict]], args: dict[str, Any], num_proc: int, progress: Progress) -> None:
    """Run tasks, in this process (``num_proc`` 1) or over a pool of worker processes.

    Raises:
        DsvError: the first task that failed (the others finish or are stopped).
    """
    if not todo:
        return
    if num_proc <= 1 or len(todo) == 1:
        tok = open_tokenizer(args["model"])
        for t, task in todo:
            run_task(
                t,
                task,
                tok,
                Path(args["shards"]),
                args["dtype"],
                args["val_fraction"],
                args["seed"],
                args["text_field"],
                args["cache_dir"],
                _Counter(lambda m: progress.add(*m[1:])),
            )
            progress.task_done()
        return
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    queue = ctx.SimpleQueue()
    # largest tasks first: the pool's tail is shorter
    order = sorted(todo, key=lambda it: -task_bytes(it[1]))
    with ctx.Pool(min(num_proc, len(todo)), initializer=_worker_init, initargs=(queue, args)) as pool:
        results = pool.imap_unordered(_worker_run, order)
        remaining = len(order)
        while remaining:
            try:
                status, value = results.next(timeout=0.2)
            except mp.TimeoutError:
                status = None
            while not queue.empty():
                msg = queue.get()
                progress.add(*msg[1:])
            if status is None:
                continue
            remaining -= 1
            if status == "error":
                pool.terminate()
                raise DsvError(value)
            progress.task_done()
        while not queue.empty():
            progress.add(*queue.get()[1:])
