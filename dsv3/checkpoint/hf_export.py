"""Export a dsv3 checkpoint in the Hugging Face DeepSeek-V3 layout (``dsv3 convert --to-hf``).

The inverse of :mod:`dsv3.checkpoint.hf_import`: stacked experts are written per expert
(``model.layers.N.mlp.experts.E.gate_proj.weight``), MTP module k becomes layer
``n_layers + k - 1`` with its own copies of ``embed_tokens`` and ``shared_head.head`` (as in
the official release), and the config is :func:`dsv3.checkpoint.hf_config.model_config_to_hf`.
Tensors stream one at a time from ``model.safetensors`` into their place in the output shards.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch

from dsv3.chat_format import DSV3_CHAT_TEMPLATE, chat_stop_ids, uses_dsv3_format
from dsv3.checkpoint.files import (
    HF_CONFIG,
    WEIGHTS,
    finish_out,
    is_hf_folder,
    prepare_out,
    read_checkpoint_config,
    resolve_checkpoint,
)
from dsv3.checkpoint.hf_config import HF_GENERATION_CONFIG, HF_INDEX, HF_SINGLE, model_config_to_hf
from dsv3.checkpoint.hf_import import FP32_KEEP
from dsv3.checkpoint.safetensors_io import TensorWriter, dtype_of, itemsize
from dsv3.checkpoint.weights import expected_shapes, shape_problems
from dsv3.config import ModelConfig
from dsv3.errors import DsvError
from dsv3.hf_tokenizer import TOKENIZER_CONFIG
from dsv3.tokenizer import BOS, EOS, PAD, UNK
from dsv3.tokenizer_files import find_tokenizer, open_tokenizer, tokenizer_files_in

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def dsv3_tokenizer_config(max_seq_len: int) -> dict:
    """``tokenizer_config.json`` for dsv3's sentencepiece ``tokenizer.model``: ``transformers``
    (5 or newer) builds its fast tokenizer from the model file and gets the same ids as
    :class:`dsv3.tokenizer.Tokenizer`; the chat template is :data:`DSV3_CHAT_TEMPLATE`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        "chat_template": DSV3_CHAT_TEMPLATE,
    }


