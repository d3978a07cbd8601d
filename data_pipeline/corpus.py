"""Corpus discovery and loading: every source becomes a ``datasets.Dataset`` of documents.

``data.source`` may be

* ``None`` / ``""``: the Python standard library source of the running interpreter
  (:func:`default_corpus_files`): real code and prose by many authors, present on every
  machine. On CPython 3.11 that is about 730 files / 12 MB.
* a local ``.txt`` / ``.py`` / ``.md`` file: one document per file;
* a local ``.jsonl`` / ``.json`` file: one document per record, text in ``text_field``; also
  compressed as ``.jsonl.gz`` / ``.json.gz`` (and ``.jsonl.zst`` when the ``zstandard``
  module is installed), which ``datasets`` decompresses while reading;
* a local ``.parquet`` file: one document per row, text in ``text_field``;
* a local folder: all files of the kinds above, found recursively, mixed by extension;
* anything else: a ``datasets`` hub name, loaded with ``split="train"`` (needs network or
  a populated hub cache).

Folder scans skip hidden files and folders (names starting with ``.``). Text files are read
with universal newlines (``"\\r\\n"`` and ``"\\r"`` become ``"\\n"``). Whitespace-only documents
are dropped. Every failure is a one-line :class:`DsvError`.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv3.errors import DsvError

if TYPE_CHECKING:  # imported where a corpus is read: it adds most of a second to every process's start
    import datasets

TEXT_EXTS = (".txt", ".py", ".md")
#: Compressed JSON lines: only the compressions ``datasets`` can decompress in this environment.
COMPRESSED_JSON_EXTS = (".jsonl.gz", ".json.gz") + ((".jsonl.zst",) if importlib.util.find_spec("zstandard") else ())
JSON_EXTS = (".jsonl", ".json") + COMPRESSED_JSON_EXTS
PARQUET_EXTS = (".parquet",)
SUPPORTED_EXTS = TEXT_EXTS + JSON_EXTS + PARQUET_EXTS

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def file_ext(path: Path | str) -> str:
    """The lower-case extension of ``path`` that decides its reader: a supported compound
    extension (``".jsonl.gz"``) if it has one, else its last suffix (``".txt"``)."""
    name = Path(path).name.lower()
    for ext in COMPRESSED_JSON_EXTS:
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder (``sysconfig`` ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The default corpus: the ``*.py`` files of the running interpreter's standard library.

    Files under ``site-packages``/``dist-packages`` (third-party code) and ``test``/``tests``
    /``idle_test`` folders (large generated fixtures) are excluded, as are the rare files
    that are not valid UTF-8. On CPython 3.11 this is about 730 files, 12 MB.

    Returns:
        Absolute paths, sorted.

    Raises:
        DsvError: the standard library source is not installed (e.g. a stripped-down
            interpreter that ships only ``.pyc`` files).
    """
    root = stdlib_dir()
    files = []
    if root.is_dir():
        for path in root.rglob("*.py"):
            if _EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1]) or not path.is_file():
                continue
            if first_bad_utf8(path) is None:
                files.append(path)
    if not files:
        raise DsvError(
            f"the default corpus (Python standard library sources under {root}) was not found; "
            "set data.source to a local text/jsonl/parquet file or folder"
        )
    return sorted(files)


def first_bad_utf8(path: Path) -> int | None:
    """Byte offset of the first undecodable byte of ``path``, or None if it is valid UTF-8."""
    decoder_chunk = 1 << 22
    try:
        with open(path, "rb") as f:
            dec = codecs.getincrementaldecoder("utf-8")()
            pos = 0
            while True:
                block = f.read(decoder_chunk)
                try:
                    dec.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    return pos + max(exc.start, 0)
                if not block:
                    return None
                pos += len(block)
    except OSError:
        return None


