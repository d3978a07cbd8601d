"""Big-model inference: place a checkpoint's blocks on GPUs, CPU memory and disk (accelerate).

A model larger than one device's memory can still generate: ``accelerate`` computes a device
map that fills the GPUs first, then CPU memory (``max_memory``), then disk
(``offload_folder``), loads each weight of ``model.safetensors`` straight to its place, and
hooks the modules so that their weights come to the execution device for their forward.
Blocks (a decoder layer, an MTP module) are never split across devices, and an attention
module loads all its weights at once (the absorbed MLA decode path reads ``kv_b_proj.weight``
without calling ``kv_b_proj``). Each block's latent cache is allocated on that block's
execution device (:meth:`dsv3.model.Transformer.new_cache`).

Used by :func:`dsv3.load_model` (``max_memory`` / ``offload_folder``) and by
``dsv3 generate`` / ``dsv3 chat`` (``--max-memory``, ``--offload-folder``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dsv3.checkpoint.weights import CheckpointWeights
from dsv3.errors import DsvError
from dsv3.model import Transformer

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$", re.I)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "kib": 2**10,
    "mb": 10**6,
    "mib": 2**20,
    "gb": 10**9,
    "gib": 2**30,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_max_memory(text: str) -> dict[int | str, int]:
    """Parse ``--max-memory`` text: comma-separated ``DEVICE=SIZE`` pairs.

    ``DEVICE`` is a GPU index (``0``, ``1``, ...) or ``cpu``; ``SIZE`` is bytes with an
    optional unit (``KB/MB/GB/TB`` powers of 1000, ``KiB/MiB/GiB/TiB`` powers of 1024), e.g.
    ``0=70GiB,cpu=200GiB``.

    Returns:
        {device: bytes}, as accelerate's ``max_memory``.

    Raises:
        DsvError: a malformed pair, device or size, or a device named twice.
    """
    out: dict[int | str, int] = {}
    for part in (p for p in text.split(",") if p.strip()):
        dev, eq, size = part.partition("=")
        m = _SIZE.match(size)
        dev = dev.strip().lower()
        if not eq or not m or not (dev == "cpu" or dev.isdigit()):
            raise DsvError(f"--max-memory entry {part.strip()!r} is not DEVICE=SIZE; write e.g. 0=20GiB,cpu=64GiB")
        key = int(dev) if dev.isdigit() else dev
        if key in out:
            raise DsvError(f"--max-memory names device {dev} twice; give each device once")
        out[key] = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if not out:
        raise DsvError("--max-memory is empty; write e.g. 0=20GiB,cpu=64GiB")
    return out


def _whole_blocks(device_map: dict[str, int | str], model: torch.nn.Module) -> dict[str, int | str]:
    """Expand entries for the ``layers`` / ``mtp`` lists into one entry per block, so that each
    block gets its own hook, which records the block's execution device (where its latent
    cache goes, :func:`dsv3.model.transformer.module_device`); a list has no forward to hook."""
    out: dict[str, int | str] = {}
    for name, dev in device_map.items():
        if name in ("layers", "mtp"):
            for i in range(len(getattr(model, name))):
                out[f"{name}.{i}"] = dev
        else:
            out[name] = dev
    return out


def load_dispatched(
    cfg, weights: Path, dtype: torch.dtype, max_memory: dict[int | str, int] | None, offload_folder: str | Path | None
):
    """Build the model without memory, compute a device map and load ``weights`` into it.

    Args:
        cfg: the checkpoint's :class:`dsv3.config.Config`.
        weights: its ``model.safetensors``.
        dtype: parameter dtype (the routing biases stay float32).
        max_memory: {GPU index or "cpu": bytes}; None = what accelerate finds free.
        offload_folder: where weights that fit nowhere else are written (disk offload).

    Returns:
        The dispatched :class:`dsv3.model.Transformer` in eval mode; ``model.hf_device_map``
        holds the placement.

    Raises:
        DsvError: ``max_memory`` names a GPU that does not exist, part of the model would go
            to disk and no ``offload_folder`` is given or it cannot be created, or the weights
            do not match the config.
    """
    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
    from safetensors import safe_open

    gpus = torch.cuda.device_count()
    for dev in max_memory or {}:
        if isinstance(dev, int) and dev >= gpus:
            raise DsvError(
                f"--max-memory names GPU {dev} but {gpus} CUDA device(s) are visible; "
                "use cpu=SIZE on a machine without GPUs"
            )

    with init_empty_weights():  # parameters on the meta device; buffers (rope tables) real
        model = Transformer(cfg.model)

    CheckpointWeights(weights, cfg.model).close()  # names and shapes (accelerate does not check those it sends to disk)
    no_split = ["Block", "MTPModule"]
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if set(device_map.values()) == {"disk"}:
        # accelerate loads a one-device map straight onto that device, which fails for "disk";
        # keeping the final norm (dim values) in CPU memory avoids that path
        device_map = {name: "disk" for name, _ in model.named_children()}
        device_map["norm"] = "cpu"
    device_map = _whole_blocks(device_map, model)
    modules = dict(model.named_modules())
    device_map = {k: v for k, v in device_map.items() if k in modules}  # not the top-level rope tables
    on_disk = sorted(k for k, v in device_map.items() if v == "disk")
    if on_disk and offload_folder is None:
        raise DsvError(
            f"{len(on_disk)} module(s) of {weights.parent} do not fit in --max-memory and would go to disk; "
            "add --offload-folder DIR or raise --max-memory"
        )
    if on_disk:
        try:
            Path(offload_folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DsvError(
                f"cannot use --offload-folder {offload_folder} ({exc.strerror or exc}); "
                "give a folder that can be created and written"
            ) from None
    model = load_checkpoint_and_dispatch(
        model,
        str(weights),
        device_map=device_map,
        offload_folder=offload_folder,
        dtype=dtype,
        strict=True,
        preload_module_classes=["MLA"],
    )
    # The routing biases are buffers: accelerate leaves those of blocks placed on disk at their
    # initial zeros, and casts the others to ``dtype``. They decide routing, so they are read
    # from the file again and kept in float32 (as in training) on each block's device.
    buffers = dict(model.named_buffers())
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            if name.endswith("e_score_correction_bias"):
                buffers[name].data = f.get_tensor(name).float().to(buffers[name].device)
    return model.eval()
