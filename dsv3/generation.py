"""Autoregressive generation with the latent KV cache (stage 10).

Sampling: repetition penalty, then logits / temperature, then top-k, then top-p (nucleus,
Holtzman et al., 2020) filtering, then a draw from a seeded ``torch.Generator``;
``temperature == 0`` is greedy (argmax). The prompts are processed in one forward (prefill)
that fills the cache; each new token then costs one single-token forward over the cached
latents.

Batches (:func:`generate_batch`) are LEFT padded: every row's last prompt token sits in the
last prefill column, so all rows decode in lock step. Padding never changes a row's result:
the attention mask hides the padded positions from every query (prefill and decode) and the
rope positions of each row start at 0 on its first real token, so a row gets the tokens it
would get alone (greedy; equal up to floating-point rounding of the batched products).

Speculative decoding (:func:`generate_speculative`) drafts one extra token per step with the
model's first Multi-Token Prediction module and lets the main model verify it in the next
forward (two tokens at once); greedy output is identical to plain greedy decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from dsv3.errors import DsvError
from dsv3.model import Transformer
from dsv3.model.graph_decode import decoder_for

#: Finish reasons: a stop id was produced / ``max_new_tokens`` were produced.
STOP, LENGTH = "stop", "length"


@dataclass
class GenerationResult:
    """The outcome for one prompt.

    Attributes:
        ids: the new token ids (prompt excluded); the stop id that ended generation is the
            last one when ``finish_reason == "stop"``.
        finish_reason: ``"stop"`` (a stop id was produced) or ``"length"`` (the token budget
            ran out).
    """

    ids: list[int]
    finish_reason: str


@dataclass
class SpeculativeStats:
    """Counters of one :func:`generate_speculative` call.

    Attributes:
        drafted: draft tokens the main model verified.
        accepted: drafts equal to the main model's own choice (each saves one forward).
        forwards: forwards of the main model, prefill included.
        tokens: tokens produced.
        seconds: wall-clock time of the call.
    """

    drafted: int = 0
    accepted: int = 0
    forwards: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens per main-model forward; plain decoding has exactly 1."""
        return self.tokens / self.forwards if self.forwards else 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask to -inf every logit outside the top-k and outside the top-p probability mass.

    Args:
        logits: (V,) or (B, V) float.
        top_k: keep the k largest (0 = no limit).
        top_p: keep the smallest set of tokens whose probability sums to >= top_p (1 = all).
            The most likely token is always kept.

    Returns:
        Tensor of the same shape.
    """
    logits = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty (Keskar et al., 2019): discourage already-seen ids.

    For every id marked in ``seen``, a positive logit is divided by ``penalty`` and a
    negative one multiplied by it (so ``penalty > 1`` always lowers the logit).

    Args:
        logits: (..., V) float.
        seen: bool of the same shape, True for ids already in the prompt or the output.
        penalty: >= 1 discourages repeats; 1 is a no-op (returns ``logits`` itself).

    Returns:
        Tensor of the shape of ``logits``.
    """
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int:
    """Pick the next token id from (V,) logits; greedy (argmax) when ``temperature <= 0``."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_settings(
    model: Transformer, max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float
) -> None:
    limit = model.cfg.max_seq_len
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    if max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be below model.max_seq_len={limit}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (got {temperature}, {top_k}, {top_p})")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be positive (1 = off)")


def _fit_prompts(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Validate prompts and keep each one's last ``max_seq_len - max_new_tokens`` ids."""
    keep = model.cfg.max_seq_len - max_new_tokens
    out = []
    for p in prompts:
        p = [int(i) for i in p]
        if not p:
            raise ValueError("a prompt is empty; give at least one token")
        out.append(p[-keep:])
    return out


