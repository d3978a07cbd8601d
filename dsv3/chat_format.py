"""The dsv3 chat format and its training labels (shared by ``dsv3 sft``, ``dsv3 chat`` and exports).

 A conversation is a list
of messages ``{"role": "system" | "user" | "assistant", "content": str}`` and is encoded as::

    <s> <|system|> SYSTEM <|end|> <|user|> USER <|end|> <|assistant|> REPLY <|end|> <|user|> ...

* ``<s>`` (BOS, id 2) once at the start; then, per message, the role token (``<|system|>`` 4,
  ``<|user|>`` 5, ``<|assistant|>`` 6), the content's tokens, and ``<|end|>`` (7).
* The template adds **no text of its own**: no newline, no space, nothing between a role
  token and the content or between ``<|end|>`` and the next role token. The content is
  encoded exactly as given (leading/trailing whitespace and newlines inside it are kept), so
  ``decode`` of a content span gives the content back.
* Content can never forge a turn boundary: a literal ``<|user|>`` (or any role string)
  inside a message is encoded as its UTF-8 byte pieces, not as the role id.
* To ask the model for a reply, the encoding ends with ``<|assistant|>``
  (``add_generation_prompt=True``); the model answers with the reply tokens and
  ``<|end|>``, on which generation stops.

Messages may come in any order (a system message is normally first, and only once).

This is the format of dsv3's sentencepiece tokenizer. A tokenizer that comes with its own Jinja
chat template (a released model's ``tokenizer.json``, :class:`dsv3.hf_tokenizer.HFTokenizer`)
is formatted by that template instead (:mod:`dsv3.chat_template`); :func:`encode_chat`,
:func:`chat_labels` and :func:`chat_stop_ids` pick the format from the tokenizer, so callers
never branch. :data:`DSV3_CHAT_TEMPLATE` writes this format as a Jinja template, for exports
(``transformers``' ``apply_chat_template`` then gives the ids of :func:`encode_chat`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dsv3.chat_template import template_chat
from dsv3.errors import DsvError
from dsv3.model import IGNORE_INDEX
from dsv3.tokenizer import CHAT_TOKENS

SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = 4, 5, 6, 7
ROLE_IDS = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}

Message = Mapping[str, str]

#: The dsv3 chat format as a Jinja chat template (``tokenizer_config.json`` of exports): the same
#: text as ``tok.decode(encode_chat(...))`` with ``<s>`` in front, which ``transformers`` encodes
#: to the ids of :func:`encode_chat` (role strings inside a content aside: there they are text).
DSV3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('dsv3 chat roles are system, user and assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def uses_dsv3_format(tok) -> bool:
    """Whether ``tok`` chats in the dsv3 format (sentencepiece) rather than its own template."""
    return getattr(tok, "kind", "sentencepiece") == "sentencepiece"


def encode_content(tok, text: str) -> list[int]:
    """Encode message text with no chat special ids in the result.

    Role strings that occur literally in ``text`` (``"<|end|>"``, ...) become their UTF-8
    byte pieces, which decode to the same characters.

    Args:
        tok: a :class:`dsv3.tokenizer.Tokenizer`.
        text: the content.

    Returns:
        Token ids; ``tok.decode`` of them is ``text``.
    """
    ids: list[int] = []
    for i in tok.encode(text):
        if SYSTEM_ID <= i <= END_ID:
            ids.extend(tok.piece_to_id(f"<0x{b:02X}>") for b in CHAT_TOKENS[i - SYSTEM_ID].encode("utf-8"))
        else:
            ids.append(i)
    return ids


def _check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, bytes)) or not len(messages):
        raise DsvError("a conversation needs at least one message ({'role': ..., 'content': ...})")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLE_IDS or not isinstance(m.get("content"), str):
            raise DsvError(
                f"message {k} must be a mapping with role one of {sorted(ROLE_IDS)} and a text content; got {m!r:.80}"
            )


def _segments(tok, messages: Sequence[Message]):
    """Yield (ids, trained) spans of the encoding, in order (BOS first)."""
    _check_messages(messages)
    yield [tok.bos_id], False
    for m in messages:
        yield [ROLE_IDS[m["role"]]], False
        yield encode_content(tok, m["content"]) + [END_ID], m["role"] == "assistant"


def encode_chat(tok, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Encode a conversation in the dsv3 chat format (see the module docstring), or, for a
    tokenizer with a chat template, as that template renders it (the ids of
    ``AutoTokenizer.apply_chat_template``).

    Args:
        tok: a :class:`dsv3.tokenizer.Tokenizer` or :class:`dsv3.hf_tokenizer.HFTokenizer`.
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
        add_generation_prompt: end with ``<|assistant|>`` (the template's generation prompt) so
            the model writes the next reply.

    Returns:
        Token ids: ``[2, role, *content, 7, role, *content, 7, ...]`` (+ ``6``).

    Raises:
        DsvError: no messages, an unknown role, or a content that is not a string; a template
            that fails.
    """
    if not uses_dsv3_format(tok):
        _check_messages(messages)
        return template_chat(tok).encode(messages, add_generation_prompt)
    ids = [i for span, _ in _segments(tok, messages) for i in span]
    if add_generation_prompt:
        ids.append(ASSISTANT_ID)
    return ids


