"""Kernels chosen by measuring them on this machine, once per shape.

Some operations of the model have several implementations that compute the same values to
rounding and whose speed depends on the CPU (its bf16 units: AVX-512-BF16, AMX) and on the
shapes: the causal attention of training, evaluation and prefill
(``scaled_dot_product_attention``'s flash kernel, SDPA as given, or two matrix products around
a softmax), the routed experts' products (``torch._grouped_mm`` or one padded ``bmm``), the
experts of a few decoding tokens (grouped, or every expert on every token), the linear
products of a few decoding tokens (``F.linear``, or oneDNN with a prepacked weight; and for a
whole decoding step, those choices or every product plain), and the optimizer's update
(torch AdamW fused or foreach, :func:`dsv3.parallel.engine.adamw_kernel`); and which precision
trains faster here (:func:`faster_precision`, for ``train.precision: auto``).
:func:`choose` picks among such candidates:

1. ``DSV3_KERNELS`` set to ``rules`` uses the first candidate (the fixed rule) everywhere, and
   ``op=candidate,...`` forces candidates by operation name;
2. else a choice this process already made or was given (:func:`preload`: the choices recorded
   in a checkpoint, so a resumed run computes as it did before);
3. else the machine's record (``$DSV3_KERNEL_CACHE``, else ``kernels.json`` in ``$DSV3_CACHE``
   or ``~/.cache/dsv3``), keyed by CPU model and ISA features, torch version and
   :data:`REVISION`, read and written under a file lock: every process on the machine makes
   the same choice, so two runs of one config compute the same values;
4. else each candidate is timed on synthetic inputs of that shape (forward and backward when
   training), interleaved, best of several rounds, and the fastest kept unless the first
   candidate is within :data:`MARGIN` of it; the timings go to the record.

Measuring uses its own random generator (the run's random state is untouched) and happens on
CPU only: other devices, code being compiled (except through :func:`at_trace_time`, which
measures once where the code is traced) and a choice asked for while candidates are being
timed (a candidate containing another measured operation, unless that choice was made before)
use the first candidate. :func:`choices`
returns this process's choices with their timings (written next to a benchmark result and
into each checkpoint); :func:`known` answers what :func:`choose` would return without timing
anything (None when the machine has not measured that key), for the memory plan.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_text
from dsv3.hardware import cpu_info, device_name

#: the first candidate is kept unless another is faster by more than this fraction
MARGIN = 0.1
#: timed rounds per candidate (the best counts): at least ROUNDS, more until each candidate
#: has run for MIN_SECONDS, at most MAX_ROUNDS; after WARMUP untimed calls
ROUNDS, MAX_ROUNDS, MIN_SECONDS, WARMUP = 3, 50, 0.05, 1
#: timed rounds of a streamed measurement (``choose(streamed=True)``)
STREAM_ROUNDS = 7

#: part of the machine's record key: raised whenever a candidate's implementation changes, so
#: that choices measured with the old one are measured again
REVISION = 7

_measuring = 0  # > 0 while candidates are being timed
_version = 0  # raised whenever a choice is made or given (see :func:`state`)
_made: dict[str, dict] = {}  # key -> {"choice": name, "ms": {name: best ms} (absent when given)}


def _forced() -> dict[str, str] | str | None:
    value = os.environ.get("DSV3_KERNELS", "").strip()
    if not value:
        return None
    if value == "rules":
        return "rules"
    forced = {}
    for item in value.split(","):
        op, sep, name = item.partition("=")
        if not sep:
            raise DsvError(
                f"DSV3_KERNELS={value!r} is not understood; set it to 'rules' or to op=candidate pairs, "
                "e.g. attention=matmul,experts=bmm"
            )
        forced[op.strip()] = name.strip()
    return forced


def cache_path() -> Path:
    """The machine's record of measured choices: ``$DSV3_KERNEL_CACHE``, else ``kernels.json`` in
    ``$DSV3_CACHE`` or ``~/.cache/dsv3`` (where prepared data lives by default)."""
    if os.environ.get("DSV3_KERNEL_CACHE"):
        return Path(os.environ["DSV3_KERNEL_CACHE"])
    return Path(os.environ.get("DSV3_CACHE") or Path.home() / ".cache" / "dsv3") / "kernels.json"


def _machine() -> str:
    info = cpu_info()
    features = ",".join(info["features"]) or "-"
    return f"{info['model']} ({features}) | torch {torch.__version__} | dsv3 kernels {REVISION}"


def choose(
    op: str,
    key: str,
    candidates: Sequence[str],
    run: Callable[[str], None],
    device: torch.device,
    streamed: bool = False,
) -> str:
    """The candidate to use for operation ``op`` at ``key`` (dtype and shape), see the module doc.

    Args:
        op: operation name (``attention``, ``experts``, ``decode_linear``, ``optimizer``, ...).
        key: what the choice depends on besides the machine, e.g. ``"bf16 train 4x8x512x96"``.
        candidates: names; the first is the fixed rule used where nothing is measured.
        run: ``run(name)`` executes candidate ``name`` once on synthetic inputs (the timed work).
        device: where the operation runs; only CPU is measured.
        streamed: ``run`` itself goes through enough copies of its operands that each comes
            from the last-level cache, not from the core's own caches (:func:`stream_copies`),
            as a decoding step meets its weights; :data:`STREAM_ROUNDS` rounds.

    Returns:
        one of ``candidates``.

    Raises:
        DsvError: ``DSV3_KERNELS`` names an unknown candidate for ``op`` or is malformed.
    """
    given = _given(op, key, candidates, device.type)
    if given is not None:
        return given
    full = f"{op} | {key}"
    if _measuring:  # asked inside a candidate being timed: the fixed rule, not recorded
        return candidates[0]
    path = cache_path()
    machine = _machine()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - held across the measurement
    except OSError:
        lock = None
    try:
        if lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # a file system without locks: measure and write anyway
                pass
        record = _read(path)
        entry = record.get(machine, {}).get(full)
        if entry is None or entry.get("choice") not in candidates:
            entry = _measure(candidates, run, streamed)
            record.setdefault(machine, {})[full] = entry
            if lock is not None:
                try:
                    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
                except OSError:
                    pass
    finally:
        if lock is not None:
            lock.close()
    _made[full] = entry
    _bump()
    return entry["choice"]


def _given(op: str, key: str, candidates: Sequence[str], device_type: str) -> str | None:
    """The choice :func:`choose` makes before reading the machine's record (steps 1-2 of the
    module doc, a device other than the CPU, code being compiled), else None."""
    forced = _forced()
    if forced == "rules" or device_type != "cpu" or (torch.compiler.is_compiling() and not _traced):
        return candidates[0]
    if forced and op in forced:
        if forced[op] not in candidates:
            raise DsvError(
                f"DSV3_KERNELS: {op}={forced[op]} is not one of {', '.join(candidates)} here; "
                "name one of them or unset DSV3_KERNELS"
            )
        return forced[op]
    made = _made.get(f"{op} | {key}")
    if made is not None and made["choice"] in candidates:
        return made["choice"]
    return None


#: set while a function of :func:`at_trace_time` runs
_traced = False


def static_ints(*ns: int) -> bool:
    """Whether every one of ``ns`` is a plain int, also where ``torch.compile`` traces, where a
    dynamic size is a symbol that passes ``isinstance(n, int)``; asks nothing that would add a
    guard on a symbol's value (a symbol's range is unbounded above)."""
    return all(known_true(n < 2**62) for n in ns)


def known_true(condition: bool | torch.SymBool) -> bool:
    """``torch.fx.experimental.symbolic_shapes.statically_known_true``: whether ``condition``
    holds for every value a symbolic size may take (a plain bool: itself), without adding a
    guard. Imported where code is compiled: the module pulls in sympy, half a second of every
    process's start on a slow CPU, which eager code never needs."""
    if isinstance(condition, bool) and not torch.compiler.is_compiling():  # (traced, a symbol passes for a bool)
        return condition
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(condition)


def assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (a
    second of every process's start on a slow CPU) where nothing has imported it yet: the
    public function imports it and marks ``fn`` with ``_dynamo_marked_constant``, which this
    sets itself then (``tests/unit/test_kernels.py`` checks that the public function sets
    exactly that mark in the installed torch)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def at_trace_time(fn: Callable[..., str]) -> Callable[..., str]:
    """``fn`` (whose arguments are Python constants: ints, strings, dtypes) for code that
    ``torch.compile`` may trace: where it is traced, ``fn`` runs once, eagerly and outside the
    graph (``torch.compiler.assume_constant_result``), and the graph keeps its result as a
    constant (a symbolic size as argument would break the graph: see :func:`static_ints`);
    the choices it asks of :func:`choose` are then measured (or read from this process or the
    machine's record) as in eager code instead of falling back to the rule. In eager code it
    is ``fn``."""

    def run(*args):
        global _traced
        before, _traced = _traced, True
        try:
            return fn(*args)
        finally:
            _traced = before

    return assume_constant_result(functools.wraps(fn)(run))


def known(op: str, key: str, candidates: Sequence[str], device_type: str = "cpu") -> str | None:
    """The candidate :func:`choose` would return for ``op`` at ``key`` without timing anything:
    given (``DSV3_KERNELS``, this process, a device other than the CPU) or in the machine's
    record; None when the machine has not measured it yet. Reads the record without taking its
    lock and writes nothing (what the memory plan asks, :func:`dsv3.model.attention.planned_attention`).

    Raises:
        DsvError: ``DSV3_KERNELS`` names an unknown candidate for ``op`` or is malformed.
    """
    given = _given(op, key, candidates, device_type)
    if given is not None:
        return given
    machine = _read(cache_path()).get(_machine())
    entry = machine.get(f"{op} | {key}") if isinstance(machine, dict) else None
    if isinstance(entry, dict) and entry.get("choice") in candidates:
        return entry["choice"]
    return None


def _bump() -> None:
    global _version
    _version += 1


_UNREAD = object()
_pinned_env: object = _UNREAD  # DSV3_KERNELS as read once for a model call (see :func:`pinned`)


def state() -> tuple:
    """What every choice depends on besides its key: ``DSV3_KERNELS``, the choices made or
    given (:func:`preload`), and whether candidates are being timed (the rule answers then). A
    caller that keeps its own copies of choices (a hot path asking for the same key on every
    call) keeps them while this stays equal (:func:`remembered`)."""
    env = os.environ.get("DSV3_KERNELS") if _pinned_env is _UNREAD else _pinned_env
    return env, id(_made), _version, _measuring


@contextlib.contextmanager
def pinned():
    """Read ``DSV3_KERNELS`` once for what runs inside (one decoding step asks for its choices
    a hundred times; reading the environment each time cost 2-4% of a small model's step)."""
    global _pinned_env
    outer = _pinned_env
    _pinned_env = os.environ.get("DSV3_KERNELS")
    try:
        yield
    finally:
        _pinned_env = outer


_memo: dict[tuple, str] = {}
_memo_state: tuple = ()


def remembered(key: tuple, answer: Callable[[], str]) -> str:
    """``answer()`` for ``key`` (a tuple of the choice's inputs, cheaper to build than
    :func:`choose`'s key string), kept while :func:`state` is unchanged and nothing is being
    timed: for choices asked on every call of a hot path."""
    global _memo_state
    now = state()
    if now != _memo_state:
        _memo.clear()
        _memo_state = now
    hit = _memo.get(key)
    if hit is None:
        hit = answer()
        if not _measuring:
            _memo[key] = hit
            _memo_state = state()
    return hit


def _read(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _measure(candidates: Sequence[str], run: Callable[[str], None], streamed: bool = False) -> dict:
    """Time each candidate (interleaved rounds after a warm-up; best wall time) and pick.

    The candidates run under identity saved-tensor hooks, so hooks of the caller (which may
    be counting what its own forward keeps for backward) do not see the synthetic tensors.
    A choice asked for inside a candidate gets the fixed rule (see :func:`choose`)."""
    global _measuring
    _measuring += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return _timed(candidates, run, streamed)
    finally:
        _measuring -= 1


def _timed(candidates: Sequence[str], run: Callable[[str], None], streamed: bool = False) -> dict:
    best = {name: float("inf") for name in candidates}
    spent = dict.fromkeys(candidates, 0.0)
    for _ in range(WARMUP):
        for name in candidates:
            run(name)
    for r in range(STREAM_ROUNDS if streamed else MAX_ROUNDS):
        if not streamed and r >= ROUNDS and min(spent.values()) >= MIN_SECONDS:
            break
        for name in candidates:
            t0 = time.perf_counter()
            run(name)
            dt = time.perf_counter() - t0
            best[name], spent[name] = min(best[name], dt), spent[name] + dt
    fastest = min(candidates, key=best.get)
    choice = candidates[0] if best[candidates[0]] <= best[fastest] * (1 + MARGIN) else fastest
    return {"choice": choice, "ms": {name: round(best[name] * 1e3, 3) for name in candidates}}


def _last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), 32 MiB where it reports none."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


#: at most this many copies in a streamed run (:func:`stream_copies`)
STREAM_MAX_COPIES = 32


def stream_copies(nbytes: int) -> int:
    """How many distinct copies of an operand of ``nbytes`` a streamed measurement
    (``choose(streamed=True)``) goes through in one timed run: enough to fill a quarter of the
    last-level cache, at most :data:`STREAM_MAX_COPIES` (a small operand's cost is then the
    call's own), at least one. Each copy is then read from the last-level cache, not from the
    core's own caches, as a decoding step meets its weights after the other layers' (the
    candidates' copies together stay within the cache: measured with more, the timings rank
    the candidates as memory-bound products, which a model that fits in the cache is not)."""
    return max(1, min(STREAM_MAX_COPIES, -(-(_last_level_cache_bytes() // 4) // max(nbytes, 1))))


def choices() -> dict[str, dict]:
    """This process's choices: ``{"op | key": {"choice": name, "ms": {candidate: best ms}}}``
    (``ms`` is absent for choices given by :func:`preload`)."""
    return {k: dict(v) for k, v in _made.items()}


def preload(recorded: dict[str, dict]) -> None:
    """Use ``recorded`` (the :func:`choices` of an earlier process, e.g. from a checkpoint) for
    the keys it holds, before anything is measured or read from the machine's record."""
    for key, entry in recorded.items():
        if isinstance(entry, dict) and isinstance(entry.get("choice"), str):
            _made[key] = {"choice": entry["choice"]}
    _bump()


#: the linear layer :func:`faster_precision` times: (rows, in, out), and its record key
PRECISION_PROBE = (512, 512, 512)
_PRECISION_KEY = "linear train {}x{}x{}".format(*PRECISION_PROBE)


def faster_precision(device: torch.device) -> str:
    """``"bf16"`` unless fp32 trains faster on this machine: what ``train.precision: auto``
    (and ``dsv3 bench --precision auto``) becomes.

    A linear layer of :data:`PRECISION_PROBE` is timed forward and backward in each precision
    through :func:`choose` (op ``precision``; bf16 is the rule, kept unless fp32 is faster by
    more than :data:`MARGIN`; recorded per machine like every choice). A CPU whose bf16
    products have no native instructions (AVX2 without AVX-512-BF16 or AMX) runs bf16 several
    times slower than fp32: a 2-core AMD EPYC with AVX2 only trained ``tiny`` at 90 tokens/s in
    bf16 against 3438 in fp32. Any device but the CPU gets bf16.
    """
    rows, d_in, d_out = PRECISION_PROBE
    gen = generator()
    x32 = torch.randn(rows, d_in, generator=gen)
    w32 = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    grad32 = torch.randn(rows, d_out, generator=gen)
    operands = {
        name: (x32.to(dtype), w32.to(dtype).requires_grad_(), grad32.to(dtype))
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    }

    def run(name: str) -> None:
        x, w, grad = operands[name]
        x.requires_grad_(True)
        torch.nn.functional.linear(x, w).backward(grad)
        x.grad = w.grad = None

    return choose("precision", _PRECISION_KEY, ("bf16", "fp32"), run, device)


def resolve_precision(precision: str, device: torch.device, label: str = "train.precision") -> tuple[str, str | None]:
    """A precision as it will run: ``auto`` becomes :func:`faster_precision`; ``fp32`` and
    ``bf16`` stay.

    Args:
        precision: ``fp32``, ``bf16`` or ``auto``.
        device: where it runs.
        label: how the user set it, for the message (``train.precision``, ``--precision``).

    Returns:
        (``"fp32"`` or ``"bf16"``, a line to show the user or None): for ``auto``, what it
        became and why; for ``bf16`` on a CPU where fp32 runs faster, that it does and by how
        much (the user may still want bf16, e.g. to compare with a GPU run).
    """
    if precision not in ("auto", "bf16") or (precision == "bf16" and device.type != "cpu"):
        return precision, None
    if device.type != "cpu":
        return "bf16", f"{label}=auto: bf16 on {device.type}"
    choice = faster_precision(device)
    ms = _made.get(f"precision | {_PRECISION_KEY}", {}).get("ms")
    timing = f" (a linear layer's forward and backward: bf16 {ms['bf16']:g} ms, fp32 {ms['fp32']:g} ms)" if ms else ""
    if precision == "auto":
        return choice, f"{label}=auto: {choice} on {device_name(device)}{timing}"
    if choice == "fp32":
        return "bf16", f"{label}=bf16 runs slower than fp32 on this CPU{timing}; {label}=fp32 (or auto) is faster here"
    return "bf16", None


def generator() -> torch.Generator:
    """A fresh CPU generator for synthetic inputs (the global random state is not touched)."""
    return torch.Generator().manual_seed(0)


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two: one measurement covers a range of lengths."""
    return 1 << max(0, (n - 1).bit_length())