def _seen_mask(rows: Sequence[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """(B, V) bool: True at every id of each row."""
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        seen[b, torch.tensor(row, dtype=torch.long, device=device)] = True
    return seen


def generate_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
    repetition_penalty: float = 1.0,
    on_token: Callable[[int, int], None] | None = None,
    cuda_graph: bool = False,
) -> list[GenerationResult]:
    """Continue several prompts at once (left padding, one shared latent cache).

    Each row gets what it would get alone: pad positions are masked out of every attention
    and each row's rope positions start at 0 on its first real token (see the module doc).

    Args:
        model: the model (token ids go to :meth:`~dsv3.model.Transformer.input_device`; switched to eval mode for the
            call and restored afterwards).
        prompts: B non-empty lists of token ids. A prompt longer than
            ``max_seq_len - max_new_tokens`` keeps only its last ids.
        max_new_tokens: at most this many new ids per row (``1 <= n < max_seq_len``).
        temperature, top_k, top_p: sampling settings (see :func:`filter_logits`);
            ``temperature == 0`` is greedy.
        seed: row b draws from a CPU ``torch.Generator`` seeded with ``seed + b``, so the
            same seed gives the same output and row 0 equals a single-prompt call; None =
            unseeded.
        stop_ids: a row finishes after producing any of these ids (the id is kept).
        repetition_penalty: CTRL penalty on every id already in the row's prompt or output
            (see :func:`apply_repetition_penalty`); 1 = off.
        on_token: called as ``on_token(row, id)`` for each new id as soon as it is chosen
            (streaming).
        cuda_graph: decode at fixed shapes (:class:`dsv3.model.graph_decode.GraphedDecoder`,
            kept on the model for the next call of this batch and length): on a CUDA device
            each step replays one captured CUDA graph; elsewhere the fixed-shape step runs
            eagerly. Needs a plain :class:`~dsv3.model.Transformer` on one device.

    Returns:
        One :class:`GenerationResult` per prompt, in order.

    Raises:
        ValueError: empty prompt list or prompt, or settings out of range.
        DsvError: ``cuda_graph`` for a compiled or dispatched model.
    """
    if not prompts:
        raise ValueError("no prompts given")
    _check_settings(model, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    rows = _fit_prompts(model, prompts, max_new_tokens)
    B, lens = len(rows), [len(r) for r in rows]
    P = max(lens)
    device = model.input_device()
    stops = {int(i) for i in stop_ids}
    gens: list[torch.Generator | None] = [
        torch.Generator(device="cpu").manual_seed(seed + b) if seed is not None else None for b in range(B)
    ]
    seen = _seen_mask(rows, model.cfg.vocab_size, device) if repetition_penalty != 1.0 else None

    pad = torch.tensor([P - n for n in lens], device=device)  # (B,) left-padding per row
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        ids[b, P - len(row) :] = torch.tensor(row, device=device)
    total = P + max_new_tokens
    padded = bool(pad.any())
    if padded:
        cols = torch.arange(total, device=device)
        key_ok = cols[None, :] >= pad[:, None]  # (B, total): False on padding
        pos = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, total) rope position of each column
        causal = cols[:P, None] >= cols[None, :P]  # (P, P)
        # pad queries attend to themselves only, which keeps their (unused) states finite
        mask = (causal & key_ok[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)  # (B, P, P)
        prefill_kw = dict(attn_mask=mask[:, None], position_ids=pos[:, :P])
    else:
        prefill_kw = {}

    was_training = model.training
    model.eval()
    # inference mode skips autograd's per-operator bookkeeping (version counters, view
    # tracking); a compiled or otherwise wrapped model keeps no_grad, which its tracing expects
    mode = torch.inference_mode() if isinstance(model, Transformer) else torch.no_grad()
    try:
        with mode:
            if cuda_graph:
                graphed = decoder_for(model, B, total)
                logits = graphed.prefill(ids, pad, **prefill_kw)  # (B, V)
            else:
                cache = model.new_cache(B, total)
                logits = model(ids, cache=cache, **prefill_kw)[:, -1]  # (B, V)
            out: list[list[int]] = [[] for _ in range(B)]
            reason = [LENGTH] * B
            active = [True] * B
            for step in range(max_new_tokens):
                if seen is not None:
                    logits = apply_repetition_penalty(logits, seen, repetition_penalty)
                logits = logits.float().cpu()
                greedy = logits.argmax(-1).tolist() if temperature <= 0 else None  # one call for all rows
                nxt = [0] * B  # finished rows feed a dummy id; their states are never read
                for b in range(B):
                    if not active[b]:
                        continue
                    nxt[b] = (
                        greedy[b] if greedy is not None else sample_next(logits[b], temperature, top_k, top_p, gens[b])
                    )
                    out[b].append(nxt[b])
                    if on_token is not None:
                        on_token(b, nxt[b])
                    if nxt[b] in stops:
                        active[b], reason[b] = False, STOP
                if not any(active) or step == max_new_tokens - 1:
                    break
                new = torch.tensor(nxt, device=device)[:, None]  # (B, 1)
                if seen is not None:
                    seen[torch.arange(B, device=device), new[:, 0]] = True
                if cuda_graph:
                    logits = graphed.step(new)
                    continue
                end = cache[0].length + 1
                kw = dict(attn_mask=key_ok[:, None, None, :end], position_ids=pos[:, end - 1 : end]) if padded else {}
                logits = model(new, cache=cache, **kw)[:, -1]
    finally:
        model.train(was_training)
    return [GenerationResult(o, r) for o, r in zip(out, reason)]


def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_ids: Iterable[int] = (),
    on_token: Callable[[int], None] | None = None,
    repetition_penalty: float = 1.0,
    cuda_graph: bool = False,
) -> list[int]:
    """Continue one prompt by up to ``max_new_tokens`` tokens (a one-row :func:`generate_batch`).

    Args:
        model: the model (token ids go to :meth:`~dsv3.model.Transformer.input_device`).
        prompt_ids: the prompt's token ids (non-empty). If prompt plus new tokens exceed
            ``max_seq_len``, the oldest prompt tokens are dropped.
        max_new_tokens: ``1 <= n < max_seq_len``.
        temperature, top_k, top_p: sampling settings (see :func:`filter_logits`).
        seed: seed of the sampling generator; the same seed gives the same output.
        eos_ids: generation stops after emitting any of these ids (it is included).
        on_token: called with each new id as soon as it is chosen (streaming).
        repetition_penalty: see :func:`apply_repetition_penalty`; 1 = off.
        cuda_graph: decode at fixed shapes, a CUDA graph on CUDA (see :func:`generate_batch`).

    Returns:
        The new token ids (without the prompt).

    Raises:
        ValueError: empty prompt, ``max_new_tokens`` outside ``[1, max_seq_len)`` or other
            settings out of range.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    stream = None if on_token is None else (lambda _row, i: on_token(i))
    return generate_batch(
        model,
        [prompt_ids],
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        eos_ids,
        repetition_penalty,
        stream,
        cuda_graph=cuda_graph,
    )[0].ids


def check_speculative(model: Transformer, temperature: float) -> None:
    """Raise :class:`DsvError` unless MTP speculative decoding applies (greedy, MTP module present)."""
    if temperature > 0:
        raise DsvError(
            f"speculative decoding with the MTP module supports greedy decoding only "
            f"(temperature {temperature}); use temperature 0 (--temperature 0)"
        )
    if not len(model.mtp):
        raise DsvError(
            "this model has no MTP module (model.mtp_depth = 0), so it cannot draft tokens; "
            "run without speculative decoding (drop --speculative)"
        )


@torch.no_grad()
def generate_speculative(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    stop_ids: Iterable[int] = (),
    repetition_penalty: float = 1.0,
    on_token: Callable[[int], None] | None = None,
) -> tuple[GenerationResult, SpeculativeStats]:
    """Greedy decoding with self-drafting by MTP depth 1; the output equals greedy :func:`generate`.

    After the main model picks token ``t_m`` from position m-1, the MTP module reads the
    post-norm state of position m-1 and the embedding of ``t_m`` and drafts ``d`` for
    position m+1. The next main forward takes ``[t_m, d]`` (positions m, m+1): its first
    logits give the true greedy ``t_{m+1}``; if that equals ``d``, the second logits already
    give ``t_{m+2}`` and one forward produced two tokens. Otherwise ``d`` is discarded by
    moving the cache length back over its position (its latents are overwritten later).
    The MTP module keeps its own latent cache and only ever sees verified tokens.

    Args:
        model: a model with ``mtp_depth >= 1`` (only the first MTP module drafts).
        prompt_ids: non-empty prompt ids (the oldest are dropped if prompt plus new tokens
            exceed ``max_seq_len``).
        max_new_tokens: ``1 <= n < max_seq_len``.
        stop_ids: generation ends after producing any of these ids (it is kept).
        repetition_penalty: as in :func:`generate` (applied to both the drafts and the checks).
        on_token: called with each new id as soon as it is verified (streaming).

    Returns:
        (:class:`GenerationResult`, :class:`SpeculativeStats`).

    Raises:
        DsvError: the model has no MTP module.
        ValueError: empty prompt or settings out of range.
    """
    check_speculative(model, 0.0)
    _check_settings(model, max_new_tokens, 0.0, 0, 1.0, repetition_penalty)
    prompt = _fit_prompts(model, [prompt_ids], max_new_tokens)[0]
    t0 = time.perf_counter()
    device = model.input_device()
    stops = {int(i) for i in stop_ids}
    seen = _seen_mask([prompt], model.cfg.vocab_size, device)[0]  # (V,)

    def pick(logits: torch.Tensor) -> int:  # (V,) -> greedy id after the repetition penalty
        return int(apply_repetition_penalty(logits, seen, repetition_penalty).argmax())

    was_training = model.training
    model.eval()
    stats = SpeculativeStats()
    out: list[int] = []

    def emit(tok: int) -> bool:
        """Record a verified token; True when generation must end."""
        out.append(tok)
        seen[tok] = True
        if on_token is not None:
            on_token(tok)
        return tok in stops or len(out) == max_new_tokens

    try:
        n = len(prompt)
        cache = model.new_cache(1, n + max_new_tokens)
        mtp_cache = model.new_mtp_cache(1, n + max_new_tokens)
        h = model.hidden_states(torch.tensor([prompt], device=device), cache=cache)  # (1, n, D)
        stats.forwards += 1
        last = pick(model.lm_head(h[0, -1]).float())
        done = emit(last)
        # MTP position i reads state h_i and the embedding of token i+1, and drafts token i+2
        new_ids = prompt[1:] + [last]
        while not done:
            draft = pick(model.mtp_draft(h, torch.tensor([new_ids], device=device), mtp_cache, last_only=True)[0, -1])
            m = cache[0].length  # position of `last`, not yet in the cache
            h = model.hidden_states(torch.tensor([[last, draft]], device=device), cache=cache)  # (1, 2, D)
            stats.forwards += 1
            stats.drafted += 1
            logits = model.lm_head(h[0]).float()  # (2, V)
            first = pick(logits[0])
            if first == draft:
                stats.accepted += 1
                if emit(first):
                    break
                second = pick(logits[1])
                done = emit(second)
                new_ids, last = [first, second], second
            else:
                for c in cache:
                    c.length = m + 1  # forget the rejected draft's position
                h = h[:, :1]
                done = emit(first)
                new_ids, last = [first], first
    finally:
        model.train(was_training)
    stats.tokens = len(out)
    stats.seconds = time.perf_counter() - t0
    reason = STOP if out and out[-1] in stops else LENGTH
    return GenerationResult(out, reason), stats
