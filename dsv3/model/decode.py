"""Helpers of the eager inference path (decoding with the latent cache).

At batch 1 a decode step is a few hundred small operator calls, each costing more in
dispatch than in arithmetic. The eager inference path therefore works on tensors derived
once from the trained weights and kept until those weights change (:func:`derived`): the
query and latent-KV projections concatenated into one matrix, the SwiGLU gate and up
projections into one, ``kv_b_proj`` split into its per-head key and value halves, the rope
tables in the interleaved layout. The stored parameters are never modified, and a compiled
model (``torch.compile``) keeps the plain code, whose operators the compiler fuses itself.

The products of a few rows (a decoding step) go through :func:`linear`, which may read its
weight from a copy prepacked for oneDNN (``torch.ops.mkldnn``) where that measured faster on
this CPU (:mod:`dsv3.model.kernels`, operation ``decode_linear``): with 8 rows the plain
product reads its weight at about a third of the speed of the packed one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model import kernels

_STORE = "_dsv3_derived"

#: products with at most this many rows (tokens) may use a prepacked weight (:func:`linear`)
PACK_MAX_ROWS = 16


def fast_inference(*modules: nn.Module) -> bool:
    """Whether the eager inference path applies: under ``torch.inference_mode`` (generation; not
    a training run's evaluation under ``no_grad``, whose weights DeepSpeed may rewrite through a
    flat buffer that the cached copies of :func:`derived` cannot see), not compiling, and
    none of ``modules`` (those whose weights the path reads directly instead of calling them)
    carries a forward hook: accelerate's ``_hf_hook`` (which brings offloaded weights in only
    when the module itself is called; see :mod:`dsv3.checkpoint.offload`) or any registered
    forward (pre-)hook, such as the one with which ZeRO stage 3 gathers a module's parameters."""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():  # (this order: no graph break)
        return False
    for m in modules:  # (``in __dict__``: a missing attribute costs an exception in nn.Module.__getattr__)
        if "_hf_hook" in m.__dict__ or m._forward_pre_hooks or m._forward_hooks:
            return False
    return True


def derived(module: nn.Module, name: str, sources: tuple[torch.Tensor, ...], build: Callable[[], torch.Tensor]):
    """``build()``, computed once and kept on ``module`` while ``sources`` stay the same.

    The kept value is rebuilt when any source is another tensor object, has other storage
    (``data_ptr``; e.g. after ``model.to(dtype)``), or its version counter moved (any
    in-place update through autograd-visible operations: optimizer steps, ``copy_``,
    ``load_state_dict``). The kept entry references the sources' storage (a detached view), so
    its address cannot be taken by another tensor while the entry lives. Writes through
    ``.data`` bypass the version counter and are not seen. Sources that are inference tensors
    (made under ``torch.inference_mode``) have no version counter: the value is then built on
    every call and not kept.

    Args:
        module: where the value is kept (an attribute outside the state dict).
        name: key of the value on ``module``.
        sources: the tensors the value is computed from.
        build: computes the value (run under ``torch.no_grad``).

    Returns:
        Whatever ``build`` returns.
    """
    key = []
    for s in sources:
        if s.is_inference():  # made under inference_mode: no version counter to watch
            with torch.no_grad():
                return build()
        key.append((s.data_ptr(), s._version))
    store = module.__dict__.get(_STORE)
    if store is None:
        store = module.__dict__[_STORE] = {}
    hit = store.get(name)
    if hit is not None and hit[1] == key and all(a is b for a, b in zip(hit[0], sources)):
        return hit[2]
    with torch.no_grad():
        value = build()
    store[name] = (sources, key, value, tuple(s.detach() for s in sources))  # pins their storage
    return value


def interleaved_rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., d/2) cos / sin tables -> (..., d) tables for :func:`rotate_interleaved`.

    ``cos2 = [c0, c0, c1, c1, ...]``, ``sin2 = [-s0, s0, -s1, s1, ...]``.
    """
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def rotate_interleaved(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """:func:`dsv3.model.rope.apply_rope` with tables from :func:`interleaved_rope_tables`.

    Pair ``(x0, x1)`` becomes ``(x0 c + x1 (-s), x1 c + x0 s)``: bit for bit the values of
    ``apply_rope`` (``a + (-b) == a - b`` and addition commutes in IEEE arithmetic), in 5
    operators instead of 12.

    Args:
        x: (..., d) any float dtype; cos2, sin2: float32 broadcastable to (..., d).

    Returns:
        Tensor of the shape and dtype of ``x``.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    out = xf * cos2 + swapped * sin2
    return out if x.dtype == torch.float32 else out.to(x.dtype)


