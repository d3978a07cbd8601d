"""Grouped matrix products: one product over every expert's rows (stage 6, the routed experts).

``grouped_matmul`` multiplies each group of rows (sorted by expert) by its expert's weight in
one call: ``torch._grouped_mm`` where it runs (on CPU under ``torch.compile`` through an opaque
custom op), else a padded batched product. :class:`ContiguousGrad` keeps the gradients it
receives contiguous (``torch._grouped_mm`` rejects expanded ones). :func:`pad_groups` pads
each group's rows to a multiple (:func:`padded_rows`) where the products' shapes should repeat
(bf16 on CPU). Used by the experts of :mod:`dsv3.model.moe` and of the expert-parallel layer.
"""

from __future__ import annotations

import torch

from dsv3.model import kernels


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, kernel: str = "grouped_mm") -> torch.Tensor:
    """``x[rows of group e] @ w[e].T`` for every group e, as one grouped product.

    Args:
        x: (M, In) rows sorted by group.
        w: (E, Out, In) one weight per group.
        offsets: (E,) int32 cumulative row counts (end row of each group).
        kernel: ``grouped_mm`` (where it runs) or ``bmm`` (the padded product); the experts
            choose by measuring both (:meth:`Experts.kernel`).

    Returns:
        (M, Out), dtype of ``x``.

    Uses ``torch._grouped_mm`` where it runs (see :func:`grouped_mm_ok`); otherwise a padded
    batched product: rows are scattered into an (E, max_rows, In) block, multiplied with one
    ``bmm`` and gathered back (the block size is read from the data: a host sync on GPU).

    Measured on a 2-core CPU (fwd + bwd of one expert layer, E=16, D=512, I=256, 4096 rows):
    ``_grouped_mm`` 83 ms fp32 / 42 ms bf16, padded ``bmm`` 92 / 52 ms, a Python loop over
    experts 133 / 61 ms (another CPU may rank them otherwise: hence the measured choice).
    """
    out_dim, in_dim = w.shape[1], w.shape[2]
    if kernel == "grouped_mm" and grouped_mm_ok(x, out_dim, in_dim):
        if x.device.type == "cpu" and torch.compiler.is_compiling():
            return _grouped_mm_cpu(x, w, offsets)  # opaque to the compiler: any dtype, no graph break
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    E = w.shape[0]
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]]).long()  # (E,)
    counts = offsets.long() - starts
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts)  # (M,)
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert]  # (M,)
    width = int(counts.max()) if x.shape[0] else 0
    padded = x.new_zeros(E, width, in_dim).index_put((expert, slot), x)  # (E, C, In)
    return torch.bmm(padded, w.transpose(-2, -1))[expert, slot]  # (M, Out)


