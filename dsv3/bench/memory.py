"""``dsv3 bench memory``: what each rank of a layout really holds, next to ``dsv3 plan``'s prediction.

For each layout (processes and config overrides, see :func:`parse_layout`) the program
:mod:`dsv3.bench.memory_probe` runs a few real training steps under ``torchrun`` (gloo on
CPU) and counts, on every rank, the bytes of weights, gradients and optimizer state from the
tensors themselves (:func:`dsv3.parallel.memory.held_bytes`) and the peak resident memory
(``VmHWM``). Beside each rank stands the plan of its pipeline stage
(:func:`dsv3.plan.layouts.plan_layout`): weights, gradients and optimizer bytes, activations,
all-to-all buffers and a planned peak resident memory = static + activations + all-to-all
buffers + the measured process baseline (the rank's resident memory after the imports, before
any model existed).

The JSON result (``bench/memory-<config>-<precision>-<date>.json``): ``machine`` (CPU model and
ISA), ``model`` (parameter counts), ``layouts``: one entry per layout with its settings and
``ranks``: per rank ``measured`` and ``planned`` (both with ``weights_bytes``,
``gradients_bytes``, ``optimizer_bytes``, ``swap_bytes``, ``disk_bytes``, ``peak_rss_bytes``;
measured also ``gathered_bytes`` and ``buckets_bytes``; planned, for ZeRO-3 and offload
layouts, the ``dsv3 plan --cpu`` ``terms`` mapped to parts by :data:`PLAN_PARTS`) and
``ratio`` (measured / planned of the three model states, and of the swap buffers where
planned).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv3.config import load_config
from dsv3.errors import DsvError
from dsv3.hardware import device_name
from dsv3.model import Transformer, count_parameters, kernels
from dsv3.parallel.layout import stage_of_rank
from dsv3.plan.costs import split_counts
from dsv3.plan.layouts import Layout, ModelParts, plan_layout

GIB = 2**30
STATES = ("weights", "gradients", "optimizer")
# short names accepted in a layout spec, for the dotted config keys
ALIASES = {
    "pp": "parallel.pp",
    "ep": "parallel.ep",
    "zero": "parallel.zero_stage",
    "precision": "train.precision",
    "ckpt": "parallel.activation_checkpointing",
    "mbs": "parallel.micro_batch_size",
    "offload_optimizer": "parallel.offload_optimizer",
    "offload_param": "parallel.offload_param",
    "offload_dir": "parallel.offload_dir",
}


@dataclass
class MemoryLayout:
    """One layout to measure: the process count and the config overrides that set it."""

    processes: int
    overrides: list[str] = field(default_factory=list)

    def setting(self, key: str, default: Any = None) -> Any:
        """The value the overrides give ``key`` (a dotted key), as text, or ``default``."""
        for o in self.overrides:
            k, _, v = o.partition("=")
            if k == key:
                return v
        return default

    def name(self) -> str:
        """``procs=2,ep=2,zero=1,precision=bf16``: the spec :func:`parse_layout` reads back."""
        back = {v: k for k, v in ALIASES.items()}
        parts = [f"procs={self.processes}"]
        for o in self.overrides:
            k, _, v = o.partition("=")
            parts.append(f"{back.get(k, k)}={v}")
        return ",".join(parts)


#: the default layouts: 1 and 2 processes, ep 1/2, ZeRO 0/1/2, pp 1/2, fp32/bf16, checkpointing
DEFAULT_LAYOUTS = (
    "procs=1,zero=0,precision=fp32",
    "procs=1,zero=2,precision=bf16",
    "procs=2,ep=2,zero=0,precision=bf16",
    "procs=2,ep=2,zero=1,precision=fp32",
    "procs=2,ep=2,zero=2,precision=bf16,ckpt=true",
    "procs=2,ep=1,zero=2,precision=bf16",
    "procs=2,pp=2,zero=1,precision=bf16",
    "procs=2,pp=2,zero=0,precision=fp32",
)
#: ZeRO-3 and ZeRO-Offload / ZeRO-Infinity layouts (one process; NVMe swap files in a temporary
#: folder), measured with ``--layouts offload``: kept out of the default list, whose run they
#: would lengthen by several minutes on the 0.54B bench model
OFFLOAD_LAYOUTS = (
    "procs=1,zero=3,precision=bf16",
    "procs=1,zero=2,precision=bf16,offload_optimizer=cpu",
    "procs=1,zero=3,precision=bf16,offload_optimizer=cpu",
    "procs=1,zero=3,precision=bf16,offload_optimizer=nvme,offload_param=nvme",
)
#: names that stand for a list of layouts in ``--layouts``
LAYOUT_LISTS = {"default": DEFAULT_LAYOUTS, "offload": OFFLOAD_LAYOUTS}


def parse_layout(spec: str) -> MemoryLayout:
    """Read a layout spec: comma-separated ``KEY=VALUE`` with ``procs=N`` (default 1) and config
    keys, dotted (``parallel.offload_optimizer=cpu``) or short (:data:`ALIASES`: ``pp``, ``ep``,
    ``zero``, ``precision``, ``ckpt``, ``mbs``, ``offload_optimizer``, ``offload_param``,
    ``offload_dir``). Config keys are passed to the run as they are (a key the config does not
    know ends that run with its own error line).

    Raises:
        DsvError: an item without ``=``, or a process count that is not a positive integer.
    """
    procs, overrides = 1, []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise DsvError(f"layout item {item!r} in {spec!r} is not KEY=VALUE; write e.g. procs=2,ep=2,zero=1")
        if key in ("procs", "processes"):
            if not value.isdigit() or int(value) < 1:
                raise DsvError(f"layout {spec!r}: procs={value} must be a positive integer")
            procs = int(value)
        else:
            overrides.append(f"{ALIASES.get(key, key)}={value}")
    return MemoryLayout(procs, overrides)


def run_layout(
    config: str | None, base: list[str], layout: MemoryLayout, steps: int, timeout: float = 900
) -> tuple[list[dict], str | None]:
    """Run :mod:`dsv3.bench.memory_probe` for ``layout`` (under ``torchrun`` with several
    processes, one thread each); returns (the rank records, None) or ([], the error's last lines)."""
    with tempfile.TemporaryDirectory(prefix="dsv3-memory-") as tmp:
        target = ["-m", "dsv3.bench.memory_probe", "--out", tmp, "--steps", str(steps)]
        target += ["--config", config] if config else []
        target += [*base, *layout.overrides]
        if layout.processes > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={layout.processes}",
            ]
            cmd += target
        else:
            cmd = [sys.executable, *target]
        threads = "1" if layout.processes > 1 else os.environ.get("OMP_NUM_THREADS", "2")
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank
            proc.communicate()
            return [], f"timed out after {timeout:.0f} s"
        files = sorted(Path(tmp).glob("rank*.json"), key=lambda f: int(f.stem[4:]))
        if proc.returncode != 0 or len(files) != layout.processes:
            lines = [x for x in (stdout + stderr).splitlines() if x.strip()]
            errors = [x for x in lines if "error" in x.lower()]
            return [], " | ".join((errors or lines)[-3:])[-600:]
        return [json.loads(f.read_text()) for f in files], None


