"""``dsv3 bench train --profile``: where the time of one training step goes, operator by operator.

After the timed steps (so the tokens/s figures are not disturbed by the profiler), three more
steps of the dsv3 side run, each under its own ``torch.profiler`` session (the one with the
least wall time is reported, like the best of the timed steps), with input shapes recorded and
``record_function`` ranges ``forward`` (the loss), ``backward`` (``loss.backward()``) and
``optimizer`` (gradient clipping, the AdamW update, dropping the gradients). Every operator
call is charged to the phase whose range holds its start, then

- matrix products (:data:`MATMUL_OPS`: ``aten::linear``, ``mm``, ``addmm``, ``bmm``,
  ``matmul``, ``_grouped_mm``, the ``scaled_dot_product_attention`` kernels and their
  backward kernels) are grouped by phase, operator, input shapes and dtype, with their time
  *including* the operators they call (a ``linear`` holds its ``mm``; on CPU a
  ``_grouped_mm`` holds one ``mm`` per expert), their FLOPs computed here from the shapes
  (:func:`matmul_flops`) and the TFLOP/s they reach against the measured peak of the
  benchmark's dtype;
- every other operator is grouped by phase and name with its *self* time (without the
  operators it calls), so no time is counted twice;
- what no operator covers in a phase (Python between operators, the profiler's own cost) is
  the group ``(between operators)``.

The groups of a phase thus add up to the phase's wall time, and ``share`` is a group's part
of the profiled step (sum of the three phases). Times are CPU times of the operators on CPU
and the time of their kernels on CUDA (each phase ends with a device synchronization, so
its range covers its kernels). The profiler adds some cost per operator call, so the
profiled step is slower than the timed ones; the shares, not the absolute times, are the
point. A group's ``ops_per_call`` (column ``ops``) counts the operator calls recorded per call,
its own and those it made: where it is large, so is the profiler's part of its time. On CPU a
``_grouped_mm`` of 8 groups is about 100 (a product, views and copies per group), a ``linear``
about 10: on a 2-core AMD EPYC a ``tiny`` layer's gate product took 1.5 ms profiled against
0.6-0.7 ms timed in an unprofiled step (0.5 ms alone).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dsv3.fileio import atomic_write_text
from dsv3.hardware import machine_info, sync

PHASES = ("forward", "backward", "optimizer")
_SDPA_FORWARD = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)
_SDPA_BACKWARD = tuple(n + "_backward" for n in _SDPA_FORWARD[2:])
#: operators grouped as matrix products (the outermost one of a nest counts)
MATMUL_OPS = frozenset(
    ("aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_grouped_mm")
    + _SDPA_FORWARD
    + _SDPA_BACKWARD
)
OTHER_GAP = "(between operators)"


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def _is_causal(op: str, args: list | None) -> bool:
    """The ``is_causal`` argument of an attention operator, read from its recorded scalar
    arguments at the position its schema gives (False when not recorded)."""
    try:
        schema = getattr(torch.ops.aten, op.split("::", 1)[1]).default._schema
        i = [a.name for a in schema.arguments].index("is_causal")
        return bool(args[i]) if args is not None and i < len(args) else False
    except (AttributeError, ValueError, IndexError, TypeError):
        return False


def matmul_flops(op: str, shapes: list[list[int]], args: list | None = None) -> float:
    """FLOPs of one call of a matrix-product operator, from its input shapes (2 per multiply-add).

    - ``linear`` x (..., In), w (Out, In): ``2 rows In Out``; ``mm`` / ``addmm`` (a, k) @ (k, b):
      ``2 a k b``; ``bmm`` / ``baddbmm``: times the batch; ``matmul`` with broadcasting;
    - ``_grouped_mm`` (rows of each group times that group's matrix): (M, K) x (G, K, N)
      ``2 M K N``; (N, M) x (M, K) with groups along M (the weight gradient) ``2 N M K``;
      (G, M, K) x (K, N) ``2 M K N``; (G, M, K) x (G, K, N) ``2 G M K N``;
    - attention forward, q (B, H, T, E), k (B, Hk, S, E), v (B, Hk, S, Ev):
      ``2 B H T S (E + Ev)``, halved when causal (model FLOPs, as in
      :func:`dsv3.model.flops_per_token`, whichever kernel runs); its backward kernels
      (q, k, v are inputs 1-3) twice that (dQ, dK, dV and dP).

    Args:
        op: profiler name, e.g. ``aten::mm``.
        shapes: the recorded input shapes (``[]`` for non-tensors).
        args: the recorded scalar arguments (for ``is_causal``).

    Returns:
        FLOPs (0.0 for an operator outside :data:`MATMUL_OPS` or shapes it cannot read).
    """
    s = [list(x) for x in shapes]
    try:
        if op == "aten::linear":
            return 2.0 * _prod(s[0]) * s[1][0]
        if op in ("aten::mm", "aten::addmm"):
            a, b = (s[0], s[1]) if op == "aten::mm" else (s[1], s[2])
            return 2.0 * a[0] * a[1] * b[1]
        if op in ("aten::bmm", "aten::baddbmm"):
            a, b = (s[0], s[1]) if op == "aten::bmm" else (s[1], s[2])
            return 2.0 * a[0] * a[1] * a[2] * b[2]
        if op == "aten::matmul":
            a, b = s[0], s[1]
            if len(a) == 1 and len(b) == 1:
                return 2.0 * a[0]
            a = [1, *a] if len(a) == 1 else a
            b = [*b, 1] if len(b) == 1 else b
            batch = torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
            return 2.0 * _prod(batch) * a[-2] * a[-1] * b[-1]
        if op == "aten::_grouped_mm":
            a, b = s[0], s[1]
            if len(a) == 2 and len(b) == 3:
                return 2.0 * a[0] * a[1] * b[2]
            if len(a) == 2 and len(b) == 2:
                return 2.0 * a[0] * a[1] * b[1]
            if len(a) == 3 and len(b) == 2:
                return 2.0 * a[1] * a[2] * b[1]
            return 2.0 * a[0] * a[1] * a[2] * b[2]
        if op in _SDPA_FORWARD or op in _SDPA_BACKWARD:
            q, k, v = (s[0], s[1], s[2]) if op in _SDPA_FORWARD else (s[1], s[2], s[3])
            f = 2.0 * _prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
            f *= 0.5 if _is_causal(op, args) else 1.0
            return f * (2.0 if op in _SDPA_BACKWARD else 1.0)
    except (IndexError, TypeError, RuntimeError):
        return 0.0
    return 0.0


def profile_steps(side, batches, device: torch.device, steps: int = 1) -> tuple[Any, float]:
    """Run ``steps`` optimizer steps of ``side`` (a :class:`dsv3.bench.Side`) under the profiler,
    with the three phase ranges.

    Returns:
        (the profiler's event list, wall seconds of the steps measured around the phases).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    wall = 0.0
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(steps):
            x, y = batches[i % len(batches)]
            sync(device)
            t0 = time.perf_counter()
            with record_function("forward"):
                loss = side.forward(x, y)
                sync(device)
            with record_function("backward"):
                side.backward(loss)
                sync(device)
            with record_function("optimizer"):
                side.update()
                sync(device)
            wall += time.perf_counter() - t0
    return prof.events(), wall


def _nested(ev) -> int:
    """Operator calls the profiler recorded for ``ev``: itself and every operator it called."""
    return 1 + sum(_nested(c) for c in ev.cpu_children)


def _dtype_name(ev) -> str:
    dtypes = getattr(ev, "input_dtypes", None) or []
    return next((str(d).replace("c10::", "") for d in dtypes if d), "")


def summarize(events, wall_s: float, steps: int, peak_tflops: float, device: torch.device) -> dict[str, Any]:
    """Group the events of :func:`profile_steps` (see the module doc); times per step, in ms.

    Raises:
        ValueError: the events hold no phase range.
    """
    on_gpu = device.type == "cuda"
    ranges = sorted(
        (ev.time_range.start, ev.time_range.end, ev.name)
        for ev in events
        if ev.name in PHASES and ev.cpu_parent is None
    )
    if not ranges:
        raise ValueError("the profile holds no forward / backward / optimizer range")
    phase_us = {p: 0.0 for p in PHASES}
    for start, end, name in ranges:
        phase_us[name] += end - start
    mm: dict[tuple, dict[str, Any]] = {}
    other: dict[tuple, dict[str, Any]] = {}

    def phase_of(ev) -> str | None:
        t = ev.time_range.start
        return next((name for start, end, name in ranges if start <= t <= end), None)

    def walk(ev, phase: str) -> None:
        if ev.name in MATMUL_OPS:
            shapes = [list(x) for x in (ev.input_shapes or [])]
            key_shapes = shapes[:]
            while key_shapes and not key_shapes[-1]:  # drop the trailing non-tensor arguments
                key_shapes.pop()
            key = (phase, ev.name, json.dumps(key_shapes), _dtype_name(ev))
            g = mm.setdefault(key, {"count": 0, "us": 0.0, "flops": 0.0, "ops": 0})
            g["count"] += 1
            g["ops"] += _nested(ev)
            g["us"] += ev.device_time_total if on_gpu else ev.cpu_time_total
            g["flops"] += matmul_flops(ev.name, shapes, getattr(ev, "concrete_inputs", None))
            return
        g = other.setdefault((phase, ev.name), {"count": 0, "us": 0.0})
        g["count"] += 1
        g["us"] += ev.self_device_time_total if on_gpu else ev.self_cpu_time_total
        for child in ev.cpu_children:
            walk(child, phase)

    for ev in events:
        if ev.cpu_parent is not None or ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        if ev.name in PHASES:
            for child in ev.cpu_children:
                walk(child, ev.name)
        elif (phase := phase_of(ev)) is not None:  # an operator on another thread (autograd's on CUDA)
            walk(ev, phase)

    step_us = sum(phase_us.values())
    for p in PHASES:  # what no operator covers
        covered = sum(g["us"] for (ph, *_), g in mm.items() if ph == p)
        covered += sum(g["us"] for (ph, _), g in other.items() if ph == p)
        if phase_us[p] - covered > 0:
            other[(p, OTHER_GAP)] = {"count": 0, "us": phase_us[p] - covered}

    def tflops(flops: float, us: float) -> float:
        return flops / us / 1e6 if us > 0 else 0.0

    matmuls = []
    for (phase, op, shapes, dtype), g in mm.items():
        t = tflops(g["flops"], g["us"])
        matmuls.append(
            {
                "phase": phase,
                "op": op,
                "shapes": json.loads(shapes),
                "dtype": dtype,
                "count": g["count"] // steps,
                "ops_per_call": g["ops"] / g["count"],
                "time_ms": g["us"] / steps / 1e3,
                "share": g["us"] / step_us,
                "flops": g["flops"] / steps,
                "tflops": t,
                "of_peak": t / peak_tflops if peak_tflops else None,
            }
        )
    others = [
        {
            "phase": phase,
            "op": op,
            "count": g["count"] // steps,
            "time_ms": g["us"] / steps / 1e3,
            "share": g["us"] / step_us,
        }
        for (phase, op), g in other.items()
    ]
    matmuls.sort(key=lambda r: -r["time_ms"])
    others.sort(key=lambda r: -r["time_ms"])
    phases = {}
    for p in PHASES:
        rows = [r for r in matmuls if r["phase"] == p]
        us = sum(r["time_ms"] for r in rows) * 1e3
        flops = sum(r["flops"] for r in rows)
        phases[p] = {
            "time_ms": phase_us[p] / steps / 1e3,
            "share": phase_us[p] / step_us,
            "matmul_time_ms": us / 1e3,
            "matmul_share": us * steps / step_us,
            "matmul_flops": flops,
            "matmul_tflops": tflops(flops, us),
        }
    mm_us = sum(r["time_ms"] for r in matmuls) * 1e3
    mm_flops = sum(r["flops"] for r in matmuls)
    return {
        "steps": steps,
        "timer": "kernel time (CUDA)" if on_gpu else "CPU time of the operators",
        "wall_ms": wall_s / steps * 1e3,
        "step_ms": step_us / steps / 1e3,
        "peak_tflops": peak_tflops,
        "phases": phases,
        "matmul_time_ms": mm_us / 1e3,
        "matmul_share": mm_us * steps / step_us,
        "matmul_flops": mm_flops,
        "matmul_tflops": tflops(mm_flops, mm_us),
        "matmuls": matmuls,
        "others": others,
    }


def profile_train(side, batches, device: torch.device, peak_tflops: float, repeats: int = 3) -> dict[str, Any]:
    """Profile ``repeats`` single optimizer steps of ``side``, each in its own profiler session,
    and group the one with the least wall time (:func:`summarize`): on a shared machine
    other processes slow some steps down, as in the timed steps, whose best counts too.

    Returns:
        The summary, plus ``side`` and ``profiled_walls_ms`` (wall time of every profiled step).
    """
    best, walls = None, []
    for _ in range(max(1, repeats)):
        events, wall = profile_steps(side, batches, device, 1)
        walls.append(wall * 1e3)
        if best is None or wall < best[1]:
            best = (events, wall)
        del events
    return {"side": side.name, "profiled_walls_ms": walls, **summarize(best[0], best[1], 1, peak_tflops, device)}


def profile_path(result_path: Path) -> Path:
    """``<dir>/<stem>.profile.json`` next to a result file ``<dir>/<stem>.json``."""
    return result_path.with_name(result_path.stem + ".profile.json")


def write_profile(prof: dict[str, Any], result_path: Path) -> Path:
    """Write ``prof`` (with the ``machine``) next to the result file; returns its path."""
    path = profile_path(result_path)
    prof = {**prof, "result_file": result_path.name, "machine": machine_info()}
    atomic_write_text(path, json.dumps(prof, indent=1, default=str) + "\n")
    return path


def format_profile(prof: dict[str, Any], top: int = 12) -> str:
    """The printed summary: the phases, then the ``top`` matrix-product and other groups."""
    peak = prof["peak_tflops"]
    walls = prof.get("profiled_walls_ms") or [prof["wall_ms"]]
    lines = [
        f"profile of the least disturbed of {len(walls)} {prof.get('side', '')} step(s) ({prof['timer']}): "
        f"{prof['step_ms']:.1f} ms per step (wall {prof['wall_ms']:.1f} ms); matmul peak {peak:.3g} TFLOP/s"
    ]
    for p, r in prof["phases"].items():
        lines.append(
            f"  {p:<10}{r['time_ms']:9.1f} ms {100 * r['share']:5.1f}%   matmuls {r['matmul_time_ms']:.1f} ms "
            f"({100 * r['matmul_share']:.1f}% of the step), {r['matmul_tflops']:.3g} TFLOP/s"
        )
    lines.append(
        f"  matmuls in all: {prof['matmul_time_ms']:.1f} ms, {100 * prof['matmul_share']:.1f}%, "
        f"{prof['matmul_tflops']:.3g} TFLOP/s ({100 * prof['matmul_tflops'] / peak:.0f}% of peak)"
    )
    lines.append(
        f"top matrix products:\n  {'ms':>8} {'share':>6} {'count':>5} {'ops':>4} {'TFLOP/s':>8} {'peak':>5}  "
        "phase      op [shapes] dtype"
    )
    for r in prof["matmuls"][:top]:
        lines.append(
            f"  {r['time_ms']:8.2f} {100 * r['share']:5.1f}% {r['count']:5d} {r.get('ops_per_call', 1):4.0f} "
            f"{r['tflops']:8.3g} "
            f"{100 * (r['of_peak'] or 0):4.0f}%  {r['phase']:<10} {r['op']} {r['shapes']} {r['dtype']}"
        )
    lines.append(f"top other operators (self time):\n  {'ms':>8} {'share':>6} {'count':>5}  phase      op")
    for r in prof["others"][:top]:
        lines.append(f"  {r['time_ms']:8.2f} {100 * r['share']:5.1f}% {r['count']:5d}  {r['phase']:<10} {r['op']}")
    return "\n".join(lines)