def _write_tokenizer(folder: Path, tmp: Path, max_seq_len: int, hf: dict) -> None:
    """Write the checkpoint's tokenizer into the export ``tmp`` with ``generation_config.json``,
    and its special ids into the config.json dict ``hf`` (module docstring of :func:`export_hf`)."""
    if find_tokenizer(folder) is None:
        return
    tok = open_tokenizer(folder)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    hf.update({k: v for k, v in ids.items() if v is not None})
    if uses_dsv3_format(tok):
        tok.save(tmp)
        (tmp / TOKENIZER_CONFIG).write_text(
            json.dumps(dsv3_tokenizer_config(max_seq_len), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    else:  # a released tokenizer: its files as they are
        for f in tokenizer_files_in(folder):
            shutil.copyfile(f, tmp / f.name)
    stops = [tok.eos_id]
    if uses_dsv3_format(tok) or tok.chat_template is not None:
        try:
            stops = chat_stop_ids(tok)
        except DsvError as err:
            print(f"warning: generation_config.json stops at EOS only: {err}", file=sys.stderr)
    gen = {k: v for k, v in ids.items() if v is not None}
    gen["eos_token_id"] = stops
    (tmp / HF_GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


def _hf_pieces(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Hugging Face key(s) for one dsv3 tensor: ``[(key, slot along dim 0 or None), ...]``."""
    m = re.match(r"^(layers|mtp)\.(\d+)\.(.+)$", name)
    if not m:
        return [(name if name == "lm_head.weight" else f"model.{name}", None)]
    layer = int(m.group(2)) + (cfg.n_layers if m.group(1) == "mtp" else 0)
    rest = m.group(3)
    em = re.match(r"^mlp\.experts\.(gate_proj|up_proj|down_proj)$", rest)
    if em:
        return [(f"model.layers.{layer}.mlp.experts.{e}.{em.group(1)}.weight", e) for e in range(shape[0])]
    return [(f"model.layers.{layer}.{rest}", None)]


def _sort_key(key: str) -> tuple:
    """Natural order: embedding, layers by number, final norm, head."""
    m = re.match(r"^model\.layers\.(\d+)\.(.*?)(?:(\d+)\.(.*))?$", key)
    if m:
        return (1, int(m.group(1)), m.group(2), int(m.group(3)) if m.group(3) else -1, m.group(4) or "")
    return (0 if "embed_tokens" in key else 2, 0, key, 0, "")


def export_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a dsv3 checkpoint in the Hugging Face DeepSeek-V3 layout.

    ``ckpt`` is a run directory or checkpoint folder (see
    :func:`dsv3.checkpoint.resolve_checkpoint`). ``out_dir`` receives ``config.json``
    (:func:`model_config_to_hf`, plus ``dtype`` and the tokenizer's pad / bos / eos ids: 0 / 2 /
    3 for dsv3's ``tokenizer.model``), the weights as ``model.safetensors`` or, above
    ``max_shard_bytes``, as ``model-0000i-of-0000n.safetensors`` shards with
    ``model.safetensors.index.json``, and the tokenizer so that serving stacks use it as it
    is: dsv3's ``tokenizer.model`` with a ``tokenizer_config.json``
    (:func:`dsv3_tokenizer_config`: special tokens, the chat template
    :data:`dsv3.chat_format.DSV3_CHAT_TEMPLATE`), or a released model's tokenizer files as
    they are; plus ``generation_config.json`` with the special ids and, as ``eos_token_id``,
    every id a reply stops at (:func:`dsv3.chat_format.chat_stop_ids`: the end-of-turn token
    first, then EOS and the turn markers), so ``generate`` ends a reply where ``dsv3 chat``
    does. Experts are written
    per expert (``model.layers.N.mlp.experts.E.gate_proj.weight``), the layout transformers
    loads without missing or unexpected keys; MTP module k is layer ``n_layers + k - 1`` with
    its own copies of ``embed_tokens`` and ``shared_head.head``, as in the official release
    (transformers itself does not load MTP layers and reports them as unexpected).
    Written to a temp folder, then renamed.

    Args:
        dtype: cast floating tensors (router weight and bias stay float32); None keeps them.

    Returns:
        ``Path(out_dir)``.

    Raises:
        DsvError: no checkpoint at ``ckpt``, unreadable weights, ``out_dir`` not empty.
    """
    from safetensors import SafetensorError, safe_open

    if is_hf_folder(ckpt):
        raise DsvError(
            f"{ckpt} is already a Hugging Face folder (config.json); pass a dsv3 run directory or "
            "checkpoint folder to --to-hf, or use the Hugging Face folder as it is"
        )
    folder = resolve_checkpoint(ckpt)
    cfg = read_checkpoint_config(folder).model
    weights = folder / WEIGHTS
    shapes = expected_shapes(cfg)
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: (dtype_of(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise DsvError(f"cannot read {weights} ({exc}); the checkpoint is corrupt, use another one") from None
    problems = [
        p
        for p in shape_problems({k: shape for k, (_, shape) in stored.items()}, cfg)
        if not p.startswith("unexpected ")
    ]
    if problems:
        raise DsvError(
            f"{weights} does not match its config.yaml ({problems[0]}; {len(problems)} problem(s)); "
            "the checkpoint is corrupt"
        )
    # (hf key, dsv3 name, slot, dtype, shape)
    plan: list[tuple[str, str, int | None, torch.dtype, tuple[int, ...]]] = []
    for name, shape in shapes.items():
        td = stored[name][0]
        if name.endswith(FP32_KEEP):
            td = torch.float32
        elif dtype is not None and td.is_floating_point:
            td = dtype
        for key, slot in _hf_pieces(name, shape, cfg):
            plan.append((key, name, slot, td, shape if slot is None else shape[1:]))
    for k in range(cfg.mtp_depth):
        layer = cfg.n_layers + k
        for key, name in (
            (f"model.layers.{layer}.embed_tokens.weight", "embed_tokens.weight"),
            (f"model.layers.{layer}.shared_head.head.weight", "lm_head.weight"),
        ):
            td = dtype if dtype is not None else stored[name][0]
            plan.append((key, name, None, td, shapes[name]))
    plan.sort(key=lambda x: _sort_key(x[0]))
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, _, _, td, shape) in enumerate(plan):
        nbytes = math.prod(shape) * itemsize(td)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    n = len(shards)
    names = [HF_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    out = Path(out_dir)
    tmp = prepare_out(out)
    try:
        weight_map: dict[str, str] = {}
        total = 0
        with safe_open(str(weights), framework="pt") as f:
            for file, idxs in zip(names, shards):
                entries = {plan[i][0]: (plan[i][3], plan[i][4]) for i in idxs}
                with TensorWriter(tmp / file, entries, {"format": "pt"}) as writer:
                    for i in idxs:
                        key, name, slot, td, _ = plan[i]
                        t = f.get_tensor(name) if slot is None else f.get_slice(name)[slot]
                        writer.write(key, t.to(td))
                        weight_map[key] = file
                total += writer.total
        if n > 1:
            ordered = dict(sorted(weight_map.items(), key=lambda kv: _sort_key(kv[0])))
            index = {"metadata": {"total_size": total}, "weight_map": ordered}
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        hf = model_config_to_hf(cfg)
        floats = {td for key, _, _, td, _ in plan if td.is_floating_point and ".mlp.gate." not in key}
        hf["dtype"] = str(floats.pop() if len(floats) == 1 else torch.float32).removeprefix("torch.")
        _write_tokenizer(folder, tmp, cfg.max_seq_len, hf)
        (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