@functools.cache
def packing(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked linear product runs here for ``dtype``."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


_packed_bytes = [0]  # bytes of the prepacked copies alive in this process
_plain = [False]  # inside plain_products(): every product reads its weight as it is


@contextlib.contextmanager
def plain_products(on: bool = True):
    """Inside (with ``on``), every :func:`linear` reads its weight as it is, whatever the
    products' own choices: the ``plain`` candidate of a whole decoding step
    (:meth:`dsv3.model.transformer.Transformer.decode_kernel`)."""
    outer = _plain[0]
    _plain[0] = on
    try:
        yield
    finally:
        _plain[0] = outer


@functools.cache
def pack_budget() -> int:
    """Bytes the prepacked copies of :func:`linear` may hold in all: an eighth of the machine's
    memory (past it, products read their weights as they are)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (OSError, ValueError):
        return 1 << 30


def _pack(w: torch.Tensor) -> torch.Tensor:
    packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
    size = w.numel() * w.element_size()
    _packed_bytes[0] += size
    weakref.finalize(packed, _release, size)
    return packed


def _release(size: int) -> None:
    _packed_bytes[0] -= size


def _packed_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def linear(
    owner: nn.Module,
    name: str,
    x: torch.Tensor,
    sources: tuple[torch.Tensor, ...],
    shape: tuple[int, int],
    build: Callable[[], torch.Tensor] | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W)`` on the eager inference path.

    W is ``weight`` if given (a parameter or a view of one), else ``build()`` (a
    concatenation, a transposed stack; kept by :func:`derived`), else ``sources[0]``. With at
    most :data:`PACK_MAX_ROWS` rows on a CPU where oneDNN runs ``x``'s dtype, the measured
    choice ``decode_linear`` (``plain`` or ``packed``, per dtype, row count and weight shape)
    may read W from a copy reordered once for oneDNN's blocked layout (:func:`derived` from
    ``sources``, kept while they are unchanged), while all such copies stay within
    :func:`pack_budget`; never inside :func:`plain_products`. The packed product equals the
    plain one to rounding (another summation order).

    Args:
        owner: the module that keeps derived weights.
        name: key of the derived weights on ``owner``.
        x: (..., in) float32 or bfloat16.
        sources: the parameters W is made of.
        shape: W's (out, in).
        build: makes W from ``sources``.
        weight: W itself.

    Returns:
        (..., out), dtype of ``x``.
    """
    if not _plain[0] and _packed_wanted(x, shape):
        if name + " packed" in owner.__dict__.get(_STORE, {}) or _fits(shape[0] * shape[1] * x.element_size()):
            make = (lambda: weight) if weight is not None else build or (lambda: sources[0])
            return _packed_product(x, derived(owner, name + " packed", sources, lambda: _pack(make())))
    if weight is None:
        weight = derived(owner, name, sources, build) if build is not None else sources[0]
    return F.linear(x, weight)


_compiled_packs: dict[int, tuple] = {}  # id(weight) -> (weakref to it, (data_ptr, version), packed copy)


@torch.library.custom_op("dsv3::few_rows_linear", mutates_args=())
def few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight.reshape(-1, in))`` for compiled inference on CPU (:func:`compiled_linear`):
    opaque to the compiler, it runs eagerly with the measured ``decode_linear`` kernel, keeping
    a packed copy per weight tensor (released with the tensor, rebuilt when it changes).

    Args: x (..., in) float32 / bfloat16 with at most :data:`PACK_MAX_ROWS` rows; weight
    (out, in), or stacked (E, I, in) read as (E I, in).

    Returns: (..., out), dtype of ``x``."""
    w = weight.reshape(-1, weight.shape[-1])
    if _packed_wanted(x, tuple(w.shape)):
        key = (weight.data_ptr(), weight._version)
        hit = _compiled_packs.get(id(weight))
        if hit is None or hit[0]() is not weight or hit[1] != key:
            if hit is None and not _fits(w.numel() * w.element_size()):
                return F.linear(x, w)
            k = id(weight)
            ref = weakref.ref(weight, lambda _, k=k: _compiled_packs.pop(k, None))
            hit = _compiled_packs[k] = (ref, key, _pack(w))
        return _packed_product(x, hit[2])
    return F.linear(x, w)


@few_rows_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.numel() // weight.shape[-1]))


def compiled_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (``weight`` (out, in) or stacked (E, I, in) read as (E I, in)) in
    model code; while ``torch.compile`` traces CPU inference on 2 to :data:`PACK_MAX_ROWS`
    rows, through :func:`few_rows_linear`, so that compiled decoding reads prepacked weights
    where that measured faster, as the eager path does. A graph for one row (the compiler
    specializes that size) keeps the compiler's own products: there the op's call from Python
    cost more than the packed weights saved (``tiny`` fp32 decoding at batch 1, compiled: 830-894
    against 949-1400 tokens/s)."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and not torch.is_grad_enabled():
        rows = x.numel() // x.shape[-1]
        if rows <= PACK_MAX_ROWS and not (isinstance(rows, int) and rows == 1):
            return few_rows_linear(x, weight)
    return F.linear(x, weight.reshape(-1, weight.shape[-1]))


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for a bias-free ``nn.Linear``; under ``torch.compile``
    :func:`compiled_linear` of its weight (a prepacked one for a few rows of CPU inference)."""
    return compiled_linear(x, linear.weight) if torch.compiler.is_compiling() else linear(x)


