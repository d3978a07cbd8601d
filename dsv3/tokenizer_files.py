"""Finding and opening a tokenizer of either kind: dsv3's sentencepiece ``tokenizer.model`` or a
released model's ``tokenizer.json`` (with ``tokenizer_config.json`` / ``chat_template.jinja``).

A folder holds a tokenizer when it has ``tokenizer.json`` (a :class:`dsv3.hf_tokenizer.HFTokenizer`;
it wins when both files are there, as it does for ``transformers``) or ``tokenizer.model`` (a
:class:`dsv3.tokenizer.Tokenizer`). Run directories, checkpoints, prepared data folders and
exports keep whichever files the tokenizer consists of (``tokenizer.save(folder)``), so every
consumer opens them the same way, with :func:`open_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from dsv3.errors import DsvError
from dsv3.hf_tokenizer import HF_TOKENIZER_FILES, TOKENIZER_JSON, HFTokenizer
from dsv3.tokenizer import MODEL_FILE, Tokenizer

#: Every file name a tokenizer of either kind may consist of.
TOKENIZER_FILES = (MODEL_FILE, *HF_TOKENIZER_FILES)


def find_tokenizer(folder: Path | str) -> Path | None:
    """The main tokenizer file in ``folder`` (``tokenizer.json``, else ``tokenizer.model``), or None."""
    folder = Path(folder)
    for name in (TOKENIZER_JSON, MODEL_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


def open_tokenizer(path: Path | str) -> Tokenizer | HFTokenizer:
    """Open the tokenizer at ``path``: a ``.model`` file, a ``tokenizer.json`` (or any ``.json``)
    file, or a folder holding either (see the module docstring).

    Raises:
        DsvError: nothing there, or the files do not load (the message says which and why).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        found = find_tokenizer(p)
        if found is None:
            raise DsvError(f"{p} holds no tokenizer ({TOKENIZER_JSON} or {MODEL_FILE})")
        p = found
    if not p.exists():
        raise DsvError(f"tokenizer {p} does not exist")
    if p.suffix == ".json":
        return HFTokenizer.load(p)
    return Tokenizer.load(p)


def tokenizer_files_in(folder: Path | str) -> list[Path]:
    """The tokenizer files present in ``folder`` (for copying them elsewhere as they are)."""
    folder = Path(folder)
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
