"""Typed run configuration: dataclasses loaded from YAML, dotted ``KEY=VALUE`` overrides.

A run config has five sections, each a dataclass below: ``model`` (the DeepSeek-V3
hyper-parameters under their official names), ``data``, ``train``, ``ckpt`` and
``parallel``. ``load_config(path, overrides)`` reads a YAML file (or the built-in tiny
default when ``path`` is None), applies overrides such as ``train.steps=50``, checks every
key and type, and validates the combination. Any problem raises :class:`DsvError` with one
line naming the value and the fix.

The shipped sizes live in ``configs/*.yaml``; ``configs/tiny.yaml`` equals the dataclass
defaults, so a missing key in a YAML file always means "the tiny default".
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from dsv3.config_schedules import parse_batch_ramp, parse_lr_schedule, parse_piecewise
from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_text


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture hyper-parameters (names as in the official inference code).

    Defaults are the ``tiny`` CPU size. See ``docs/design.md`` / DeepSeek-V3 report §2 for
    the meaning of each; sizes of the 671B model are in ``configs/deepseek_v3_671b.yaml``.

    YaRN magnitude coefficients (used only when ``rope_factor`` s > 1; Hugging Face
    ``rope_parameters`` names): with ``m(c) = 0.1 * c * ln(s) + 1`` (YaRN eq. 22), the softmax
    scale is ``qk_head_dim ** -0.5 * m(mscale_all_dim) ** 2`` and the rope cos/sin tables are
    multiplied by ``m(mscale) / m(mscale_all_dim)``. ``mscale_all_dim`` None (the default)
    means "equal to ``mscale``": the tables are then unscaled and ``mscale`` alone sets the
    softmax scale, as in DeepSeek-V3 (both 1.0) and V2-Lite (both 0.707).

    ``rms_norm_eps`` is the epsilon of the block, final and MTP norms; the latent norms of
    MLA (``q_a_layernorm``, ``kv_a_layernorm``) always use 1e-6, as the reference code does.
    """

    vocab_size: int = 4096
    dim: int = 256
    inter_dim: int = 768  # dense SwiGLU hidden size of the first n_dense_layers blocks
    moe_inter_dim: int = 192  # hidden size of each routed and shared expert
    n_layers: int = 4
    n_dense_layers: int = 1
    n_heads: int = 4
    # DeepSeekMoE (§2.1.2)
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 2
    n_limited_groups: int = 1
    route_scale: float = 1.0
    # Multi-head Latent Attention (§2.1.1); q_lora_rank 0 = no query compression
    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # Rotary embeddings with YaRN (DeepSeek-V2 §3.1 / appendix); YaRN is on when rope_factor > 1
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0  # YaRN coefficient: cos/sin numerator, and the softmax when mscale_all_dim is None
    mscale_all_dim: float | None = None  # YaRN coefficient of the softmax scale; None = mscale
    # Multi-Token Prediction (§2.2): depth D
    mtp_depth: int = 1
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02  # 671B config: 0.006 (V3 report §4.2)

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: ``qk_nope_head_dim + qk_rope_head_dim`` (192 for 671B)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers


@dataclass
class DataConfig:
    """Corpus, tokenizer and packing settings for ``dsv3 prepare`` / ``dsv3 train``."""

    # None or "" = the Python standard library source of the running interpreter; else a
    # local .txt/.jsonl/.parquet file or folder, or a datasets hub name; or a blend: a list
    # of {path: ..., weight: ...} (see data_pipeline/README.md)
    source: str | list | None = None
    format: str = "text"  # text: packed documents (pre-training); chat: conversations (dsv3 sft)
    seq_len: int = 256
    text_field: str = "text"  # column holding the text in jsonl/parquet/hub sources
    val_fraction: float = 0.02  # share of documents held out for validation
    num_proc: int = 2  # tokenization worker processes
    tokenizer_sample_size: int = (
        100_000  # sentencepiece input_sentence_size: text chunks (<= 8 lines / 4 KiB each) sampled
    )
    cache_dir: str | None = None  # where prepared data lives; None = $DSV3_CACHE or ~/.cache/dsv3
    # an existing sentencepiece model (file, run dir or checkpoint folder) to use instead of
    # training one; defaults to the tokenizer of train.init_from when that has one
    tokenizer: str | None = None
    shard_mb: float = 8.0  # input MB per prepare task (one token shard each); raise to 256+ for TB corpora
    # dsv3 prepare on several nodes: this node's rank and the node count (None = from
    # SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else 0 and 1)
    prepare_rank: int | None = None
    prepare_world: int | None = None
    # document-aware packing: positions restart at each document, attention stays within it
    document_aware: bool = False


