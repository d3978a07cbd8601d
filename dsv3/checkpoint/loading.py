"""Loading a trained model, its weights one tensor at a time, or its tokenizer, from a run directory,
checkpoint folder or Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3.checkpoint.files import TOKENIZER, WEIGHTS, is_hf_folder, read_checkpoint_config, resolve_checkpoint
from dsv3.checkpoint.hf_import import HFWeights, load_hf_model
from dsv3.checkpoint.weights import CheckpointWeights
from dsv3.errors import DsvError
from dsv3.model import Transformer
from dsv3.tokenizer import Tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               max_memory: dict[int | str, int] | None = None, offload_folder: str | Path | None = None):
    """Load a trained model for inference (the Python API of docs/design.md).

    Args:
        path: a run directory (its latest checkpoint), a checkpoint folder, or a Hugging Face
            DeepSeek-V3 folder (config.json + safetensors).
        device: where to put the weights.
        dtype: parameter dtype (float buffers such as the routing bias stay float32).
        max_memory, offload_folder: either one switches to big-model placement
            (:func:`dsv3.checkpoint.offload.load_dispatched`): whole blocks go to the GPUs, then CPU
            memory, then ``offload_folder`` on disk, within ``max_memory`` ({GPU index or
            "cpu": bytes}); ``device`` is then unused. dsv3 checkpoints only.

    Returns:
        :class:`dsv3.model.Transformer` in eval mode.

    Raises:
        DsvError: missing or corrupt checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    dispatch = max_memory is not None or offload_folder is not None
    if is_hf_folder(path):
        if dispatch:
            raise DsvError(f"--max-memory / --offload-folder need a dsv3 checkpoint; import {path} first with "
                           f"dsv3 convert --from-hf {path} --out DIR")
        return load_hf_model(path, device=device, dtype=dtype).eval()
    folder = resolve_checkpoint(path)
    cfg = read_checkpoint_config(folder)
    if dispatch:
        from dsv3.checkpoint.offload import load_dispatched

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
    if (p / TOKENIZER).is_file():
        return p / TOKENIZER
    cand = resolve_checkpoint(p) / TOKENIZER
    if cand.is_file():
        return cand
    raise DsvError(f"no {TOKENIZER} found for {p}; pass the run directory of the training run")


def load_tokenizer(path: str | Path):
    """Load the sentencepiece tokenizer of a run directory, checkpoint folder or ``.model`` file.

    Returns:
        :class:`dsv3.tokenizer.Tokenizer` with ``encode(str) -> list[int]`` and
        ``decode(list[int]) -> str``.
    """
    return Tokenizer.load(tokenizer_path(path))


def open_weights(path: str | Path):
    """The model config and a weights source of a run directory, checkpoint folder or Hugging
    Face folder (the paths :func:`dsv3.checkpoint.load_model` accepts), reading no
    tensor data yet.

    Returns:
        ``(ModelConfig, source)``: for a Hugging Face folder the config of
        :class:`dsv3.checkpoint.hf_import.HFWeights` (``mtp_depth`` as present in the weights) and that
        source; for a dsv3 checkpoint its ``config.yaml`` model section and a
        :class:`CheckpointWeights` checked against it.

    Raises:
        DsvError: as ``load_model``: no such path, no checkpoint in it, a corrupt or
            mismatching weights file, an unsupported Hugging Face config.
    """
    if is_hf_folder(path):
        source = HFWeights(path)
        return source.cfg, source
    folder = resolve_checkpoint(path)
    cfg = read_checkpoint_config(folder).model
    return cfg, CheckpointWeights(folder / WEIGHTS, cfg)
