"""The Hugging Face ``DeepseekV3ForCausalLM`` folder: its ``config.json`` <-> :class:`ModelConfig`.

A Hugging Face folder holds ``config.json`` and either one ``model.safetensors`` or several
shards listed by ``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file).
This module maps the config both ways (:func:`hf_config_to_model_config`,
:func:`model_config_to_hf`) and names the files; the tensors are mapped by
:mod:`dsv3.checkpoint.hf_import` and :mod:`dsv3.checkpoint.hf_export`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dsv3.checkpoint.files import HF_CONFIG, WEIGHTS
from dsv3.config import ModelConfig
from dsv3.errors import DsvError
from dsv3.model.rope import yarn_mscale, yarn_rope_scale

HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
HF_MODEL_TYPE = "deepseek_v3"
HF_SINGLE = WEIGHTS  # a single-file Hugging Face checkpoint uses the same name
HF_INDEX = "model.safetensors.index.json"
HF_GENERATION_CONFIG = "generation_config.json"

#: Values transformers' ``DeepseekV3Config`` assumes for keys a ``config.json`` leaves out
#: (the official 671B settings).
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "num_nextn_predict_layers": 1,
    "attention_bias": False,
    "rope_interleave": True,
}


def _get(hf: dict, key: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if k in hf and hf[k] is not None:
            return hf[k]
    return HF_DEFAULTS.get(key)


def _rope_fields(hf: dict) -> dict[str, Any]:
    """The dsv3 rope fields from ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` (older)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise DsvError(f"config.json rope_parameters={rope!r} is not a mapping; fix config.json")
    if any(isinstance(v, dict) for v in rope.values()):
        raise DsvError(
            "config.json has per-layer-type rope_parameters, which DeepSeek-V3 does not use; "
            "give one rope_parameters mapping"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    rtype = rope.get("rope_type", rope.get("type")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise DsvError(
            "config.json partial_rotary_factor != 1 is not supported by dsv3 (DeepSeek-V3 rotates the "
            "whole qk_rope_head_dim slice)"
        )
    if rtype == "default":
        return out
    if rtype != "yarn":
        raise DsvError(
            f"config.json rope type {rtype!r} is not supported; dsv3 models DeepSeek-V3's rope (default or yarn)"
        )
    max_pos = _get(hf, "max_position_embeddings")
    original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos
    factor = rope.get("factor")
    if factor is None:
        factor = max_pos / original
    factor = float(factor)
    if factor < 1:
        raise DsvError(f"config.json yarn factor={factor} is below 1; dsv3 supports factor >= 1")
    if rope.get("truncate", True) is False:
        raise DsvError(
            "config.json yarn truncate=false is not supported by dsv3 (the correction range is "
            "always rounded outward, as in DeepSeek-V3)"
        )
    mscale, all_dim, attention_factor = rope.get("mscale"), rope.get("mscale_all_dim"), rope.get("attention_factor")
    mscale_fields = _yarn_mscales(factor, mscale, all_dim, attention_factor)
    out.update(
        rope_factor=factor,
        original_seq_len=int(original),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        **mscale_fields,
    )
    return out


def _yarn_mscales(factor: float, mscale: Any, mscale_all_dim: Any, attention_factor: Any) -> dict[str, Any]:
    """dsv3's ``mscale`` / ``mscale_all_dim`` giving the model transformers builds from these values.

    transformers (``yarn_apply_mscale``, ``_compute_yarn_parameters``) multiplies the softmax
    scale by ``yarn_mscale(factor, mscale_all_dim) ** 2`` when ``mscale_all_dim`` is set and
    non-zero (else by nothing, which is coefficient 0 here), and the cos/sin tables by
    ``attention_factor``; without an explicit one, by ``yarn_mscale(factor, mscale) /
    yarn_mscale(factor, mscale_all_dim)`` when both are non-zero, else by
    ``yarn_mscale(factor, 1)``. dsv3 multiplies the tables by ``yarn_mscale(factor, mscale) /
    yarn_mscale(factor, mscale_all_dim)``, so with YaRN (factor > 1) every table factor is
    reached by solving for ``mscale``; an explicit ``attention_factor`` other than that ratio is
    thereby folded into ``mscale``. ``mscale_all_dim`` is None when it equals ``mscale``.

    Raises:
        DsvError: factor 1 (YaRN off in dsv3) with a table factor other than 1.
    """
    all_dim = float(mscale_all_dim or 0.0)
    if attention_factor is not None:
        table = float(attention_factor)
    elif mscale and mscale_all_dim:
        table = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, all_dim)
    else:
        table = yarn_mscale(factor, 1.0)
    if factor <= 1:
        if abs(table - 1.0) > 1e-12:
            raise DsvError(
                f"config.json yarn factor={factor} with attention_factor={table:.6g} scales the rope "
                "tables without YaRN, which dsv3 cannot represent; use factor > 1 or attention_factor 1"
            )
        coefficient = all_dim
    else:
        coefficient = (table * yarn_mscale(factor, all_dim) - 1.0) / (0.1 * math.log(factor))
        for c in ([float(mscale)] if mscale is not None else []) + [all_dim, 1.0, 0.0]:
            if abs(coefficient - c) <= 1e-9 * max(1.0, abs(c)):  # the round value it stands for
                coefficient = c
                break
    return {"mscale": coefficient, "mscale_all_dim": None if coefficient == all_dim else all_dim}


def _check_architecture(hf: dict) -> None:
    archs = hf.get("architectures")
    if archs is None and hf.get("model_type") == HF_MODEL_TYPE:
        return
    if not isinstance(archs, list) or HF_ARCHITECTURE not in archs:
        raise DsvError(
            f"unknown architecture {archs!r} (model_type {hf.get('model_type')!r}) in config.json; "
            f"dsv3 converts only {HF_ARCHITECTURE} checkpoints"
        )


def hf_config_to_model_config(hf: dict) -> ModelConfig:
    """Map a Hugging Face DeepSeek-V3 ``config.json`` dict to a :class:`ModelConfig`.

    Keys the dict leaves out take transformers' ``DeepseekV3Config`` defaults (the 671B
    values). Both ``rope_parameters`` (transformers >= 5) and the older ``rope_scaling`` +
    ``rope_theta`` are read; ``type``/``rope_type`` ``yarn`` turns YaRN on (``factor`` ->
    ``rope_factor``, ``original_max_position_embeddings`` -> ``original_seq_len``, ``mscale``
    and ``mscale_all_dim`` -> the fields of the same names, ``mscale_all_dim`` None when equal;
    an explicit ``attention_factor`` is folded into ``mscale``, see :func:`_yarn_mscales`).
    ``num_key_value_heads`` is ignored (MLA expands keys to every head).

    Raises:
        DsvError: the architecture is not ``DeepseekV3ForCausalLM``; tied embeddings;
            ``norm_topk_prob`` false; ``topk_method`` other than ``noaux_tc``; ``scoring_func``
            other than ``sigmoid``; a rope type other than default/yarn; yarn factor 1 with an
            ``attention_factor`` other than 1; attention biases; an activation other than silu;
            ``moe_layer_freq`` != 1; sizes that do not divide.
    """
    if not isinstance(hf, dict):
        raise DsvError("config.json must hold a JSON object")
    _check_architecture(hf)
    unsupported = {
        "tie_word_embeddings": (False,),
        "norm_topk_prob": (True,),
        "topk_method": ("noaux_tc",),
        "scoring_func": ("sigmoid",),
        "attention_bias": (False,),
        "hidden_act": ("silu",),
        "moe_layer_freq": (1,),
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
            raise DsvError(
                f"config.json n_routed_experts={cfg.n_routed_experts} is not divisible by "
                f"n_group={cfg.n_expert_groups}; fix config.json"
            )
        if cfg.n_limited_groups > cfg.n_expert_groups:
            raise DsvError(f"config.json topk_group={cfg.n_limited_groups} exceeds n_group={cfg.n_expert_groups}")
    if cfg.qk_rope_head_dim % 2:
        raise DsvError(f"config.json qk_rope_head_dim={cfg.qk_rope_head_dim} must be even")
    return cfg


def model_config_to_hf(cfg: ModelConfig) -> dict:
    """Map a :class:`ModelConfig` to a transformers ``DeepseekV3Config`` dict (``config.json``).

    The inverse of :func:`hf_config_to_model_config`: ``hf_config_to_model_config(
    model_config_to_hf(cfg)) == cfg`` (an explicit ``mscale_all_dim`` equal to ``mscale`` comes
    back as None, which means the same). Rope settings are written as transformers 5
    ``rope_parameters``; with YaRN, ``mscale`` and ``mscale_all_dim`` (``cfg.mscale`` when
    None), so transformers scales the softmax by ``yarn_mscale(s, mscale_all_dim) ** 2`` and the
    cos/sin tables by ``yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)``, as dsv3 does.
    When one of the two is 0 transformers would not form that ratio, so it is written as an
    explicit ``attention_factor`` (1 when both are 0).
    """
    if cfg.rope_factor > 1:
        all_dim = cfg.mscale if cfg.mscale_all_dim is None else cfg.mscale_all_dim
        rope: dict[str, Any] = {
            "rope_type": "yarn",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "mscale": cfg.mscale,
            "mscale_all_dim": all_dim,
        }
        if not (cfg.mscale and all_dim):
            rope["attention_factor"] = float(yarn_rope_scale(cfg))
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