@dataclass
class TrainConfig:
    """Optimization and logging (defaults follow DeepSeek-V3 report §4.2 where it applies)."""

    steps: int = 800
    seed: int = 1234
    out_dir: str = "runs/tiny"
    log_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 | auto (the faster of the two here: dsv3.model.kernels.faster_precision)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3  # weight of the MTP loss (§2.2.2)
    balance_loss_alpha: float = 1e-4  # sequence-wise balance loss weight (eq. 17)
    bias_update_speed: float = 1e-3  # gamma of auxiliary-loss-free balancing (§2.1.2)
    # The schedules of the V3 recipe (report §4.2), each a pure function of the step and the
    # tokens consumed before it (dsv3/training/schedule.py); None = off (the constants above).
    # lr_schedule: phases [{type: warmup|constant|cosine|linear, until_step: N | until_tokens: T,
    # lr: X}, ...] instead of lr / warmup_steps / min_lr_ratio (parse_lr_schedule)
    lr_schedule: Any = None
    # batch_ramp: {start: sequences, tokens: T, increment: sequences (optional)}: the global batch
    # grows from start to micro_batch_size * grad_accum * dp over the first T tokens (parse_batch_ramp)
    batch_ramp: Any = None
    # piecewise constants over tokens, [[from_tokens, value], ...] starting at 0 (parse_piecewise),
    # instead of mtp_lambda / bias_update_speed
    mtp_lambda_schedule: Any = None
    bias_update_speed_schedule: Any = None
    # per-process peak (e.g. 989 for an H100 in bf16); enables MFU logging. "auto" measures a
    # bf16/fp32 (as train.precision) square matmul once at start (dsv3.hardware.measure_peak_tflops)
    peak_tflops: float | str | None = None
    compile: bool = False  # torch.compile the model inside the DeepSpeed engine
    nonfinite: str = "stop"  # NaN/Inf loss or gradient: "stop" (keep the last good checkpoint) or "skip" the step
    eval_every: int = 100
    eval_batches: int = 4  # validation size, in global batches
    # start from these weights (dsv3 run dir / checkpoint folder, or a Hugging Face folder);
    # the model section is then taken from it. Ignored when out_dir already has a checkpoint.
    init_from: str | None = None
    sample_prompt: str = "def "
    sample_tokens: int = 80


@dataclass
class CkptConfig:
    every: int = 200  # save every N optimizer steps (and always at the end)
    keep_last: int = 3  # older checkpoints are deleted


@dataclass
class ParallelConfig:
    """Parallel layout. Global batch = micro_batch_size * grad_accum * data-parallel size."""

    zero_stage: int = 0
    ep: int = 1  # expert parallelism degree
    pp: int = 1  # pipeline stages
    pp_partition: str = "parameters"  # blocks per stage: by parameter count, or counts such as "2,3,3"
    micro_batch_size: int = 8
    grad_accum: int = 1
    activation_checkpointing: bool = False
    # ZeRO-Offload / ZeRO-Infinity: where the optimizer state and ZeRO-3's weights live; nvme's folder
    offload_optimizer: str = "none"
    offload_param: str = "none"
    offload_dir: str = ""


