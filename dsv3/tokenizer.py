"""Byte-fallback BPE tokenizer (sentencepiece) tuned for mixed prose and source code.

:func:`train_tokenizer` learns a sentencepiece BPE model from an iterable of documents and
writes it to one ``.model`` file; :class:`Tokenizer` loads such a file and encodes/decodes.

Design points:

* **Lossless.** Identity normalization, no dummy prefix, no whitespace collapsing and byte
  fallback make ``decode(encode(x)) == x`` for every string that is valid Unicode (tabs, runs
  of spaces, ``"\\r\\n"``, control characters, emoji, CJK, the empty string, ...). Characters
  the model never saw become their UTF-8 bytes (``<0xNN>`` pieces), never ``<unk>``. A
  literal U+2581 (sentencepiece's internal space mark) is encoded as its bytes so it does not
  come back as a space.
* **Fixed ids.** ``<pad>``=0, ``<unk>``=1, ``<s>`` (BOS)=2, ``</s>`` (EOS)=3, then the chat
  role tokens ``<|system|>``=4, ``<|user|>``=5, ``<|assistant|>``=6, ``<|end|>``=7. Plain text
  that literally contains one of the role strings is encoded to its role id (and decodes back
  to the same text), so such text still round-trips but is not distinguishable from a role
  marker.
* **Code friendly.** The trainer sees multi-line chunks, so ``"\\n"`` is an ordinary piece
  that merges with neighbours (``":\\n"``, ``"\\n\\n"``); a newline followed by an indentation
  run (2..24 spaces in steps of 2, or 1..6 tabs) is a single reserved piece (ids 8..25), so a
  typical indented Python line starts with one token. Digits are always split (one piece
  per digit).
* **Long lines are kept.** Lines longer than the trainer's sentence limit are cut into
  chunks before they reach sentencepiece, so they contribute to training instead of being
  skipped.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_bytes

#: Bumped whenever training settings change in a way that changes the learned model.
TOKENIZER_VERSION = 1

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
#: Chat role tokens, ids 4..7 in this order.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

_WS = "\u2581"  # sentencepiece's visible space; the normalizer maps " " to it
#: Newline + indentation runs reserved as single pieces (written with the visible space,
#: which is how sentencepiece matches them after normalization).
INDENT_SYMBOLS = tuple("\n" + _WS * n for n in range(2, 25, 2)) + tuple("\n" + "\t" * n for n in range(1, 7))

#: Trainer input unit: at most this many lines and this many UTF-8 bytes per chunk.
CHUNK_LINES = 8
CHUNK_BYTES = 4096
_MAX_SENTENCE_BYTES = 4 * CHUNK_BYTES  # margin for " " -> U+2581 (3 bytes) growth
# Fixed (not os.cpu_count()): the thread count is stored in the model file, so a constant keeps
# the file byte-identical across machines. It does not change the learned pieces.
_TRAIN_THREADS = 4

_SURROGATE = re.compile("[\ud800-\udfff]")
_WS_BYTES = "\u2581".encode("utf-8")


def _split_long(line: str) -> Iterator[str]:
    """Cut ``line`` into pieces of at most CHUNK_BYTES UTF-8 bytes on character boundaries."""
    data = line.encode("utf-8")
    start = 0
    while start < len(data):
        end = min(start + CHUNK_BYTES, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # inside a multi-byte char
            end -= 1
        yield data[start:end].decode("utf-8")
        start = end


def training_chunks(text: str) -> Iterator[str]:
    """Split one document into the trainer's input units.

    Lines are grouped into chunks of at most :data:`CHUNK_LINES` lines and
    :data:`CHUNK_BYTES` UTF-8 bytes; a single longer line is cut into byte-bounded pieces.
    Chunks are cut just *before* a newline, so each chunk after the first starts with
    ``"\\n"`` plus the next line's indentation and none ends with a newline (the trainer
    strips trailing newlines, which would hide ``"\\n"`` from it). Joining all chunks gives
    back ``text`` exactly.

    Args:
        text: one document.

    Returns:
        An iterator of non-empty strings.
    """
    group: list[str] = []
    size = 0
    for k, line in enumerate(text.split("\n")):
        piece = line if k == 0 else "\n" + line
        n = len(piece.encode("utf-8"))
        if group and (len(group) >= CHUNK_LINES or size + n > CHUNK_BYTES):
            yield "".join(group)
            group, size = [], 0
        if n > CHUNK_BYTES:
            yield from _split_long(piece)
        elif piece:
            group.append(piece)
            size += n
    if group:
        yield "".join(group)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: Path | str, sample_size: int, seed: int = 0
) -> Tokenizer:
    """Train a byte-fallback BPE tokenizer and write it to ``out_path`` atomically.

    Documents are streamed through :func:`training_chunks`; sentencepiece keeps a uniform
    random sample of ``sample_size`` chunks (reservoir sampling), so memory stays bounded
    however large the corpus is. Training is deterministic for a given input order and
    ``seed``.

    Args:
        texts: documents (any iterable; consumed once).
        vocab_size: target vocabulary size including the 26 reserved and 256 byte pieces.
            A corpus too small to supply enough merges yields a smaller vocabulary
            (:attr:`Tokenizer.vocab_size` tells the real size); it is never larger.
        out_path: where to write the ``.model`` file (parent folders are created; written
            to a temporary name in the same folder, then renamed).
        sample_size: number of chunks (each <= 8 lines / 4 KiB) the trainer samples.
        seed: random seed of the chunk sampling.

    Returns:
        The trained :class:`Tokenizer`, loaded from ``out_path``.

    Raises:
        DsvError: ``vocab_size`` too small for the reserved pieces, or no usable text.
    """
    reserved = 4 + len(CHAT_TOKENS) + len(INDENT_SYMBOLS) + 256
    if vocab_size < reserved + 16:
        raise DsvError(
            f"vocab_size={vocab_size} is too small: the tokenizer reserves {reserved} pieces "
            f"(special, indentation and 256 byte pieces); use at least {reserved + 16}"
        )
    if sample_size < 1:
        raise DsvError(f"tokenizer sample size {sample_size} must be positive (data.tokenizer_sample_size)")
    out_path = Path(out_path)
    seen = [0]
    failed: list[DsvError] = []  # an error of the corpus reader, which sentencepiece would wrap

    def chunks() -> Iterator[str]:
        try:
            for text in texts:
                for chunk in training_chunks(text):
                    seen[0] += 1
                    yield chunk
        except DsvError as exc:
            failed.append(exc)
            raise

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chunks(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            split_digits=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=sample_size,
            shuffle_input_sentence=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=_TRAIN_THREADS,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=PAD,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            user_defined_symbols=list(CHAT_TOKENS + INDENT_SYMBOLS),
            minloglevel=2,
        )
    except RuntimeError as exc:
        if failed:  # the corpus, not the tokenizer: its own message and fix
            raise failed[0] from None
        if seen[0] == 0:
            raise DsvError("tokenizer training got no text; the corpus is empty (check data.source)") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DsvError(
            f"sentencepiece could not train a {vocab_size}-piece tokenizer ({first}); "
            "use a larger corpus or a smaller model.vocab_size"
        ) from None
    atomic_write_bytes(out_path, model.getvalue())
    return Tokenizer.load(out_path)


#: The file name of a sentencepiece tokenizer in run, checkpoint and prepared folders.
MODEL_FILE = "tokenizer.model"


class Tokenizer:
    """A loaded sentencepiece model with the dsv3 conventions (see the module docstring).

    The interface every dsv3 tokenizer offers (this class, and
    :class:`dsv3.hf_tokenizer.HFTokenizer` for a released model's ``tokenizer.json``):
    ``encode``, ``encode_batch``, ``decode``, ``id_to_piece``, ``piece_to_id``,
    ``is_special``, ``save``, and the attributes below. Chat formatting goes through
    :mod:`dsv3.chat_format`, which picks the dsv3 chat format for this class.

    Attributes:
        path: the ``.model`` file it was loaded from.
        kind: ``"sentencepiece"``.
        vocab_size: number of pieces; every id produced is in ``[0, vocab_size)``.
        pad_id, unk_id, bos_id, eos_id: 0, 1, 2, 3.
        special_ids: ``{"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<|system|>": 4,
            "<|user|>": 5, "<|assistant|>": 6, "<|end|>": 7}``.
        add_bos: False: dsv3 documents and prompts do not start with BOS.
        chat_template: None: the chat format is dsv3's own (:mod:`dsv3.chat_format`).
        files: ``{"tokenizer.model": the model bytes}``.

    Instances pickle as their model bytes, so they can be sent to worker processes.
    """

    kind = "sentencepiece"
    add_bos = False
    chat_template = None

    def __init__(self, model_proto: bytes, path: Path | str | None = None):
        """Build from serialized model bytes; prefer :meth:`load`.

        Raises:
            DsvError: the bytes are not a sentencepiece model with the dsv3 special ids.
        """
        self.path = Path(path) if path is not None else None
        self._proto = bytes(model_proto)
        where = f"tokenizer file {self.path}" if self.path else "tokenizer model"
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on bad bytes
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DsvError(
                f"{where} is corrupt or not a sentencepiece model ({first}); delete it and run dsv3 prepare again"
            ) from None
        names = (PAD, UNK, BOS, EOS) + CHAT_TOKENS
        self.special_ids = {name: self._sp.piece_to_id(name) for name in names}
        if list(self.special_ids.values()) != list(range(len(names))):
            raise DsvError(
                f"{where} does not have the dsv3 special ids (<pad>=0 ... <|end|>=7); "
                "it was not made by dsv3 prepare - delete it and run dsv3 prepare again"
            )
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = 0, 1, 2, 3
        self._ws_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _WS_BYTES]

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """Load a tokenizer written by :func:`train_tokenizer`.

        Args:
            path: the ``.model`` file.

        Returns:
            The :class:`Tokenizer`.

        Raises:
            DsvError: the file is missing, unreadable, or not a dsv3 sentencepiece model.
        """
        path = Path(path)
        if not path.is_file():
            raise DsvError(
                f"tokenizer file {path} does not exist; run dsv3 prepare first "
                "(or point to the prepared folder's tokenizer.model)"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DsvError(f"tokenizer file {path} cannot be read ({exc.strerror}); check its permissions") from None
        return cls(data, path)

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "path": self.path}

    @property
    def files(self) -> dict[str, bytes]:
        """``{file name: bytes}`` that :meth:`save` writes."""
        return {MODEL_FILE: self._proto}

    @property
    def fingerprint(self) -> str:
        """sha256 of the model bytes (the ``.model`` file's checksum)."""
        return hashlib.sha256(self._proto).hexdigest()

    def save(self, folder: Path | str) -> list[Path]:
        """Write ``tokenizer.model`` into ``folder`` atomically; returns its path in a list."""
        target = Path(folder) / MODEL_FILE
        atomic_write_bytes(target, self._proto)
        return [target]

    def is_special(self, i: int) -> bool:
        """Whether id ``i`` is one of the fixed special ids (<pad> ... <|end|>, ids 0-7)."""
        return 0 <= int(i) < len(self.special_ids)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    def _encode_text(self, text: str, num_threads: int = -1) -> list[int]:
        if _WS in text:
            # sentencepiece would read a literal U+2581 as a space; emit its UTF-8 bytes instead.
            ids: list[int] = []
            for i, part in enumerate(text.split(_WS)):
                if i:
                    ids.extend(self._ws_bytes)
                if part:
                    ids.extend(self._encode_text(part))
            return ids
        try:
            return self._sp.encode(text, num_threads=num_threads)
        except RuntimeError:
            if not _SURROGATE.search(text):
                raise
            return self._sp.encode(_SURROGATE.sub("\ufffd", text), num_threads=num_threads)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode text to token ids.

        Args:
            text: any string. Lone surrogates (not valid Unicode) become U+FFFD.
            bos: prepend ``bos_id``.
            eos: append ``eos_id``.

        Returns:
            A list of ids in ``[0, vocab_size)``; ``decode`` gives ``text`` back exactly.
        """
        ids = self._encode_text(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """Encode several texts; same result as ``[encode(t, bos, eos) for t in texts]``.

        Args:
            texts: the strings.
            bos, eos: as in :meth:`encode`.
            num_threads: sentencepiece worker threads (-1 = all cores).

        Returns:
            One id list per text.
        """
        texts = list(texts)
        if any(_WS in t for t in texts):
            out = [self._encode_text(t) for t in texts]
        else:
            try:
                out = self._sp.encode(texts, num_threads=num_threads)
            except RuntimeError:
                out = [self._encode_text(t) for t in texts]
        head = [self.bos_id] if bos else []
        tail = [self.eos_id] if eos else []
        if head or tail:
            out = [head + ids + tail for ids in out]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Turn ids back into text.

        ``<pad>``, ``<s>`` and ``</s>`` produce nothing, chat role ids produce their text,
        byte pieces are reassembled into UTF-8 (invalid byte sequences become U+FFFD), and ids
        outside ``[0, vocab_size)`` (possible when a model's embedding is larger than the
        tokenizer) are skipped.

        Args:
            ids: token ids (ints, or anything ``int()`` accepts, e.g. a 1-D tensor).

        Returns:
            The decoded string.
        """
        n = self.vocab_size
        clean = [int(i) for i in ids]
        clean = [i for i in clean if 0 <= i < n]
        return self._sp.decode(clean)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id ``i`` (spaces shown as U+2581, bytes as ``<0xNN>``).

        Raises:
            IndexError: ``i`` is outside ``[0, vocab_size)``.
        """
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of vocabulary piece ``piece``, or ``unk_id`` if it is not a piece."""
        return int(self._sp.piece_to_id(piece))
