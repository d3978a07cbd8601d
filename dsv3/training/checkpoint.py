"""Saving the training state: DeepSpeed engine state for resuming, plus safetensors weights.

The folder layout and its names are :mod:`dsv3.checkpoint.files`; under
``<out_dir>/checkpoints/``::

    step_0000200/                 one folder per saved optimizer step
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's sharded engine state
        layout_free.safetensors   with pipelines, expert parallelism or ZeRO-3: fp32 weights and AdamW
                                  state under the single-process names, experts whole
                                  (resumes with any pp / ep / process count, see
                                  dsv3.parallel.layout_free; pipelines and nvme
                                  offload write only these)
        model.safetensors         full model weights (loadable without DeepSpeed or pickle)
        config.yaml               the run's resolved config
        tokenizer.model           the tokenizer: dsv3's sentencepiece model, or a released
                                  model's tokenizer.json, tokenizer_config.json, chat_template.jinja
        rng_rankNNNNN.json        each rank's Python / NumPy / torch RNG states
        kernels.json              the kernels rank 0 chose by measuring (dsv3.model.kernels),
                                  which a resumed run uses again
        manifest.json             every file with its size; written once all ranks finished
    latest                        name of the newest complete folder

Both safetensors files are written by all ranks at once, each writing the bytes it holds
(:mod:`dsv3.parallel.unsplit_save`): no rank ever holds more than its own share.
Restoring the RNG states is :func:`load_rng`, the kernel choices :func:`load_kernels`; finding
the checkpoint to resume is :func:`dsv3.checkpoint.files.resume_candidates`.

``latest`` is rewritten (temp file + rename) only after every rank has finished writing, so
an interrupted save leaves the previous checkpoint as the one that resumes. On start-up a
checkpoint whose files do not match its manifest is reported and the previous good one is
used instead (:func:`dsv3.checkpoint.files.resume_candidates`).
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3.checkpoint.files import (
    CONFIG,
    KERNELS,
    LATEST,
    LAYOUT_FREE,
    MANIFEST,
    WEIGHTS,
    interrupted_saves,
    previous_good,
    prune,
    resume_candidates,
    rng_file,
    tag_for,
)
from dsv3.collectives import all_reduce_sum, barrier
from dsv3.config import Config, save_config
from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_text
from dsv3.model import kernels
from dsv3.parallel.expert_parallel import ep_modules, save_expert_files
from dsv3.parallel.unsplit_save import save_optimizer_state, save_weights


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states, JSON-serializable."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def save_checkpoint(
    engine,
    cfg: Config,
    ckpt_root: Path,
    step: int,
    client_state: dict[str, Any],
    tokenizer_files: Sequence[Path],
    rank: int,
    pipe=None,
) -> Path:
    """Save a resumable checkpoint of optimizer step ``step`` (collective: every rank calls).

    Every rank writes its part of the DeepSpeed state, its RNG states and its share of
    ``model.safetensors``, which holds the whole model in the single-process layout
    (:func:`dsv3.parallel.unsplit_save.save_weights`: each rank writes the bytes it holds,
    nothing is gathered). Rank 0 adds ``config.yaml``, the tokenizer (copies of
    ``tokenizer_files``, e.g. ``tokenizer.model``) and, once all ranks are done,
    ``manifest.json`` (every file with its size) and then moves ``latest``.

    With expert parallelism (:mod:`dsv3.parallel.expert_parallel`) each EP rank also writes
    its experts into DeepSpeed's per-expert files under their global index. Runs with expert
    parallelism, pipelines or ZeRO-3 also write the optimizer state in the single-process layout
    (``layout_free.safetensors``, the same way), so the checkpoint resumes with another
    ``ep``, ``pp``, process count or ZeRO stage (:mod:`dsv3.parallel.layout_free`).

    ``pipe``: the :class:`dsv3.parallel.pipeline.PipelineRun` of a run with pipelines; its
    checkpoint holds only the files above, not DeepSpeed's per-stage engine files. Neither
    does the checkpoint of a run offloading to nvme (it resumes from ``layout_free.safetensors``).

    Returns:
        The step folder.

    Raises:
        DsvError: the checkpoint could not be written (disk full, permission denied, ...);
            ``latest`` still names the previous checkpoint.
    """
    tag = tag_for(step)
    folder = ckpt_root / tag
    failure = torch.zeros(1)
    error = ""
    if pipe is not None:
        model, names, stage, dp = pipe.model, pipe.names, pipe.stage, (pipe.dp_rank, pipe.dp)
    else:
        model, names, stage = engine.module, [n for n, _ in engine.module.named_parameters()], 0
        dp = (rank, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    expert_parallel = pipe is None and bool(ep_modules(model))
    # ZeRO-Infinity resumes from layout_free.safetensors only (see dsv3.parallel.layout_free):
    # DeepSpeed's own files, which copy the whole swapped optimizer state, are not written
    nvme = "nvme" in (cfg.parallel.offload_optimizer, cfg.parallel.offload_param)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    # collective, every rank writing what it holds
    meta = {"format": "pt", "step": str(step)}
    error = save_weights(folder / WEIGHTS, model, names, stage, dp, meta, engine.optimizer) or error
    if pipe is not None or expert_parallel or cfg.parallel.zero_stage == 3:
        params = dict(model.named_parameters())
        trainable = [n for n in names if params[n].requires_grad]
        error = save_optimizer_state(folder / LAYOUT_FREE, model, trainable, engine.optimizer, stage, dp) or error
    if error:
        failure += 1
    try:
        if pipe is None and not nvme:
            engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
            if expert_parallel:
                save_expert_files(engine.module, ckpt_root, tag)
        atomic_write_text(rng_file(folder, rank), json.dumps(rng_state()))
        if rank == 0:
            save_config(cfg, folder / CONFIG)
            atomic_write_text(folder / KERNELS, json.dumps(kernels.choices(), indent=1, sort_keys=True) + "\n")
            for f in tokenizer_files:
                shutil.copyfile(f, folder / f.name)
    except (OSError, RuntimeError) as exc:
        failure += 1
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    all_reduce_sum(failure)
    if failure.item() == 0 and rank == 0:
        try:
            manifest = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
            atomic_write_text(
                folder / MANIFEST,
                json.dumps(
                    {
                        "step": step,
                        "world_size": client_state.get("world_size"),  # the data-parallel size
                        "processes": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                        "parallel": {k: getattr(cfg.parallel, k) for k in ("pp", "ep", "zero_stage")},
                        "data": client_state.get("data"),
                        "files": manifest,
                    },
                    indent=1,
                ),
            )
            atomic_write_text(ckpt_root / LATEST, tag + "\n")
        except OSError as exc:
            failure += 1
            error = f"{type(exc).__name__}: {exc}"
    barrier()
    if failure.item() > 0 or error:
        previous = previous_good(ckpt_root, exclude=tag)
        if rank == 0 and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        keep = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        try:
            free = f"; its disk has {shutil.disk_usage(ckpt_root).free / 2**20:,.0f} MiB free"
        except OSError:
            free = ""
        raise DsvError(
            f"could not write checkpoint {folder} ({error or 'failed on another rank'}{free}); {keep}; "
            "free disk space or fix the permissions of train.out_dir, then run again to resume"
        )
    if rank == 0:
        prune(ckpt_root, cfg.ckpt.keep_last, keep=tag)
    barrier()
    return folder


def load_kernels(folder: Path) -> None:
    """Use the kernel choices recorded in checkpoint ``folder``
    (:func:`dsv3.model.kernels.preload`, so the resumed steps compute as the saved run did,
    the optimizer's implementation included: called before the model and optimizer are
    built); nothing for a checkpoint written before kernels were recorded."""
    try:
        kernels.preload(json.loads((folder / KERNELS).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG states from ``folder``; False if that rank saved no RNG states."""
    f = rng_file(folder, rank)
    if not f.is_file():
        return False
    set_rng_state(json.loads(f.read_text(encoding="utf-8")))
    return True


def pick_checkpoint(ckpt_root: Path, log) -> str | None:
    """The newest intact checkpoint of ``ckpt_root`` to resume from, or None when there is none;
    interrupted saves and corrupt checkpoints are reported through ``log(message)`` and skipped.

    Raises:
        DsvError: there are checkpoints but none is intact (starting over would overwrite them).
    """
    for tag in interrupted_saves(ckpt_root):
        log(f"warning: checkpoint {ckpt_root / tag} was never completed (the save was interrupted); it is ignored")
    candidates = resume_candidates(ckpt_root)
    for tag, problem in candidates:
        if problem is None:
            return tag
        log(f"warning: checkpoint {ckpt_root / tag} is unusable: {problem}; trying an older one")
    if candidates:
        raise DsvError(
            f"none of the {len(candidates)} checkpoint(s) in {ckpt_root} is usable (see the "
            "warnings above); move that folder away to start the run over, or set train.out_dir to a "
            "new folder"
        )
    return None
