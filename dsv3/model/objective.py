"""The training objective of DeepSeek-V3, defined once for every layout.

Total loss of one optimizer step (V3 report §2.1.2 eq. 17-20, §2.2 eq. 25)::

    L = L_main + lambda / D * sum_k L_MTP^k + alpha * L_Bal

- ``L_main``: next-token cross-entropy of the main head, summed over the labelled positions
  of the *global* batch and divided by their number (so the loss is the mean over the global
  batch, whatever the micro-batch split and the number of processes);
- ``L_MTP^k``: the same for MTP depth ``k`` (1..D), over the positions whose target
  ``k`` tokens further is labelled (and, with document-aware packing, in the same document;
  :func:`label_counts`);
- ``L_Bal``: the sum over MoE layers of the sequence-wise balance loss, already a mean over
  the sequences (:class:`dsv3.model.moe.Gate`).

A process computes its micro-batches' summed cross-entropies (:func:`ce_sum`, in
:class:`dsv3.model.transformer.TrainOutput` or the last pipeline stage) and divides by the
global counts that every rank agrees on before the step; :func:`training_loss` forms ``L``
for one micro-batch, with ``scale`` undoing the averaging of the data-parallel engine over
micro-batches and ranks.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value that carries no loss (padding, prompt tokens in SFT)


#: On CPU the cross-entropy works on blocks of about this many logits (8 MiB in fp32) at a time
CE_BLOCK_ELEMENTS = 2**21


class _BlockedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (N, V) logits whose fp32 work runs block by block.

    Forward: ``sum over labelled rows of -log_softmax(x)[label]`` in fp32; saves the logits (in
    their own dtype). Backward: ``g (softmax(x) - onehot(label))`` on labelled rows, 0
    elsewhere, the softmax recomputed in fp32 block by block and the result written in the
    logits' dtype. Both use torch's fused (log-)softmax kernels, which read each block once
    (into two fp32 buffers reused by all blocks):
    ``torch.logsumexp`` (max, subtract, exp, sum, log as separate passes) took 4.7x as long as
    ``log_softmax`` on a (512, 4096) bf16 block (5.9 against 1.3 ms, one thread, AVX-512-BF16
    CPU), and the recomputed ``softmax`` 1.1 ms against 1.6 ms for ``exp(x - logsumexp)``.

    Same value and gradient as ``F.cross_entropy(logits.float(), labels, reduction="sum")`` up
    to fp32 rounding, without its four full (N, V) fp32 tensors (the cast, the log-softmax,
    the zero-filled gradient of the NLL and that of the log-softmax). On CPU each of those was
    freshly mapped memory every step (e.g. 64 MiB for 2048 x 8192 logits, above the size
    from which the C allocator maps and unmaps memory at each allocation), so its page faults
    cost more than the arithmetic; blocks of :data:`CE_BLOCK_ELEMENTS` are reused instead.
    On CUDA one block holds all rows.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n, v = logits.shape
        rows = n if logits.is_cuda else max(1, CE_BLOCK_ELEMENTS // v)
        valid = labels != IGNORE_INDEX
        target = torch.where(valid, labels, 0)
        x32, out32 = _block_buffers(logits, rows)
        picked = []
        for i in range(0, n, rows):
            m = min(rows, n - i)
            x = x32[:m].copy_(logits[i : i + m])
            ls = torch.ops.aten._log_softmax.out(x, -1, False, out=out32[:m])  # (m, V) fp32
            picked.append(ls.gather(1, target[i : i + m, None]))
        nll = -torch.cat(picked).squeeze(1) if picked else logits.new_zeros(0, dtype=torch.float32)  # (N,)
        ctx.save_for_backward(logits, target, valid)
        ctx.rows = rows
        return torch.where(valid, nll, 0.0).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        logits, target, valid = ctx.saved_tensors
        rows = ctx.rows
        n = logits.shape[0]
        scale = torch.where(valid, grad.float(), 0.0)  # (N,)
        out = torch.empty_like(logits)
        x32, p32 = _block_buffers(logits, rows)
        for i in range(0, n, rows):
            m = min(rows, n - i)
            x = x32[:m].copy_(logits[i : i + m])
            p = torch.ops.aten._softmax.out(x, -1, False, out=p32[:m])  # (m, V) fp32
            p.scatter_add_(1, target[i : i + m, None], p.new_full((m, 1), -1.0))  # - onehot
            out[i : i + m] = p.mul_(scale[i : i + m, None])
        return out, None


def _block_buffers(logits: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (rows, V) fp32 buffers reused by every block of one call (the block in fp32 and its
    (log-)softmax): on CPU each fresh block-sized tensor cost page faults (the copies to fp32
    ran at 3 GB/s inside a training step)."""
    shape = (min(rows, logits.shape[0]), logits.shape[1])
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.float32)


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32 over positions whose label is not ``IGNORE_INDEX``.

    Computed block by block (:class:`_BlockedCrossEntropy`), equal to
    ``F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
    reduction="sum")`` up to fp32 rounding; compiled code (``torch.compile``) takes that
    expression itself, which the compiler fuses into one pass forward and one backward (the
    blocked function's in-place block updates compiled to a 3x slower backward: 13 against
    4.4 ms for 2048 x 8192 bf16 logits on a 2-core CPU).

    Args:
        logits: (B, T, V), any float dtype (computed in fp32).
        labels: (B, T) int64.

    Returns:
        Scalar fp32 tensor (0 when no position is labelled).
    """
    if torch.compiler.is_compiling():
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return _BlockedCrossEntropy.apply(logits.flatten(0, 1), labels.flatten())


def label_counts(labels: torch.Tensor, depth: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(1 + depth,) int64: labelled positions seen by the main head and by each MTP depth.

    Entry 0 counts ``labels != IGNORE_INDEX``; entry k counts the positions of ``labels[:, k:]``
    that are labelled and, with document-aware ``position_ids`` (B, T), whose target is in the
    same document (``position_ids[:, i + k] == position_ids[:, i] + k``).

    Args:
        labels: (B, T) int64.
        depth: the number of MTP modules D.
        position_ids: (B, T) int64 or None.
    """
    T = labels.shape[1]
    out = [(labels != IGNORE_INDEX).sum()]
    for k in range(1, depth + 1):
        ok = labels[:, k:] != IGNORE_INDEX
        if position_ids is not None:
            ok &= position_ids[:, k:] == position_ids[:, : T - k] + k
        out.append(ok.sum())
    return torch.stack(out).long()


