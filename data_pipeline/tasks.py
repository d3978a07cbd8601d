"""Split a corpus into independent tokenization tasks and stream each task's documents.

A *task* is a JSON-able dict naming a contiguous piece of one corpus; tasks are planned
from file sizes alone (nothing is read but parquet footers and the first bytes of ``.json``
files), so the plan is cheap and deterministic, and the documents of all tasks in plan order
are the documents of the corpus in order. Files up to ``shard_bytes`` are read whole, through
``datasets`` (its ``text``, ``json`` and ``parquet`` builders, streaming, so nothing is
loaded whole or written to its cache); consecutive files of one reader are grouped until
about ``shard_bytes`` of input:

* ``{"kind": "files", "files": [...]}`` - ``.txt``/``.py``/``.md`` files, one document per
  file (``datasets`` ``text`` with ``sample_by="document"``);
* ``{"kind": "json_files", "files": [...]}`` - ``.jsonl``/``.json`` files, one document per
  record, text in ``text_field`` (``datasets`` ``json``). Compressed files (``.jsonl.gz``,
  ``.json.gz``, ``.jsonl.zst`` with ``zstandard``) are always read whole, whatever their
  size, since they cannot be entered at an offset; so is a ``.json`` file holding one array;
* ``{"kind": "parquet_files", "files": [...]}`` - ``.parquet`` files, one document per row
  (``datasets`` ``parquet``, only the ``text_field`` column read).

A single file larger than ``shard_bytes`` must still be spread over workers and nodes, and
``datasets`` can only read a file from its start, so such files are split here:

* ``{"kind": "textsplit", "file": f, "start": a, "end": b}`` - a byte range of a text file.
  Such a file is not one document: it is cut into documents of about
  :data:`TEXT_PIECE_BYTES` at blank lines (``"\\n\\n"``; at a newline if a piece has no
  blank line, at a character boundary if it has no newline). Range ends are moved to the
  next cut by the same rule, so neighbouring tasks neither overlap nor leave a gap;
* ``{"kind": "jsonl", "file": f, "start": a, "end": b}`` - the JSON lines that *start* in
  byte range ``[a, b)`` of an uncompressed ``.jsonl`` (or JSON-lines ``.json``) file;
* ``{"kind": "parquet", "file": f, "row_groups": [i, j]}`` - row groups ``i..j-1`` of a
  parquet file (read with pyarrow, the parquet engine of ``datasets``).

Hub corpora: ``{"kind": "hub", "name": n, "start": r0, "end": r1}`` - rows of a
``datasets`` hub corpus.

Every task also carries ``"corpus"``: the index of the corpus in a blended source.
Text files are decoded as UTF-8 with universal newlines (``"\\r\\n"``/``"\\r"`` ->
``"\\n"``; JSON strings are kept as written); whitespace-only documents are dropped, as are
records whose ``text_field`` is null or missing (a whole file read by ``datasets`` without
that column, or a split file whose first record lacks it, is an error); a file that is not
UTF-8 fails with one line naming it (and the byte offset, for an uncompressed file).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipeline.corpus import (
    COMPRESSED_JSON_EXTS,
    JSON_EXTS,
    TEXT_EXTS,
    file_ext,
    first_bad_utf8,
    first_line,
    resolve_source,
)
from dsv3.errors import DsvError

#: Target size of one document cut from a large text file (see the module docstring).
TEXT_PIECE_BYTES = 1 << 20
#: How far past a cut point a blank line / newline is searched for.
_SEARCH_BYTES = 1 << 20


def plan_tasks(
    source: str | None, shard_bytes: int, corpus: int = 0, text_field: str = "text", cache_dir: str | None = None
) -> list[dict[str, Any]]:
    """The tasks of one corpus, in corpus order.

    Args:
        source: one ``data.source`` path / hub name (None = the default corpus).
        shard_bytes: target input bytes per task (> 0).
        corpus: index stored in every task (blended sources).
        text_field: column of hub corpora (checked here, before any task runs).
        cache_dir: ``datasets`` cache of hub corpora.

    Returns:
        A list of task dicts (see the module docstring).

    Raises:
        DsvError: as :func:`data_pipeline.corpus.resolve_source`, or a hub corpus that cannot
            be loaded or lacks ``text_field``.
    """
    shard_bytes = max(1, int(shard_bytes))
    kind, files = resolve_source(source)
    if kind == "hub":
        n = len(_hub_dataset(str(source), text_field, cache_dir))
        rows = max(1, shard_bytes // 2048)  # hub rows: assume ~2 KB per document
        return [
            {"corpus": corpus, "kind": "hub", "name": str(source), "start": s, "end": min(n, s + rows)}
            for s in range(0, n, rows)
        ]
    tasks: list[dict[str, Any]] = []
    group: list[str] = []
    group_kind = ""
    size = 0

    def flush() -> None:
        nonlocal group, size
        if group:
            tasks.append({"corpus": corpus, "kind": group_kind, "files": group})
        group, size = [], 0

    for f in files:
        ext = file_ext(f)
        n = f.stat().st_size
        kind_ = "files" if ext in TEXT_EXTS else "json_files" if ext in JSON_EXTS else "parquet_files"
        whole = n <= shard_bytes or ext in COMPRESSED_JSON_EXTS or (ext in JSON_EXTS and _is_json_array(f))
        if whole:
            if group and (kind_ != group_kind or size + n > shard_bytes):
                flush()
            group_kind = kind_
            group.append(str(f))
            size += n
            continue
        flush()
        if ext in TEXT_EXTS or ext in JSON_EXTS:
            kind_ = "textsplit" if ext in TEXT_EXTS else "jsonl"
            for a in range(0, n, shard_bytes):
                tasks.append(
                    {"corpus": corpus, "kind": kind_, "file": str(f), "start": a, "end": min(n, a + shard_bytes)}
                )
        else:
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as exc:
                raise DsvError(
                    f"file {f} is not a readable parquet file ({type(exc).__name__}); fix or remove it"
                ) from None
            start, acc = 0, 0
            for g in range(meta.num_row_groups):
                acc += meta.row_group(g).total_byte_size
                if acc >= shard_bytes or g == meta.num_row_groups - 1:
                    tasks.append({"corpus": corpus, "kind": "parquet", "file": str(f), "row_groups": [start, g + 1]})
                    start, acc = g + 1, 0
    flush()
    return tasks


def _is_json_array(path: Path) -> bool:
    """Whether a ``.json`` file holds one JSON array/object rather than JSON lines."""
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        return True
    if not head.startswith(b"{"):
        return False
    # one object per line (JSON lines) or one object spanning the file?
    with open(path, "rb") as f:
        first = f.readline()
    try:
        json.loads(first)
        return False
    except ValueError:
        return True


@functools.lru_cache(maxsize=2)
def _hub_dataset(name: str, text_field: str, cache_dir: str | None):
    """The hub corpus (memory-mapped Arrow), loaded once per process."""
    from data_pipeline.corpus import load_hub

    return load_hub(name, text_field, cache_dir)


def _decode(data: bytes, path: str, offset: int = 0) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DsvError(
            f"file {path} is not valid UTF-8 (bad byte at offset {offset + exc.start}); re-encode it "
            "as UTF-8 or remove it from data.source"
        ) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _cut(f, size: int, pos: int) -> int:
    """The document cut at or after byte ``pos`` of a large text file (module docstring)."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    f.seek(pos - 1)
    window = f.read(_SEARCH_BYTES + 1)
    i = window.find(b"\n\n")
    if i >= 0:
        return pos - 1 + i + 2
    i = window.find(b"\n")
    if i >= 0:
        return pos - 1 + i + 1
    j = 1  # no newline: the next UTF-8 character start
    while j < len(window) and (window[j] & 0xC0) == 0x80:
        j += 1
    return min(size, pos - 1 + j)