def _is_pathlike(source: str) -> bool:
    """Whether a non-existing ``source`` was meant as a local path rather than a hub name."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or "\\" in source
        or source.lower().endswith(SUPPORTED_EXTS)
    )


def resolve_source(source: str | None) -> tuple[str, list[Path] | None]:
    """Classify a ``data.source`` value and list its files.

    Args:
        source: the config value.

    Returns:
        ``(kind, files)``: kind is ``"default"``, ``"local"`` or ``"hub"``; files are the
        sorted document files (None for ``"hub"``).

    Raises:
        DsvError: a path that does not exist, a file of an unsupported kind, or a folder
            with no supported files.
    """
    if source is None or not str(source).strip():
        return "default", default_corpus_files()
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        if file_ext(path) not in SUPPORTED_EXTS:
            raise DsvError(
                f"data.source={source} has unsupported type {file_ext(path) or '(none)'!r}; use "
                f"{'/'.join(SUPPORTED_EXTS)} files or a folder of them"
            )
        return "local", [path.resolve()]
    if path.is_dir():
        files = sorted(
            p.resolve()
            for p in path.rglob("*")
            if file_ext(p) in SUPPORTED_EXTS
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DsvError(
                f"data.source={source} is a folder with no {'/'.join(SUPPORTED_EXTS)} files; "
                "add documents or point data.source elsewhere"
            )
        return "local", files
    if _is_pathlike(source):
        raise DsvError(
            f"data.source={source} does not exist; fix the path (or leave data.source empty "
            "for the built-in Python standard library corpus)"
        )
    return "hub", None


def source_fingerprint(source: str | None) -> dict[str, Any]:
    """A JSON-able description of a source that changes whenever its content may have changed.

    Local sources are described by resolved path plus each file's size and mtime; the
    default corpus additionally by the interpreter's stdlib path and Python version; a hub
    name only by its name.

    Raises:
        DsvError: as :func:`resolve_source`.
    """
    kind, files = resolve_source(source)
    if kind == "hub":
        return {"kind": "hub", "name": str(source)}
    digest = hashlib.sha256()
    total = 0
    for f in files:
        st = f.stat()
        total += st.st_size
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    out: dict[str, Any] = {"kind": kind, "n_files": len(files), "bytes": total, "files_sha256": digest.hexdigest()}
    if kind == "default":
        out.update(stdlib=str(stdlib_dir()), python=sys.version.split()[0], implementation=sys.implementation.name)
    else:
        out["path"] = str(Path(str(source)).expanduser().resolve())
    return out


def describe_source(source: str | None) -> str:
    """Human-readable name of a source for logs and ``meta.json``."""
    if source is None or not str(source).strip():
        return f"python-stdlib:{stdlib_dir()}"
    return str(source)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Turn ``datasets`` progress bars on or off for the duration of a ``with`` block."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def first_line(exc: BaseException) -> str:
    while exc.__cause__ is not None and not str(exc).strip():
        exc = exc.__cause__
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _raise_unreadable(source: str, files: list[Path], exc: BaseException) -> None:
    """Turn a ``datasets`` loading failure on local files into a precise DsvError."""
    for f in files:
        if file_ext(f) in TEXT_EXTS + JSON_EXTS and file_ext(f) not in COMPRESSED_JSON_EXTS:
            bad = first_bad_utf8(f)
            if bad is not None:
                raise DsvError(
                    f"file {f} is not valid UTF-8 (bad byte at offset {bad}); re-encode it as UTF-8 "
                    "or remove it from data.source"
                ) from None
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    raise DsvError(
        f"could not read data.source={source} ({first_line(cause)}); check that the files are valid text/jsonl/parquet"
    ) from None


def _text_column(ds: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    """Reduce ``ds`` to a single string column named ``text``."""
    import datasets

    if text_field not in ds.column_names:
        raise DsvError(
            f"{where} has no column {text_field!r} (columns: {', '.join(ds.column_names) or 'none'}); "
            "set data.text_field to the column holding the text"
        )
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DsvError(
            f"{where} column {text_field!r} holds {feature}, not text; set data.text_field to a string column"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds


def _load_local(source: str, files: list[Path], text_field: str, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    groups = {
        "text": [str(f) for f in files if file_ext(f) in TEXT_EXTS],
        "json": [str(f) for f in files if file_ext(f) in JSON_EXTS],
        "parquet": [str(f) for f in files if file_ext(f) in PARQUET_EXTS],
    }
    parts = []
    for builder, paths in groups.items():
        if not paths:
            continue
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(
                builder, data_files=[glob.escape(p) for p in paths], split="train", cache_dir=cache_dir, **kwargs
            )
        except Exception as exc:  # datasets wraps parser errors in several exception types
            _raise_unreadable(source, [Path(p) for p in paths], exc)
        where = f"data.source={source} ({builder} files)" if len(paths) > 1 else f"file {paths[0]}"
        parts.append(_text_column(ds, "text" if builder == "text" else text_field, where))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_hub(source: str, text_field: str, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    try:
        ds = datasets.load_dataset(source, split="train", cache_dir=cache_dir)
    except Exception as exc:
        raise DsvError(
            f"data.source={source} is neither an existing file/folder nor a loadable dataset "
            f"({first_line(exc)}); give a local path, or a datasets hub name with network access "
            "or a populated cache"
        ) from None
    return _text_column(ds, text_field, f"dataset {source}")


def load_corpus(source: str | None, text_field: str = "text", cache_dir: str | Path | None = None) -> datasets.Dataset:
    """Load a corpus as documents.

    Args:
        source: ``data.source`` (see the module docstring for the accepted forms).
        text_field: column with the text for jsonl/json/parquet/hub sources.
        cache_dir: ``datasets`` cache folder (None = the ``datasets`` default);
            :func:`data_pipeline.prepare.prepare` passes ``<dsv3 cache>/hf_datasets``.

    Returns:
        A ``datasets.Dataset`` with one row per non-blank document and the single string
        column ``text``; order follows the sorted file list (text files, then json, then
        parquet), then row order within files.

    Raises:
        DsvError: missing path; unsupported file; folder without supported files; a file
            that is not UTF-8 (named); a json/parquet/hub source without ``text_field``
            (columns listed); a hub name that cannot be loaded; no non-blank text at all.
    """
    kind, files = resolve_source(source)
    cache = str(cache_dir) if cache_dir is not None else None
    label = describe_source(source)
    if kind == "hub":
        ds = load_hub(str(source), text_field, cache)  # download progress stays visible
    else:
        with progress_bars(False):  # reading local files is quick; keep stderr clean
            ds = _load_local(label, files, text_field, cache)
    with progress_bars(False):
        ds = ds.filter(
            lambda batch: [isinstance(t, str) and not t.isspace() and t != "" for t in batch["text"]],
            batched=True,
            batch_size=1000,
            keep_in_memory=True,
        )
    if len(ds) == 0:
        raise DsvError(
            f"data.source={label} contains no text (all documents are empty or whitespace); "
            "point data.source at a non-empty corpus"
        )
    return ds