def training_loss(
    lm_loss_sum: torch.Tensor,
    mtp_loss_sum: torch.Tensor,
    balance_loss: torch.Tensor,
    tokens: torch.Tensor,
    mtp_lambda: float,
    alpha: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """``(L_main + lambda / D * sum_k L_MTP^k) * scale + alpha * L_Bal`` for one micro-batch.

    Args:
        lm_loss_sum: scalar fp32, the micro-batch's summed main-head cross-entropy.
        mtp_loss_sum: (D,) fp32, its summed cross-entropy per MTP depth (empty for D = 0).
        balance_loss: scalar fp32, its balance loss (sum over MoE layers).
        tokens: (1 + D,) fp32, the labelled-position counts that normalize each sum (the
            global batch's, see :func:`label_counts`; each at least 1), on the sums' device.
        mtp_lambda: lambda, the MTP weight (V3: 0.3, then 0.1).
        alpha: the balance-loss weight (V3: 1e-4).
        scale: multiplies the cross-entropy part (``grad_accum * data-parallel size`` to undo
            the engine's averaging of gradients).

    Returns:
        Scalar fp32 tensor.
    """
    loss = lm_loss_sum / tokens[0]
    depth = mtp_loss_sum.numel()
    if depth:
        loss = loss + mtp_lambda / depth * (mtp_loss_sum / tokens[1:]).sum()
    return loss * scale + alpha * balance_loss
