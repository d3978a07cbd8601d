"""Split a corpus into independent tokenization tasks and stream each task's documents.

A *task* is a JSON-able dict naming a contiguous piece of one corpus; tasks are planned
from file sizes alone (nothing is read), so the plan is cheap and deterministic, and the
documents of all tasks in plan order are the documents of the corpus in order:

* ``{"kind": "files", "files": [...]}`` - consecutive small ``.txt``/``.py``/``.md`` files,
  one document per file, grouped until about ``shard_bytes`` of input;
* ``{"kind": "textsplit", "file": f, "start": a, "end": b}`` - a byte range of a text file
  larger than ``shard_bytes``. Such a file is not one document: it is cut into documents of
  about :data:`TEXT_PIECE_BYTES` at blank lines (``"\\n\\n"``; at a newline if a piece has
  no blank line, at a character boundary if it has no newline). Range ends are moved to the
  next cut by the same rule, so neighbouring tasks neither overlap nor leave a gap;
* ``{"kind": "jsonl", "file": f, "start": a, "end": b}`` - the JSON lines that *start* in
  byte range ``[a, b)`` of a ``.jsonl`` file (one document per record, text in
  ``text_field``); a ``.json`` file holding one array is a single task;
* ``{"kind": "parquet", "file": f, "row_groups": [i, j]}`` - row groups ``i..j-1``;
* ``{"kind": "hub", "name": n, "start": r0, "end": r1}`` - rows of a ``datasets`` hub corpus.

Every task also carries ``"corpus"``: the index of the corpus in a blended source.
Text is decoded as UTF-8 with universal newlines (``"\\r\\n"``/``"\\r"`` -> ``"\\n"``);
whitespace-only documents are dropped; a file that is not UTF-8 fails with one line naming
it and the byte offset.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterator

from data_pipeline.corpus import JSON_EXTS, PARQUET_EXTS, TEXT_EXTS, _first_bad_utf8, resolve_source
from dsv3.errors import DsvError

#: Target size of one document cut from a large text file (see the module docstring).
TEXT_PIECE_BYTES = 1 << 20
#: How far past a cut point a blank line / newline is searched for.
_SEARCH_BYTES = 1 << 20


def plan_tasks(source: str | None, shard_bytes: int, corpus: int = 0, text_field: str = "text",
               cache_dir: str | None = None) -> list[dict[str, Any]]:
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
        return [{"corpus": corpus, "kind": "hub", "name": str(source), "start": s, "end": min(n, s + rows)}
                for s in range(0, n, rows)]
    tasks: list[dict[str, Any]] = []
    group: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal group, size
        if group:
            tasks.append({"corpus": corpus, "kind": "files", "files": group})
        group, size = [], 0

    for f in files:
        ext = f.suffix.lower()
        n = f.stat().st_size
        if ext in TEXT_EXTS and n <= shard_bytes:
            if size + n > shard_bytes:
                flush()
            group.append(str(f))
            size += n
            continue
        flush()
        if ext in TEXT_EXTS or (ext in JSON_EXTS and not _is_json_array(f)):
            step = shard_bytes
            kind_ = "textsplit" if ext in TEXT_EXTS else "jsonl"
            for a in range(0, max(n, 1), step):
                tasks.append({"corpus": corpus, "kind": kind_, "file": str(f), "start": a, "end": min(n, a + step)})
        elif ext in JSON_EXTS:
            tasks.append({"corpus": corpus, "kind": "jsonl", "file": str(f), "start": 0, "end": n})
        elif ext in PARQUET_EXTS:
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as exc:
                raise DsvError(f"file {f} is not a readable parquet file ({type(exc).__name__}); fix or remove it") from None
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
    from data_pipeline.corpus import _load_hub

    return _load_hub(name, text_field, cache_dir)


def _decode(data: bytes, path: str, offset: int = 0) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DsvError(f"file {path} is not valid UTF-8 (bad byte at offset {offset + exc.start}); re-encode it "
                       "as UTF-8 or remove it from data.source") from None
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


def _record_text(rec: Any, field: str, where: str) -> str | None:
    if not isinstance(rec, dict):
        raise DsvError(f"{where} holds a {type(rec).__name__}, not a JSON object; write one object per line with "
                       f"the text in {field!r}")
    if field not in rec:
        raise DsvError(f"{where} has no column {field!r} (columns: {', '.join(map(str, rec)) or 'none'}); "
                       "set data.text_field to the column holding the text")
    text = rec[field]
    if text is not None and not isinstance(text, str):
        raise DsvError(f"{where} column {field!r} holds {type(text).__name__}, not text; set data.text_field to a "
                       "string column")
    return text


def _jsonl_texts(task: dict[str, Any], field: str) -> Iterator[str | None]:
    path, start, end = task["file"], task["start"], task["end"]
    if _is_json_array(Path(path)):
        try:
            data = json.loads(_decode(Path(path).read_bytes(), path))
        except ValueError as exc:
            raise DsvError(f"file {path} is not valid JSON ({exc}); fix it or remove it from data.source") from None
        for rec in data if isinstance(data, list) else [data]:
            yield _record_text(rec, field, f"file {path}")
        return
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
                    bad = _first_bad_utf8(Path(path))
                    raise DsvError(f"file {path} is not valid UTF-8 (bad byte at offset {bad}); re-encode it as UTF-8 "
                                   "or remove it from data.source") from None
                except ValueError as exc:
                    raise DsvError(f"file {path} line at byte {pos} is not valid JSON ({exc}); fix the line or remove "
                                   "the file from data.source") from None
                yield _record_text(rec, field, f"file {path}")
            pos += len(line)


def _parquet_texts(task: dict[str, Any], field: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    path = task["file"]
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DsvError(f"file {path} has no column {field!r} (columns: {', '.join(pf.schema_arrow.names) or 'none'}); "
                       "set data.text_field to the column holding the text")
    import pyarrow as pa

    typ = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DsvError(f"file {path} column {field!r} holds {typ}, not text; set data.text_field to a string column")
    g0, g1 = task["row_groups"]
    for batch in pf.iter_batches(batch_size=1024, row_groups=list(range(g0, g1)), columns=[field]):
        yield from batch.column(0).to_pylist()


def iter_documents(task: dict[str, Any], text_field: str = "text", cache_dir: str | None = None) -> Iterator[str]:
    """The documents of one task, in order, as ``str`` (blank ones dropped).

    Raises:
        DsvError: a file that is not UTF-8 / not valid JSON, or a record without a text
            ``text_field`` (one line naming the file).
    """
    kind = task["kind"]
    if kind == "files":
        texts: Iterator[str | None] = (_decode(Path(p).read_bytes(), p) for p in task["files"])
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
    if task["kind"] == "files":
        return sum(os.path.getsize(p) for p in task["files"])
    if task["kind"] in ("textsplit", "jsonl"):
        return task["end"] - task["start"]
    if task["kind"] == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(task["file"]).metadata
        return sum(meta.row_group(g).total_byte_size for g in range(*task["row_groups"]))
    return (task["end"] - task["start"]) * 2048
