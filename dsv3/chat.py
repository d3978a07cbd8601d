"""Streaming detokenization and the chat loop of ``dsv3 chat`` (stage 12).

The chat format itself (how a conversation becomes ids, and its SFT labels) is
:mod:`dsv3.chat_format`.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from dsv3.chat_format import Message, chat_stop_ids, encode_chat
from dsv3.errors import DsvError
from dsv3.generation import generate


class StreamDecoder:
    """Incremental detokenizer: feed ids one by one, get only new, complete text back.

    Byte-fallback tokenizers split a character outside the vocabulary into several byte
    tokens, and byte-level BPE pieces (released tokenizer.json tokenizers) may end or start
    inside a character; decoding a prefix that ends inside a character gives U+FFFD. The
    decoder decodes the ids since the last point where the text was complete and withholds a
    trailing run of U+FFFD until a later id completes (or breaks) the character, so the
    concatenation of everything returned equals ``tok.decode(all ids)`` and no broken
    character is ever emitted early. The pending ids are decoded after the last id of the
    previous complete run (and that id's text is cut off again), so decoders that treat the
    first token of a text specially (a leading space dropped) do so only once.
    """

    def __init__(self, tok):
        """Args: tok: a dsv3 tokenizer (anything with ``decode``)."""
        self.tok = tok
        self._ids: list[int] = []  # ids since the last complete point
        self._sent = 0  # characters of the pending text already returned
        self._ctx: list[int] = []  # the last id before the pending ones, decoded in front of them
        self._ctx_len = 0  # characters of decode(self._ctx)

    def _pending_text(self) -> str:
        return self.tok.decode(self._ctx + self._ids)[self._ctx_len :]

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became complete ("" if none)."""
        self._ids.append(int(token_id))
        text = self._pending_text()
        stable = len(text.rstrip("\ufffd"))
        new = text[self._sent : stable] if stable > self._sent else ""
        if stable == len(text):  # nothing pending: later text decodes after this id
            last = self._ids[-1:]
            ctx_text = self.tok.decode(last)
            self._ctx, self._ctx_len = (last, len(ctx_text)) if "\ufffd" not in ctx_text else ([], 0)
            self._ids, self._sent = [], 0
        else:
            self._sent = max(self._sent, stable)
        return new

    def flush(self) -> str:
        """Return whatever is still withheld (U+FFFD for a truly incomplete character) and reset."""
        text = self._pending_text()[self._sent :] if self._ids else ""
        self._ids, self._sent, self._ctx, self._ctx_len = [], 0, [], 0
        return text


def fit_conversation(tok, system: str | None, turns: list[Message], budget: int) -> tuple[list[int], int]:
    """Encode ``[system] + turns`` with a generation prompt, dropping the oldest turns to fit.

    Whole exchanges are dropped from the front (a user message and the assistant reply that
    follows it) until the encoding has at most ``budget`` ids or only the last user message
    is left; the system message is always kept. ``turns`` is shortened in place.

    Args:
        tok: the tokenizer.
        system: system prompt or None.
        turns: the user/assistant messages so far, the last one being the new user message.
        budget: the number of prompt ids that still leaves room for the reply.

    Returns:
        (ids, number of messages dropped). The ids may still exceed ``budget`` when the last
        message alone is too long (generation then keeps only its last ids).
    """
    head = [{"role": "system", "content": system}] if system else []
    dropped = 0
    while True:
        ids = encode_chat(tok, head + turns)
        if len(ids) <= budget or len(turns) <= 1:
            return ids, dropped
        del turns[0]
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] != "user":
            del turns[0]
            dropped += 1