def _text_pieces(task: dict[str, Any]) -> Iterator[str]:
    path = task["file"]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        a, end = _cut(f, size, task["start"]), _cut(f, size, task["end"])
        while a < end:
            b = min(end, max(a + 1, _cut(f, size, a + TEXT_PIECE_BYTES)))
            f.seek(a)
            yield _decode(f.read(b - a), path, a)
            a = b


def _not_utf8(path: str) -> DsvError:
    """The one-line error for a file that is not UTF-8 (with the offset when it can be found)."""
    bad = None if file_ext(path) in COMPRESSED_JSON_EXTS else first_bad_utf8(Path(path))
    where = f" (bad byte at offset {bad})" if bad is not None else ""
    return DsvError(f"file {path} is not valid UTF-8{where}; re-encode it as UTF-8 or remove it from data.source")


def _record_text(rec: Any, field: str, where: str) -> str | None:
    if not isinstance(rec, dict):
        raise DsvError(
            f"{where} holds a {type(rec).__name__}, not a JSON object; write one object per line with "
            f"the text in {field!r}"
        )
    text = rec.get(field)
    if text is not None and not isinstance(text, str):
        raise DsvError(
            f"{where} column {field!r} holds {type(text).__name__}, not text; set data.text_field to a string column"
        )
    return text