#: ``dsv3 plan``'s per-rank resident terms (device and host, :func:`dsv3.plan.offload.place_states`)
#: by the part of :func:`dsv3.parallel.memory.held_bytes` that measures them; terms not listed
#: (activations, all-to-all buffers, the reduce bucket, the gathered parameters, the fp32
#: gradient copies of the last micro-batch, NVMe offload's fp32 gradient buffer of start-up)
#: are not alive as tensors at the measurement, or are reported apart (``buckets``, ``gathered``)
PLAN_PARTS = {
    "weights": ("weights", "parameter partition", "weight copy-back buffer"),
    "gradients": (
        "gradients",
        "gradient partition",
        "fp32 gradients",
        "gradient accumulation",
        "gradient staging buffers",
    ),
    "optimizer": ("optimizer", "fp32 master weights", "Adam moments"),
    "swap": ("optimizer swap buffers", "parameter swap buffers", "parameter swap-out buffer"),
}


def planned_ranks(cfg, processes: int) -> list[dict]:
    """``dsv3 plan``'s prediction for each rank of ``processes`` (its pipeline stage's plan):
    weights, gradients, optimizer state and swap buffers resident in the process, the device
    and host terms of the plan summed per part (:data:`PLAN_PARTS`), and ``disk_bytes``
    (the swap files)."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    layout = Layout.of(cfg.parallel, processes)
    parts = ModelParts.of(model)
    out = []
    for rank in range(processes):
        # DeepSpeed's pipeline topology: rank = stage * dp + data-parallel rank
        stage = stage_of_rank(rank, processes, layout.pp)
        sp = plan_layout(cfg, parts, layout, cpu=True, dp_rank=rank % layout.dp)
        mem = sp.stages[stage]
        planned = {
            "weights_bytes": int(mem.weights),
            "gradients_bytes": int(mem.grads),
            "optimizer_bytes": int(mem.optimizer),
            "swap_bytes": 0,
            "disk_bytes": 0,
            "static_bytes": int(mem.static),
            "activations_bytes": int(mem.activations),
            "a2a_buffers_bytes": int(mem.a2a_buffers),
        }
        if layout.zero_stage == 3 or layout.offloads:  # pp = 1: the placement is this rank's stage
            resident = {**sp.placement.device, **{k: v for k, v in sp.placement.host.items()}}
            for k, v in sp.placement.host.items():
                if k in sp.placement.device:
                    resident[k] = sp.placement.device[k] + v
            for part, terms in PLAN_PARTS.items():
                planned[f"{part}_bytes"] = int(sum(resident.get(t, 0.0) for t in terms))
            planned["static_bytes"] = sum(planned[f"{k}_bytes"] for k in (*STATES, "swap"))
            planned["disk_bytes"] = int(sp.placement.disk_total)
            planned["terms"] = {k: int(v) for k, v in sp.resident.items()}
        out.append(planned)
    return out


def measure_layout(config: str | None, base: list[str], layout: MemoryLayout, steps: int) -> dict[str, Any]:
    """Measure one layout and put the plan beside each rank (the ``layouts`` entry of the result).

    A layout with NVMe offload and no ``offload_dir`` swaps to a temporary folder (removed after)."""
    entry: dict[str, Any] = {"name": layout.name(), "processes": layout.processes, "overrides": layout.overrides}
    nvme = any(o.endswith("=nvme") for o in layout.overrides if o.startswith("parallel.offload_"))
    if nvme and layout.setting("parallel.offload_dir") is None:
        with tempfile.TemporaryDirectory(prefix="dsv3-swap-") as swap:
            inner = MemoryLayout(layout.processes, [*layout.overrides, f"parallel.offload_dir={swap}"])
            entry = measure_layout(config, base, inner, steps)
        entry.update(name=layout.name(), overrides=layout.overrides)
        return entry
    try:
        cfg = load_config(config, [*base, *layout.overrides])
    except DsvError as err:
        entry.update(error=str(err), ranks=[])
        return entry
    # auto: what the ranks' trainers make of it on this machine (the same measured choice)
    cfg.train.precision = kernels.resolve_precision(cfg.train.precision, torch.device("cpu"))[0]
    p = cfg.parallel
    entry.update(
        pp=p.pp,
        ep=p.ep,
        dp=layout.processes // p.pp,
        zero_stage=p.zero_stage,
        precision=cfg.train.precision,
        activation_checkpointing=p.activation_checkpointing,
        micro_batch_size=p.micro_batch_size,
        seq_len=cfg.data.seq_len,
    )
    for key in ("offload_optimizer", "offload_param", "offload_dir"):
        if hasattr(p, key):
            entry[key] = getattr(p, key)
    records, error = run_layout(config, base, layout, steps)
    if error:
        entry.update(error=error, ranks=[])
        return entry
    plans = planned_ranks(cfg, layout.processes)
    ranks = []
    for rec, plan in zip(records, plans):
        held = rec["held"]
        measured = {f"{k}_bytes": held[f"{k}_bytes"] for k in (*STATES, "swap", "gathered", "buckets")}
        measured.update(
            disk_bytes=rec.get("disk_bytes", 0),
            peak_rss_bytes=rec["peak_rss_bytes"],
            buffers_bytes=held["buffers_bytes"],
            other_bytes=held["other_bytes"],
            expert_weights_bytes=held["expert_weights_bytes"],
            expert_optimizer_bytes=held["expert_optimizer_bytes"],
            rss_at_update_bytes=rec["rss_at_measure_bytes"],
            peak_rss_by_phase=rec.get("peak_rss_by_phase", {}),
            holders=held["holders"],
        )
        planned = dict(plan)
        planned["baseline_rss_bytes"] = rec["baseline_rss_bytes"]
        planned["peak_rss_bytes"] = (
            plan["static_bytes"] + plan["activations_bytes"] + plan["a2a_buffers_bytes"] + rec["baseline_rss_bytes"]
        )
        planned["rss_at_update_bytes"] = plan["static_bytes"] + rec["baseline_rss_bytes"]
        if "terms" in plan:  # ZeRO-3 / offload: every resident term of the plan, the measured baseline
            resident = sum(v for k, v in plan["terms"].items() if k != "process baseline")
            planned["peak_rss_bytes"] = resident + rec["baseline_rss_bytes"]
        compared = _compared(plan)
        ratio = {k: (measured[f"{k}_bytes"] / plan[f"{k}_bytes"] if plan[f"{k}_bytes"] else None) for k in compared}
        ratio["peak_rss"] = measured["peak_rss_bytes"] / planned["peak_rss_bytes"]
        ratio["rss_at_update"] = measured["rss_at_update_bytes"] / planned["rss_at_update_bytes"]
        ranks.append(
            {
                "rank": rec["rank"],
                "stage": rec["stage"],
                "measured": measured,
                "planned": planned,
                "ratio": ratio,
                "agree_5pct": all(r is not None and abs(r - 1) <= 0.05 for k, r in ratio.items() if k in compared),
                "seconds": rec["seconds"],
            }
        )
    entry["ranks"] = ranks
    return entry


def _compared(planned: dict) -> tuple[str, ...]:
    """The parts a rank's measurement is checked against the plan for: weights, gradients,
    optimizer, and the swap buffers where the plan has them (NVMe offload)."""
    return (*STATES, "swap") if planned.get("swap_bytes") else STATES


def bench_memory(
    config: str | None, overrides: list[str], layouts: list[str] | None = None, steps: int = 2, progress=print
) -> dict[str, Any]:
    """Run every layout (default :data:`DEFAULT_LAYOUTS`; ``"default"`` and ``"offload"`` in
    ``layouts`` stand for :data:`DEFAULT_LAYOUTS` and :data:`OFFLOAD_LAYOUTS`) and collect the
    result (see the module docstring).

    Raises:
        DsvError: a malformed layout spec or config.
    """
    names = [x for s in (layouts or ["default"]) for x in LAYOUT_LISTS.get(s.strip(), [s])]
    specs = [parse_layout(s) for s in names]
    cfg = load_config(config, overrides)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_parameters(model)
    experts, other = split_counts(model)
    result: dict[str, Any] = {
        "kind": "memory",
        "device": device_name(torch.device("cpu")),  # "machine" is added by write_result
        "versions": {"torch": torch.__version__, "deepspeed": _version("deepspeed")},
        "model": {
            "parameters": counts["total"],
            "main": counts["main"],
            "mtp": counts["mtp"],
            "routed_experts_main": experts,
            "other_main": other,
        },
        "steps": steps,
        "notes": {
            "measured": "bytes of distinct tensor storages held between the last step's backward and its update "
            "(weights: parameters / their flat buffers; gradients: .grad, ZeRO gradient partitions and "
            "reduction buckets; optimizer: fp32 master copies / partitions and the Adam state); "
            "peak_rss_bytes: VmHWM, the largest of the phases in peak_rss_by_phase (build: start-up and "
            "engine; earlier_steps; last_forward_backward; last_update), each restarted through "
            "/proc/self/clear_refs; rss_at_update_bytes: VmRSS at the measurement",
            "planned": "dsv3 plan for the same layout and the rank's pipeline stage; peak_rss_bytes = static_bytes "
            "+ activations_bytes + a2a_buffers_bytes (planned) + baseline_rss_bytes (measured: resident memory "
            "after the imports, before any model); rss_at_update_bytes = static_bytes + baseline_rss_bytes "
            "(activations are freed by then)",
        },
        "layouts": [],
    }
    for spec in specs:
        progress(f"memory: {spec.name()} ...")
        entry = measure_layout(config, overrides, spec, steps)
        result["layouts"].append(entry)
        progress(entry.get("error") and f"  failed: {entry['error']}" or "  " + _summary(entry))
    return result


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a missing package is simply not reported
        return None


def _summary(entry: dict) -> str:
    worst = max(
        (abs(r - 1) for rk in entry["ranks"] for k, r in rk["ratio"].items() if k in (*STATES, "swap") and r),
        default=0,
    )
    return f"{len(entry['ranks'])} rank(s), largest deviation of plan and measurement {100 * worst:.2f}%"


def memory_table(result: dict[str, Any]) -> str:
    """The printed table: one row per rank of each layout, measured / planned (GiB, or MiB for
    a model under 1 GiB of weights)."""
    ranks = [r for e in result["layouts"] for r in e.get("ranks", [])]
    small = all(r["measured"]["weights_bytes"] < GIB for r in ranks)
    unit, scale = ("MiB", 2**20) if small else ("GiB", GIB)

    def gib(v) -> str:
        return f"{v / scale:.2f}"

    head = ["layout", "rank", "weights", "gradients", "optimizer", "max dev.", "RSS at update", "peak RSS"]
    rows = [head]
    for e in result["layouts"]:
        if e.get("error"):
            rows.append([e["name"], "-", "failed: " + e["error"][:60], "", "", "", "", ""])
            continue
        for r in e["ranks"]:
            m, p = r["measured"], r["planned"]
            dev = max(abs(v - 1) for k, v in r["ratio"].items() if k in (*STATES, "swap") and v is not None)
            rows.append(
                [
                    e["name"],
                    str(r["rank"]),
                    *(f"{gib(m[f'{k}_bytes'])} / {gib(p[f'{k}_bytes'])}" for k in STATES),
                    f"{100 * dev:.2f}%",
                    f"{gib(m['rss_at_update_bytes'])} / {gib(p['rss_at_update_bytes'])}",
                    f"{gib(m['peak_rss_bytes'])} / {gib(p['peak_rss_bytes'])}",
                ]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        f"machine: {result.get('device') or result['machine'].get('cpu_model', 'unknown')}",
        f"{unit} measured / planned per rank",
    ]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
