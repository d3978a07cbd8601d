"""The schedules of a training run (DeepSeek-V3 report §4.2): learning rate, global batch,
MTP weight lambda and the bias update speed gamma.

Every scheduled value of optimizer step ``s`` (0-based) is a pure function of ``s`` and the
config: nothing accumulates during training, so a resumed run (with any layout) computes
the same values as an uninterrupted one. Where the recipe counts tokens, "the tokens of step
``s``" are the tokens consumed *before* it, ``consumed(s) * seq_len``, and ``consumed(s)``
is itself a pure function of ``s`` (:class:`BatchSchedule`).

- :class:`BatchSchedule`: the global batch of each step (``train.batch_ramp``) and the samples
  consumed before it (the cursor into the exactly-once sample stream,
  :func:`data_pipeline.sampling.stream_indices`).
- :func:`lr_at`: the default warmup + cosine learning rate (``train.warmup_steps``,
  ``train.min_lr_ratio``); :class:`Schedules` runs ``train.lr_schedule`` phases instead when
  set.
- piecewise constants over tokens: ``train.mtp_lambda_schedule``,
  ``train.bias_update_speed_schedule``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from dsv3.config import Config, TrainConfig
from dsv3.config_schedules import BatchRamp, LRPhase, parse_batch_ramp, parse_lr_schedule, parse_piecewise
from dsv3.errors import DsvError


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) without ``train.lr_schedule``.

    ``lr * (step+1) / warmup_steps`` during warmup; then cosine from ``lr`` down to
    ``lr * min_lr_ratio`` at the last step.
    """
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - t.warmup_steps - 1, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_warning(t: TrainConfig) -> str | None:
    """A warning line when the schedule of :func:`lr_at` cannot run its course: with
    ``warmup_steps >= steps`` the rate never decays, and reaches ``lr`` only at the last step
    (``==``) or never (``>``). None otherwise (and always with ``train.lr_schedule``)."""
    if t.lr_schedule is not None:
        return None
    if t.warmup_steps > t.steps:
        return (
            f"warning: train.warmup_steps={t.warmup_steps} > train.steps={t.steps}: the learning rate ends "
            f"at {lr_at(t.steps - 1, t):.2e}, never reaching train.lr={t.lr:g} nor decaying; lower "
            "train.warmup_steps"
        )
    if t.warmup_steps == t.steps:
        return (
            f"warning: train.warmup_steps=train.steps={t.steps}: the learning rate reaches train.lr={t.lr:g} "
            "only at the last step and never decays; lower train.warmup_steps"
        )
    return None


