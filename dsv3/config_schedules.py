"""The schedule forms of the training config: the batch-size ramp, the phased learning rate and
piecewise-constant values over tokens (DeepSeek-V3 report §4.2), parsed and checked.

:func:`dsv3.config.validate` checks them when a config loads; :mod:`dsv3.training.schedule`
turns them into the value of each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dsv3.errors import DsvError

LR_PHASE_TYPES = ("warmup", "constant", "cosine", "linear")
LR_EXAMPLE = (
    "train.lr_schedule=[{type: warmup, until_step: 2000, lr: 2.2e-4}, {type: constant, until_tokens: 10.0e+12}, "
    "{type: cosine, until_tokens: 14.3e+12, lr: 2.2e-5}, {type: constant}]"
)


@dataclass(frozen=True)
class LRPhase:
    """One phase of ``train.lr_schedule`` (see :func:`parse_lr_schedule`).

    Attributes:
        type: ``warmup`` (linear from 0 to ``lr``), ``constant`` (``lr``, default the previous
            phase's value), ``cosine`` / ``linear`` (from the previous phase's value to ``lr``).
        until_step: the phase ends before this optimizer step (0-based), or
        until_tokens: it ends at the first step that starts with at least this many tokens
            consumed; both None: it lasts until the end of training (last phase only).
        lr: the phase's target value (None: see ``type``).
    """

    type: str
    until_step: int | None = None
    until_tokens: int | None = None
    lr: float | None = None


@dataclass(frozen=True)
class BatchRamp:
    """``train.batch_ramp`` (see :func:`parse_batch_ramp`): the global batch grows from ``start``
    sequences to the configured one over the first ``tokens`` tokens, by ``increment`` sequences
    (None: one micro-batch on every data-parallel rank)."""

    start: int
    tokens: int
    increment: int | None = None


def _number(key: str, value: Any, fix: str, integer: bool = False, positive: bool = False) -> float | int:
    """``value`` as a finite float (or a whole int with ``integer``); YAML strings such as
    ``10.0e12`` count as numbers.

    Raises:
        DsvError: not a number, not finite, negative (or 0 with ``positive``), or not whole.
    """
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise DsvError(f"{key}={value!r} must be a number; {fix}")
    if number < 0 or (positive and number == 0):
        raise DsvError(f"{key}={value!r} must be {'positive' if positive else '>= 0'}; {fix}")
    if integer:
        if float(number) != math.floor(number):
            raise DsvError(f"{key}={value!r} must be a whole number; {fix}")
        return int(number) if isinstance(number, int) else int(round(number))
    return float(number)


def parse_piecewise(key: str, value: Any) -> list[tuple[int, float]] | None:
    """A piecewise-constant schedule over tokens: ``[[0, v0], [t1, v1], ...]`` means ``v0``
    while fewer than ``t1`` tokens were consumed before a step, then ``v1``, ... (V3: MTP
    lambda ``[[0, 0.3], [10.0e+12, 0.1]]``). The first entry starts at 0 tokens; the token
    counts increase strictly; values are >= 0.

    Args:
        key: the config key, for the messages (``train.mtp_lambda_schedule``).
        value: the raw config value, or None.

    Returns:
        ``[(tokens, value), ...]`` (tokens as int), or None when ``value`` is None.

    Raises:
        DsvError: any other form (one line naming the key and an example).
    """
    if value is None:
        return None
    fix = f"write it like {key}=[[0, 0.3], [10.0e+12, 0.1]] ([from_tokens, value] pairs from 0 tokens on)"
    if not isinstance(value, list) or not value:
        raise DsvError(f"{key}={value!r} must be a non-empty list of [from_tokens, value] pairs; {fix}")
    out: list[tuple[int, float]] = []
    for i, entry in enumerate(value):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise DsvError(f"{key} entry {i} ({entry!r}) is not a [from_tokens, value] pair; {fix}")
        tokens = _number(f"{key}[{i}][0]", entry[0], fix, integer=True)
        val = _number(f"{key}[{i}][1]", entry[1], fix)
        if i == 0 and tokens != 0:
            raise DsvError(f"{key} starts at {entry[0]!r} tokens; its first entry must start at 0 tokens; {fix}")
        if out and tokens <= out[-1][0]:
            raise DsvError(
                f"{key} entry {i} starts at {entry[0]!r} tokens, not after entry {i - 1} "
                f"({out[-1][0]:,}); list the entries by increasing tokens; {fix}"
            )
        out.append((tokens, val))
    return out


def parse_batch_ramp(value: Any) -> BatchRamp | None:
    """``train.batch_ramp``: ``{start: 3072, tokens: 469.0e+9}`` (V3) or with ``increment``.

    Returns:
        The :class:`BatchRamp`, or None when ``value`` is None.

    Raises:
        DsvError: another form, a non-positive start, tokens or increment.
    """
    if value is None:
        return None
    fix = "write it like train.batch_ramp={start: 3072, tokens: 469.0e+9} (optionally increment: 128)"
    if not isinstance(value, dict):
        raise DsvError(f"train.batch_ramp={value!r} must be a mapping; {fix}")
    unknown = sorted(set(value) - {"start", "tokens", "increment"})
    if unknown:
        raise DsvError(f"train.batch_ramp has an unknown key {unknown[0]!r}; valid: start, tokens, increment; {fix}")
    for need in ("start", "tokens"):
        if need not in value:
            raise DsvError(f"train.batch_ramp needs {need}; {fix}")
    start = _number("train.batch_ramp.start", value["start"], fix, integer=True, positive=True)
    tokens = _number("train.batch_ramp.tokens", value["tokens"], fix, integer=True, positive=True)
    inc = value.get("increment")
    if inc is not None:
        inc = _number("train.batch_ramp.increment", inc, fix, integer=True, positive=True)
    return BatchRamp(start=start, tokens=tokens, increment=inc)


def parse_lr_schedule(value: Any, default_lr: float = 1.0) -> list[LRPhase] | None:
    """``train.lr_schedule``: the learning rate as phases, in order. Each phase is a mapping
    with ``type`` (``warmup``, ``constant``, ``cosine``, ``linear``), an end (``until_step: N``
    = before optimizer step N, or ``until_tokens: T`` = at the first step that starts with T
    tokens consumed; counted from the start of training) and ``lr`` (the value the phase
    reaches or holds). Only a last ``constant``, ``cosine`` or ``linear`` phase may omit its end
    (it lasts to the end of training); ``cosine`` and ``linear`` need ``lr``; the ends of
    phases on the same axis increase.

    Args:
        default_lr: ``train.lr``, the default target of a warmup.

    Returns:
        The phases, or None when ``value`` is None.

    Raises:
        DsvError: any other form (one line naming the phase and the fix).
    """
    if value is None:
        return None
    fix = f"write it like {LR_EXAMPLE}"
    if not isinstance(value, list) or not value:
        raise DsvError(f"train.lr_schedule={value!r} must be a non-empty list of phases; {fix}")
    phases: list[LRPhase] = []
    last_end: dict[str, int] = {}
    for i, ph in enumerate(value):
        where = f"train.lr_schedule[{i}]"
        if not isinstance(ph, dict):
            raise DsvError(f"{where}={ph!r} must be a mapping with type, until_step or until_tokens, lr; {fix}")
        unknown = sorted(set(ph) - {"type", "until_step", "until_tokens", "lr"})
        if unknown:
            raise DsvError(f"{where} has an unknown key {unknown[0]!r}; valid: type, until_step, until_tokens, lr")
        kind = ph.get("type")
        if kind not in LR_PHASE_TYPES:
            raise DsvError(f"{where}.type={kind!r} must be one of {', '.join(LR_PHASE_TYPES)}; {fix}")
        if "until_step" in ph and "until_tokens" in ph:
            raise DsvError(f"{where} has both until_step and until_tokens; give one end per phase")
        step = ph.get("until_step")
        tokens = ph.get("until_tokens")
        if step is not None:
            step = _number(f"{where}.until_step", step, fix, integer=True, positive=True)
        if tokens is not None:
            tokens = _number(f"{where}.until_tokens", tokens, fix, integer=True, positive=True)
        lr = ph.get("lr")
        if lr is not None:
            lr = _number(f"{where}.lr", lr, fix)
        if step is None and tokens is None and (i < len(value) - 1 or kind == "warmup"):
            what = "a warmup" if kind == "warmup" else "only the last phase may run to the end of training"
            raise DsvError(f"{where} ({kind}) needs an end, until_step or until_tokens ({what}); {fix}")
        if kind in ("cosine", "linear") and lr is None:
            raise DsvError(f"{where} ({kind}) needs lr, the value it decays to; {fix}")
        if kind == "warmup" and (lr if lr is not None else default_lr) <= 0:
            raise DsvError(f"{where} (warmup) must warm up to a positive lr")
        axis, end = ("step", step) if step is not None else ("tokens", tokens)
        if end is not None:
            if axis in last_end and end <= last_end[axis]:
                raise DsvError(
                    f"{where} ends at until_{axis}={end:,}, not after an earlier phase's "
                    f"{last_end[axis]:,}; give each phase's end counted from the start of training, "
                    "increasing"
                )
            last_end[axis] = end
        phases.append(LRPhase(type=kind, until_step=step, until_tokens=tokens, lr=lr))
    return phases
