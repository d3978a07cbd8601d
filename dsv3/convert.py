"""Import and export the Hugging Face DeepSeek-V3 checkpoint layout (``dsv3 convert``).

A Hugging Face folder holds ``config.json`` and either one ``model.safetensors`` or several
shards listed by ``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file).
A dsv3 checkpoint folder holds ``model.safetensors`` (the state dict of
:class:`dsv3.model.Transformer`), ``config.yaml`` (a full :class:`dsv3.config.Config`) and,
when known, ``tokenizer.model``.

Name mapping (dsv3 module names equal the Hugging Face keys minus the ``model.`` prefix):

- ``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``
  -> ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``;
- ``model.layers.N.<rest>`` (N < n_layers) -> ``layers.N.<rest>``;
- ``model.layers.N.mlp.experts.E.{gate,up}_proj.weight`` (I, D) and ``...down_proj.weight``
  (D, I) -> slice E of the stacked ``layers.N.mlp.experts.{gate,up}_proj`` (E, I, D) and
  ``...down_proj`` (E, D, I);
- fused ``model.layers.N.mlp.experts.gate_up_proj`` (E, 2I, D) -> ``gate_proj`` = rows [:I],
  ``up_proj`` = rows [I:]; fused ``...experts.down_proj`` (E, D, I) -> ``down_proj``;
- ``model.layers.{n_layers + k}.<rest>`` (MTP module k + 1) -> ``mtp.k.<rest>`` (``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm`` and the block's weights); that layer's
  ``embed_tokens`` and ``shared_head.head`` are dropped on import (dsv3 shares the main
  embedding and head) and written as copies on export, as in the official release.

Per-expert keys are what the official checkpoints hold and what transformers 5
``save_pretrained`` writes for ``DeepseekV3ForCausalLM`` (its in-memory fused
``experts.gate_up_proj`` is split back on save); the fused layout is accepted too.

FP8 checkpoints (the official release): a ``float8_e4m3fn`` weight ``W`` comes with
``W_scale_inv`` (float32, one value per ``b x b`` block, ``b`` = 128 by default, from
``quantization_config.weight_block_size``); the real weight is ``W * scale_inv`` blockwise.
Import dequantizes such weights to bfloat16.

Rotary layout: DeepSeek weights expect the interleaved-pair rotation, which dsv3 uses, so
``rope_interleave: true`` checkpoints (the default) import with no permutation. For
``rope_interleave: false`` the rope rows of ``q_b_proj``/``q_proj`` and ``kv_a_proj_with_mqa``
are permuted from the rotate-half order (pairs ``(i, i + d/2)``) to adjacent pairs.

Both directions stream: tensors are read one at a time with ``safetensors.safe_open`` (one
expert slice at a time for stacked experts) and written straight into their place in the
output file, so peak memory is about one tensor, never a whole shard or model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv3.config import Config, DataConfig, ModelConfig, save_config
from dsv3.errors import DsvError

log = logging.getLogger(__name__)

HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
HF_MODEL_TYPE = "deepseek_v3"
HF_CONFIG = "config.json"
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
DSV3_WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

#: Values transformers' ``DeepseekV3Config`` assumes for keys a ``config.json`` leaves out
#: (the official 671B settings).
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 4096,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "num_nextn_predict_layers": 1, "attention_bias": False, "rope_interleave": True,
}

# safetensors dtype names <-> torch dtypes (the ones a DeepSeek-V3 checkpoint can hold)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP32_KEEP = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # routers stay float32


# --------------------------------------------------------------------------- configs


def _get(hf: dict, key: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if k in hf and hf[k] is not None:
            return hf[k]
    return HF_DEFAULTS.get(key)


def _yarn_mscale(factor: float, m: float) -> float:
    """YaRN magnitude correction ``0.1 * m * ln(factor) + 1`` (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _rope_fields(hf: dict) -> dict[str, Any]:
    """The dsv3 rope fields from ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` (older)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise DsvError(f"config.json rope_parameters={rope!r} is not a mapping; fix config.json")
    if any(isinstance(v, dict) for v in rope.values()):
        raise DsvError("config.json has per-layer-type rope_parameters, which DeepSeek-V3 does not use; "
                       "give one rope_parameters mapping")
    theta = rope.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    rtype = rope.get("rope_type", rope.get("type")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise DsvError("config.json partial_rotary_factor != 1 is not supported by dsv3 (DeepSeek-V3 rotates the "
                       "whole qk_rope_head_dim slice)")
    if rtype == "default":
        return out
    if rtype != "yarn":
        raise DsvError(f"config.json rope type {rtype!r} is not supported; dsv3 models DeepSeek-V3's rope "
                       "(default or yarn)")
    max_pos = _get(hf, "max_position_embeddings")
    original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos
    factor = rope.get("factor")
    if factor is None:
        factor = max_pos / original
    factor = float(factor)
    if factor < 1:
        raise DsvError(f"config.json yarn factor={factor} is below 1; dsv3 supports factor >= 1")
    if rope.get("truncate", True) is False:
        raise DsvError("config.json yarn truncate=false is not supported by dsv3 (the correction range is "
                       "always rounded outward, as in DeepSeek-V3)")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    # transformers scales cos/sin by this factor; dsv3 only models the case where it is 1
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor, 1.0)
    if abs(attention_factor - 1.0) > 1e-12:
        raise DsvError(f"config.json yarn mscale={mscale} differs from mscale_all_dim={mscale_all_dim} "
                       f"(rotary attention factor {attention_factor:.6g}); dsv3 models only "
                       "mscale == mscale_all_dim, as in DeepSeek-V3")
    out.update(
        rope_factor=factor,
        original_seq_len=int(original),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(mscale_all_dim or 0.0),
    )
    return out


def _check_architecture(hf: dict) -> None:
    archs = hf.get("architectures")
    if archs is None and hf.get("model_type") == HF_MODEL_TYPE:
        return
    if not isinstance(archs, list) or HF_ARCHITECTURE not in archs:
        raise DsvError(f"unknown architecture {archs!r} (model_type {hf.get('model_type')!r}) in config.json; "
                       f"dsv3 converts only {HF_ARCHITECTURE} checkpoints")


def hf_config_to_model_config(hf: dict) -> ModelConfig:
    """Map a Hugging Face DeepSeek-V3 ``config.json`` dict to a :class:`ModelConfig`.

    Keys the dict leaves out take transformers' ``DeepseekV3Config`` defaults (the 671B
    values). Both ``rope_parameters`` (transformers >= 5) and the older ``rope_scaling`` +
    ``rope_theta`` are read; ``type``/``rope_type`` ``yarn`` turns YaRN on (``factor`` ->
    ``rope_factor``, ``original_max_position_embeddings`` -> ``original_seq_len``,
    ``mscale_all_dim`` -> ``mscale``). ``num_key_value_heads`` is ignored (MLA expands keys to
    every head).

    Raises:
        DsvError: the architecture is not ``DeepseekV3ForCausalLM``; tied embeddings;
            ``norm_topk_prob`` false; ``topk_method`` other than ``noaux_tc``; ``scoring_func``
            other than ``sigmoid``; a rope type other than default/yarn; yarn ``mscale`` !=
            ``mscale_all_dim``; attention biases; an activation other than silu;
            ``moe_layer_freq`` != 1; sizes that do not divide.
    """
    if not isinstance(hf, dict):
        raise DsvError("config.json must hold a JSON object")
    _check_architecture(hf)
    unsupported = {
        "tie_word_embeddings": (False,), "norm_topk_prob": (True,), "topk_method": ("noaux_tc",),
        "scoring_func": ("sigmoid",), "attention_bias": (False,), "hidden_act": ("silu",), "moe_layer_freq": (1,),
    }
    for key, ok in unsupported.items():
        value = hf.get(key, ok[0])
        if value not in ok:
            raise DsvError(f"config.json {key}={value!r} is not supported by dsv3 (DeepSeek-V3 uses {ok[0]!r})")
    n_group = _get(hf, "n_group") or 1
    topk_group = _get(hf, "topk_group") or 1
    cfg = ModelConfig(
        vocab_size=int(_get(hf, "vocab_size")),
        dim=int(_get(hf, "hidden_size")),
        inter_dim=int(_get(hf, "intermediate_size")),
        moe_inter_dim=int(_get(hf, "moe_intermediate_size")),
        n_layers=int(_get(hf, "num_hidden_layers")),
        n_dense_layers=int(_get(hf, "first_k_dense_replace")),
        n_heads=int(_get(hf, "num_attention_heads")),
        n_routed_experts=int(_get(hf, "n_routed_experts")),
        n_shared_experts=int(hf.get("n_shared_experts", HF_DEFAULTS["n_shared_experts"]) or 0),
        n_activated_experts=int(_get(hf, "num_experts_per_tok")),
        n_expert_groups=int(n_group),
        n_limited_groups=int(topk_group),
        route_scale=float(_get(hf, "routed_scaling_factor")),
        q_lora_rank=int(hf.get("q_lora_rank", HF_DEFAULTS["q_lora_rank"]) or 0),  # null = no query compression
        kv_lora_rank=int(_get(hf, "kv_lora_rank")),
        qk_nope_head_dim=int(_get(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_get(hf, "qk_rope_head_dim")),
        v_head_dim=int(_get(hf, "v_head_dim")),
        max_seq_len=int(_get(hf, "max_position_embeddings")),
        mtp_depth=int(_get(hf, "num_nextn_predict_layers", "num_mtp_layers")),
        rms_norm_eps=float(_get(hf, "rms_norm_eps")),
        init_std=float(_get(hf, "initializer_range")),
        **_rope_fields(hf),
    )
    if cfg.n_dense_layers < cfg.n_layers:
        if cfg.n_routed_experts % cfg.n_expert_groups:
            raise DsvError(f"config.json n_routed_experts={cfg.n_routed_experts} is not divisible by "
                           f"n_group={cfg.n_expert_groups}; fix config.json")
        if cfg.n_limited_groups > cfg.n_expert_groups:
            raise DsvError(f"config.json topk_group={cfg.n_limited_groups} exceeds n_group={cfg.n_expert_groups}")
    if cfg.qk_rope_head_dim % 2:
        raise DsvError(f"config.json qk_rope_head_dim={cfg.qk_rope_head_dim} must be even")
    return cfg


def model_config_to_hf(cfg: ModelConfig) -> dict:
    """Map a :class:`ModelConfig` to a transformers ``DeepseekV3Config`` dict (``config.json``).

    The inverse of :func:`hf_config_to_model_config`: ``hf_config_to_model_config(
    model_config_to_hf(cfg)) == cfg``. Rope settings are written as transformers 5
    ``rope_parameters``; with YaRN, ``mscale`` and ``mscale_all_dim`` are both ``cfg.mscale``
    (so the rotary tables are not rescaled and the softmax scale gets ``mscale**2``), plus an
    explicit ``attention_factor`` 1 when ``cfg.mscale`` is 0.
    """
    if cfg.rope_factor > 1:
        rope: dict[str, Any] = {
            "rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale,
        }
        if not cfg.mscale:
            rope["attention_factor"] = 1.0
    else:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts,
        "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups,
        "routed_scaling_factor": cfg.route_scale,
        "norm_topk_prob": True,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": rope,
        "rope_interleave": True,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
    }


# --------------------------------------------------------------------------- tensor math


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Blockwise FP8 dequantization of a DeepSeek-V3 weight.

    ``out[i, j] = float(weight[i, j]) * scale_inv[i // bm, j // bn]`` (``bm, bn = block``),
    computed in float32 and returned in ``dtype``. Partial blocks at the right and bottom
    edges use their block's scale like full ones.

    Args:
        weight: (M, N) ``float8_e4m3fn`` (any float dtype works).
        scale_inv: (ceil(M / bm), ceil(N / bn)) float32.

    Raises:
        DsvError: the scale grid does not match the weight shape.
    """
    if weight.dim() != 2:
        raise DsvError(f"FP8 weight of shape {tuple(weight.shape)} is not a matrix; cannot dequantize")
    m, n = weight.shape
    bm, bn = block
    grid = (math.ceil(m / bm), math.ceil(n / bn))
    if tuple(scale_inv.shape) != grid:
        raise DsvError(f"FP8 scale of shape {tuple(scale_inv.shape)} does not fit a {m}x{n} weight in "
                       f"{bm}x{bn} blocks (expected {grid}); the checkpoint is corrupt")
    s = scale_inv.float().repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]  # (M, N)
    return (weight.float() * s).to(dtype)


