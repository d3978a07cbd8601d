"""Import the Hugging Face DeepSeek-V3 checkpoint layout (``dsv3 convert --from-hf``, ``load_model``).

A Hugging Face folder holds ``config.json`` (:mod:`dsv3.checkpoint.hf_config`) and either one
``model.safetensors`` or several shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> shard file). A dsv3 checkpoint folder holds ``model.safetensors`` (the state dict of
:class:`dsv3.model.Transformer`), ``config.yaml`` (a full :class:`dsv3.config.Config`) and,
when known, the tokenizer (``tokenizer.model``, or a released model's ``tokenizer.json`` with
its ``tokenizer_config.json`` and chat template).

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

Both directions (export: :mod:`dsv3.checkpoint.hf_export`) stream: tensors are read one at a
time with ``safetensors.safe_open`` (one expert slice at a time for stacked experts) and
written straight into their place in the output file, so peak memory is about one tensor,
never a whole shard or model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv3.checkpoint.files import CONFIG, WEIGHTS, finish_out, prepare_out
from dsv3.checkpoint.hf_config import HF_INDEX, HF_SINGLE, hf_config_to_model_config, read_hf_config
from dsv3.checkpoint.hf_tensors import dequantize_fp8, rope_rows_from_half
from dsv3.checkpoint.safetensors_io import TensorWriter, dtype_of
from dsv3.checkpoint.weights import expected_shapes
from dsv3.config import Config, DataConfig, ModelConfig, save_config
from dsv3.errors import DsvError
from dsv3.model import Transformer
from dsv3.tokenizer_files import tokenizer_files_in

log = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP32_KEEP = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # routers stay float32


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
            raise DsvError(
                f"shard {src / missing[0]}{more} listed in {HF_INDEX} is missing; "
                "download every shard of the checkpoint"
            )
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
        return [
            (f"{prefix}.mlp.experts.gate_proj", None, (0, inter)),
            (f"{prefix}.mlp.experts.up_proj", None, (inter, 2 * inter)),
        ]
    return [(f"{prefix}.{rest}", None, None)]


def _mtp_layers_present(wmap: dict[str, str], cfg: ModelConfig) -> int:
    depth = 0
    while depth < cfg.mtp_depth and any(k.startswith(f"model.layers.{cfg.n_layers + depth}.") for k in wmap):
        depth += 1
    return depth


def plan_import(src: Path, dtype: torch.dtype | None = None) -> _Plan:
    """Read config and headers, map every tensor, and check names and shapes."""
    hf = read_hf_config(src)
    cfg = hf_config_to_model_config(hf)
    wmap = _weight_map(src)
    present = _mtp_layers_present(wmap, cfg)
    if present < cfg.mtp_depth:
        log.warning(
            "config.json declares %d MTP layer(s) but the weights hold %d; importing with mtp_depth=%d",
            cfg.mtp_depth,
            present,
            present,
        )
        cfg = dataclasses.replace(cfg, mtp_depth=present)
    headers = _headers(src, set(wmap.values()))
    for key, file in wmap.items():
        if key not in headers:
            raise DsvError(f"tensor {key} listed in {HF_INDEX} is not in {src / file}; the checkpoint is corrupt")
    shapes = expected_shapes(cfg)
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
            raise DsvError(
                f"unexpected tensor {key} in {src / wmap[key]}: config.json has {cfg.n_layers} layers "
                f"and {cfg.mtp_depth} MTP layer(s); the checkpoint does not match config.json"
            )
        if not targets and key.endswith("shared_head.head.weight"):
            dropped_heads.append((key, wmap[key]))
        for target, index, rows in targets:
            if target not in shapes:
                raise DsvError(
                    f"unexpected tensor {key} in {src / wmap[key]} (no dsv3 parameter {target}); "
                    "the checkpoint does not match config.json"
                )
            sources.setdefault(target, []).append(_Source(key, wmap[key], index=index, rows=rows))
            src_dtypes.setdefault(target, set()).add(headers[key][0])
    # FP8 scales
    for pieces in sources.values():
        for p in pieces:
            if dtype_of(headers[p.key][0]) in FP8_DTYPES:
                skey = p.key + "_scale_inv"
                if skey not in wmap:
                    raise DsvError(f"FP8 tensor {p.key} has no {skey}; the checkpoint is incomplete")
                p.scale_key, p.scale_file = skey, wmap[skey]
    # names and shapes
    missing = sorted(set(shapes) - set(sources))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DsvError(
            f"{src} lacks the weights of dsv3 parameter {missing[0]}{more}; the checkpoint is "
            "incomplete or does not match config.json"
        )
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
                raise DsvError(
                    f"{src} {problem} for {target} (config.json n_routed_experts={want[0]}); "
                    "the checkpoint is incomplete or does not match config.json"
                )
        for p in pieces:
            got = headers[p.key][1]
            if p.index is not None:
                exp = want[1:]
            elif p.rows is not None:
                exp = (want[0], 2 * want[1], want[2])
            else:
                exp = want
            if tuple(got) != tuple(exp):
                raise DsvError(
                    f"tensor {p.key} has shape {list(got)}, expected {list(exp)} from config.json; "
                    "the checkpoint does not match its config"
                )
    dtypes: dict[str, torch.dtype] = {}
    for target, names in src_dtypes.items():
        tds = {torch.bfloat16 if t in FP8_DTYPES else t for t in map(dtype_of, names)}
        if len(tds) > 1:
            raise DsvError(f"the pieces of {target} have mixed dtypes {sorted(names)}; the checkpoint is corrupt")
        td = tds.pop()
        if target.endswith(FP32_KEEP):
            td = torch.float32
        elif dtype is not None and td.is_floating_point:
            td = dtype
        dtypes[target] = td
    return _Plan(
        src=src,
        hf=hf,
        cfg=cfg,
        sources=sources,
        dtypes=dtypes,
        shapes=shapes,
        rope_permute=hf.get("rope_interleave", True) is False,
        fp8_block=(int(block[0]), int(block[1])),
        dropped_heads=dropped_heads,
    )


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
        self.plan = plan_import(Path(src))
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

    def __enter__(self) -> HFWeights:
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
                raise DsvError(
                    f"FP8 tensor {p.key}: moe_intermediate_size is not a multiple of the {b}-row "
                    "quantization block; cannot split gate and up"
                )
            scale = scale[p.rows[0] // b : p.rows[1] // b]
    return dequantize_fp8(t, scale, plan.fp8_block, torch.float32)


def _fix_rope(plan: _Plan, target: str, t: torch.Tensor) -> torch.Tensor:
    """Permute rotate-half rope rows into interleaved pairs (``rope_interleave: false`` only)."""
    if not plan.rope_permute:
        return t
    cfg = plan.cfg
    qk = cfg.qk_head_dim
    if target.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        order = rope_rows_from_half(t.shape[0], cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, qk, cfg.n_heads)
        return t[order]
    if target.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        order = rope_rows_from_half(t.shape[0], cfg.kv_lora_rank, cfg.qk_rope_head_dim, t.shape[0], 1)
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
            log.warning(
                "%s differs from lm_head.weight; dsv3 shares the main output head, so the MTP module "
                "will use lm_head.weight",
                key,
            )


# --------------------------------------------------------------------------- import


def import_hf(src_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert a Hugging Face DeepSeek-V3 folder into a dsv3 checkpoint folder.

    Reads ``config.json`` and ``model.safetensors`` or the shards of
    ``model.safetensors.index.json``, streaming one tensor (one expert slice) at a time.
    Writes ``out_dir/model.safetensors`` (dsv3 names, stacked experts), ``out_dir/config.yaml``
    (a full :class:`Config` whose ``model`` comes from :func:`hf_config_to_model_config`) and
    copies the tokenizer files as they are when present (``tokenizer.json``,
    ``tokenizer_config.json``, ``chat_template.jinja``, ``special_tokens_map.json``,
    ``tokenizer.model``; :data:`dsv3.tokenizer_files.TOKENIZER_FILES`). Everything is written
    to a temp folder first, then renamed, so a failure leaves nothing behind.

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
    plan = plan_import(src, dtype)
    _check_heads(plan)
    tmp = prepare_out(out)
    try:
        entries = {name: (plan.dtypes[name], plan.shapes[name]) for name in plan.sources}
        with TensorWriter(tmp / WEIGHTS, entries, {"format": "pt", "source": "huggingface"}) as writer:
            for name, index, tensor in _iter_import(plan):
                writer.write(name, tensor, index)
        seq_len = min(DataConfig().seq_len, plan.cfg.max_seq_len)
        save_config(Config(model=plan.cfg, data=DataConfig(seq_len=seq_len)), tmp / CONFIG)
        for f in tokenizer_files_in(src):
            shutil.copyfile(f, tmp / f.name)
        finish_out(tmp, out)
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
    plan = plan_import(Path(src_dir))
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
