"""Conversation data for supervised fine-tuning (``dsv3 sft``).

A source is a ``.jsonl``/``.json``/``.parquet`` file or folder, or a ``datasets`` hub name,
whose rows hold a ``messages`` list of ``{"role", "content"}`` dicts. With no source, the
default data is made on the spot from the Python standard library: for every documented
public function and class, a user asks what it does and the assistant answers with its
docstring's first paragraph (parsed with ``ast``; nothing is imported or executed).

Each conversation becomes one sample of ``data.seq_len`` positions: input ids (right-padded
with the pad id) and labels from :func:`dsv3.chat_format.chat_labels` (``IGNORE_INDEX`` on system,
user, role and padding tokens): dsv3's chat format for its sentencepiece tokenizer, the
model's own chat template for a released ``tokenizer.json``. Samples are stored as two int32 ``.npy`` arrays per split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.corpus import default_corpus_files, source_fingerprint, stdlib_dir
from dsv3.config import Config
from dsv3.errors import DsvError
from dsv3.model import IGNORE_INDEX

CHAT_FORMAT_VERSION = 1
SYSTEM_PROMPT = "You answer questions about the Python standard library."


def _summary(doc: str) -> str | None:
    """First paragraph of a docstring on one line, or None if unsuitable as an answer."""
    para = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in para.splitlines()).strip()
    if not 20 <= len(text) <= 400 or text.startswith((">>>", ":", "..")):
        return None
    return text


def stdlib_docstring_conversations() -> Iterator[dict[str, Any]]:
    """Question/answer conversations about documented stdlib functions and classes, in a fixed order.

    Yields:
        ``{"messages": [system, user, assistant]}`` dicts.
    """
    root = stdlib_dir()
    for path in default_corpus_files():
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        if any(part.startswith("_") for part in module.split(".")):
            continue  # private modules
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            answer = _summary(ast.get_docstring(node) or "")
            if answer is None:
                continue
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            yield {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"What does the {kind} {module}.{node.name} do?"},
                    {"role": "assistant", "content": answer},
                ]
            }


def _load_conversations(source: str | None, cache_dir: Path) -> list[list[dict[str, str]]]:
    if not source:
        return [c["messages"] for c in stdlib_docstring_conversations()]
    import datasets

    p = Path(source).expanduser()
    try:
        if p.exists():
            files = sorted(
                str(f) for f in (p.rglob("*") if p.is_dir() else [p]) if f.suffix in (".jsonl", ".json", ".parquet")
            )
            if not files:
                raise DsvError(f"data.source={source} holds no .jsonl, .json or .parquet file of conversations")
            kind = "parquet" if files[0].endswith(".parquet") else "json"
            ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=str(cache_dir))
        elif "/" in source and not source.startswith((".", "/", "~")):
            ds = datasets.load_dataset(source, split="train", cache_dir=str(cache_dir))
        else:
            raise DsvError(f"data.source={source} does not exist; point it at a .jsonl file of conversations")
    except DsvError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DsvError(
            f"cannot read conversations from data.source={source} ({first}); "
            "use a .jsonl file with a 'messages' list per line"
        ) from None
    if "messages" not in ds.column_names:
        raise DsvError(
            f"data.source={source} has no 'messages' column (columns: {', '.join(ds.column_names)}); "
            "each row needs messages: [{role, content}, ...]"
        )
    return list(ds["messages"])


def chat_key(cfg: Config, tok) -> str:
    """Cache key of the prepared conversations: source, tokenizer (its fingerprint), seq_len,
    split, seed."""
    parts = {
        "format": CHAT_FORMAT_VERSION,
        "source": source_fingerprint(cfg.data.source) if cfg.data.source else "stdlib-docstrings",
        "stdlib": str(stdlib_dir()) if not cfg.data.source else None,
        "tokenizer": tok.fingerprint,
        "seq_len": cfg.data.seq_len,
        "val_fraction": cfg.data.val_fraction,
        "seed": cfg.train.seed,
    }
    return "chat-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare_chat(cfg: Config, tokenizer: Path | str, progress: bool = True) -> Path:
    """Tokenize conversations into fixed-length (ids, labels) samples; cached by :func:`chat_key`.

    Args:
        cfg: the run config (``data``, ``train.seed``, ``model.vocab_size``).
        tokenizer: the tokenizer (a file or a folder holding one,
            :func:`dsv3.tokenizer_files.open_tokenizer`): dsv3's sentencepiece model (dsv3 chat
            format) or a released ``tokenizer.json`` with its chat template.

    Returns:
        The prepared folder with ``{train,val}_{ids,labels}.npy`` (int32, (N, seq_len)),
        the tokenizer's files and ``meta.json``.

    Raises:
        DsvError: unreadable source, a conversation without an assistant reply, a chat template
            that cannot mark the replies, a tokenizer with more ids than ``model.vocab_size``,
            or too few usable conversations (fewer than 2, or none left for validation).
    """
    from data_pipeline.prepare import cache_root, check_vocab_size, hf_cache_dir
    from dsv3.chat_format import chat_labels
    from dsv3.tokenizer_files import open_tokenizer

    tok = open_tokenizer(tokenizer)
    check_vocab_size(tok, cfg.model.vocab_size, f"the tokenizer {tokenizer}")
    out = cache_root(cfg.data) / "prepared" / chat_key(cfg, tok)
    if (out / "meta.json").is_file():
        return out
    convs = _load_conversations(cfg.data.source, hf_cache_dir(cfg.data))
    T = cfg.data.seq_len
    ids = np.full((len(convs), T), tok.pad_id, dtype=np.int32)
    labels = np.full((len(convs), T), IGNORE_INDEX, dtype=np.int32)
    kept, truncated = 0, 0
    for n, messages in enumerate(convs):
        try:
            x, y = chat_labels(tok, messages)
        except DsvError as err:
            raise DsvError(f"conversation {n} of data.source={cfg.data.source or 'stdlib docstrings'}: {err}") from None
        if len(x) > T:
            truncated += 1
            x, y = x[:T], y[:T]
            if all(v == IGNORE_INDEX for v in y):
                continue  # the reply starts beyond seq_len: nothing left to learn
        ids[kept, : len(x)] = x
        labels[kept, : len(y)] = y
        kept += 1
    if kept < 2:
        raise DsvError(
            f"only {kept} usable conversation(s) in data.source={cfg.data.source}; need at least 2 "
            f"(raise data.seq_len={T} if replies are cut off)"
        )
    order = torch.randperm(kept, generator=torch.Generator().manual_seed(cfg.train.seed)).numpy()
    n_val = max(1, round(kept * cfg.data.val_fraction))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".chat.", dir=out.parent))
    try:
        for split, rows in splits.items():
            np.save(build / f"{split}_ids.npy", ids[np.sort(rows)])
            np.save(build / f"{split}_labels.npy", labels[np.sort(rows)])
        tok.save(build)
        meta = {
            "format": "chat",
            "version": CHAT_FORMAT_VERSION,
            "seq_len": T,
            "n_samples": {k: int(len(v)) for k, v in splits.items()},
            "truncated": truncated,
            "dropped": len(convs) - kept,
            "source": cfg.data.source or "stdlib docstrings",
        }
        (build / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.chmod(build, 0o755)
        try:
            os.replace(build, out)
        except OSError:
            if not (out / "meta.json").is_file():
                raise
            shutil.rmtree(build, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    if progress:
        print(
            f"prepared {out}: {kept} conversations ({meta['n_samples']['train']} train / "
            f"{meta['n_samples']['val']} val), {truncated} truncated to {T} tokens, "
            f"{len(convs) - kept} dropped",
            flush=True,
        )
    return out


class ChatDataset:
    """Fixed-length SFT samples: ``batch_xy(indices)`` -> (inputs, labels), each (B, seq_len) int64.

    ``meta``: the prepared folder's ``meta.json`` with its cache ``key`` (the folder's name, see
    :func:`chat_key`), which a checkpoint records so that a resume on other data is refused.
    """

    def __init__(self, prepared_dir: Path, split: str):
        prepared_dir = Path(prepared_dir)
        self.ids = np.load(prepared_dir / f"{split}_ids.npy", mmap_mode="r")
        self.labels = np.load(prepared_dir / f"{split}_labels.npy", mmap_mode="r")
        meta_file = prepared_dir / "meta.json"
        self.meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        self.meta.setdefault("key", prepared_dir.name)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch_xy(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(list(indices))
        return (torch.from_numpy(self.ids[idx].astype(np.int64)), torch.from_numpy(self.labels[idx].astype(np.int64)))