def _rope_rows_from_half(n_rows: int, start: int, d: int, period: int, n_blocks: int) -> torch.Tensor:
    """Row order turning rotate-half rope rows into interleaved pairs.

    In each of ``n_blocks`` blocks of ``period`` rows, the ``d`` rope rows beginning at
    ``start`` are reordered so new row ``2i`` is old row ``i`` and ``2i+1`` is ``i + d/2``.
    """
    order = torch.arange(n_rows)
    half = torch.arange(d // 2)
    local = torch.stack([half, half + d // 2], dim=-1).flatten()  # (d,)
    for b in range(n_blocks):
        base = b * period + start
        order[base : base + d] = base + local
    return order


# --------------------------------------------------------------------------- safetensors I/O


class _Writer:
    """Write one safetensors file tensor by tensor (or slice by slice along dim 0).

    The header (names, dtypes, shapes, offsets) is known up front, so each tensor's bytes go
    straight to their offset; nothing is held in memory beyond the tensor being written.
    """

    def __init__(self, path: Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self.entries = entries
        order = sorted(entries, key=lambda k: -_itemsize(entries[k][0]))  # keep wide dtypes aligned
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        self.offsets: dict[str, int] = {}
        pos = 0
        for name in order:
            dtype, shape = entries[name]
            nbytes = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self.offsets[name] = pos
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = pos
        self.written: dict[str, int] = {name: 0 for name in entries}
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little"))
        self.file.write(raw)
        self.file.truncate(self.data_start + pos)

    def write(self, name: str, tensor: torch.Tensor, index: int | None = None) -> None:
        """Write ``tensor`` as entry ``name`` or, with ``index``, as ``name[index]``."""
        dtype, shape = self.entries[name]
        want = shape if index is None else shape[1:]
        if tuple(tensor.shape) != tuple(want) or tensor.dtype != dtype:
            raise RuntimeError(f"internal: {name} got {tuple(tensor.shape)} {tensor.dtype}, want {want} {dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = self.offsets[name] + (0 if index is None else index * data.nbytes)
        self.file.seek(self.data_start + offset)
        self.file.write(memoryview(data))
        self.written[name] += data.nbytes

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        if exc_type is not None:
            return
        for name, (dtype, shape) in self.entries.items():
            if self.written[name] != math.prod(shape) * _itemsize(dtype):
                raise RuntimeError(f"internal: {name} was not completely written")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _st_dtype(name: str) -> torch.dtype:
    if name not in _ST_DTYPES:
        raise DsvError(f"tensor dtype {name} is not supported by dsv3 convert")
    return _ST_DTYPES[name]


# --------------------------------------------------------------------------- reading HF folders


@dataclass
class _Source:
    """Where one piece of a dsv3 tensor comes from in the Hugging Face files."""

    key: str  # Hugging Face tensor name
    file: str  # shard file name
    index: int | None = None  # slot along dim 0 of the stacked dsv3 tensor (per-expert keys)
    rows: tuple[int, int] | None = None  # for fused gate_up_proj: rows [a, b) of dim 1
    scale_key: str | None = None  # FP8 scale (weight_scale_inv) key
    scale_file: str | None = None


@dataclass
class _Plan:
    """Everything import needs, checked before a byte is written."""

    src: Path
    hf: dict
    cfg: ModelConfig
    sources: dict[str, list[_Source]]  # dsv3 name -> pieces
    dtypes: dict[str, torch.dtype]  # dsv3 name -> dtype to write
    shapes: dict[str, tuple[int, ...]]  # dsv3 name -> shape
    rope_permute: bool
    fp8_block: tuple[int, int]
    dropped_heads: list[tuple[str, str]]  # (key, file) of MTP shared_head.head copies


def read_hf_config(src: str | Path) -> dict:
    """Read ``config.json`` of a Hugging Face folder.

    Raises:
        DsvError: the folder or its ``config.json`` is missing or not valid JSON.
    """
    src = Path(src)
    if not src.is_dir():
        raise DsvError(f"Hugging Face folder {src} does not exist; pass the folder holding config.json")
    f = src / HF_CONFIG
    if not f.is_file():
        raise DsvError(f"{src} has no config.json; pass a Hugging Face DeepSeek-V3 folder (config.json + safetensors)")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DsvError(f"{f} is not valid JSON ({exc}); fix or re-download it") from None


def _weight_map(src: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index or the single file; checks every shard exists."""
    from safetensors import SafetensorError, safe_open

    index = src / HF_INDEX
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise DsvError(f"{index} is not a valid safetensors index (no weight_map); fix or re-download it") from None
        missing = sorted({f for f in wmap.values() if not (src / f).is_file()})
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DsvError(f"shard {src / missing[0]}{more} listed in {HF_INDEX} is missing; "
                           "download every shard of the checkpoint")
        return dict(wmap)
    single = src / HF_SINGLE
    if not single.is_file():
        raise DsvError(f"{src} has neither {HF_SINGLE} nor {HF_INDEX}; the checkpoint weights are missing")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {k: HF_SINGLE for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise DsvError(f"cannot read {single} ({exc}); the file is corrupt, re-download it") from None


def _headers(src: Path, files: set[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype name, shape) from the shard headers (no tensor data)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in sorted(files):
        try:
            with safe_open(str(src / name), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        except (SafetensorError, OSError) as exc:
            raise DsvError(f"cannot read {src / name} ({exc}); the shard is corrupt, re-download it") from None
    return out


_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")


def _map_hf_key(key: str, cfg: ModelConfig) -> list[tuple[str, int | None, tuple[int, int] | None]] | None:
    """The dsv3 destination(s) of one Hugging Face tensor.

    Returns ``[(dsv3 name, expert slot or None, rows of a fused gate_up_proj or None), ...]``;
    ``[]`` for tensors dsv3 does not store (the MTP layers' copies of the embedding and head,
    saved rope tables); None for a layer index beyond ``n_layers + mtp_depth``.
    """
    name = key.removeprefix("model.")
    m = _LAYER.match(name)
    if not m:
        return [] if name.endswith("rotary_emb.inv_freq") else [(name, None, None)]
    layer, rest = int(m.group(1)), m.group(2)
    if rest.endswith("rotary_emb.inv_freq"):
        return []  # a non-persistent table some old exports saved
    if layer < cfg.n_layers:
        prefix = f"layers.{layer}"
    elif layer < cfg.n_layers + cfg.mtp_depth:
        prefix = f"mtp.{layer - cfg.n_layers}"
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return []  # dsv3 shares the main embedding and output head
    else:
        return None
    em, fm = _EXPERT.match(rest), _FUSED.match(rest)
    if em:
        return [(f"{prefix}.mlp.experts.{em.group(2)}", int(em.group(1)), None)]
    if fm and fm.group(1) == "gate_up_proj":
        inter = cfg.moe_inter_dim
        return [(f"{prefix}.mlp.experts.gate_proj", None, (0, inter)),
                (f"{prefix}.mlp.experts.up_proj", None, (inter, 2 * inter))]
    return [(f"{prefix}.{rest}", None, None)]


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from dsv3.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mtp_layers_present(wmap: dict[str, str], cfg: ModelConfig) -> int:
    depth = 0
    while depth < cfg.mtp_depth and any(k.startswith(f"model.layers.{cfg.n_layers + depth}.") for k in wmap):
        depth += 1
    return depth


def _plan_import(src: Path, dtype: torch.dtype | None = None) -> _Plan:
    """Read config and headers, map every tensor, and check names and shapes."""
    hf = read_hf_config(src)
    cfg = hf_config_to_model_config(hf)
    wmap = _weight_map(src)
    present = _mtp_layers_present(wmap, cfg)
    if present < cfg.mtp_depth:
        log.warning("config.json declares %d MTP layer(s) but the weights hold %d; importing with mtp_depth=%d",
                    cfg.mtp_depth, present, present)
        cfg = dataclasses.replace(cfg, mtp_depth=present)
    headers = _headers(src, set(wmap.values()))
    for key, file in wmap.items():
        if key not in headers:
            raise DsvError(f"tensor {key} listed in {HF_INDEX} is not in {src / file}; the checkpoint is corrupt")
    shapes = _expected_shapes(cfg)
    qcfg = hf.get("quantization_config") or {}
    block = tuple(qcfg.get("weight_block_size") or (128, 128))
    sources: dict[str, list[_Source]] = {}
    src_dtypes: dict[str, set[str]] = {}
    dropped_heads: list[tuple[str, str]] = []
    for key in sorted(wmap):
        if key.endswith("_scale_inv"):
            continue  # consumed with its weight
        targets = _map_hf_key(key, cfg)
        if targets is None:
            raise DsvError(f"unexpected tensor {key} in {src / wmap[key]}: config.json has {cfg.n_layers} layers "
                           f"and {cfg.mtp_depth} MTP layer(s); the checkpoint does not match config.json")
        if not targets and key.endswith("shared_head.head.weight"):
            dropped_heads.append((key, wmap[key]))
        for target, index, rows in targets:
            if target not in shapes:
                raise DsvError(f"unexpected tensor {key} in {src / wmap[key]} (no dsv3 parameter {target}); "
                               "the checkpoint does not match config.json")
            sources.setdefault(target, []).append(_Source(key, wmap[key], index=index, rows=rows))
            src_dtypes.setdefault(target, set()).add(headers[key][0])
    # FP8 scales
    for target, pieces in sources.items():
        for p in pieces:
            if _st_dtype(headers[p.key][0]) in _FP8:
                skey = p.key + "_scale_inv"
                if skey not in wmap:
                    raise DsvError(f"FP8 tensor {p.key} has no {skey}; the checkpoint is incomplete")
                p.scale_key, p.scale_file = skey, wmap[skey]
    # names and shapes
    missing = sorted(set(shapes) - set(sources))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DsvError(f"{src} lacks the weights of dsv3 parameter {missing[0]}{more}; the checkpoint is "
                       "incomplete or does not match config.json")
    for target, pieces in sources.items():
        want = shapes[target]
        if "mlp.experts." in target:
            slots = sorted(p.index for p in pieces if p.index is not None)
            fused = [p for p in pieces if p.index is None]
            if fused and slots:
                raise DsvError(f"{src} holds both fused and per-expert weights for {target}; the checkpoint is corrupt")
            if slots and slots != list(range(want[0])):
                lacking = sorted(set(range(want[0])) - set(slots))
                problem = f"lacks experts {lacking[:8]}" if lacking else "holds duplicate or extra experts"
                raise DsvError(f"{src} {problem} for {target} (config.json n_routed_experts={want[0]}); "
                               "the checkpoint is incomplete or does not match config.json")
        for p in pieces:
            got = headers[p.key][1]
            if p.index is not None:
                exp = want[1:]
            elif p.rows is not None:
                exp = (want[0], 2 * want[1], want[2])
            else:
                exp = want
            if tuple(got) != tuple(exp):
                raise DsvError(f"tensor {p.key} has shape {list(got)}, expected {list(exp)} from config.json; "
                               "the checkpoint does not match its config")
    dtypes: dict[str, torch.dtype] = {}
    for target, names in src_dtypes.items():
        tds = {torch.bfloat16 if t in _FP8 else t for t in map(_st_dtype, names)}
        if len(tds) > 1:
            raise DsvError(f"the pieces of {target} have mixed dtypes {sorted(names)}; the checkpoint is corrupt")
        td = tds.pop()
        if target.endswith(_FP32_KEEP):
            td = torch.float32
        elif dtype is not None and td.is_floating_point:
            td = dtype
        dtypes[target] = td
    return _Plan(src=src, hf=hf, cfg=cfg, sources=sources, dtypes=dtypes, shapes=shapes,
                 rope_permute=hf.get("rope_interleave", True) is False, fp8_block=(int(block[0]), int(block[1])),
                 dropped_heads=dropped_heads)


def _iter_import(plan: _Plan) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """Yield ``(dsv3 name, slot or None, tensor)`` in the plan's dtypes, one shard file at a time."""
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, _Source]]] = {}
    for target, pieces in plan.sources.items():
        for p in pieces:
            by_file.setdefault(p.file, []).append((target, p))
    for file in sorted(by_file):
        with safe_open(str(plan.src / file), framework="pt") as f:
            for target, p in by_file[file]:
                stacked = p.index is None and "mlp.experts." in target  # fused (E, ...) tensor
                if not stacked:
                    yield target, p.index, _read_piece(plan, f, p, target)
                    continue
                for e in range(plan.shapes[target][0]):  # one expert at a time
                    yield target, e, _read_piece(plan, f, p, target, e)


def _read_piece(plan: _Plan, f, p: _Source, target: str, expert: int | None = None) -> torch.Tensor:
    """One piece of dsv3 tensor ``target`` from the open shard ``f`` (``p.file``), dequantized,
    rope rows fixed and cast to the plan's dtype: the whole tensor ``p.key``, or with
    ``expert`` slot ``expert`` of a fused (E, ...) expert tensor (only that slot is read)."""
    if expert is None:
        t = _dequant(plan, f, p, f.get_tensor(p.key))
        return _fix_rope(plan, target, t).to(plan.dtypes[target])
    sl = f.get_slice(p.key)
    t = sl[expert] if p.rows is None else sl[expert, p.rows[0] : p.rows[1]]
    return _dequant(plan, f, p, t, expert).to(plan.dtypes[target])


class HFWeights:
    """The tensors of a Hugging Face DeepSeek-V3 folder under dsv3 names, read one at a time
    (a :class:`dsv3.model.init.WeightsSource`).

    Built on the import plan (:func:`_plan_import`: same mapping, checks and errors as
    :func:`import_hf`), so values are exactly what the importer writes: FP8 weights
    dequantized (to bfloat16), rope rows permuted for ``rope_interleave: false``, the routers
    in float32. A stacked expert block ``rows=(a, b)`` is assembled from the per-expert keys
    ``...experts.{e}.*_proj.weight`` for e in [a, b) only (or slots [a, b) of a fused tensor).

    Attributes:
        cfg: the :class:`ModelConfig` of the weights (``mtp_depth`` as present in the files).
        shapes: dsv3 name -> shape of the unsplit model.

    Raises:
        DsvError: as :func:`import_hf` (missing files, unknown architecture, names or shapes
            that do not match config.json).
    """

    def __init__(self, src: str | Path):
        self.plan = _plan_import(Path(src))
        self.cfg = self.plan.cfg
        self.shapes = {name: tuple(self.plan.shapes[name]) for name in self.plan.sources}
        self._files: dict[str, Any] = {}

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._files:
            self._files[file] = safe_open(str(self.plan.src / file), framework="pt")
        return self._files[file]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or rows ``[a, b)`` of it) on the CPU, in the import dtype.

        Raises:
            KeyError: no such tensor.
        """
        pieces = self.plan.sources[name]
        if "mlp.experts." not in name:
            t = _read_piece(self.plan, self._open(pieces[0].file), pieces[0], name)
            return t if rows is None else t[rows[0] : rows[1]]
        a, b = rows if rows is not None else (0, self.shapes[name][0])
        by_slot = {p.index: p for p in pieces}
        if None in by_slot:  # fused (E, ...) tensor: slots [a, b)
            p = by_slot[None]
            parts = [_read_piece(self.plan, self._open(p.file), p, name, e) for e in range(a, b)]
        else:  # one key per expert
            parts = [_read_piece(self.plan, self._open(by_slot[e].file), by_slot[e], name) for e in range(a, b)]
        return torch.stack(parts)

    def close(self) -> None:
        """Release the open shard files."""
        self._files.clear()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _dequant(plan: _Plan, f, p: _Source, t: torch.Tensor, expert: int | None = None) -> torch.Tensor:
    if p.scale_key is None:
        return t
    from safetensors import safe_open

    if p.scale_file == p.file:
        scale = f.get_tensor(p.scale_key)
    else:
        with safe_open(str(plan.src / p.scale_file), framework="pt") as g:
            scale = g.get_tensor(p.scale_key)
    if expert is not None:  # fused (E, ...) weights carry an (E, ...) scale grid
        scale = scale[expert]
        if p.rows is not None:
            b = plan.fp8_block[0]
            if p.rows[0] % b or p.rows[1] % b:
                raise DsvError(f"FP8 tensor {p.key}: moe_intermediate_size is not a multiple of the {b}-row "
                               "quantization block; cannot split gate and up")
            scale = scale[p.rows[0] // b : p.rows[1] // b]
    return dequantize_fp8(t, scale, plan.fp8_block, torch.float32)


def _fix_rope(plan: _Plan, target: str, t: torch.Tensor) -> torch.Tensor:
    """Permute rotate-half rope rows into interleaved pairs (``rope_interleave: false`` only)."""
    if not plan.rope_permute:
        return t
    cfg = plan.cfg
    qk = cfg.qk_head_dim
    if target.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        order = _rope_rows_from_half(t.shape[0], cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, qk, cfg.n_heads)
        return t[order]
    if target.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        order = _rope_rows_from_half(t.shape[0], cfg.kv_lora_rank, cfg.qk_rope_head_dim, t.shape[0], 1)
        return t[order]
    return t


def _check_heads(plan: _Plan) -> None:
    """Warn if an MTP layer's own output head differs from the main ``lm_head`` (dsv3 shares it)."""
    if not plan.dropped_heads:
        return
    from safetensors import safe_open

    main_file = plan.sources["lm_head.weight"][0].file
    with safe_open(str(plan.src / main_file), framework="pt") as f:
        main = f.get_tensor(plan.sources["lm_head.weight"][0].key)
    for key, file in plan.dropped_heads:
        with safe_open(str(plan.src / file), framework="pt") as f:
            other = f.get_tensor(key)
        if other.shape != main.shape or not torch.equal(other.to(main.dtype), main):
            log.warning("%s differs from lm_head.weight; dsv3 shares the main output head, so the MTP module "
                        "will use lm_head.weight", key)


# --------------------------------------------------------------------------- import


def _prepare_out(out_dir: Path) -> Path:
    """Check ``out_dir`` is new or empty and return a temp folder beside it."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DsvError(f"output folder {out_dir} already exists and is not empty; pass a new --out folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish_out(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked by _prepare_out
    os.replace(tmp, out_dir)


def import_hf(src_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert a Hugging Face DeepSeek-V3 folder into a dsv3 checkpoint folder.

    Reads ``config.json`` and ``model.safetensors`` or the shards of
    ``model.safetensors.index.json``, streaming one tensor (one expert slice) at a time.
    Writes ``out_dir/model.safetensors`` (dsv3 names, stacked experts), ``out_dir/config.yaml``
    (a full :class:`Config` whose ``model`` comes from :func:`hf_config_to_model_config`) and
    copies ``tokenizer.model`` (and ``tokenizer.json``/``tokenizer_config.json``/
    ``special_tokens_map.json``) when present. Everything is written to a temp folder first,
    then renamed, so a failure leaves nothing behind.

    Dtypes: tensors keep their stored dtype; FP8 weights are dequantized to bfloat16; the
    router weight and bias are float32. ``dtype`` (e.g. ``torch.bfloat16``) casts the rest.
    MTP layers that ``config.json`` declares but the weights lack (transformers'
    ``save_pretrained`` does not write them) are left out: the result has that smaller
    ``mtp_depth``.

    Returns:
        ``Path(out_dir)``.

    Raises:
        DsvError: missing ``config.json``, weights or shard; unknown architecture or
            unsupported setting; a tensor of the wrong shape, an unexpected or missing tensor;
            ``out_dir`` exists and is not empty.
    """
    src, out = Path(src_dir), Path(out_dir)
    plan = _plan_import(src, dtype)
    _check_heads(plan)
    tmp = _prepare_out(out)
    try:
        entries = {name: (plan.dtypes[name], plan.shapes[name]) for name in plan.sources}
        with _Writer(tmp / DSV3_WEIGHTS, entries, {"format": "pt", "source": "huggingface"}) as writer:
            for name, index, tensor in _iter_import(plan):
                writer.write(name, tensor, index)
        seq_len = min(DataConfig().seq_len, plan.cfg.max_seq_len)
        save_config(Config(model=plan.cfg, data=DataConfig(seq_len=seq_len)), tmp / "config.yaml")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_hf_model(src_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Build a :class:`dsv3.model.Transformer` directly from a Hugging Face folder (no files written).

    Same mapping and checks as :func:`import_hf`; parameters are cast to ``dtype`` (the routing
    bias stays float32). Returns the model in eval mode.

    Raises:
        DsvError: as :func:`import_hf`.
    """
    from dsv3.model import Transformer

    plan = _plan_import(Path(src_dir))
    with torch.device("meta"):
        model = Transformer(plan.cfg)
    model.to_empty(device=device)
    model.init_rope()
    state = model.state_dict()
    with torch.no_grad():
        for name, index, tensor in _iter_import(plan):
            dst = state[name] if index is None else state[name][index]
            dst.copy_(tensor)
    for _, p in model.named_parameters():
        p.data = p.data.to(dtype)
    return model.eval()


def is_hf_folder(path: str | Path) -> bool:
    """True if ``path`` is a folder with a Hugging Face ``config.json`` and no dsv3 ``config.yaml``."""
    p = Path(path)
    return p.is_dir() and (p / HF_CONFIG).is_file() and not (p / "config.yaml").is_file()


# --------------------------------------------------------------------------- export


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


def export_hf(ckpt: str | Path, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              dtype: torch.dtype | None = None) -> Path:
    """Write a dsv3 checkpoint in the Hugging Face DeepSeek-V3 layout.

    ``ckpt`` is a run directory or checkpoint folder (see
    :func:`dsv3.training.checkpoint.resolve_checkpoint`). ``out_dir`` receives ``config.json``
    (:func:`model_config_to_hf`, plus ``dtype`` and, when the checkpoint has a dsv3
    ``tokenizer.model``, its ids pad 0 / bos 2 / eos 3), the weights as ``model.safetensors`` or,
    above ``max_shard_bytes``, as ``model-0000i-of-0000n.safetensors`` shards with
    ``model.safetensors.index.json``, and ``tokenizer.model`` when present. Experts are written
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

    from dsv3.training.checkpoint import read_checkpoint_config, resolve_checkpoint

    if is_hf_folder(ckpt):
        raise DsvError(f"{ckpt} is already a Hugging Face folder (config.json); pass a dsv3 run directory or "
                       "checkpoint folder to --to-hf, or use the Hugging Face folder as it is")
    folder = resolve_checkpoint(ckpt)
    cfg = read_checkpoint_config(folder).model
    weights = folder / DSV3_WEIGHTS
    shapes = _expected_shapes(cfg)
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: (_st_dtype(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise DsvError(f"cannot read {weights} ({exc}); the checkpoint is corrupt, use another one") from None
    for name, shape in shapes.items():
        if name not in stored or stored[name][1] != shape:
            got = list(stored[name][1]) if name in stored else "nothing"
            raise DsvError(f"{weights} holds {got} for {name}, expected {list(shape)} from config.yaml; "
                           "the checkpoint is corrupt")
    # (hf key, dsv3 name, slot, dtype, shape)
    plan: list[tuple[str, str, int | None, torch.dtype, tuple[int, ...]]] = []
    for name, shape in shapes.items():
        td = stored[name][0]
        if name.endswith(_FP32_KEEP):
            td = torch.float32
        elif dtype is not None and td.is_floating_point:
            td = dtype
        for key, slot in _hf_pieces(name, shape, cfg):
            plan.append((key, name, slot, td, shape if slot is None else shape[1:]))
    for k in range(cfg.mtp_depth):
        layer = cfg.n_layers + k
        for key, name in ((f"model.layers.{layer}.embed_tokens.weight", "embed_tokens.weight"),
                          (f"model.layers.{layer}.shared_head.head.weight", "lm_head.weight")):
            td = dtype if dtype is not None else stored[name][0]
            plan.append((key, name, None, td, shapes[name]))
    plan.sort(key=lambda x: _sort_key(x[0]))
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, _, _, td, shape) in enumerate(plan):
        nbytes = math.prod(shape) * _itemsize(td)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    n = len(shards)
    names = [HF_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    out = Path(out_dir)
    tmp = _prepare_out(out)
    try:
        weight_map: dict[str, str] = {}
        total = 0
        with safe_open(str(weights), framework="pt") as f:
            for file, idxs in zip(names, shards):
                entries = {plan[i][0]: (plan[i][3], plan[i][4]) for i in idxs}
                with _Writer(tmp / file, entries, {"format": "pt"}) as writer:
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
        if (folder / "tokenizer.model").is_file():  # dsv3.tokenizer fixes <pad>=0, <s>=2, </s>=3
            hf.update(pad_token_id=0, bos_token_id=2, eos_token_id=3)
            shutil.copyfile(folder / "tokenizer.model", tmp / "tokenizer.model")
        (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
