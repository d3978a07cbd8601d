"""Tokenizers of released models: ``tokenizer.json`` with ``tokenizer_config.json`` and a chat template.

Released DeepSeek-family models (and most models on the Hugging Face hub) ship their tokenizer
as a ``tokenizer.json`` of the `tokenizers` library (DeepSeek: byte-level BPE with added
special tokens such as ``<｜begin▁of▁sentence｜>``), a ``tokenizer_config.json`` naming the
special tokens and holding the ``chat_template``, and, from ``transformers`` 5's
``save_pretrained``, the template in its own file ``chat_template.jinja``.
:class:`HFTokenizer` loads such a folder (or a ``tokenizer.json`` file, with the other files
taken from its folder) and offers the same interface as the sentencepiece
:class:`dsv3.tokenizer.Tokenizer`:

* ``encode(text, bos=False, eos=False)`` gives the ids of ``transformers.AutoTokenizer``'s
  ``encode(text, add_special_tokens=False)``: the `tokenizers` library does the work, with
  the added tokens of ``tokenizer.json`` (special tokens in the text are matched as such);
  ``add_bos`` tells whether the tokenizer's own post-processor puts BOS before a text (what
  ``AutoTokenizer.encode(text)`` does), which prompts and pre-training documents follow.
* ``decode(ids)`` leaves out BOS, EOS and padding (as the sentencepiece wrapper does) and
  writes every other token, special ones included; a byte-level piece that ends inside a
  character decodes to U+FFFD until the rest arrives (see :class:`dsv3.chat.StreamDecoder`).
* ``render_chat(messages, add_generation_prompt)`` renders ``chat_template`` with Jinja set
  up as ``transformers`` does (sandboxed, ``trim_blocks``, ``lstrip_blocks``, loop controls,
  ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII characters, the
  ``{% generation %}`` tag, the special tokens the config names as variables), so that
  encoding the rendered text gives the ids of ``AutoTokenizer.apply_chat_template``. What the
  template means for
  chat and fine-tuning (end-of-turn ids, which tokens are the replies) is
  :mod:`dsv3.chat_template`.

Special tokens: ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` of
``tokenizer_config.json`` (a string or ``{"content": ...}``; else ``special_tokens_map.json``);
without them BOS and EOS are looked up among well-known names (``<｜begin▁of▁sentence｜>``,
``<s>``, ``<|begin_of_text|>``, ... / ``<｜end▁of▁sentence｜>``, ``</s>``, ``<|endoftext|>``,
...). An EOS is required (documents and replies end with it); padding falls back to EOS.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_bytes

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
#: The files that make an :class:`HFTokenizer`, in the order they are written.
HF_TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, SPECIAL_TOKENS_MAP)

_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|im_start|>")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")

#: Characters that wrap the output of ``{% generation %}`` blocks while :meth:`HFTokenizer.render_chat`
#: marks them (Unicode noncharacters, which no text should hold).
GEN_OPEN, GEN_CLOSE = "\ufdd0", "\ufdd1"
_MARKING: contextvars.ContextVar[bool] = contextvars.ContextVar("dsv3_mark_generation", default=False)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _compile_template(source: str, where: str):
    """Compile a chat template in a sandboxed Jinja environment with the settings and helpers
    ``transformers`` gives its templates.

    Raises:
        DsvError: jinja2 is missing or the template does not compile.
    """
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DsvError("chat templates need the jinja2 package; install it with pip install jinja2") from None
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        # a model's template is code from elsewhere; older releases have known sandbox escapes
        raise DsvError(
            f"chat templates need jinja2 3.1.6 or newer (found {jinja2.__version__}); "
            "upgrade it with pip install -U jinja2"
        )

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}``: the assistant's part of a turn. Renders its
        body; while marking, wraps it in GEN_OPEN / GEN_CLOSE."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("wrap"), [], [], body).set_lineno(lineno)

        def wrap(self, caller) -> str:
            text = caller()
            return f"{GEN_OPEN}{text}{GEN_CLOSE}" if _MARKING.get() else text

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source), jinja2.exceptions.TemplateError
    except jinja2.exceptions.TemplateError as exc:
        raise DsvError(
            f"the chat template of {where} does not compile ({_first_line(exc)}); fix the template "
            f"({CHAT_TEMPLATE_FILE} or chat_template in {TOKENIZER_CONFIG})"
        ) from None


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer with its config and chat template (see the module docstring).

    Attributes:
        path: the ``tokenizer.json`` it was loaded from (None when built from bytes).
        kind: ``"tokenizer.json"`` (the sentencepiece wrapper's is ``"sentencepiece"``).
        vocab_size: largest id + 1 (added tokens included); every id produced is below it.
        bos_id: BOS id, or None when the tokenizer has none.
        eos_id, pad_id: EOS id; padding id (EOS when the tokenizer names no padding token).
        unk_id: id of the unknown token, or None.
        special_ids: ``{text: id}`` of every added special token.
        add_bos: whether the tokenizer's post-processor starts a text with BOS.
        chat_template: the Jinja chat template, or None.
        files: ``{file name: bytes}`` of the files it was loaded from (:data:`HF_TOKENIZER_FILES`).

    Instances pickle as their files, so they can be sent to worker processes.
    """

    kind = "tokenizer.json"

    def __init__(self, files: Mapping[str, bytes], path: Path | str | None = None):
        """Build from file contents (``tokenizer.json`` required); prefer :meth:`load`.

        Raises:
            DsvError: a file does not parse, a named special token is not in the vocabulary, or
                no EOS token can be found.
        """
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path) if path is not None else None
        self.files = {name: bytes(files[name]) for name in HF_TOKENIZER_FILES if name in files}
        where = str(self.path) if self.path else TOKENIZER_JSON
        self._where = where
        if TOKENIZER_JSON not in self.files:
            raise DsvError(f"{where}: a tokenizer.json tokenizer needs its {TOKENIZER_JSON}")
        try:
            self._tk = RustTokenizer.from_str(self.files[TOKENIZER_JSON].decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception on bad JSON or models
            raise DsvError(
                f"tokenizer file {where} does not parse as a tokenizers tokenizer.json "
                f"({_first_line(exc)}); point data.tokenizer / --ckpt at a valid tokenizer"
            ) from None
        config = self._json(TOKENIZER_CONFIG)
        special_map = self._json(SPECIAL_TOKENS_MAP)
        vocab = self._tk.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DsvError(f"tokenizer file {where} has an empty vocabulary")
        self.vocab_size = max(vocab.values()) + 1
        added = self._tk.get_added_tokens_decoder()
        self.special_ids = {tok.content: int(i) for i, tok in sorted(added.items()) if tok.special}
        self._special = set(self.special_ids.values())

        # the special tokens a chat template sees: those the config names, as transformers passes them
        self._tokens: dict[str, str] = {}

        def named(key: str, fallbacks: Sequence[str] = ()) -> int | None:
            text = _token_content(config.get(key)) or _token_content(special_map.get(key))
            if text is not None:
                i = self._tk.token_to_id(text)
                if i is None:
                    raise DsvError(
                        f"{where}: {key} {text!r} of {TOKENIZER_CONFIG} is not in the vocabulary of "
                        f"{TOKENIZER_JSON}; fix {key}"
                    )
                self._tokens[key] = text
                return int(i)
            for name in fallbacks:
                i = self._tk.token_to_id(name)
                if i is not None:
                    return int(i)
            return None

        self.bos_id = named("bos_token", _BOS_NAMES)
        eos = named("eos_token", _EOS_NAMES)
        if eos is None:
            raise DsvError(
                f'tokenizer {where} names no end-of-sequence token; add "eos_token" to its {TOKENIZER_CONFIG}'
            )
        self.eos_id = eos
        pad = named("pad_token")
        self.pad_id = eos if pad is None else pad
        self.unk_id = named("unk_token")
        self._silent = {i for i in (self.bos_id, self.eos_id, pad) if i is not None}
        probe = self._tk.encode("a", add_special_tokens=True).ids
        plain = self._tk.encode("a", add_special_tokens=False).ids
        self.add_bos = self.bos_id is not None and probe[:1] == [self.bos_id] and probe[1 : 1 + len(plain)] == plain
        template = None
        if CHAT_TEMPLATE_FILE in self.files:
            template = self.files[CHAT_TEMPLATE_FILE].decode("utf-8")
        else:
            raw = config.get("chat_template")
            if isinstance(raw, list):  # named templates: [{"name": ..., "template": ...}, ...]
                named_templates = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
                raw = named_templates.get("default")
            template = raw if isinstance(raw, str) else None
        self.chat_template: str | None = template
        self._compiled = None

    def _json(self, name: str) -> dict:
        if name not in self.files:
            return {}
        try:
            data = json.loads(self.files[name].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DsvError(
                f"{name} next to {self._where} is not valid JSON ({_first_line(exc)}); fix or remove it"
            ) from None
        if not isinstance(data, dict):
            raise DsvError(f"{name} next to {self._where} is not a JSON object; fix or remove it")
        return data

    @classmethod
    def load(cls, path: Path | str) -> HFTokenizer:
        """Load ``path``: a folder holding ``tokenizer.json``, or the ``tokenizer.json`` file
        itself; ``tokenizer_config.json``, ``chat_template.jinja`` and
        ``special_tokens_map.json`` are read from the same folder when present.

        Raises:
            DsvError: ``tokenizer.json`` is missing, unreadable or does not parse (and the
                problems of the constructor).
        """
        p = Path(path)
        file = p / TOKENIZER_JSON if p.is_dir() else p
        if not file.is_file():
            raise DsvError(f"tokenizer file {file} does not exist")
        files = {}
        for name in HF_TOKENIZER_FILES:
            f = file if name == TOKENIZER_JSON else file.parent / name
            if f.is_file():
                try:
                    files[name] = f.read_bytes()
                except OSError as exc:
                    raise DsvError(
                        f"tokenizer file {f} cannot be read ({exc.strerror}); check its permissions"
                    ) from None
        return cls(files, file)

    def __getstate__(self) -> dict:
        return {"files": self.files, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["files"], state["path"])

    def __repr__(self) -> str:
        return f"HFTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def fingerprint(self) -> str:
        """sha256 over the files' names and contents: equal for the same tokenizer."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()

    def save(self, folder: Path | str) -> list[Path]:
        """Write the tokenizer's files into ``folder`` (each atomically, ``tokenizer.json`` last, so
        a reader that sees it sees the others); returns their paths."""
        folder = Path(folder)
        out = []
        for name in (*HF_TOKENIZER_FILES[1:], TOKENIZER_JSON):
            if name in self.files:
                atomic_write_bytes(folder / name, self.files[name])
                out.append(folder / name)
        return out

    # ------------------------------------------------------------------ encoding

    @staticmethod
    def _clean(text: str) -> str:
        return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (``AutoTokenizer``'s ``encode(text, add_special_tokens=False)``),
        with ``bos_id`` / ``eos_id`` added on request. Lone surrogates become U+FFFD.

        Raises:
            DsvError: ``bos`` asked of a tokenizer without BOS.
        """
        ids = self._tk.encode(self._clean(text), add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise DsvError(f"tokenizer {self._where} has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """``[encode(t, bos, eos) for t in texts]``; ``num_threads`` other than 1 lets the
        `tokenizers` library use its thread pool."""
        if num_threads == 1:
            return [self.encode(t, bos, eos) for t in texts]
        out = [e.ids for e in self._tk.encode_batch([self._clean(t) for t in texts], add_special_tokens=False)]
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos else []
        return [head + ids + tail for ids in out] if head or tail else out

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids of ``encode(text)``, each token's ``(start, end)`` character span in ``text``)."""
        enc = self._tk.encode(self._clean(text), add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: BOS, EOS and padding give nothing, ids outside the vocabulary are
        skipped, a byte sequence cut inside a character gives U+FFFD."""
        n = self.vocab_size
        clean = [i for i in (int(x) for x in ids) if 0 <= i < n and i not in self._silent]
        return self._tk.decode(clean, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (byte-level pieces as stored, e.g. ``Ġ`` for a space).

        Raises:
            IndexError: ``i`` is not an id of the vocabulary.
        """
        piece = self._tk.id_to_token(int(i))
        if piece is None:
            raise IndexError(f"token id {i} is not in the vocabulary of {self._where}")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        """The id of vocabulary entry ``piece``, else ``unk_id`` (None without one)."""
        i = self._tk.token_to_id(piece)
        return self.unk_id if i is None else int(i)

    def is_special(self, i: int) -> bool:
        """Whether id ``i`` is an added special token."""
        return int(i) in self._special

    # ------------------------------------------------------------------ chat template

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, mark_generation: bool = False
    ) -> str:
        """The text of ``chat_template`` for ``messages`` (as ``apply_chat_template(...,
        tokenize=False)``); ``mark_generation`` wraps the output of ``{% generation %}`` blocks
        in :data:`GEN_OPEN` / :data:`GEN_CLOSE`.

        Raises:
            DsvError: no chat template, it does not compile, or it fails on these messages
                (e.g. its ``raise_exception``).
        """
        if self.chat_template is None:
            raise DsvError(
                f"tokenizer {self._where} has no chat template; add chat_template to its "
                f"{TOKENIZER_CONFIG} (or a {CHAT_TEMPLATE_FILE}) to chat or fine-tune on conversations"
            )
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template, self._where)
        template, error = self._compiled
        variables = {
            "messages": [dict(m) for m in messages],
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
            **self._tokens,
        }
        token = _MARKING.set(mark_generation)
        try:
            return template.render(**variables)
        except (error, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise DsvError(
                f"the chat template of {self._where} failed on a conversation ({_first_line(exc)})"
            ) from None
        finally:
            _MARKING.reset(token)
