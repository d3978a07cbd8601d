"""Benchmark results: the JSON file under ``bench/``, the table, and ``dsv3 bench`` itself."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dsv3.bench.memory import bench_memory, memory_table
from dsv3.bench.profile import format_profile, profile_path, write_profile
from dsv3.bench.runs import bench_data, bench_decode, bench_train
from dsv3.config import load_config
from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_text
from dsv3.hardware import machine_info
from dsv3.model import kernels

#: the config of ``dsv3 bench memory`` when none is given
DEFAULT_MEMORY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bench_memory.yaml"

# --------------------------------------------------------------------------- output


def result_path(out_dir: str | Path, kind: str, config_name: str, precision: str, when: datetime | None = None) -> Path:
    """``<out_dir>/<kind>-<config>-<precision>-<YYYYmmdd-HHMMSS>.json``."""
    when = when or datetime.now(timezone.utc)
    return Path(out_dir) / f"{kind}-{config_name}-{precision}-{when.strftime('%Y%m%d-%H%M%S')}.json"


def write_result(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` as JSON atomically, with the ``machine`` it ran on
    (:func:`dsv3.hardware.machine_info`) and the ``kernels`` this process chose by measuring
    (:func:`dsv3.model.kernels.choices`, with their timings; set in ``result`` too); returns the path."""
    result["machine"] = machine_info()
    result.setdefault("kernels", kernels.choices())
    atomic_write_text(path, json.dumps(result, indent=1, sort_keys=False, default=str) + "\n")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a result: one row per side (or per key for flat results)."""
    lines = []
    rows = result.get("results")
    if isinstance(rows, dict) and rows:
        cols = []
        for r in rows.values():
            for c in r:
                if c not in cols and not isinstance(r[c], (dict, list)):
                    cols.append(c)
        table = [["side", *cols]] + [[name, *(_fmt(r.get(c, "")) for c in cols)] for name, r in rows.items()]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            lines.append(
                "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            )
        lines.append("")
    flat = {k: v for k, v in result.items() if k not in ("results", "model") and not isinstance(v, (dict, list))}
    if isinstance(result.get("peak_tflops"), dict):
        flat.update({f"peak_tflops_{k}": v for k, v in result["peak_tflops"].items()})
    w = max((len(k) for k in flat), default=0)
    lines += [f"{k.ljust(w)}  {_fmt(v)}" for k, v in flat.items()]
    return "\n".join(lines)


def run_cli(
    kind: str,
    config: str | None,
    overrides: list[str],
    precision: str = "fp32",
    vs: str | None = None,
    compile_model: bool = False,
    steps: int | None = None,
    reps: int = 3,
    out_dir: str = "bench",
    profile: bool = False,
    layouts: list[str] | None = None,
    cuda_graph: bool = False,
) -> Path:
    """``dsv3 bench KIND``: run, write the JSON result, print the table; returns the file.

    ``profile`` (train only): also write the per-operator breakdown of a step (after the timed ones) to
    ``<stem>.profile.json`` next to the result (:mod:`dsv3.bench.profile`) and print its summary.
    ``memory`` measures ``layouts`` (default :data:`dsv3.bench.memory.DEFAULT_LAYOUTS`) of
    ``config`` (default ``configs/bench_memory.yaml``) with :func:`dsv3.bench.memory.bench_memory`.
    """
    if profile and kind != "train":
        raise DsvError(f"--profile is for dsv3 bench train, not {kind}")
    if layouts is not None and kind != "memory":
        raise DsvError(f"--layouts is for dsv3 bench memory, not {kind}")
    if cuda_graph and kind != "decode":
        raise DsvError(f"--cuda-graph is for dsv3 bench decode, not {kind}")
    if kind == "memory":
        return _run_memory(config, overrides, 2 if steps is None else steps, out_dir, layouts)
    steps = 3 if steps is None else steps
    cfg = load_config(config, overrides)
    compile_model = compile_model or cfg.train.compile
    if vs not in (None, "hf"):
        raise DsvError(f"--vs {vs}: the only peer is 'hf' (transformers)")
    name = Path(config).stem if config else "tiny"
    asked, note = precision, None
    if kind in ("train", "decode"):  # auto: the faster precision here; bf16 where fp32 is faster: a note
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision, note = kernels.resolve_precision(precision, device, "--precision")
        if note:
            print(note, flush=True)
    if kind == "train":
        result = bench_train(
            cfg, precision, vs_hf=vs == "hf", compile_model=compile_model, steps=steps, reps=reps, profile=profile
        )
    elif kind == "decode":
        result = bench_decode(
            cfg, precision, vs_hf=vs == "hf", reps=reps, compile_model=compile_model, cuda_graph=cuda_graph
        )
    elif kind == "data":
        result = bench_data(cfg)
    else:
        raise DsvError(f"unknown benchmark {kind!r}; use train, decode, data or memory")
    result["config"] = name
    if note:
        result["notes"] = [*result.get("notes", []), note]
    result["command"] = "dsv3 bench " + " ".join(
        [kind]
        + ([f"--config {config}"] if config else [])
        + ([f"--vs {vs}"] if vs else [])
        + ([f"--precision {asked}"] if kind != "data" else [])
        + (["--compile"] if compile_model else [])
        + (["--cuda-graph"] if cuda_graph else [])
        + ([f"--steps {steps}", f"--reps {reps}"] if kind == "train" else [])
        + ([f"--reps {reps}"] if kind == "decode" else [])
        + (["--profile"] if profile else [])
        + list(overrides)
    )
    path = result_path(out_dir, kind, name, precision if kind != "data" else "data")
    prof = result.pop("profile", None)
    if prof is not None:
        result["profile_file"] = profile_path(path).name
    write_result(result, path)
    print(format_table(result))
    print(f"wrote {path}")
    if prof is not None:
        ppath = write_profile({"config": name, "command": result["command"], **prof}, path)
        print(format_profile(prof))
        print(f"wrote {ppath}")
    return path


def _run_memory(config: str | None, overrides: list[str], steps: int, out_dir: str, layouts: list[str] | None) -> Path:
    """``dsv3 bench memory``: see :mod:`dsv3.bench.memory`."""
    if steps < 2:
        raise DsvError(f"--steps {steps}: dsv3 bench memory needs at least 2 (Adam's state exists after the first)")
    shown = config
    if config is None:
        config, shown = str(DEFAULT_MEMORY_CONFIG), "configs/bench_memory.yaml"
        if not DEFAULT_MEMORY_CONFIG.is_file():
            raise DsvError(f"{config} is missing; pass --config CFG")
    result = bench_memory(config, overrides, layouts, steps)
    name = Path(config).stem
    precisions = {e.get("precision") for e in result["layouts"] if e.get("precision")}
    result["config"] = name
    result["command"] = " ".join(
        ["dsv3 bench memory", f"--config {shown}", f"--steps {steps}"]
        + ([f"--layouts '{';'.join(layouts)}'"] if layouts else [])
        + list(overrides)
    )
    precision = precisions.pop() if len(precisions) == 1 else "mixed"
    path = write_result(result, result_path(out_dir, "memory", name, precision))
    print(memory_table(result))
    print(f"wrote {path}")
    return path
