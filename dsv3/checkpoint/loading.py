"""Loading a trained model, its weights one tensor at a time, or its tokenizer, from a run directory,
checkpoint folder or Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3.checkpoint.files import WEIGHTS, is_hf_folder, read_checkpoint_config, resolve_checkpoint
from dsv3.checkpoint.hf_import import HFWeights, load_hf_model
from dsv3.checkpoint.weights import CheckpointWeights
from dsv3.errors import DsvError
from dsv3.model import Transformer
from dsv3.tokenizer_files import find_tokenizer, open_tokenizer


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_memory: dict[int | str, int] | None = None,
    offload_folder: str | Path | None = None,
):
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
            raise DsvError(
                f"--max-memory / --offload-folder need a dsv3 checkpoint; import {path} first with "
                f"dsv3 convert --from-hf {path} --out DIR"
            )
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
        raise DsvError(
            f"{folder / WEIGHTS} does not match its config.yaml ({first}); use a matching checkpoint"
        ) from None
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval()


def tokenizer_path(path: str | Path) -> Path:
    """The tokenizer file of a run directory, checkpoint folder or Hugging Face folder, or the
    file itself: ``tokenizer.json`` (a released model's tokenizer; its config and chat template
    lie next to it) or else ``tokenizer.model`` (dsv3's sentencepiece model).

    Raises:
        DsvError: no tokenizer there.
    """
    p = Path(path)
    if p.is_file():
        return p
    found = find_tokenizer(p) if p.is_dir() else None
    if found is not None:
        return found
    if p.is_dir() and is_hf_folder(p):
        raise DsvError(
            f"the Hugging Face folder {p} has no tokenizer (tokenizer.json or tokenizer.model); "
            "copy the model's tokenizer files into it"
        )
    found = find_tokenizer(resolve_checkpoint(p))
    if found is not None:
        return found
    raise DsvError(
        f"no tokenizer (tokenizer.model or tokenizer.json) found for {p}; pass the run directory of the training run"
    )


def load_tokenizer(path: str | Path):
    """Load the tokenizer of a run directory, checkpoint folder or Hugging Face folder, or a
    ``.model`` / ``tokenizer.json`` file.

    Returns:
        :class:`dsv3.tokenizer.Tokenizer` (sentencepiece) or
        :class:`dsv3.hf_tokenizer.HFTokenizer` (``tokenizer.json``), both with
        ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``bos_id``, ``eos_id``,
        ``vocab_size``; chat formatting through :mod:`dsv3.chat_format`.

    Raises:
        DsvError: no tokenizer there, or it does not load.
    """
    return open_tokenizer(tokenizer_path(path))


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
