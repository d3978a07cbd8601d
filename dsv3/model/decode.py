"""Helpers of the eager inference path (decoding with the latent cache).

At batch 1 a decode step is a few hundred small operator calls, each costing more in
dispatch than in arithmetic. The eager inference path therefore works on tensors derived
once from the trained weights and kept until those weights change (:func:`derived`): the
query and latent-KV projections concatenated into one matrix, the SwiGLU gate and up
projections into one, ``kv_b_proj`` split into its per-head key and value halves, the rope
tables in the interleaved layout. The stored parameters are never modified, and a compiled
model (``torch.compile``) keeps the plain code, whose operators the compiler fuses itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_STORE = "_dsv3_derived"


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
    return not any(hasattr(m, "_hf_hook") or m._forward_pre_hooks or m._forward_hooks for m in modules)


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
    if any(s.is_inference() for s in sources):  # made under inference_mode: no version counter to watch
        with torch.no_grad():
            return build()
    store = module.__dict__.get(_STORE)
    if store is None:
        store = module.__dict__[_STORE] = {}
    key = tuple((s.data_ptr(), s._version) for s in sources)
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