def chat_labels(tok, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """Inputs and next-token labels for supervised fine-tuning on a conversation.

    ``ids = encode_chat(tok, messages, add_generation_prompt=False)``. ``labels`` has the
    length of ``ids`` and follows :meth:`dsv3.model.Transformer.forward`'s convention
    (``labels[i]`` is the target of position i, i.e. token i+1): ``labels[i] = ids[i+1]``
    when token i+1 belongs to an assistant message's content or is that message's closing
    ``<|end|>``, else ``IGNORE_INDEX`` (-100). So the model learns to write replies and to
    end them, never the system or user text, the role tokens or BOS; the last label is
    always ``IGNORE_INDEX``. Pass both straight to ``model(ids, labels)``.

    Example, ``[system "S", user "U", assistant "A"]`` with one token per text::

        ids    = [<s>,  <|system|>, S,    <|end|>, <|user|>, U,    <|end|>, <|assistant|>, A, <|end|>]
        labels = [-100, -100,       -100, -100,    -100,     -100, -100,    A,             <|end|>, -100]

    With a chat template the trained tokens are the assistant turns as the template renders
    them, up to and including their end-of-turn token (:meth:`dsv3.chat_template.TemplateChat.labels`).

    Args:
        tok: a :class:`dsv3.tokenizer.Tokenizer` or :class:`dsv3.hf_tokenizer.HFTokenizer`.
        messages: as in :func:`encode_chat`.

    Returns:
        (ids, labels), two lists of ints of equal length.

    Raises:
        DsvError: the conversation has no assistant message (nothing to learn), or bad
            messages as in :func:`encode_chat`; a template whose replies cannot be found.
    """
    if not uses_dsv3_format(tok):
        _check_messages(messages)
        return template_chat(tok).labels(messages)
    ids: list[int] = []
    trained: list[bool] = []
    for span, learn in _segments(tok, messages):
        ids.extend(span)
        trained.extend([learn] * len(span))
    if not any(trained):
        raise DsvError(
            "the conversation has no assistant message, so it has nothing to train on; "
            "add an assistant reply or drop the conversation"
        )
    labels = [ids[i + 1] if trained[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, labels


def chat_stop_ids(tok) -> list[int]:
    """Ids that end an assistant reply: ``<|end|>``, EOS, and every role marker
    (``<|user|>`` / ``<|system|>`` / ``<|assistant|>``: a model that starts another turn has
    finished its reply). With a chat template: its end-of-turn tokens, EOS and its turn markers
    (:class:`dsv3.chat_template.TemplateChat`).

    Raises:
        DsvError: the tokenizer's template cannot be used for chat (no template, no assistant
            marker, ...).
    """
    if not uses_dsv3_format(tok):
        return list(template_chat(tok).stop_ids)
    return [END_ID, tok.eos_id, USER_ID, SYSTEM_ID, ASSISTANT_ID]