OFFLOAD_DEVICES = ("none", "cpu", "nvme")  # values of parallel.offload_optimizer / parallel.offload_param


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # the dotted keys ("model.rope_factor") that the YAML file or an override set, as
    # load_config saw them (not a config value: not saved, not compared)
    given: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted for floats."""
    if tp is Any:  # a structured value (a schedule): checked by its parser in validate()
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except DsvError:
                pass
        names = " or ".join(_type_name(a) for a in args)
        raise DsvError(f"config key {key}={value!r} has the wrong type; expected {names}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer() and key.endswith("steps"):
        return int(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise DsvError(
        f"config key {key}={value!r} has the wrong type; expected {_type_name(tp)}, e.g. {key}={_example(tp)}"
    )


def _example(tp: Any) -> str:
    return {int: "8", float: "0.5", bool: "true", str: "text"}.get(tp, "...")


def _apply(section_obj: Any, section: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = [f.name for f in dataclasses.fields(section_obj)]
    for key, value in values.items():
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f"; did you mean {section}.{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise DsvError(f"unknown config key {section}.{key}{hint}")
        setattr(section_obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise DsvError(f"override {text!r} is not KEY=VALUE; write it like train.steps=50")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise DsvError(f"override key {key!r} must be section.name, e.g. train.steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts[0], parts[1], value


def config_from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    """Build a :class:`Config` from a nested dict (e.g. a parsed YAML file). No validation."""
    cfg = Config()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DsvError(f"{where} must be a YAML mapping of sections (model:, data:, train:, ...)")
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in raw.items():
        if section not in sections:
            raise DsvError(f"unknown config section {section!r} in {where}; valid: {', '.join(sorted(sections))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise DsvError(f"config section {section!r} in {where} must be a mapping of key: value")
        _apply(getattr(cfg, section), section, values)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, override and validate a run config.

    Args:
        path: YAML file; None = the built-in tiny default (``configs/tiny.yaml``).
        overrides: dotted ``section.key=value`` strings; values are parsed as YAML scalars.

    Returns:
        The validated :class:`Config`.

    Raises:
        DsvError: missing or unparsable file, unknown key, wrong type, or an invalid
            combination (see :func:`validate`).
    """
    raw: dict[str, Any] = {}
    where = "the default config"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise DsvError(f"config file {p} does not exist; pass an existing YAML file to --config (see configs/)")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DsvError(
                f"config file {p} is not valid YAML ({first}); fix the file or pick one from configs/"
            ) from None
    cfg = config_from_dict(raw, where)
    given = {
        f"{section}.{key}" for section, values in (raw or {}).items() if isinstance(values, dict) for key in values
    }
    for text in overrides:
        section, key, value = _parse_override(text)
        if section not in {f.name for f in dataclasses.fields(cfg)}:
            raise DsvError(
                f"unknown config section {section!r} in override {text!r}; valid: ckpt, data, model, parallel, train"
            )
        _apply(getattr(cfg, section), section, {key: value})
        given.add(f"{section}.{key}")
    validate(cfg)
    cfg.given = frozenset(given)
    return cfg