def tokens_text(n: float) -> str:
    """``n`` tokens in short form: 469B, 14.8T, 36.9K, 512."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.4g}{unit}"
    return f"{n:g}"


@dataclass(frozen=True)
class _Segment:
    first_step: int  # the first step of the segment
    consumed: int  # samples consumed before that step
    batch: int  # global batch (sequences) of every step of the segment


class BatchSchedule:
    """The global batch of every optimizer step, and the samples consumed before it.

    Without a ramp every step takes ``final`` sequences. With ``train.batch_ramp`` the batch
    grows in ``K = ceil((final - start) / increment)`` equal token intervals: while the
    tokens consumed before a step are below ``(i + 1) * ramp_tokens / K`` (and at least
    ``i * ramp_tokens / K``) the step takes ``min(final, start + i * increment)`` sequences;
    from ``ramp_tokens`` on, ``final``. ``final`` is ``micro_batch_size * grad_accum * dp``
    and the increment defaults to ``micro_batch_size * dp`` (one micro-batch more on every
    data-parallel rank), so every batch is a whole number of micro-batches per rank. The
    steps are built interval by interval (O(K) at start-up); a step's batch and cursor are
    then a lookup, the same for every process and on every resume.

    Args:
        final: the global batch after the ramp (sequences).
        seq_len: tokens per sequence.
        ramp: the parsed ``train.batch_ramp`` or None.
        granule: ``micro_batch_size * dp``: every batch must be a multiple of it.

    Raises:
        DsvError: a start or increment that is not a whole number of micro-batches per
            data-parallel rank, or a start above ``final``.
    """

    def __init__(self, final: int, seq_len: int, ramp: BatchRamp | None = None, granule: int | None = None):
        self.final, self.seq_len, self.ramp = int(final), int(seq_len), ramp
        granule = granule or self.final
        self.increment = None
        self.intervals = 0  # K, the ramp's token intervals
        self.segments = [_Segment(0, 0, self.final)]
        self.ramp_end_step = 0
        if ramp is None:
            return
        self.increment = ramp.increment or granule
        for key, value in (("start", ramp.start), ("increment", self.increment)):
            if value % granule:
                lower, upper = value // granule * granule, (value // granule + 1) * granule
                example = f"{lower} or {upper}" if lower else f"{upper}"
                raise DsvError(
                    f"train.batch_ramp.{key}={value} is not a whole number of micro-batches on every "
                    f"data-parallel rank (parallel.micro_batch_size x data-parallel size = {granule}); "
                    f"use a multiple of {granule} such as {example}"
                )
        if ramp.start > self.final:
            raise DsvError(
                f"train.batch_ramp.start={ramp.start} exceeds the final global batch {self.final} "
                "(parallel.micro_batch_size x grad_accum x data-parallel size); a ramp grows the batch: "
                "lower start or raise parallel.grad_accum"
            )
        n_inc = -(-(self.final - ramp.start) // self.increment)  # K intervals
        self.segments = []
        step, consumed = 0, 0
        while True:
            i = self._interval(consumed, n_inc)
            if i >= n_inc:
                break
            batch = min(self.final, ramp.start + i * self.increment)
            # first sample count whose tokens reach the end of interval i: c * seq_len * K >= (i + 1) * tokens
            end = -(-(i + 1) * ramp.tokens // (self.seq_len * n_inc))
            n_steps = -(-(end - consumed) // batch)
            self.segments.append(_Segment(step, consumed, batch))
            step, consumed = step + n_steps, consumed + n_steps * batch
        self.segments.append(_Segment(step, consumed, self.final))
        self.ramp_end_step = step
        self.intervals = n_inc

    def _interval(self, consumed: int, n_inc: int) -> int:
        return consumed * self.seq_len * n_inc // self.ramp.tokens

    def _segment(self, step: int) -> _Segment:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        i = bisect.bisect_right([s.first_step for s in self.segments], step) - 1
        return self.segments[i]

    def batch(self, step: int) -> int:
        """Sequences of optimizer step ``step`` (0-based), all ranks together."""
        return self._segment(step).batch

    def consumed(self, step: int) -> int:
        """Samples consumed before optimizer step ``step`` (= after ``step`` steps)."""
        seg = self._segment(step)
        return seg.consumed + (step - seg.first_step) * seg.batch

    def tokens(self, step: int) -> int:
        """Tokens consumed before optimizer step ``step``: ``consumed(step) * seq_len``."""
        return self.consumed(step) * self.seq_len

    def first_step_at(self, tokens: int) -> int:
        """The first step that starts with at least ``tokens`` tokens consumed."""
        need = -(-int(tokens) // self.seq_len)  # samples
        for seg, nxt in zip(self.segments, self.segments[1:] + [None]):
            if nxt is None or nxt.consumed >= need:
                return seg.first_step + max(0, -(-(need - seg.consumed) // seg.batch))
        raise AssertionError("unreachable")

    def state(self) -> dict | None:
        """The ramp as the loader state of a checkpoint records it (None without a ramp)."""
        if self.ramp is None:
            return None
        return {"start": self.ramp.start, "increment": self.increment, "tokens": self.ramp.tokens}


def _piecewise_value(schedule: list[tuple[int, float]], tokens: int) -> float:
    i = bisect.bisect_right([t for t, _ in schedule], tokens) - 1
    return schedule[i][1]


@dataclass(frozen=True)
class _Phase:
    spec: LRPhase
    start: int  # first step
    end: int | None  # first step after the phase (None: to the end of training)
    begin_lr: float
    target: float


class Schedules:
    """Every scheduled value of a run for ``dp`` data-parallel ranks (see the module docstring).

    Raises:
        DsvError: a ramp that does not fit the layout (:class:`BatchSchedule`), or an
            ``lr_schedule`` phase whose token end falls before the end of an earlier phase.
    """

    def __init__(self, cfg: Config, dp: int):
        t, p = cfg.train, cfg.parallel
        self.t = t
        granule = p.micro_batch_size * dp
        self.batch = BatchSchedule(granule * p.grad_accum, cfg.data.seq_len, parse_batch_ramp(t.batch_ramp), granule)
        self.mtp = parse_piecewise("train.mtp_lambda_schedule", t.mtp_lambda_schedule)
        self.gamma = parse_piecewise("train.bias_update_speed_schedule", t.bias_update_speed_schedule)
        self.phases = self._resolve(parse_lr_schedule(t.lr_schedule, t.lr))
        self._starts = [ph.start for ph in self.phases]

    @property
    def ramped(self) -> bool:
        """Whether the global batch changes during the run."""
        return self.batch.ramp is not None

    def _resolve(self, phases: list[LRPhase] | None) -> list[_Phase]:
        if phases is None:
            return []
        out: list[_Phase] = []
        start, value = 0, self.t.lr
        for i, ph in enumerate(phases):
            if ph.until_step is not None:
                end = ph.until_step
            elif ph.until_tokens is not None:
                end = self.batch.first_step_at(ph.until_tokens)
            else:
                end = None
            if end is not None and end < start:
                what = (
                    f"until_step={ph.until_step}"
                    if ph.until_step is not None
                    else f"until_tokens={ph.until_tokens:,} (step {end:,})"
                )
                raise DsvError(
                    f"train.lr_schedule[{i}] ({ph.type}) ends at {what}, before the previous phase ends "
                    f"(step {start:,}); give the phases in order with increasing ends"
                )
            if ph.type == "warmup":
                begin, target = 0.0, ph.lr if ph.lr is not None else self.t.lr
            else:
                begin = value
                target = ph.lr if ph.lr is not None else value
            out.append(_Phase(ph, start, end, begin, target))
            value = target
            if end is None:
                break
            start = end
        return out

    # ------------------------------------------------------------------ values of a step
    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step``.

        Without ``train.lr_schedule``: :func:`lr_at`. With it, the phase that holds the step
        (after the last phase's end, its value stays): a ``constant`` phase gives its value; a
        ``warmup`` rises linearly from 0, ``(x_after - x0) / (x1 - x0)`` of the way, where ``x``
        counts steps (``until_step``) or tokens (``until_tokens``), ``x0`` is the phase's first
        step (or its tokens), ``x1`` its end, and ``x_after`` the position after this step (so
        its last step reaches ``lr``); ``cosine`` and ``linear`` go from the previous value to
        ``lr`` with the fraction ``(x - x0) / (x1 - x0)`` at the step's start (``lr`` is
        reached where the next phase begins); a last ``cosine`` / ``linear`` without an end
        runs to ``train.steps`` and reaches ``lr`` at the last step, as :func:`lr_at` does.
        """
        if not self.phases:
            return lr_at(step, self.t)
        i = bisect.bisect_right(self._starts, step) - 1
        ph = self.phases[i]
        if ph.end is not None and step >= ph.end:  # after the last phase
            return ph.target
        kind = ph.spec.type
        if kind == "constant":
            return ph.target
        if ph.end is None:  # the last phase, to the end of training (cosine / linear)
            num, den = step - ph.start, max(self.t.steps - 1 - ph.start, 1)
        elif ph.spec.until_step is not None:
            num, den = (step + 1 if kind == "warmup" else step) - ph.start, ph.end - ph.start
        else:
            x0 = self.batch.tokens(ph.start)
            num = self.batch.tokens(step + 1 if kind == "warmup" else step) - x0
            den = max(ph.spec.until_tokens - x0, 1)
        if kind == "warmup":  # the same arithmetic as lr_at
            return ph.target * num / den if num <= den else ph.target
        frac = min(max(num / den, 0.0), 1.0)
        if kind == "linear":
            return ph.begin_lr + (ph.target - ph.begin_lr) * frac
        return ph.target + (ph.begin_lr - ph.target) * 0.5 * (1 + math.cos(math.pi * frac))

    def mtp_lambda(self, step: int) -> float:
        """lambda of optimizer step ``step``: ``train.mtp_lambda_schedule`` at the tokens
        consumed before it, else ``train.mtp_lambda``."""
        return _piecewise_value(self.mtp, self.batch.tokens(step)) if self.mtp else self.t.mtp_lambda

    def bias_update_speed(self, step: int) -> float:
        """gamma of optimizer step ``step``: ``train.bias_update_speed_schedule`` at the tokens
        consumed before it, else ``train.bias_update_speed``."""
        return _piecewise_value(self.gamma, self.batch.tokens(step)) if self.gamma else self.t.bias_update_speed

    def values(self, step: int) -> dict[str, float]:
        """``global_batch``, ``lr``, ``mtp_lambda``, ``bias_update_speed`` of step ``step``,
        as the step's metrics record logs them."""
        return {
            "global_batch": self.batch.batch(step),
            "lr": self.lr(step),
            "mtp_lambda": self.mtp_lambda(step),
            "bias_update_speed": self.bias_update_speed(step),
        }

    # ------------------------------------------------------------------ the phases, for dsv3 plan
    def phase_rows(self) -> list[tuple[str, str, int, int | None]]:
        """Every phase of every schedule as ``(schedule, what, first step, end step or None)``;
        ``end`` is the first step after the phase (None: to the end of training)."""
        rows: list[tuple[str, str, int, int | None]] = []
        b = self.batch
        if b.ramp is not None:
            every = tokens_text(b.ramp.tokens / max(b.intervals, 1))
            what = f"ramp {b.ramp.start:,} -> {b.final:,} (+{b.increment:,} every {every} tokens)"
            rows.append(("global_batch", what, 0, b.ramp_end_step))
            rows.append(("global_batch", f"{b.final:,} sequences", b.ramp_end_step, None))
        else:
            rows.append(("global_batch", f"{b.final:,} sequences", 0, None))
        if self.phases:
            for ph in self.phases:
                kind = ph.spec.type
                what = {
                    "warmup": f"warmup 0 -> {ph.target:.3g}",
                    "constant": f"constant {ph.target:.3g}",
                    "cosine": f"cosine {ph.begin_lr:.3g} -> {ph.target:.3g}",
                    "linear": f"linear {ph.begin_lr:.3g} -> {ph.target:.3g}",
                }[kind]
                rows.append(("lr", what, ph.start, ph.end))
            last = self.phases[-1]
            if last.end is not None:
                rows.append(("lr", f"constant {last.target:.3g}", last.end, None))
        else:
            t = self.t
            w = min(t.warmup_steps, t.steps)
            if w:
                rows.append(("lr", f"warmup 0 -> {t.lr:.3g}", 0, w))
            rows.append(("lr", f"cosine {t.lr:.3g} -> {t.lr * t.min_lr_ratio:.3g}", w, None))
        for name, sched, const in (
            ("mtp_lambda", self.mtp, self.t.mtp_lambda),
            ("bias_update_speed", self.gamma, self.t.bias_update_speed),
        ):
            if not sched:
                rows.append((name, f"{const:g}", 0, None))
                continue
            for (tok, val), nxt in zip(sched, sched[1:] + [None]):
                end = b.first_step_at(nxt[0]) if nxt is not None else None
                rows.append((name, f"{val:g}", b.first_step_at(tok), end))
        return rows

    def warnings(self) -> list[str]:
        """One warning line when schedule phases start at or after ``train.steps`` (they never
        run), naming the first such phase of each schedule; else no line."""
        steps = self.t.steps
        late: dict[str, str] = {}
        for name, what, first, _ in self.phase_rows():
            if first >= steps and first > 0 and name not in late:
                late[name] = f"{name} {what} (step {first:,})"
        if not late:
            return []
        return [
            f"warning: train.steps={steps:,} ends before these schedule phases start: {'; '.join(late.values())}; "
            "raise train.steps or shorten the schedules"
        ]