def _packed_wanted(x: torch.Tensor, shape: tuple[int, int]) -> bool:
    """Whether the product of ``x`` (..., in) by a weight of ``shape`` (out, in) should read a
    prepacked weight: a few rows on a CPU where oneDNN runs the dtype, and measured faster."""
    rows = x.numel() // x.shape[-1]
    return (
        x.device.type == "cpu"
        and rows <= PACK_MAX_ROWS
        and packing(x.dtype)
        and linear_kernel(x.dtype, rows, shape) == "packed"
    )


def _fits(nbytes: int) -> bool:
    """One more prepacked copy of ``nbytes`` stays within :func:`pack_budget`."""
    return _packed_bytes[0] + nbytes <= pack_budget()


def choose_linears(dtype: torch.dtype, rows: int, shapes: tuple[tuple[int, int], ...]) -> None:
    """Make the ``decode_linear`` choices of these products now: before a measured candidate that
    runs them is timed (inside it they would take the rule)."""
    if rows <= PACK_MAX_ROWS and packing(dtype):
        for shape in shapes:
            linear_kernel(dtype, rows, shape)


def linear_kernel(dtype: torch.dtype, rows: int, shape: tuple[int, int]) -> str:
    """``plain`` (F.linear) or ``packed`` (oneDNN, prepacked weight): the measured choice for
    ``rows`` rows of ``dtype`` through a weight of ``shape`` (out, in) on this CPU (remembered
    per call site's inputs: this is asked on every product)."""
    return kernels.remembered(("decode_linear", dtype, rows, shape), lambda: _linear_choice(dtype, rows, shape))


def _linear_choice(dtype: torch.dtype, rows: int, shape: tuple[int, int]) -> str:
    rows = kernels.bucket(rows)
    out_dim, in_dim = shape
    key = f"{str(dtype).removeprefix('torch.')} N={rows} out={out_dim} in={in_dim}"

    def run(name, data={}):  # noqa: B006 - the synthetic operands, made on the first call
        if not data:
            g = kernels.generator()
            copies = kernels.stream_copies(out_dim * in_dim * dtype.itemsize)
            with torch.inference_mode(False):
                data["x"] = torch.randn(rows, in_dim, generator=g).to(dtype)
                w = (torch.randn(out_dim, in_dim, generator=g) * 0.02).to(dtype)
                data["plain"] = [w.clone() for _ in range(copies)]
                data["packed"] = [_pack(w) for w in data["plain"]]
        x = data["x"]
        if name == "plain":
            for w in data["plain"]:
                F.linear(x, w)
        else:
            for w in data["packed"]:
                _packed_product(x, w)

    return kernels.choose("decode_linear", key, ["plain", "packed"], run, torch.device("cpu"), streamed=True)