# the model fields a context extension changes (V3 report §4.3: YaRN and a longer context);
# every other field is the architecture of the weights
CONTEXT_FIELDS = (
    "max_seq_len",
    "rope_factor",
    "original_seq_len",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


def extend_model(saved: ModelConfig, cfg: Config, where: str) -> ModelConfig:
    """The model of a run that continues from weights (``train.init_from``): the weights'
    own ``saved`` config, with the context-extension fields (:data:`CONTEXT_FIELDS`) that
    ``cfg``'s file or overrides set explicitly (``cfg.given``).

    A ``model.*`` key set to another value than the weights have is refused unless it is a
    context-extension field (``init_std`` is ignored: the weights are not initialized); an
    extension keeps or raises ``max_seq_len`` and ``rope_factor``.

    Args:
        where: the weights' path, for the messages.

    Raises:
        DsvError: one line naming the field and the fix.
    """
    out = dataclasses.replace(saved)
    for key in sorted(k for k in cfg.given if k.startswith("model.")):
        name = key.split(".", 1)[1]
        new, old = getattr(cfg.model, name), getattr(saved, name)
        if name in CONTEXT_FIELDS:
            setattr(out, name, new)
        elif name != "init_std" and new != old:
            raise DsvError(
                f"model.{name}={new} differs from the {old} of train.init_from={where}: the weights fix the "
                f"architecture, and only the context-extension fields ({', '.join(CONTEXT_FIELDS)}) may "
                f"change; drop model.{name} from the config"
            )
    for name in ("max_seq_len", "rope_factor"):
        if getattr(out, name) < getattr(saved, name):
            raise DsvError(
                f"model.{name}={getattr(out, name)} is below the {getattr(saved, name)} of train.init_from="
                f"{where}; a context extension keeps or raises it"
            )
    if out.rope_factor > 1 and out.original_seq_len > out.max_seq_len:
        raise DsvError(
            f"model.original_seq_len={out.original_seq_len} exceeds model.max_seq_len={out.max_seq_len}: "
            "with YaRN it is the context the weights were trained on (e.g. their data.seq_len); set it"
        )
    return out


def validate(cfg: Config) -> None:
    """Check that the config describes a buildable model and a possible run.

    Raises:
        DsvError: the first problem found, naming the values and a fix.
    """
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    if isinstance(t.peak_tflops, str) and t.peak_tflops != "auto":
        raise DsvError(f"train.peak_tflops={t.peak_tflops!r} must be a number (TFLOP/s per process) or auto")
    if t.compile and cfg.parallel.ep > 1:
        raise DsvError("train.compile=true is not supported with expert parallelism (parallel.ep > 1); drop one")
    if t.compile and cfg.parallel.pp > 1:
        raise DsvError("train.compile=true is not supported with pipeline parallelism (parallel.pp > 1); drop one")
    if isinstance(t.peak_tflops, float) and t.peak_tflops <= 0:
        raise DsvError(f"train.peak_tflops={t.peak_tflops} must be positive (TFLOP/s per process) or auto")
    positive = {
        "model.vocab_size": m.vocab_size,
        "model.dim": m.dim,
        "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads,
        "model.kv_lora_rank": m.kv_lora_rank,
        "model.qk_nope_head_dim": m.qk_nope_head_dim,
        "model.qk_rope_head_dim": m.qk_rope_head_dim,
        "model.v_head_dim": m.v_head_dim,
        "model.max_seq_len": m.max_seq_len,
        "data.seq_len": d.seq_len,
        "train.steps": t.steps,
        "train.log_every": t.log_every,
        "ckpt.every": cfg.ckpt.every,
        "parallel.micro_batch_size": p.micro_batch_size,
        "parallel.grad_accum": p.grad_accum,
        "parallel.ep": p.ep,
        "parallel.pp": p.pp,
        "data.num_proc": d.num_proc,
        "data.shard_mb": d.shard_mb,
    }
    for key, value in positive.items():
        if value <= 0:
            raise DsvError(f"{key}={value} must be a positive integer")
    nonneg = {
        "model.q_lora_rank": m.q_lora_rank,
        "model.mtp_depth": m.mtp_depth,
        "model.n_dense_layers": m.n_dense_layers,
        "model.n_shared_experts": m.n_shared_experts,
        "train.warmup_steps": t.warmup_steps,
    }
    for key, value in nonneg.items():
        if value < 0:
            raise DsvError(f"{key}={value} must be >= 0")
    if m.qk_rope_head_dim % 2:
        raise DsvError(f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even (RoPE rotates channel pairs)")
    if m.n_dense_layers > m.n_layers:
        raise DsvError(f"model.n_dense_layers={m.n_dense_layers} exceeds model.n_layers={m.n_layers}; lower it")
    if m.n_dense_layers < m.n_layers:
        if m.n_routed_experts <= 0 or m.moe_inter_dim <= 0:
            raise DsvError(
                "model.n_routed_experts and model.moe_inter_dim must be positive when MoE layers exist "
                "(or set model.n_dense_layers=model.n_layers)"
            )
        if m.n_expert_groups <= 0 or m.n_routed_experts % m.n_expert_groups:
            divs = [g for g in range(1, m.n_routed_experts + 1) if m.n_routed_experts % g == 0]
            raise DsvError(
                f"model.n_routed_experts={m.n_routed_experts} is not divisible into "
                f"model.n_expert_groups={m.n_expert_groups}; choose n_expert_groups in {divs}"
            )
        per_group = m.n_routed_experts // m.n_expert_groups
        if m.n_expert_groups > 1 and per_group < 2:
            raise DsvError(
                f"model.n_expert_groups={m.n_expert_groups} leaves {per_group} expert per group; a group "
                "is scored by its two best experts, so use at most n_routed_experts/2 groups"
            )
        if not 1 <= m.n_limited_groups <= m.n_expert_groups:
            raise DsvError(
                f"model.n_limited_groups={m.n_limited_groups} must be between 1 and "
                f"model.n_expert_groups={m.n_expert_groups}"
            )
        kept = m.n_limited_groups * per_group
        if not 1 <= m.n_activated_experts <= kept:
            raise DsvError(
                f"model.n_activated_experts={m.n_activated_experts} must be between 1 and the "
                f"{kept} experts that n_limited_groups={m.n_limited_groups} groups of {per_group} hold; "
                "raise n_limited_groups or lower n_activated_experts"
            )
        if m.n_routed_experts % p.ep:
            divs = [e for e in range(1, m.n_routed_experts + 1) if m.n_routed_experts % e == 0]
            raise DsvError(
                f"model.n_routed_experts={m.n_routed_experts} is not divisible by parallel.ep={p.ep}; "
                f"choose ep in {divs}"
            )
    spec = str(p.pp_partition).strip()
    if p.pp == 1 and spec != "parameters" and spec != str(m.n_layers):
        raise DsvError(
            f"parallel.pp_partition={spec!r} splits blocks over pipeline stages but parallel.pp=1; "
            f"set parallel.pp to the number of stages, or drop pp_partition"
        )
    if m.rope_factor < 1:
        raise DsvError(f"model.rope_factor={m.rope_factor} must be >= 1 (1 disables YaRN)")
    if m.rope_factor > 1 and not m.beta_fast > m.beta_slow > 0:
        raise DsvError(f"YaRN needs model.beta_fast > model.beta_slow > 0, got {m.beta_fast} and {m.beta_slow}")
    if m.rope_factor > 1:
        for key, c in (("model.mscale", m.mscale), ("model.mscale_all_dim", m.mscale_all_dim)):
            if c is not None and not 0.1 * c * math.log(m.rope_factor) + 1 > 0:
                raise DsvError(
                    f"{key}={c} makes YaRN's magnitude 0.1*{c}*ln({m.rope_factor})+1 non-positive; "
                    "use a value above -10/ln(rope_factor)"
                )
    if d.seq_len > m.max_seq_len:
        raise DsvError(
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower data.seq_len "
            "or raise model.max_seq_len"
        )
    if m.mtp_depth >= d.seq_len:
        raise DsvError(f"model.mtp_depth={m.mtp_depth} must be smaller than data.seq_len={d.seq_len}")
    if m.vocab_size < 384:
        raise DsvError(
            f"model.vocab_size={m.vocab_size} is too small: the tokenizer needs 256 byte pieces plus "
            "special tokens and merges; use at least 384"
        )
    if not 0 < d.val_fraction < 0.5:
        raise DsvError(f"data.val_fraction={d.val_fraction} must be in (0, 0.5)")
    if t.precision not in ("fp32", "bf16", "auto"):
        raise DsvError(f"train.precision={t.precision!r} is not supported; use fp32, bf16 or auto")
    if d.format not in ("text", "chat"):
        raise DsvError(f"data.format={d.format!r} must be text (pre-training) or chat (fine-tuning)")
    if isinstance(d.source, list) and d.format == "chat":
        raise DsvError(
            "data.source lists several corpora, which only pre-training (data.format=text) blends; "
            "give one source for fine-tuning"
        )
    if t.nonfinite not in ("stop", "skip"):
        raise DsvError(f"train.nonfinite={t.nonfinite!r} must be stop or skip")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        raise DsvError(f"train.lr={t.lr} must be a positive number")
    if not 0 <= t.min_lr_ratio <= 1:
        raise DsvError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if p.zero_stage not in (0, 1, 2, 3):
        raise DsvError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    for key, value in (
        ("parallel.offload_optimizer", p.offload_optimizer),
        ("parallel.offload_param", p.offload_param),
    ):
        if value not in OFFLOAD_DEVICES:
            raise DsvError(f"{key}={value!r} must be none, cpu or nvme")
        if value == "nvme" and not str(p.offload_dir).strip():
            raise DsvError(f"{key}=nvme needs parallel.offload_dir, the folder for DeepSpeed's swap files; set it")
    if cfg.ckpt.keep_last < 1:
        raise DsvError(f"ckpt.keep_last={cfg.ckpt.keep_last} must be at least 1")
    parse_lr_schedule(t.lr_schedule, t.lr)
    parse_batch_ramp(t.batch_ramp)
    parse_piecewise("train.mtp_lambda_schedule", t.mtp_lambda_schedule)
    parse_piecewise("train.bias_update_speed_schedule", t.bias_update_speed_schedule)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML, atomically (temp file + rename)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