def schedule_table(cfg: Config, dp: int) -> list[str]:
    """The token budget and the steps of every schedule phase, for ``dsv3 plan``: one line per
    phase (schedule, what it does, the tokens it covers, its steps), then the run's total.

    Raises:
        DsvError: the schedules do not fit ``dp`` data-parallel ranks (:class:`Schedules`).
    """
    sched = Schedules(cfg, dp)
    b, steps = sched.batch, cfg.train.steps
    lines = [
        f"schedule    train.steps={steps:,} consume {tokens_text(b.tokens(steps))} tokens "
        f"({b.consumed(steps):,} sequences of {b.seq_len:,}); each phase's token budget and steps (0-based):"
    ]
    for name, what, first, end in sched.phase_rows():
        stop = steps if end is None else end
        if first >= steps and first > 0:
            span = f"from step {first:,}: after train.steps, never runs"
        else:
            stop = min(stop, steps)
            span = (
                f"tokens {tokens_text(b.tokens(first)):>7} - {tokens_text(b.tokens(stop)):<7} "
                f"steps {first:>9,} - {stop - 1:<9,} ({stop - first:,} steps)"
            )
            if end is not None and end > steps:
                span += f"; train.steps ends it before its step {end - 1:,}"
        lines.append(f"  {name:<18} {what:<47} {span}")
    return lines
