"""Checkpoints: DeepSpeed engine state for resuming, plus safetensors weights for everything else.

Layout under ``<out_dir>/checkpoints/``::

    step_0000200/                 one folder per saved optimizer step
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's sharded engine state
        layout_free.safetensors   with pipelines or expert parallelism: fp32 weights and AdamW
                                  state under the single-process names, experts whole
                                  (resumes with any pp / ep / process count, see
                                  dsv3.parallel.layout_free; pipelines write only these)
        model.safetensors         full model weights (loadable without DeepSpeed or pickle)
        config.yaml               the run's resolved config
        tokenizer.model           the sentencepiece model
        rng_rankNNNNN.json        each rank's Python / NumPy / torch RNG states
        manifest.json             every file with its size; written once all ranks finished
    latest                        name of the newest complete folder

Both safetensors files are written by all ranks at once, each writing the bytes it holds
(:mod:`dsv3.parallel.unsplit_save`): no rank ever holds more than its own share.

``latest`` is rewritten (temp file + rename) only after every rank has finished writing, so
an interrupted save leaves the previous checkpoint as the one that resumes. On start-up a
checkpoint whose files do not match its manifest is reported and the previous good one is
used instead (:func:`resume_candidates`).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dsv3.config import Config, config_from_dict, save_config
from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_text
from dsv3.parallel.distributed import all_reduce_sum, barrier

WEIGHTS = "model.safetensors"
LATEST = "latest"
MANIFEST = "manifest.json"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def latest_tag(ckpt_root: Path) -> str | None:
    """The tag ``latest`` names, if it exists and its folder holds weights; else None."""
    f = ckpt_root / LATEST
    if not f.is_file():
        return None
    tag = f.read_text(encoding="utf-8").strip()
    if not tag or not (ckpt_root / tag / WEIGHTS).is_file():
        raise DsvError(f"checkpoint pointer {f} names {tag!r}, which is missing or incomplete; "
                       f"delete {f} to start over or point it at a complete step folder")
    return tag


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


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank{rank:05d}.json"


def save_checkpoint(engine, cfg: Config, ckpt_root: Path, step: int, client_state: dict[str, Any],
                    tokenizer_path: Path, rank: int, pipe=None) -> Path:
    """Save a resumable checkpoint of optimizer step ``step`` (collective: every rank calls).

    Every rank writes its part of the DeepSpeed state, its RNG states and its share of
    ``model.safetensors``, which holds the whole model in the single-process layout
    (:func:`dsv3.parallel.unsplit_save.save_weights`: each rank writes the bytes it holds,
    nothing is gathered). Rank 0 adds ``config.yaml``, ``tokenizer.model`` and, once all ranks
    are done, ``manifest.json`` (every file with its size) and then moves ``latest``.

    With expert parallelism (:mod:`dsv3.parallel.expert_parallel`) each EP rank also writes
    its experts into DeepSpeed's per-expert files under their global index. Runs with expert
    parallelism or pipelines also write the optimizer state in the single-process layout
    (``layout_free.safetensors``, the same way), so the checkpoint resumes with another
    ``ep``, ``pp``, process count or ZeRO stage (:mod:`dsv3.parallel.layout_free`).

    ``pipe``: the :class:`dsv3.parallel.pipeline.PipelineRun` of a run with pipelines; its
    checkpoint holds only the files above, not DeepSpeed's per-stage engine files.

    Returns:
        The step folder.

    Raises:
        DsvError: the checkpoint could not be written (disk full, permission denied, ...);
            ``latest`` still names the previous checkpoint.
    """
    from dsv3.parallel.expert_parallel import ep_modules, save_expert_files
    from dsv3.parallel.unsplit_save import LAYOUT_FREE, save_optimizer_state, save_weights

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
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    # collective, every rank writing what it holds
    error = save_weights(folder / WEIGHTS, model, names, stage, dp, {"format": "pt", "step": str(step)}) or error
    if pipe is not None or expert_parallel:
        params = dict(model.named_parameters())
        trainable = [n for n in names if params[n].requires_grad]
        error = save_optimizer_state(folder / LAYOUT_FREE, model, trainable, engine.optimizer, stage, dp) or error
    if error:
        failure += 1
    try:
        if pipe is None:
            engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
            if expert_parallel:
                save_expert_files(engine.module, ckpt_root, tag)
        atomic_write_text(_rng_file(folder, rank), json.dumps(rng_state()))
        if rank == 0:
            save_config(cfg, folder / "config.yaml")
            shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    except (OSError, RuntimeError) as exc:
        failure += 1
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    all_reduce_sum(failure)
    if failure.item() == 0 and rank == 0:
        try:
            manifest = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
            atomic_write_text(folder / MANIFEST, json.dumps(
                {"step": step, "world_size": client_state.get("world_size"),  # the data-parallel size
                 "processes": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                 "parallel": {k: getattr(cfg.parallel, k) for k in ("pp", "ep", "zero_stage")},
                 "data": client_state.get("data"),
                 "files": manifest}, indent=1))
            atomic_write_text(ckpt_root / LATEST, tag + "\n")
        except OSError as exc:
            failure += 1
            error = f"{type(exc).__name__}: {exc}"
    barrier()
    if failure.item() > 0 or error:
        previous = _previous_good(ckpt_root, exclude=tag)
        if rank == 0 and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        keep = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        try:
            free = f"; its disk has {shutil.disk_usage(ckpt_root).free / 2**20:,.0f} MiB free"
        except OSError:
            free = ""
        raise DsvError(f"could not write checkpoint {folder} ({error or 'failed on another rank'}{free}); {keep}; "
                       "free disk space or fix the permissions of train.out_dir, then run again to resume")
    if rank == 0:
        _prune(ckpt_root, cfg.ckpt.keep_last, keep=tag)
    barrier()
    return folder


def _previous_good(ckpt_root: Path, exclude: str) -> str | None:
    for folder in sorted(ckpt_root.glob("step_*"), reverse=True):
        if folder.name != exclude and checkpoint_problem(folder) is None:
            return folder.name
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, intact checkpoint, or None if it is.

    Checks that ``manifest.json`` exists (written only after every rank finished), that every
    file it lists is present with its recorded size, and that the header of each safetensors
    file (the weights, the layout-free optimizer state) reads.
    """
    from safetensors import safe_open

    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "it was never completed (no manifest.json)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, OSError):
        return "its manifest.json is unreadable"
    for name, size in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for name in [WEIGHTS] + sorted(n for n in files if n.endswith(".safetensors") and n != WEIGHTS):
        try:
            with safe_open(str(folder / name), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - any parse failure means corrupt
            return f"{name} is unreadable ({type(exc).__name__})"
    return None


def interrupted_saves(ckpt_root: Path) -> list[str]:
    """Step folders newer than the one ``latest`` names: saves that never completed."""
    latest_file = ckpt_root / LATEST
    if not latest_file.is_file():
        return []
    latest = latest_file.read_text(encoding="utf-8").strip()
    return sorted(p.name for p in ckpt_root.glob("step_*") if p.is_dir() and p.name > latest)


def resume_candidates(ckpt_root: Path) -> list[tuple[str, str | None]]:
    """Checkpoints to try on start-up, newest first: ``[(tag, problem or None), ...]``.

    The folder named by ``latest`` comes first; older step folders follow, so a corrupt
    latest checkpoint falls back to the previous good one.
    """
    latest_file = ckpt_root / LATEST
    if not latest_file.is_file():
        return []
    latest = latest_file.read_text(encoding="utf-8").strip()
    found = sorted((p.name for p in ckpt_root.glob("step_*") if p.is_dir()), reverse=True)
    # folders newer than latest are saves that never completed
    tags = ([latest] if latest in found else []) + [t for t in found if t < latest]
    return [(t, checkpoint_problem(ckpt_root / t)) for t in tags]


def saved_world_size(folder: Path) -> int | None:
    """Number of data-parallel ranks that wrote the checkpoint in ``folder`` (from its manifest)."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("world_size")
    except (OSError, ValueError):
        return None


def to_universal(ckpt_root: Path, tag: str) -> Path:
    """Convert checkpoint ``tag`` to DeepSpeed's layout-independent universal format.

    Writes ``<ckpt_root>/universal/<tag>/`` (once; reused later) with
    ``deepspeed.checkpoint.ds_to_universal``. Run on one rank; the others wait.

    Returns:
        ``<ckpt_root>/universal``, whose per-parameter files :mod:`dsv3.parallel.layout_free`
        reads when a ZeRO-1/2 checkpoint resumes with another layout.
    """
    import subprocess
    import sys

    root = ckpt_root / "universal"
    out = root / tag
    if not (out / "zero").is_dir():
        tmp = root / f".{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_root / tag),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise DsvError(f"could not re-partition checkpoint {ckpt_root / tag} for a new process count ({last}); "
                           "resume with the process count it was saved with")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return root


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG states from ``folder``; False if that rank saved none."""
    f = _rng_file(folder, rank)
    if not f.is_file():
        return False
    set_rng_state(json.loads(f.read_text(encoding="utf-8")))
    return True


def _prune(ckpt_root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """Map a run directory or a checkpoint folder to the checkpoint folder holding weights.

    Raises:
        DsvError: the path does not exist or holds no dsv3 checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise DsvError(f"checkpoint path {p} does not exist; pass a run directory (train.out_dir) or a checkpoint folder")
    if (p / WEIGHTS).is_file():
        return p
    for root in (p / "checkpoints", p):
        if (root / LATEST).is_file():
            tag = latest_tag(root)
            if tag:
                return root / tag
    if (p / "config.json").is_file():
        raise DsvError(f"{p} looks like a Hugging Face folder; import it with "
                       f"dsv3 convert --from-hf {p} --out DIR, or pass it to load_model / dsv3 generate directly")
    raise DsvError(f"{p} holds no dsv3 checkpoint (no {WEIGHTS} or checkpoints/{LATEST}); "
                   "train first with dsv3 train or pass the right folder")


def read_checkpoint_config(folder: Path) -> Config:
    f = folder / "config.yaml"
    if not f.is_file():
        raise DsvError(f"checkpoint {folder} has no config.yaml; it is incomplete, use another checkpoint")
    try:
        raw = yaml.safe_load(f.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise DsvError(f"{f} is not valid YAML; the checkpoint is corrupt, use another one") from None
    return config_from_dict(raw, str(f))


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               max_memory: dict[int | str, int] | None = None, offload_folder: str | Path | None = None):
    """Load a trained model for inference (CONTRACT.md Python API).

    Args:
        path: a run directory (its latest checkpoint), a checkpoint folder, or a Hugging Face
            DeepSeek-V3 folder (config.json + safetensors).
        device: where to put the weights.
        dtype: parameter dtype (float buffers such as the routing bias stay float32).
        max_memory, offload_folder: either one switches to big-model placement
            (:func:`dsv3.offload.load_dispatched`): whole blocks go to the GPUs, then CPU
            memory, then ``offload_folder`` on disk, within ``max_memory`` ({GPU index or
            "cpu": bytes}); ``device`` is then unused. dsv3 checkpoints only.

    Returns:
        :class:`dsv3.model.Transformer` in eval mode.

    Raises:
        DsvError: missing or corrupt checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dsv3.convert import is_hf_folder, load_hf_model
    from dsv3.model import Transformer

    dispatch = max_memory is not None or offload_folder is not None
    if is_hf_folder(path):
        if dispatch:
            raise DsvError(f"--max-memory / --offload-folder need a dsv3 checkpoint; import {path} first with "
                           f"dsv3 convert --from-hf {path} --out DIR")
        return load_hf_model(path, device=device, dtype=dtype).eval()
    folder = resolve_checkpoint(path)
    cfg = read_checkpoint_config(folder)
    if dispatch:
        from dsv3.offload import load_dispatched

        return load_dispatched(cfg, folder / WEIGHTS, dtype, max_memory, offload_folder)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    model.init_rope()
    try:
        state = load_file(str(folder / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise DsvError(f"cannot read {folder / WEIGHTS} ({exc}); the checkpoint is corrupt, use another one") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise DsvError(f"{folder / WEIGHTS} does not match its config.yaml ({first}); use a matching checkpoint") from None
    for name, p in model.named_parameters():
        p.data = p.data.to(dtype)
    return model.eval()


def tokenizer_path(path: str | Path) -> Path:
    """Find ``tokenizer.model`` for a run directory, checkpoint folder or the file itself."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (p / "tokenizer.model",):
        if cand.is_file():
            return cand
    folder = resolve_checkpoint(p)
    cand = folder / "tokenizer.model"
    if cand.is_file():
        return cand
    raise DsvError(f"no tokenizer.model found for {p}; pass the run directory of the training run")


def load_tokenizer(path: str | Path):
    """Load the sentencepiece tokenizer of a run directory, checkpoint folder or ``.model`` file.

    Returns:
        :class:`dsv3.tokenizer.Tokenizer` with ``encode(str) -> list[int]`` and
        ``decode(list[int]) -> str``.
    """
    from dsv3.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_path(path))