def _no_column(path: str, field: str, columns) -> DsvError:
    return DsvError(
        f"file {path} has no column {field!r} (columns: {', '.join(map(str, columns)) or 'none'}); "
        "set data.text_field to the column holding the text"
    )


def _jsonl_texts(task: dict[str, Any], field: str) -> Iterator[str | None]:
    """Records of a byte range of a large uncompressed JSON-lines file (module docstring)."""
    path, start, end = task["file"], task["start"], task["end"]
    first = start == 0
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous task
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                try:
                    rec = json.loads(line)
                except UnicodeDecodeError:
                    raise _not_utf8(path) from None
                except ValueError as exc:
                    raise DsvError(
                        f"file {path} line at byte {pos} is not valid JSON ({exc}); fix the line or remove "
                        "the file from data.source"
                    ) from None
                text = _record_text(rec, field, f"file {path}")
                if first and field not in rec:  # judged on the file's first record, whatever the split
                    raise _no_column(path, field, rec)
                first = False
                yield text
            pos += len(line)


def _parquet_check(path: str, field: str) -> None:
    """Raise the one-line error for a parquet file without a string column ``field``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise DsvError(f"file {path} is not a readable parquet file ({type(exc).__name__}); fix or remove it") from None
    if field not in schema.names:
        raise _no_column(path, field, schema.names)
    typ = schema.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DsvError(f"file {path} column {field!r} holds {typ}, not text; set data.text_field to a string column")


def _parquet_texts(task: dict[str, Any], field: str) -> Iterator[str | None]:
    """Rows of a range of row groups of a large parquet file (module docstring)."""
    import pyarrow.parquet as pq

    path = task["file"]
    _parquet_check(path, field)
    g0, g1 = task["row_groups"]
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, row_groups=list(range(g0, g1)), columns=[field]):
        yield from batch.column(0).to_pylist()


#: Rows per batch read from a ``datasets`` stream.
_BATCH = 256


@contextlib.contextmanager
def _quiet():
    """``datasets`` without progress bars and without its own error log lines (our errors
    name the file in one line)."""
    import datasets

    from data_pipeline.corpus import progress_bars

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        with progress_bars(False):
            yield
    finally:
        datasets.logging.set_verbosity(level)


def _stream(builder: str, files: list[str], cache_dir: str | None, **kwargs):
    """``datasets.load_dataset(builder, ..., streaming=True)`` over ``files`` in order (their
    names escaped: ``data_files`` entries are glob patterns)."""
    import datasets

    return datasets.load_dataset(
        builder,
        data_files=[glob.escape(p) for p in files],
        split="train",
        streaming=True,
        cache_dir=cache_dir,
        **kwargs,
    )


def _text_files(files: list[str], cache_dir: str | None) -> Iterator[str]:
    """One document per text file, in order (``datasets`` ``text``, ``sample_by="document"``)."""
    n = 0
    try:
        with _quiet():
            ds = _stream("text", files, cache_dir, sample_by="document")
            for batch in ds.iter(batch_size=_BATCH):
                texts = batch["text"]
                n += len(texts)
                yield from texts
    except UnicodeDecodeError:
        for p in files[n:]:  # rows are files: the bad one is at or after the rows already read
            if first_bad_utf8(Path(p)) is not None:
                raise _not_utf8(p) from None
        raise
    if n != len(files):
        raise DsvError(
            f"read {n} documents from {len(files)} text files starting with {files[0]}; check that the "
            "files are readable"
        )


def _json_file(path: str, field: str, cache_dir: str | None) -> Iterator[str | None]:
    """The records of one whole JSON-lines / JSON-array file (``datasets`` ``json``)."""
    import datasets

    if os.path.getsize(path) == 0:
        return
    try:
        with _quiet():
            ds = _stream("json", [path], cache_dir)
            if ds.features is not None:  # inferred from the first block (None for a JSON array)
                if field not in ds.features:
                    raise _no_column(path, field, list(ds.features))
                feat = ds.features[field]
                if not (isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")):
                    raise DsvError(
                        f"file {path} column {field!r} holds {feat}, not text; set data.text_field to a string column"
                    )
                ds = ds.select_columns([field])
            for batch in ds.iter(batch_size=_BATCH):
                if field not in batch:
                    raise _no_column(path, field, list(batch))
                texts = batch[field]
                if ds.features is None:
                    for t in texts:
                        _record_text({field: t}, field, f"file {path}")
                yield from texts
    except DsvError:
        raise
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except Exception as exc:  # datasets/pyarrow raise several types for malformed JSON
        raise DsvError(
            f"file {path} is not valid JSON lines or a JSON array ({first_line(exc)}); fix it or remove "
            "it from data.source"
        ) from None


def _parquet_files(files: list[str], field: str, cache_dir: str | None) -> Iterator[str | None]:
    """The rows of whole parquet files (``datasets`` ``parquet``, only ``field`` read)."""
    for path in files:
        _parquet_check(path, field)
        try:
            with _quiet():
                ds = _stream("parquet", [path], cache_dir, columns=[field])
                for batch in ds.iter(batch_size=_BATCH):
                    yield from batch[field]
        except DsvError:
            raise
        except Exception as exc:
            raise DsvError(
                f"file {path} is not a readable parquet file ({first_line(exc)}); fix or remove it"
            ) from None


def iter_documents(task: dict[str, Any], text_field: str = "text", cache_dir: str | None = None) -> Iterator[str]:
    """The documents of one task, in order, as ``str`` (blank ones dropped).

    Raises:
        DsvError: a file that is not UTF-8 / not valid JSON / not parquet, a file without a
            ``text_field`` column, or a ``text_field`` that is not text (one line naming the file).
    """
    kind = task["kind"]
    if kind == "files":
        texts: Iterator[str | None] = _text_files(task["files"], cache_dir)
    elif kind == "json_files":
        texts = (t for p in task["files"] for t in _json_file(p, text_field, cache_dir))
    elif kind == "parquet_files":
        texts = _parquet_files(task["files"], text_field, cache_dir)
    elif kind == "textsplit":
        texts = _text_pieces(task)
    elif kind == "jsonl":
        texts = _jsonl_texts(task, text_field)
    elif kind == "parquet":
        texts = _parquet_texts(task, text_field)
    elif kind == "hub":
        ds = _hub_dataset(task["name"], text_field, cache_dir)
        texts = (t for b in ds.select(range(task["start"], task["end"])).iter(batch_size=1024) for t in b["text"])
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    for t in texts:
        if t and not t.isspace():
            yield t


def task_bytes(task: dict[str, Any]) -> int:
    """Approximate input bytes of a task (for progress and load balancing)."""
    if "files" in task:
        return sum(os.path.getsize(p) for p in task["files"])
    if task["kind"] in ("textsplit", "jsonl"):
        return task["end"] - task["start"]
    if task["kind"] == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(task["file"]).metadata
        return sum(meta.row_group(g).total_byte_size for g in range(*task["row_groups"]))
    return (task["end"] - task["start"]) * 2048
