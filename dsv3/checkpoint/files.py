"""The on-disk layout of runs and checkpoints, and finding a checkpoint from any path.

A run directory (``train.out_dir``)::

    config.yaml                   the fully resolved config          (CONFIG)
    tokenizer.model               the sentencepiece model            (TOKENIZER), or a released
                                  model's tokenizer.json, tokenizer_config.json, chat_template.jinja
                                  (dsv3.tokenizer_files: find_tokenizer, open_tokenizer)
    metrics.jsonl, tb/            logs (dsv3.training.metrics)
    checkpoints/                                                      (CHECKPOINTS)
        step_0000200/             one folder per saved optimizer step (tag_for)
            model.safetensors     the unsplit model's state dict      (WEIGHTS)
            layout_free.safetensors   with pipelines or expert parallelism: fp32 weights and
                                  AdamW moments by parameter name     (LAYOUT_FREE)
            config.yaml, the tokenizer's files
            rng_rankNNNNN.json    each rank's RNG states              (rng_file)
            mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's engine state
            manifest.json         every file with its size; written last   (MANIFEST)
        latest                    the tag of the newest complete folder   (LATEST)

A checkpoint is complete once ``manifest.json`` exists; ``latest`` moves only then. Writing
checkpoints is the trainer's (:mod:`dsv3.training.checkpoint`); this module only names and
finds things, and checks that a folder is intact (:func:`checkpoint_problem`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from dsv3.config import Config, config_from_dict
from dsv3.errors import DsvError

WEIGHTS = "model.safetensors"
LAYOUT_FREE = "layout_free.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
MANIFEST = "manifest.json"
KERNELS = "kernels.json"
LATEST = "latest"
CHECKPOINTS = "checkpoints"
HF_CONFIG = "config.json"


def tag_for(step: int) -> str:
    """The step folder name of optimizer step ``step`` (``step_0000200``)."""
    return f"step_{step:07d}"


def rng_file(folder: Path, rank: int) -> Path:
    """The file holding rank ``rank``'s RNG states in checkpoint ``folder``."""
    return folder / f"rng_rank{rank:05d}.json"


def latest_tag(ckpt_root: Path) -> str | None:
    """The tag ``latest`` names, if it exists and its folder holds weights; else None."""
    f = ckpt_root / LATEST
    if not f.is_file():
        return None
    tag = f.read_text(encoding="utf-8").strip()
    if not tag or not (ckpt_root / tag / WEIGHTS).is_file():
        raise DsvError(
            f"checkpoint pointer {f} names {tag!r}, which is missing or incomplete; "
            f"delete {f} to start over or point it at a complete step folder"
        )
    return tag


def previous_good(ckpt_root: Path, exclude: str) -> str | None:
    """The newest intact step folder other than ``exclude``, or None."""
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


def prune(ckpt_root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest ``keep_last`` step folders, never ``keep``."""
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
        raise DsvError(
            f"checkpoint path {p} does not exist; pass a run directory (train.out_dir) or a checkpoint folder"
        )
    if (p / WEIGHTS).is_file():
        return p
    for root in (p / CHECKPOINTS, p):
        if (root / LATEST).is_file():
            tag = latest_tag(root)
            if tag:
                return root / tag
    if (p / HF_CONFIG).is_file():
        raise DsvError(
            f"{p} looks like a Hugging Face folder; import it with "
            f"dsv3 convert --from-hf {p} --out DIR, or pass it to load_model / dsv3 generate directly"
        )
    raise DsvError(
        f"{p} holds no dsv3 checkpoint (no {WEIGHTS} or checkpoints/{LATEST}); "
        "train first with dsv3 train or pass the right folder"
    )


def read_checkpoint_config(folder: Path) -> Config:
    """The :class:`Config` a checkpoint folder was saved with (its ``config.yaml``).

    Raises:
        DsvError: the file is missing or not valid YAML, or holds an invalid config.
    """
    f = folder / CONFIG
    if not f.is_file():
        raise DsvError(f"checkpoint {folder} has no config.yaml; it is incomplete, use another checkpoint")
    try:
        raw = yaml.safe_load(f.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise DsvError(f"{f} is not valid YAML; the checkpoint is corrupt, use another one") from None
    return config_from_dict(raw, str(f))


def is_hf_folder(path: str | Path) -> bool:
    """True if ``path`` is a folder with a Hugging Face ``config.json`` and no dsv3 ``config.yaml``."""
    p = Path(path)
    return p.is_dir() and (p / HF_CONFIG).is_file() and not (p / CONFIG).is_file()


def prepare_out(out_dir: Path) -> Path:
    """Check ``out_dir`` is new or empty and return a temp folder beside it.

    Raises:
        DsvError: ``out_dir`` exists and is not an empty folder.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DsvError(f"output folder {out_dir} already exists and is not empty; pass a new --out folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_out(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder ``tmp`` into place as ``out_dir`` (see :func:`prepare_out`)."""
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked by _prepare_out
    os.replace(tmp, out_dir)