def chat_loop(
    model,
    tok,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    interactive: bool | None = None,
    jsonl: bool = False,
) -> None:
    """Run a multi-turn conversation: one user message per input line, streamed replies.

    Each input line (without its line break) is a user message; ``/reset`` forgets the
    conversation (the system prompt stays), ``/exit`` or end of input ends the loop. Blank
    lines are ignored. Each reply is streamed to ``stdout`` as it is generated (complete
    characters only, see :class:`StreamDecoder`) and ends with one ``"\\n"``; it stops at
    any of :func:`chat_stop_ids` (not printed) or after ``max_new_tokens``. When the context
    (``max_seq_len - max_new_tokens`` prompt ids) is full, the oldest exchanges are
    dropped. The ``"> "`` prompt and notices are written only when ``interactive``, so piped
    output holds nothing but the replies.

    With ``jsonl`` (for scripts: a reply may span lines), each input line is a JSON object,
    ``{"content": "..."}`` (a user message, newlines allowed), ``{"reset": true}`` (answered
    with the line ``{"reset": true}``) or both (reset, then the message). Each reply is written
    when complete as one JSON line: ``{"reply": str, "tokens": int, "stop": "end" | "length",
    "dropped": int, "truncated": bool}`` (``tokens``: generated ids, the stop id included;
    ``"length"``: cut at ``max_new_tokens``; ``dropped``: oldest messages left out to fit the
    context; ``truncated``: the message itself was cut to its last tokens). So every non-blank
    input line gets exactly one output line; blank lines are ignored; no prompts or notices.

    Args:
        model: a :class:`dsv3.model.Transformer`.
        tok: its tokenizer.
        system: optional system prompt.
        max_new_tokens: reply length limit (``1 <= n < max_seq_len``).
        temperature, top_k, top_p, repetition_penalty: sampling (see :mod:`dsv3.generation`).
        seed: sampling seed; reply k uses ``seed + k`` (None = unseeded).
        stdin, stdout, stderr: streams (default: the process's).
        interactive: show prompts and notices; default ``stdin.isatty()`` (False with ``jsonl``).
        jsonl: JSON lines in and out (see above).

    Raises:
        DsvError: ``max_new_tokens`` does not leave room for a prompt, or (``jsonl``) an input
            line is not such an object (the message says what is wrong).
    """

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if interactive is None:
        interactive = stdin.isatty() and not jsonl
    limit = model.cfg.max_seq_len
    if not 1 <= max_new_tokens < limit:
        raise DsvError(
            f"--max-new-tokens {max_new_tokens} must be between 1 and the model's max_seq_len - 1 ({limit - 1})"
        )
    budget = limit - max_new_tokens
    stops = chat_stop_ids(tok)
    turns: list[Message] = []
    replies = 0
    if interactive:
        print(
            "dsv3 chat: type a message and press Enter; /reset starts over, /exit or Ctrl-D quits",
            file=stderr,
            flush=True,
        )
    number = 0
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        number += 1
        if not line:
            if interactive:
                stdout.write("\n")
                stdout.flush()
            return
        text = line.rstrip("\r\n")
        command = text.strip()
        if jsonl and command:
            content, reset = parse_json_message(command, number)
            if reset:
                turns = []
            if content is None:  # a reset alone: acknowledged, so a script can read one line per line
                stdout.write(json.dumps({"reset": True}) + "\n")
                stdout.flush()
                continue
            text, command = content, "message"
        if command == "/exit":
            return
        if command == "/reset":
            turns = []
            if interactive:
                print("(conversation reset)", file=stderr, flush=True)
            continue
        if not command:
            continue
        turns.append({"role": "user", "content": text})
        ids, dropped = fit_conversation(tok, system, turns, budget)
        if interactive and dropped:
            print(f"(context full: dropped the {dropped} oldest messages)", file=stderr, flush=True)
        if interactive and len(ids) > budget:
            print(f"(message too long: only its last {budget} tokens are read)", file=stderr, flush=True)
        decoder = StreamDecoder(tok)

        def stream(i: int, decoder: StreamDecoder = decoder) -> None:
            if i not in stops and not jsonl:
                piece = decoder.push(i)
                if piece:
                    stdout.write(piece)
                    stdout.flush()

        out = generate(
            model,
            ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            None if seed is None else seed + replies,
            eos_ids=stops,
            on_token=stream,
            repetition_penalty=repetition_penalty,
        )
        ended = bool(out) and out[-1] in stops
        reply = out[:-1] if ended else out
        if jsonl:
            stdout.write(
                json.dumps(
                    {
                        "reply": tok.decode(reply),
                        "tokens": len(out),
                        "stop": "end" if ended else "length",
                        "dropped": dropped,
                        "truncated": len(ids) > budget,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
        else:
            stdout.write(decoder.flush() + "\n")
        stdout.flush()
        replies += 1
        turns.append({"role": "assistant", "content": tok.decode(reply)})


def parse_json_message(line: str, number: int) -> tuple[str | None, bool]:
    """(message text or None, reset first) of a ``--jsonl`` input line: ``{"content": ...}``,
    ``{"reset": true}`` or both (the conversation is reset, then the message is read).

    Raises:
        DsvError: the line is not such an object; the message says what is wrong.
    """
    where = f"input line {number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DsvError(
            f'{where} is not JSON ({exc.msg}); --jsonl reads one object per line, such as {{"content": "hello"}}'
        ) from None
    if not isinstance(obj, dict):
        raise DsvError(f'{where} is a JSON {type(obj).__name__}, not an object such as {{"content": "hello"}}')
    unknown = sorted(set(obj) - {"content", "reset"})
    if unknown:
        extra = "; set the system prompt with --system" if "role" in unknown else ""
        raise DsvError(
            f'{where} has the unknown key(s) {", ".join(map(repr, unknown))}; --jsonl reads "content" '
            f'(a user message) and "reset"{extra}'
        )
    reset = obj.get("reset", False)
    if not isinstance(reset, bool):
        raise DsvError(f'{where}: "reset" must be true or false, not {json.dumps(reset)}')
    content = obj.get("content")
    if content is None and reset:
        return None, True
    if not isinstance(content, str) or not content.strip():
        raise DsvError(f'{where}: "content" must be a non-empty string, not {json.dumps(content)}')
    return content, reset
