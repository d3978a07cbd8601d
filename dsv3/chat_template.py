"""Chat and fine-tuning with a model's own Jinja chat template (tokenizers with ``chat_template``).

:class:`TemplateChat` is the chat format of a :class:`dsv3.hf_tokenizer.HFTokenizer`; dsv3's
sentencepiece tokenizer uses the fixed format of :mod:`dsv3.chat_format`, which dispatches
between the two. Everything is derived from what the template renders:

* **Ids.** ``encode(messages, add_generation_prompt)`` renders the template and encodes the
  text with the tokenizer's added tokens matched, which is what
  ``AutoTokenizer.apply_chat_template`` does, so the ids are equal.
* **Stop ids.** A probe conversation (one user message, one reply) is rendered three ways:
  the user turn alone, with the generation prompt, and with the reply. The special tokens
  the template writes after the reply's text are its end-of-turn tokens; with EOS, the
  special tokens that open a user turn and the first special token of the generation prompt
  (a model that starts another turn has finished its reply) they are the ids generation
  stops at (BOS never is).
* **SFT labels.** If the template marks replies with ``{% generation %}`` blocks, the tokens
  inside them are trained (the tokens ``transformers`` puts in its assistant mask).
  Otherwise each assistant message k is located by rendering the
  first k messages with the generation prompt (P) and the first k+1 without (Q): the reply's
  turn is the text between the ends of P and Q in the whole conversation, and the tokens
  that start there are trained, up to and including the first stop id (its end-of-turn
  token). This needs a template that renders a conversation turn by turn (P and Q are
  prefixes of the whole) and has an assistant marker (the generation prompt adds text);
  otherwise the replies cannot be found and :class:`DsvError` says so.

A content that contains the text of a special token is encoded to that token, as
``transformers`` does (dsv3's own format encodes such text as bytes).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

from dsv3.errors import DsvError
from dsv3.hf_tokenizer import GEN_CLOSE, GEN_OPEN
from dsv3.model import IGNORE_INDEX

_PROBE_USER = "Hello there"
_PROBE_REPLY = "General Kenobi"
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unique(ids) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return out


class TemplateChat:
    """The chat format of a tokenizer with a Jinja ``chat_template`` (module docstring).

    Attributes:
        tok: the tokenizer (:class:`dsv3.hf_tokenizer.HFTokenizer`).
        end_ids: the template's end-of-turn special tokens (after a reply's text).
        stop_ids: ids that end a reply: ``end_ids``, EOS, the user-turn and assistant markers.
        marks_generation: the template has ``{% generation %}`` blocks.
    """

    def __init__(self, tok):
        """Analyse ``tok``'s template with a probe conversation.

        Raises:
            DsvError: no template; it does not compile or fails; it has no assistant marker
                (the generation prompt adds nothing); or it does not render turn by turn.
        """
        self.tok = tok
        where = tok.path or "the tokenizer"
        self._where = where
        user = {"role": "user", "content": _PROBE_USER}
        reply = {"role": "assistant", "content": _PROBE_REPLY}
        base = tok.render_chat([user], add_generation_prompt=False)
        prompt = tok.render_chat([user], add_generation_prompt=True)
        if prompt == base:
            raise DsvError(
                f"the chat template of {where} has no assistant marker: add_generation_prompt adds "
                "nothing, so dsv3 cannot tell where a reply starts; use a template that opens the "
                "assistant's turn when add_generation_prompt is true"
            )
        full = tok.render_chat([user, reply], add_generation_prompt=False)
        marked = tok.render_chat([user, reply], mark_generation=True)
        self.marks_generation = marked != full
        if self.marks_generation:  # the reply's turn is what the template marks
            turn = marked[marked.find(GEN_OPEN) + 1 :].split(GEN_CLOSE)[0]
        elif prompt.startswith(base) and full.startswith(prompt):
            turn = full[len(prompt) :]
        else:
            raise self._not_turn_by_turn()
        at = turn.find(_PROBE_REPLY)
        after = turn[at + len(_PROBE_REPLY) :] if at >= 0 else ""
        self.end_ids = [i for i in tok.encode(after) if tok.is_special(i)]
        at = base.find(_PROBE_USER)
        user_open = [i for i in tok.encode(base[:at]) if tok.is_special(i) and i != tok.bos_id] if at >= 0 else []
        added = prompt[len(base) :] if prompt.startswith(base) else ""
        marker = [i for i in tok.encode(added) if tok.is_special(i)][:1]
        self.stop_ids = _unique([*self.end_ids, tok.eos_id, *user_open, *marker])
        self.stop_ids = [i for i in self.stop_ids if i != tok.bos_id]

    def _not_turn_by_turn(self) -> DsvError:
        return DsvError(
            f"the chat template of {self._where} does not render a conversation turn by turn (the "
            "first messages with the generation prompt are not the start of the whole conversation), "
            "so dsv3 cannot find the assistant replies; mark them with {% generation %} ... "
            "{% endgeneration %} in the template"
        )

    def encode(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation (``apply_chat_template(messages, add_generation_prompt)``)."""
        return self.tok.encode(self.tok.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def _spans(self, messages: Sequence[Mapping[str, str]], text: str) -> list[tuple[int, int]]:
        """Character spans of ``text`` (the whole conversation) that hold the assistant turns."""
        tok = self.tok
        if self.marks_generation:
            marked = tok.render_chat(messages, mark_generation=True)
            spans, pos, start = [], 0, None
            for ch in marked:
                if ch == GEN_OPEN:
                    start = pos
                elif ch == GEN_CLOSE:
                    if start is not None:
                        spans.append((start, pos))
                    start = None
                else:
                    pos += 1
            return spans
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.render_chat(messages[:k], add_generation_prompt=True)
            through = tok.render_chat(messages[: k + 1], add_generation_prompt=False)
            if not text.startswith(before) or not text.startswith(through) or len(through) <= len(before):
                raise self._not_turn_by_turn()
            spans.append((len(before), len(through)))
        return spans

    def labels(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """(ids, labels) for fine-tuning: ``ids = encode(messages, add_generation_prompt=False)``;
        ``labels[i] = ids[i + 1]`` when token i+1 belongs to an assistant turn (its text and its
        end-of-turn token), else ``IGNORE_INDEX``.

        Raises:
            DsvError: no assistant message, or the replies cannot be found (module docstring).
        """
        tok = self.tok
        if not any(m["role"] == "assistant" for m in messages):
            raise DsvError(
                "the conversation has no assistant message, so it has nothing to train on; "
                "add an assistant reply or drop the conversation"
            )
        text = tok.render_chat(messages, add_generation_prompt=False)
        ids, offsets = tok.encode_with_offsets(text)
        spans = self._spans(messages, text)
        trained = [False] * len(ids)
        stops = set() if self.marks_generation else set(self.stop_ids)  # generation blocks are taken as they are
        k = 0
        for s, e in spans:
            while k < len(ids) and offsets[k][0] < s:
                k += 1
            while k < len(ids) and offsets[k][0] < e:
                trained[k] = True
                k += 1
                if ids[k - 1] in stops:  # the end of the turn: what follows it is not the reply's
                    while k < len(ids) and offsets[k][0] < e:
                        k += 1
                    break
        if not any(trained):
            raise DsvError(
                f"the chat template of {self._where} renders the assistant replies as no tokens; "
                "dsv3 cannot train on them"
            )
        labels = [ids[i + 1] if trained[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]
        return ids, labels


def template_chat(tok) -> TemplateChat:
    """The :class:`TemplateChat` of ``tok``, analysed once per tokenizer object."""
    chat = _CACHE.get(tok)
    if chat is None:
        chat = TemplateChat(tok)
        _CACHE[tok] = chat
    return chat
