"""Layout-free training state: resume a checkpoint with another parallel layout.

DeepSpeed's checkpoint files are split by the layout that wrote them: by pipeline stage, by EP
rank (each rank's block of routed experts) and, under ZeRO-1/2, by data-parallel rank (flat
partitions of the fp32 master weights and Adam moments). Its universal-checkpoint converter
re-partitions the last kind only, and handles neither pipelines with a tied embedding nor
expert parallelism. So runs with pipelines or expert parallelism also write the state of every
parameter in the shape of the *unsplit* model:

    layout_free.safetensors     NAME/fp32, NAME/exp_avg, NAME/exp_avg_sq: fp32 master weights
                                and AdamW moments under the single-process names, routed
                                experts whole (E, ...); metadata "step": the AdamW step count

written by all ranks at once, each writing the values it holds (its ZeRO fragments, its expert
rows, its share of replicated tensors; :mod:`dsv3.parallel.unsplit_save`), so no rank gathers
more than its own share.

A run with any other layout (``pp`` 2 <-> 1, ``ep`` 2 -> 1 or 4, another process count, ZeRO
stage 0 <-> 1) reads them (:func:`read_layout_free`: a rank reads only its own stage's tensors
and its own expert rows) and puts every value into whatever optimizer DeepSpeed built
(:func:`set_layout_free_state`): the plain torch AdamW (fp32, ZeRO stage 0), the unfused bf16
optimizer (per-parameter fp32 copies), or the flat ZeRO-1/2 and bf16 partitions (through
DeepSpeed's ``safe_set_full_*`` fragment API). Checkpoints without these files (``pp`` = ``ep``
= 1) are read from DeepSpeed's own files: the fp32 ZeRO-0 model states, or the universal
checkpoint for partitioned ones. The restored state equals the saved one exactly; a resharded
run then agrees with an uninterrupted one to float rounding (another summation order), not bit
for bit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsv3.checkpoint import LAYOUT_FREE, MANIFEST, WEIGHTS, read_checkpoint_config, saved_world_size
from dsv3.collectives import all_reduce_sum, barrier
from dsv3.config import Config
from dsv3.errors import DsvError
from dsv3.model import Transformer
from dsv3.parallel import ds_internals
from dsv3.parallel.expert_parallel import ep_module

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
FIELDS = ("fp32", *ADAM_KEYS)


def adam_steps(optimizer: torch.optim.Optimizer) -> int:
    """Number of Adam updates taken so far (0 before the first)."""
    steps = [int(st["step"]) for st in optimizer.state.values() if "step" in st]
    return max(steps, default=0)


@torch.no_grad()
def set_layout_free_state(
    named: dict[str, nn.Parameter],
    optimizer,
    state: dict[str, dict[str, torch.Tensor]],
    step: int,
    ds_optimizer=None,
    model: nn.Module | None = None,
) -> None:
    """Load what :func:`layout_free_state` returned into freshly built parameters and optimizer.

    Sets the weights, the fp32 master weights (ZeRO-1 / bf16), Adam's moments and its step
    count. Not collective.

    Raises:
        DsvError: a parameter is missing from ``state`` or has another shape.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if ds_optimizer is not None and step > 0:
        ds_internals.relink_hp_state(ds_optimizer, create_step=step)
        ds_internals.create_zero3_state(ds_optimizer, step)
    zero3: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in named.items():
        entry = state.get(name)
        if entry is not None and ds_internals.is_zero3_param(p):  # ZeRO-3: this rank's partition of each, below
            shape = tuple(ds_internals.full_shape(p))
            if _entry_shape(entry) != shape:
                raise DsvError(
                    f"the checkpoint has no optimizer state for {name} with shape {shape}; "
                    "resume with the layout it was saved with"
                )
            zero3[name] = entry  # read tensor by tensor (LazyEntry): never the whole state at once
            continue
        if entry is not None:
            entry = {k: _local_experts(model, name, v) for k, v in entry.items()}
        shape = tuple(ds_internals.full_shape(p))
        if entry is None or tuple(entry["fp32"].shape) != shape:
            raise DsvError(
                f"the checkpoint has no optimizer state for {name} with shape {shape}; "
                "resume with the layout it was saved with"
            )
        p.data.copy_(entry["fp32"].to(p.device, p.dtype))
        if ds_internals.has_flat_partition(p):
            safe_set_full_fp32_param(p, entry["fp32"].to(p.device))
            for key in ADAM_KEYS:
                if key in entry and step > 0:
                    safe_set_full_optimizer_state(p, entry[key].to(p.device), key)
        elif all(k in entry for k in ADAM_KEYS) and step > 0:
            master = ds_internals.master_of(ds_optimizer, p)
            master.data.copy_(entry["fp32"].to(master.device, master.dtype))
            optimizer.state[master] = {
                "step": torch.tensor(float(step)),
                **{k: entry[k].to(master.device, master.dtype).clone() for k in ADAM_KEYS},
            }
    if zero3:
        _set_zero3_partitions(ds_optimizer, [(n, named[n]) for n in zero3], zero3, step)
    for st in optimizer.state.values():  # ZeRO's flat partitions
        if "step" in st:
            st["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st["step"]) else step


class LazyEntry(Mapping):
    """One parameter's fields in ``layout_free.safetensors`` (``"fp32"``, ``"exp_avg"``,
    ``"exp_avg_sq"``), each read from the open file when accessed and not kept, so that a
    resume holds one tensor at a time instead of the whole optimizer state (16 bytes per
    parameter: more than the memory of a machine that trains with nvme offload).

    Each access opens the file anew (a small header read), so the mapped pages of what was read
    are released with it instead of staying resident until the whole state was read.

    Args:
        path: the ``layout_free.safetensors`` file.
        name: the parameter's plain name.
        keys: the fields the file has for it.
        rows: with expert parallelism, this rank's rows of the stacked experts; else None.
    """

    def __init__(self, path: str, name: str, keys: list[str], rows: slice | None = None):
        self.path, self.name, self.keys_, self.rows = str(path), name, list(keys), rows

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.keys_:
            raise KeyError(key)
        full = f"{self.name}/{key}"
        with safe_open(self.path, framework="pt") as f:
            return (f.get_slice(full)[self.rows] if self.rows else f.get_tensor(full)).clone()

    def __contains__(self, key) -> bool:
        return key in self.keys_

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def shape(self) -> tuple[int, ...]:
        """Shape of the ``"fp32"`` field as read (this rank's expert rows), without reading it."""
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            shape = list(f.get_slice(f"{self.name}/fp32").get_shape())
        if self.rows is not None:
            shape[0] = len(range(*self.rows.indices(shape[0])))
        return tuple(shape)


def _entry_shape(entry) -> tuple[int, ...]:
    return entry.shape() if isinstance(entry, LazyEntry) else tuple(entry["fp32"].shape)


def _set_zero3_partitions(ds_optimizer, params: list, entries: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    """Write this rank's partition of each ``entries[name]`` (whole fp32 tensors) into ZeRO-3's
    fp32 master weights and, after the first update, Adam's moments of the parameters
    ``params`` (``[(name, param)]``), one optimizer sub-group at a time
    (:func:`dsv3.parallel.ds_internals.zero3_partitions`). The weights themselves were loaded
    into the model before DeepSpeed partitioned it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, _, read in ds_internals.zero3_partitions(ds_optimizer, params, write=True, state_step=step or None):
        for key in ("fp32",) + ADAM_KEYS:
            if key not in entries[name] or (key != "fp32" and step == 0):
                continue
            dest = read(None if key == "fp32" else key)
            size = dest.numel()
            flat = entries[name][key].reshape(-1)
            valid = max(0, min(size, flat.numel() - rank * size))
            dest.zero_()
            dest[:valid].copy_(flat[rank * size : rank * size + valid])


def read_layout_free(folder, cfg_saved: Config, model: Transformer) -> tuple[dict, int]:
    """The per-parameter optimizer state of checkpoint ``folder`` under the plain names.

    Handles checkpoints saved with pipelines or expert parallelism (``layout_free.safetensors``),
    single-stage ZeRO-0
    checkpoints (the torch optimizer's state in DeepSpeed's model-states file; in bf16 with the
    unfused optimizer's fp32 copies) and single-stage partitioned ones (ZeRO-1/2), through
    DeepSpeed's universal checkpoint (converted once by rank 0 into
    ``checkpoints/universal/<tag>``; collective).

    A rank reads from disk only what it then copies into its own parameters: parameters of
    ``model`` on the meta device (other pipeline stages) get no entry, and an expert-parallel
    block gets only its rows of the stacked experts (``safe_open(...).get_slice``).

    Returns:
        (``{name: {"fp32", "exp_avg", "exp_avg_sq"}}``, Adam step count); from a
        ``layout_free.safetensors`` file each entry is a :class:`LazyEntry` (read on access).

    Raises:
        DsvError: the checkpoint keeps its optimizer state in another form.
    """
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / LAYOUT_FREE).is_file():
        state = {}
        with safe_open(str(folder / LAYOUT_FREE), framework="pt") as f:
            keys = set(f.keys())
            step = int(f.metadata()["step"])
        for name, p in model.named_parameters():
            if p.is_meta or f"{name}/fp32" not in keys:
                continue  # another stage's parameter; a missing one is reported by set_layout_free_state
            m = ep_module(model, name)
            rows = slice(m.first_expert, m.first_expert + m.num_local_experts) if m is not None else None
            state[name] = LazyEntry(
                folder / LAYOUT_FREE, name, [k for k in ("fp32",) + ADAM_KEYS if f"{name}/{k}" in keys], rows
            )
        return state, step
    if cfg_saved.parallel.pp > 1 or cfg_saved.parallel.ep > 1:
        raise DsvError(
            f"checkpoint {folder} has no {LAYOUT_FREE} although it was saved with pipelines or expert "
            "parallelism; it is incomplete: resume from an older checkpoint"
        )
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        return _read_universal(folder, model)
    ds = torch.load(next(folder.glob("mp_rank_*_model_states.pt")), map_location="cpu", weights_only=False, mmap=True)
    # with DeepSpeed's unfused bf16 optimizer: its fp32 copies, then torch's state
    masters, opt = ds_internals.unfused_fp32_copies(ds.get("optimizer") or {"state": {}})
    # the saving run had neither pipelines nor expert parallelism: its optimizer groups were
    # dsv3.parallel.engine.param_groups of the plain model (matrices and stacked experts, then
    # vectors), and torch numbers the state by position in those groups
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [n for n, p in trainable if p.ndim >= 2] + [n for n, p in trainable if p.ndim < 2]
    params = dict(trainable)
    state, step = {}, 0
    with safe_open(str(folder / WEIGHTS), framework="pt") as weights:
        for i, name in enumerate(order):
            st = opt["state"].get(i, {})
            if "step" in st:
                step = max(step, int(st["step"]))
            if params[name].is_meta:  # another pipeline stage's parameter: not read
                continue
            entry = {"fp32": (masters[i] if masters is not None else weights.get_tensor(name)).float()}
            for key in ADAM_KEYS:
                if key in st:
                    entry[key] = st[key].float()
            state[name] = entry
    return state, step


def resumes_layout_free(cfg: Config, folder, dp: int) -> bool:
    """True when resuming checkpoint ``folder`` with ``cfg`` on ``dp`` data-parallel ranks goes
    through the plain-name weights and per-parameter optimizer state: either side uses
    pipelines, ``parallel.ep``, ``parallel.zero_stage`` or ``train.precision`` changed (each
    changes the form of DeepSpeed's optimizer files), either side offloads to nvme
    (``engine.load_checkpoint`` leaves the swapped optimizer state of ZeRO-Infinity stale; its
    checkpoints are ZeRO-3 ones, which hold the per-parameter state), or an expert-parallel
    run changed its process count."""
    saved_cfg = read_checkpoint_config(folder)
    saved, p = saved_cfg.parallel, cfg.parallel
    if p.pp > 1 or saved.pp > 1 or saved.ep != p.ep or saved.zero_stage != p.zero_stage:
        return True
    if saved_cfg.train.precision != cfg.train.precision:
        return True
    if "nvme" in (saved.offload_optimizer, p.offload_optimizer, saved.offload_param, p.offload_param):
        return True  # DeepSpeed's own files do not restore a state swapped to nvme
    if saved_world_size(folder) in (None, dp):
        return False
    # another process count: expert-parallel files, and ZeRO-1/2 partitions, are split by it
    return p.ep > 1 or any(Path(folder).glob("*zero_pp_rank_*optim_states.pt"))


def resume_layout_free(folder, model: Transformer, names: list[str], optimizer, ds_optimizer) -> int:
    """Load checkpoint ``folder``'s optimizer state into a freshly built engine's optimizer (the
    weights were loaded into the plain model before the engine was built); returns the saved step.

    Works across layouts (``pp`` 2 <-> 1, other stage splits, ``ep`` changes, process counts,
    ZeRO stage 0 <-> 1). Collective only when a partitioned checkpoint is first converted to
    DeepSpeed's universal format.

    Args:
        folder: the checkpoint's step folder.
        model: the plain model (other pipeline stages' parameters on the meta device).
        names: the parameters this rank's optimizer updates, by plain name.
        optimizer: the torch optimizer inside the engine.
        ds_optimizer: the engine's optimizer (DeepSpeed's wrapper, or ``optimizer`` itself).
    """
    saved = read_checkpoint_config(Path(folder))
    state, adam_step = read_layout_free(folder, saved, model)
    params = dict(model.named_parameters())
    set_layout_free_state({n: params[n] for n in names}, optimizer, state, adam_step, ds_optimizer, model)
    return int(json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))["step"])


def _read_universal(folder, model: Transformer) -> tuple[dict, int]:
    """Per-parameter state of a single-stage partitioned checkpoint via DeepSpeed's universal
    format (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``). Collective."""
    failed = torch.zeros(1)
    message = ""
    if dist.get_rank() == 0:
        try:
            to_universal(folder.parent, folder.name)
        except DsvError as exc:
            failed += 1
            message = str(exc)
    all_reduce_sum(failed)
    if failed.item():
        raise DsvError(message or f"could not convert checkpoint {folder} for a new pipeline layout")
    barrier()
    root = folder.parent / "universal" / folder.name / "zero"
    state, step = {}, 0
    for name, _ in model.named_parameters():
        entry = {}
        for key in ("fp32",) + ADAM_KEYS:
            f = root / name / f"{key}.pt"
            if f.is_file():
                entry[key] = torch.load(f, map_location="cpu", weights_only=False, mmap=True)["param"].float()
        if "fp32" not in entry:
            raise DsvError(
                f"checkpoint {folder} has no universal state for {name}; resume with the layout it was saved with"
            )
        f = root / name / "step.pt"
        if f.is_file():
            value = torch.load(f, map_location="cpu", weights_only=False)
            value = value.get("param", value) if isinstance(value, dict) else value
            step = max(step, int(value))
        state[name] = entry
    return state, step


def _local_experts(model: nn.Module | None, name: str, value: torch.Tensor) -> torch.Tensor:
    """This rank's block of a whole expert tensor (unchanged if it is a block already)."""
    m = ep_module(model, name)
    if m is None or value.shape[0] != m.num_experts:
        return value
    return value[m.first_expert : m.first_expert + m.num_local_experts]


def to_universal(ckpt_root: Path, tag: str) -> Path:
    """Convert checkpoint ``tag`` to DeepSpeed's layout-independent universal format.

    Writes ``<ckpt_root>/universal/<tag>/`` (once; reused later) with
    ``deepspeed.checkpoint.ds_to_universal``. Run on one rank; the others wait.

    Returns:
        ``<ckpt_root>/universal``, whose per-parameter files :func:`read_layout_free` reads
        when a ZeRO-1/2 checkpoint resumes with another layout.

    Raises:
        DsvError: the conversion failed (its last error line is in the message).
    """
    import os
    import shutil
    import subprocess
    import sys

    root = ckpt_root / "universal"
    out = root / tag
    if not (out / "zero").is_dir():
        tmp = root / f".{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpt_root / tag),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise DsvError(
                f"could not re-partition checkpoint {ckpt_root / tag} for a new process count ({last}); "
                "resume with the process count it was saved with"
            )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return root