def padded_rows(rows: int, n_experts: int, x: torch.Tensor) -> int:
    """The multiple to which the grouped expert products pad each expert's rows: 0 (none)
    except for a bf16 / fp16 layer on CPU with at least
    :data:`PAD_MIN_ROWS` rows per expert on average, where it is an eighth of the power of two
    at or above that mean (``tiny`` at 4 x 256 tokens: 32, ``bench``: 64), so about 1/16 more
    rows on average, at most 1/4.

    Why: on CPU these dtypes run through oneDNN, which generates machine code for every new
    product shape (a few hundred microseconds each, kept in a cache of 1024 shapes); the rows
    per expert change at every step, so an unpadded layer kept generating kernels: in a
    ``tiny`` bf16 training step, 244 kernels and 10-20 thousand page faults (their code
    buffers), for 15-40 steps until the cache held every size; ``bench`` never got there. Padded,
    the shapes repeat after a few steps: ``tiny`` steps 5-16 took 122-132 against 139-185 ms,
    ``bench`` steps 10-24 680-720 against 740-840 ms (2-core AMD EPYC, one thread). fp32 products
    (MKL) generate no code per shape. Compiled code pads too (unpadded, the compiled ``tiny``
    bf16 step spent 60 against 19 ms in its grouped products), into a block of a fixed number
    of rows (:func:`pad_groups`), unless the row count is a symbol (dynamic
    shapes, as in compiled generation): padding would make the graph depend on its value.

    Args:
        rows: the rows of the grouped products (tokens x experts per token).
        n_experts: E.
        x: the layer's input (its dtype and device decide).
    """
    mean = -(-rows // n_experts)
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return 0
    if not kernels.known_true(mean >= PAD_MIN_ROWS):  # (also a dynamic shape of compiled code: no guard)
        return 0
    return kernels.bucket(mean) // 8


#: the padding of :func:`padded_rows` starts at this many rows per expert (a multiple of 16):
#: below it, padding would add too large a share of rows for what it saves
PAD_MIN_ROWS = 128


def pad_groups(
    x: torch.Tensor, counts: torch.Tensor, group: torch.Tensor, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by group, each group followed by zero rows up to a multiple of ``pad``.

    Args:
        x: (M, D) rows sorted by group; counts: (E,) int64 rows per group; group: (M,) the
            group of each row; pad: the multiple (:func:`padded_rows`).

    Returns:
        (padded (P, D) rows, (E,) padded counts, (M,) int64 row of each input row in it);
        ``padded[dest] == x``, every other row is zero (a product of it is zero too). P is the
        padded total, read from the data; in compiled code, whose shapes may not depend on the
        data, ``M + E * (pad - 1)``, which always holds it (rows after the last padded group
        then belong to no group).
    """
    padded = (counts + pad - 1) // pad * pad  # (E,)
    rank = torch.arange(x.shape[0], device=x.device) - (counts.cumsum(0) - counts)[group]  # (M,)
    dest = (padded.cumsum(0) - padded)[group] + rank  # (M,)
    P = x.shape[0] + counts.shape[0] * (pad - 1) if torch.compiler.is_compiling() else int(padded.sum())
    return x.new_zeros(P, x.shape[1]).index_copy(0, dest, x), padded, dest


#: whether this torch build has ``torch._grouped_mm``
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def grouped_mm_ok(x: torch.Tensor, out_dim: int, in_dim: int) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: the build has it, row strides are
    16-byte aligned, and the dtype is supported there (any on CPU, under ``torch.compile``
    through the opaque :func:`_grouped_mm_cpu`; bf16 on CUDA from compute capability 9.0)."""
    item = x.element_size()
    if not HAS_GROUPED_MM or (in_dim * item) % 16 or (out_dim * item) % 16:
        return False
    if x.device.type == "cpu":
        return True
    if x.dtype != torch.bfloat16:
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (9, 0)


if HAS_GROUPED_MM:
    # torch.compile traces torch._grouped_mm with shape rules written for CUDA bf16, and the
    # fallback below reads its block size from the data (a graph break). On CPU the compiled
    # model therefore calls the eager kernel through these two custom ops, whose backward is
    # written out: dX = dY W (per group), dW_e = dY_e^T X_e.

    @torch.library.custom_op("dsv3::grouped_mm_cpu", mutates_args=())
    def _grouped_mm_cpu(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """(M, In) x (E, Out, In) -> (M, Out): rows ``offsets[e-1]:offsets[e]`` times ``w[e].T``;
        rows after the last group are zero (``torch._grouped_mm`` leaves them unwritten)."""
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
        y[int(offsets[-1]) :].zero_()  # (eager code on CPU: reading the offset is free)
        return y

    @_grouped_mm_cpu.register_fake
    def _(x, w, offsets):
        return x.new_empty(x.shape[0], w.shape[1])

    @torch.library.custom_op("dsv3::grouped_mm_cpu_weight_grad", mutates_args=())
    def _grouped_mm_cpu_weight_grad(x: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """(M, In), (M, Out) -> (E, Out, In): ``g[rows of e].T @ x[rows of e]`` (zero for an empty group)."""
        return torch._grouped_mm(g.t(), x, offs=offsets)

    @_grouped_mm_cpu_weight_grad.register_fake
    def _(x, g, offsets):
        return x.new_empty(offsets.shape[0], g.shape[1], x.shape[1])

    def _grouped_mm_cpu_setup(ctx, inputs, output):
        x, w, offsets = inputs
        ctx.save_for_backward(x, w, offsets)

    def _grouped_mm_cpu_backward(ctx, g):
        x, w, offsets = ctx.saved_tensors
        g = g.contiguous()
        gx = _grouped_mm_cpu(g, w.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
        gw = _grouped_mm_cpu_weight_grad(x, g, offsets) if ctx.needs_input_grad[1] else None
        return gx, gw, None

    _grouped_mm_cpu.register_autograd(_grouped_mm_cpu_backward, setup_context=_grouped_mm_cpu_setup)


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm`` rejects expanded (stride-0) gradients, which e.g. ``y.sum()`` makes.
    """

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g.contiguous()
