"""Checkpoints: DeepSpeed engine state for resuming, plus safetensors weights for everything else.

Layout under ``<out_dir>/checkpoints/``::

    step_0000200/                 one folder per saved optimizer step
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's sharded engine state
        model.safetensors         full model weights (loadable without DeepSpeed or pickle)
        config.yaml               the run's resolved config
        tokenizer.model           the sentencepiece model
    latest                        name of the newest complete folder

``latest`` is rewritten (temp file + rename) only after every rank has finished writing, so
an interrupted save leaves the previous checkpoint as the one that resumes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from dsv3.config import Config, config_from_dict, save_config
from dsv3.errors import DsvError
from dsv3.parallel.distributed import barrier

WEIGHTS = "model.safetensors"
LATEST = "latest"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def save_checkpoint(engine, cfg: Config, ckpt_root: Path, step: int, client_state: dict[str, Any],
                    tokenizer_path: Path, is_main: bool) -> Path:
    """Save a resumable checkpoint of optimizer step ``step`` (collective: every rank calls).

    Returns:
        The step folder.
    """
    from safetensors.torch import save_file

    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
    folder = ckpt_root / tag
    if is_main:
        state = {k: v.detach().cpu().contiguous() for k, v in engine.module.state_dict().items()}
        tmp = folder / f".{WEIGHTS}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt", "step": str(step)})
        os.replace(tmp, folder / WEIGHTS)
        save_config(cfg, folder / "config.yaml")
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    barrier()
    if is_main:
        atomic_write_text(ckpt_root / LATEST, tag + "\n")
        _prune(ckpt_root, cfg.ckpt.keep_last, keep=tag)
    barrier()
    return folder


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


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a trained model for inference (CONTRACT.md Python API).

    Args:
        path: a run directory (its latest checkpoint), a checkpoint folder, or a Hugging Face
            DeepSeek-V3 folder (config.json + safetensors).
        device: where to put the weights.
        dtype: parameter dtype (float buffers such as the routing bias stay float32).

    Returns:
        :class:`dsv3.model.Transformer` in eval mode.

    Raises:
        DsvError: missing or corrupt checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dsv3.convert import is_hf_folder, load_hf_model
    from dsv3.model import Transformer

    if is_hf_folder(path):
        return load_hf_model(path, device=device, dtype=dtype).eval()
    folder = resolve_checkpoint(path)
    cfg = read_checkpoint_config(folder)
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
