"""Autoregressive generation with the latent KV cache (stage 10).

Sampling: logits / temperature, then top-k, then top-p (nucleus, Holtzman et al., 2020)
filtering, then a draw from a seeded ``torch.Generator``; ``temperature == 0`` is greedy
(argmax). The prompt is processed in one forward (prefill) that fills the cache; each new
token then costs one single-token forward over the cached latents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from dsv3.model import Transformer


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


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    """Pick the next token id from (V,) logits; greedy when ``temperature <= 0``."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
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
) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens.

    Args:
        model: the model (its parameters' device is used).
        prompt_ids: the prompt's token ids (non-empty). If prompt plus new tokens exceed
            ``max_seq_len``, the oldest prompt tokens are dropped.
        temperature, top_k, top_p: sampling settings (see :func:`filter_logits`).
        seed: seed of the sampling generator; the same seed gives the same output.
        eos_ids: generation stops after emitting any of these ids (it is included).
        on_token: called with each new id as soon as it is chosen (streaming).

    Returns:
        The new token ids (without the prompt).

    Raises:
        ValueError: empty prompt or ``max_new_tokens >= model.cfg.max_seq_len``.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    limit = model.cfg.max_seq_len
    if max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be below model.max_seq_len={limit}")
    prompt_ids = list(prompt_ids)[-(limit - max_new_tokens):]
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    stops = set(eos_ids)
    was_training = model.training
    model.eval()
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[0, -1]
    out: list[int] = []
    for i in range(max_new_tokens):
        nxt = sample_next(logits.cpu(), temperature, top_k, top_p, gen)
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if nxt in stops or i == max_new_tokens - 1:
            break
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1]
    model.train(was_training)
    return out
