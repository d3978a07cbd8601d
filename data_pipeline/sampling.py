"""The rank-independent order in which a run reads its training samples.

The training samples form one stream: a seeded permutation of the split per epoch, read
in order. :func:`stream_indices` reads any stretch of it by position (the cursor = samples
consumed so far), so a step of any global batch size - a constant one
(:func:`global_sample_indices`: step ``s`` reads ``[s*B, (s+1)*B)``) or one that grows during
a batch-size ramp - takes the next samples: every sample is seen once per epoch.
:func:`rank_micro_batches` cuts a step into the micro-batches of one rank. Together they
make a run's data order a pure function of (seed, cursor, batch), independent of the
number of data-parallel ranks, so resuming or changing the parallel layout does not change
what the model sees, and skipping to any step costs O(1) (no replay).
:func:`loader_state` / :func:`check_loader_state` store and check that position in a
checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from dsv3.errors import DsvError


@lru_cache(maxsize=4)
def _epoch_permutation(n_samples: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))


def stream_indices(start: int, count: int, n_samples: int, seed: int) -> list[int]:
    """Samples at positions ``[start, start + count)`` of the training stream.

    The stream is the concatenation of per-epoch permutations; epoch ``e`` is
    ``torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed + e))``. A
    stretch may straddle an epoch boundary (and span several epochs when ``count >
    n_samples``). Reading the stream in consecutive stretches of any lengths sees every
    sample exactly once per epoch.

    Args:
        start: stream position (samples consumed before), >= 0.
        count: samples to read, >= 1.
        n_samples: ``len(dataset)``, >= 1.
        seed: base seed of the permutations.

    Returns:
        ``count`` sample indices in ``[0, n_samples)``.

    Raises:
        DsvError: ``n_samples`` < 1 (the split is shorter than one sample).
        ValueError: negative ``start`` or non-positive ``count``.
    """
    if n_samples < 1:
        raise DsvError("the training split holds no complete sample; lower data.seq_len or use a larger corpus")
    if start < 0 or count < 1:
        raise ValueError(f"need start >= 0 and count >= 1, got start={start}, count={count}")
    pos, end = int(start), int(start) + int(count)
    out: list[int] = []
    while pos < end:
        epoch, offset = divmod(pos, n_samples)
        take = min(end - pos, n_samples - offset)
        out.extend(_epoch_permutation(n_samples, seed + epoch)[offset : offset + take].tolist())
        pos += take
    return out


def global_sample_indices(step: int, global_batch: int, n_samples: int, seed: int) -> list[int]:
    """The samples of optimizer step ``step`` (0-based), for all ranks together.

    The sample stream is the concatenation of per-epoch permutations; epoch ``e`` is
    ``torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed + e))``.
    Step ``step`` takes stream positions ``[step*global_batch, (step+1)*global_batch)``,
    which may straddle an epoch boundary (and span several epochs when
    ``global_batch > n_samples``).

    Args:
        step: optimizer step, >= 0.
        global_batch: samples per step (micro_batch_size * grad_accum * dp_size), >= 1.
        n_samples: ``len(dataset)``, >= 1.
        seed: base seed of the permutations.

    Returns:
        ``global_batch`` sample indices in ``[0, n_samples)``.

    Raises:
        DsvError: ``n_samples`` < 1 (the split is shorter than one sample).
        ValueError: negative ``step`` or non-positive ``global_batch``.
    """
    if step < 0 or global_batch < 1:
        if n_samples < 1:
            raise DsvError("the training split holds no complete sample; lower data.seq_len or use a larger corpus")
        raise ValueError(f"need step >= 0 and global_batch >= 1, got step={step}, global_batch={global_batch}")
    return stream_indices(step * global_batch, global_batch, n_samples, seed)


def rank_micro_batches(
    indices: Sequence[int], dp_rank: int, dp_size: int, micro_batch_size: int, grad_accum: int
) -> list[list[int]]:
    """This rank's micro-batches of one step.

    Element ``j`` of micro-batch ``m`` on rank ``r`` is
    ``indices[(m*dp_size + r)*micro_batch_size + j]``, so micro-batch ``m`` of all ranks
    together is one contiguous slice of ``indices``.

    Args:
        indices: the step's samples from :func:`global_sample_indices`.
        dp_rank: this rank, in ``[0, dp_size)``.
        dp_size: data-parallel world size.
        micro_batch_size: samples per micro-batch per rank.
        grad_accum: micro-batches per step.

    Returns:
        ``grad_accum`` lists of ``micro_batch_size`` indices.

    Raises:
        ValueError: ``len(indices) != micro_batch_size * grad_accum * dp_size`` or a bad rank.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    expected = micro_batch_size * grad_accum * dp_size
    if len(indices) != expected:
        raise ValueError(
            f"got {len(indices)} indices for micro_batch_size*grad_accum*dp_size = "
            f"{micro_batch_size}*{grad_accum}*{dp_size} = {expected}"
        )
    out = []
    for m in range(grad_accum):
        start = (m * dp_size + dp_rank) * micro_batch_size
        out.append([int(i) for i in indices[start : start + micro_batch_size]])
    return out


def loader_state(
    step: int,
    global_batch: int,
    n_samples: int,
    seed: int,
    data_key: str | None,
    consumed: int | None = None,
    batch_ramp: dict | None = None,
) -> dict[str, Any]:
    """The loader's position after ``step`` optimizer steps, for a checkpoint's client state.

    Args:
        global_batch: the global batch (after the ramp, when there is one).
        consumed: samples consumed after ``step`` steps; default ``step * global_batch``.
        batch_ramp: the batch-size ramp that consumed them (``{start, increment, tokens}``),
            or None.

    Returns:
        ``{"consumed_samples", "epoch", "epoch_offset", "global_batch", "n_samples", "seed",
        "data_key"}`` (and ``"batch_ramp"`` with a ramp): ``consumed_samples`` stream
        positions were used; the next one is position ``epoch_offset`` of epoch ``epoch``.
    """
    consumed = int(step) * int(global_batch) if consumed is None else int(consumed)
    epoch, offset = divmod(consumed, max(int(n_samples), 1))
    state = {
        "consumed_samples": consumed,
        "epoch": epoch,
        "epoch_offset": offset,
        "global_batch": int(global_batch),
        "n_samples": int(n_samples),
        "seed": int(seed),
        "data_key": data_key,
    }
    if batch_ramp is not None:
        state["batch_ramp"] = dict(batch_ramp)
    return state


def _ramp_text(ramp: dict | None) -> str:
    if not ramp:
        return "none"
    return f"{{start: {ramp.get('start')}, increment: {ramp.get('increment')}, tokens: {ramp.get('tokens')}}}"


def check_loader_state(
    saved: dict[str, Any] | None,
    step: int,
    global_batch: int,
    n_samples: int,
    seed: int,
    data_key: str | None,
    where: str,
    consumed: int | None = None,
    batch_ramp: dict | None = None,
) -> None:
    """Check that resuming at ``step`` continues the saved sample stream exactly.

    The stream is a function of (data, seed, global batch, batch ramp) only, so the
    data-parallel size may change as long as the global batch and the ramp stay the same. A
    checkpoint without loader state (older runs) is accepted as is.

    Args:
        consumed: samples consumed after ``step`` steps now; default ``step * global_batch``.
        batch_ramp: the ramp now (as :func:`loader_state` records it), or None.

    Raises:
        DsvError: other data, seed, global batch or batch ramp than at save time, or a step
            that does not match the saved position (one line naming the values and the fix).
    """
    if not saved:
        return
    if saved.get("seed") != seed:  # first: the seed also chooses the validation split, so the data key follows
        raise DsvError(
            f"checkpoint {where} used train.seed={saved.get('seed')} (now {seed}), which orders the "
            "samples; resume with the same train.seed"
        )
    if saved.get("data_key") not in (None, data_key) or saved.get("n_samples") != n_samples:
        raise DsvError(
            f"checkpoint {where} was trained on other prepared data (key {saved.get('data_key')}, "
            f"{saved.get('n_samples')} samples; now {data_key}, {n_samples}); resume with the same data.* "
            "settings, or start a new run from its weights with train.init_from"
        )
    if saved.get("global_batch") != global_batch:
        raise DsvError(
            f"checkpoint {where} used a global batch of {saved.get('global_batch')} samples (now "
            f"{global_batch}); keep parallel.micro_batch_size * parallel.grad_accum * processes equal "
            "(e.g. double grad_accum when halving the processes)"
        )
    if (saved.get("batch_ramp") or None) != (dict(batch_ramp) if batch_ramp else None):
        raise DsvError(
            f"checkpoint {where} used the batch ramp {_ramp_text(saved.get('batch_ramp'))} (now "
            f"{_ramp_text(batch_ramp)}), which decides how many samples each step reads; resume with the "
            "same train.batch_ramp (its default increment is parallel.micro_batch_size x data-parallel "
            "size: keep it, or set train.batch_ramp.increment to the saved one)"
        )
    if consumed is None:
        consumed = step * global_batch
    if saved.get("consumed_samples") != consumed:
        raise DsvError(
            f"checkpoint {where} is inconsistent (step {step} but {saved.get('consumed_samples')} samples "
            "consumed); delete it to resume from an older one"
        )
