"""Benchmarks (``dsv3 bench train|decode|data``): throughput, MFU, memory, and a peer comparison.

``bench train`` times full optimizer steps (forward, backward, gradient clipping, AdamW
update) of the plain :class:`dsv3.model.Transformer` on synthetic token batches, in this
process, without the DeepSpeed engine (its bookkeeping is the same for any model and would
blur the comparison). Precisions:

- ``fp32``: fp32 weights, torch AdamW;
- ``bf16``: bf16 weights and activations, with fp32 master weights and fp32 AdamW moments in
  :class:`MasterWeightAdamW` (what DeepSpeed's bf16 optimizer does in ``dsv3 train``).

``--vs hf`` builds ``transformers``' ``DeepseekV3ForCausalLM`` at the same configuration
with the same weights (exported through :mod:`dsv3.convert`; logits are checked equal at
step 0), trains it with torch AdamW on the same batches, and times both in the same process,
step by step in turn, so machine noise hits both alike; the best step of each side counts
(wall clock, and process CPU time, which with one thread ignores time spent waiting for a
core held by another process). The peer runs in the settings a user would pick: fp32,
and for a bf16 benchmark also bf16 weights (pure bf16 AdamW, its fastest bf16 option); the
``eager`` expert loop and ``grouped_mm`` experts (``batched_mm`` is left out: on CPU it ran
at 85 tokens/s on ``tiny``, 40x slower); SDPA attention. The ratio is taken against its
fastest setting.

MFU = model FLOPs per token (:func:`dsv3.model.flops_per_token`, 6N + attention) x tokens/s
divided by a peak measured on this machine with a square matmul of the benchmark's dtype
(:func:`measure_peak_tflops`; the bf16 peak is the reference for the bf16 goal).

Memory per micro-batch: on CUDA ``torch.cuda.max_memory_allocated`` over one step; on CPU
the bytes of tensors autograd saves for the backward pass (activation memory, counted by a
``saved_tensors_hooks`` pass over one forward), reported with and without activation
checkpointing.

Results: ``bench/<kind>-<config>-<precision>-<date>.json`` (atomic write) and a table.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from dsv3.config import Config, load_config
from dsv3.errors import DsvError
from dsv3.fileio import atomic_write_text

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_EXPERTS = ("eager", "grouped_mm")  # "batched_mm" is far slower on CPU (85 tokens/s on tiny); opt in


# --------------------------------------------------------------------------- machine peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(dtype: torch.dtype, device: torch.device | str = "cpu", n: int | None = None,
                        seconds: float = 0.5) -> float:
    """Best dense-matmul throughput of this machine for ``dtype``: TFLOP/s of an (n, n) @ (n, n).

    ``2 n^3`` FLOPs per product; the best of several timed rounds (``seconds`` of work in all)
    after a warm-up. n defaults to 1024 on CPU and 8192 on CUDA.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    a @ b
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(20, int(seconds / 5 / one)))
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12


def machine_peaks(device: torch.device, seconds: float = 0.5) -> dict[str, float]:
    """Measured fp32 and bf16 matmul peaks (TFLOP/s) of ``device``."""
    return {name: measure_peak_tflops(dt, device, seconds=seconds) for name, dt in DTYPES.items()}


# --------------------------------------------------------------------------- optimizer


class MasterWeightAdamW:
    """AdamW over fp32 master copies of low-precision (bf16) model parameters.

    ``step()`` casts each parameter's gradient to fp32 onto its master copy, runs torch AdamW
    (fp32 moments) on the masters, and writes the updated masters back into the bf16
    parameters. Gradients, moments and updates are fp32, so small updates accumulate in the
    master weights instead of vanishing in bf16 (mixed-precision training, Micikevicius et
    al. 2018; DeepSeek-V3 report §3.3 keeps fp32 master weights and moments too).

    Args:
        param_groups: torch-style groups of the model's (bf16) parameters.
        **adamw: torch.optim.AdamW keyword arguments (lr, betas, eps, weight_decay, ...).
    """

    def __init__(self, param_groups: list[dict[str, Any]], **adamw):
        self.model_params: list[torch.Tensor] = []
        self.master_params: list[torch.Tensor] = []
        groups = []
        for g in param_groups:
            masters = []
            for p in g["params"]:
                m = p.detach().float().clone()
                self.model_params.append(p)
                self.master_params.append(m)
                masters.append(m)
            groups.append({**g, "params": masters})
        self.optimizer = torch.optim.AdamW(groups, **adamw)
        self.param_groups = self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        """Update the masters with the model gradients, then copy them into the model."""
        src, dst = [], []
        for p, m in zip(self.model_params, self.master_params):
            if p.grad is None:
                m.grad = None
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)  # kept between steps: one fp32 buffer per parameter
            src.append(p.grad)
            dst.append(m.grad)
        if dst:
            torch._foreach_copy_(dst, src)  # bf16 -> fp32
        self.optimizer.step()
        torch._foreach_copy_(self.model_params, self.master_params)  # fp32 -> bf16 (round to nearest)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the model's gradients (the fp32 gradient buffers are reused)."""
        for p in self.model_params:
            p.grad = None


def _adamw_kwargs(cfg: Config, device: torch.device) -> dict[str, Any]:
    t = cfg.train
    kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, weight_decay=t.weight_decay)
    kw["fused"] = True  # torch's fused AdamW exists for CPU and CUDA
    return kw


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: Config, precision: str, master: bool):
    """torch AdamW (fp32 weights or pure low precision), or :class:`MasterWeightAdamW`."""
    device = next(model.parameters()).device
    groups = _decay_groups(model, cfg.train.weight_decay)
    kw = _adamw_kwargs(cfg, device)
    if precision != "fp32" and master:
        return MasterWeightAdamW(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


# --------------------------------------------------------------------------- sides


class Side:
    """One model + optimizer under test: ``step(batch)`` runs one full optimizer step."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer, loss_fn: Callable, grad_clip: float):
        self.name, self.model, self.optimizer, self.loss_fn = name, model, optimizer, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_clip = grad_clip
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        loss = self.loss_fn(self.model, inputs, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _dsv3_loss(cfg: Config):
    lam, alpha = cfg.train.mtp_lambda, cfg.train.balance_loss_alpha

    def loss(model, inputs, labels):
        return model(inputs, labels).local_loss(lam, alpha)

    return loss


def _hf_loss(model, inputs, labels):
    return model(input_ids=inputs, labels=inputs).loss


def build_dsv3(cfg: Config, device: torch.device, precision: str, checkpointing: bool = False,
               compile_model: bool = False, seed: int = 0):
    """The dsv3 model in ``precision`` on ``device`` (routing biases and rope tables stay fp32)."""
    from dsv3.model import Transformer
    from dsv3.parallel.checkpointing import apply_activation_checkpointing

    model = Transformer(cfg.model)
    model.init_weights(seed=seed)
    model.to(device)
    if precision != "fp32":
        for p in model.parameters():
            p.data = p.data.to(DTYPES[precision])
    if checkpointing:
        apply_activation_checkpointing(model)
    model.train()
    if compile_model:
        model = torch.compile(model)
    return model


def build_hf(cfg: Config, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
             experts: str = "grouped_mm", attn: str = "sdpa"):
    """transformers' ``DeepseekV3ForCausalLM`` with the weights of a dsv3 state dict.

    The weights go through :func:`dsv3.convert.export_hf` (a temporary folder), so the peer
    is exactly what a user importing the exported checkpoint gets.

    Raises:
        DsvError: transformers is not installed.
    """
    try:
        from transformers import DeepseekV3ForCausalLM
    except ImportError as err:  # pragma: no cover - transformers is a test dependency
        raise DsvError(f"--vs hf needs transformers ({err}); pip install transformers") from err
    from safetensors.torch import save_file

    from dsv3.config import save_config
    from dsv3.convert import export_hf

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "ckpt"
        ck.mkdir()
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(ck / "model.safetensors"))
        save_config(Config(model=cfg.model), ck / "config.yaml")
        export_hf(ck, Path(tmp) / "hf")
        model = DeepseekV3ForCausalLM.from_pretrained(str(Path(tmp) / "hf"), attn_implementation=attn,
                                                      experts_implementation=experts, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.to(device)
    if dtype != torch.float32:
        model.to(dtype)
        for name, buf in model.named_buffers():  # routing bias stays fp32, as in dsv3
            if name.endswith("e_score_correction_bias"):
                buf.data = buf.data.float()
    return model.train()


def _dsv3_state(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    from dsv3.model import Transformer

    m = Transformer(cfg.model)
    m.init_weights(seed=seed)
    return m.state_dict()


def hf_parity(cfg: Config, seed: int = 0) -> float:
    """Max |logits difference| between dsv3 and the transformers model built by the bench
    (fp32, eval mode, same weights, one random batch)."""
    state = _dsv3_state(cfg, seed)
    ours = build_dsv3(cfg, torch.device("cpu"), "fp32", seed=seed).eval()
    hf = build_hf(cfg, state, torch.device("cpu"), torch.float32, experts="eager", attn="eager").eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, min(32, cfg.data.seq_len)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(ids) - hf(input_ids=ids).logits.float()).abs().max().item()


# --------------------------------------------------------------------------- memory


def activation_bytes(side: Side, inputs: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct tensor storages autograd saves for backward in one forward.

    Parameters are excluded (they exist anyway); with activation checkpointing only the
    block inputs are saved, so the figure drops. Runs one forward and its backward.
    """
    params = {p.untyped_storage().data_ptr() for p in side.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            try:
                s = t.untyped_storage()
            except RuntimeError:
                return t
            ptr = s.data_ptr()
            if ptr not in params:
                seen[ptr] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = side.loss_fn(side.model, inputs, labels)
    loss.backward()
    side.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- train


def _batches(cfg: Config, batch: int, seq: int, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(cfg.train.seed)
    out = []
    for _ in range(n):
        w = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=g)
        out.append((w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)))
    return out


def _time_sides(sides: list[Side], batches, steps: int, reps: int, warmup: int, device: torch.device,
                between: Callable[[], None] | None = None) -> None:
    """Warm up every side, then ``steps * reps`` timed steps per side, interleaved step by step
    (side A, side B, ..., side A, ...) so that load from other processes hits all sides alike.
    ``between`` runs after every ``steps`` rounds (used to re-probe the matmul peak)."""
    for s in sides:
        for i in range(warmup):
            s.step(*batches[i % len(batches)])
        _sync(device)
    for k in range(steps * reps):
        x, y = batches[k % len(batches)]
        for s in sides:
            t0, c0 = time.perf_counter(), time.process_time()
            s.step(x, y)
            _sync(device)
            s.times.append(time.perf_counter() - t0)
            s.cpu_times.append(time.process_time() - c0)
        if between is not None and (k + 1) % steps == 0:
            between()


def bench_train(cfg: Config, precision: str = "fp32", vs_hf: bool = False, compile_model: bool = False,
                steps: int = 3, reps: int = 3, warmup: int = 1, checkpointing: bool = True,
                hf_precisions: tuple[str, ...] | None = None, device: str | None = None) -> dict[str, Any]:
    """Time optimizer steps of dsv3 (and the transformers peer); see the module doc.

    Args:
        cfg: run config; batch = ``parallel.micro_batch_size``, sequence = ``data.seq_len``.
        precision: ``fp32`` or ``bf16``.
        vs_hf: also time transformers' DeepseekV3ForCausalLM in each setting.
        compile_model: ``torch.compile`` the dsv3 model.
        steps, reps, warmup: timed steps per round, rounds, untimed warm-up steps per side.
        checkpointing: also time dsv3 with activation checkpointing (not with ``compile_model``).
        hf_precisions: peer precisions (default: fp32, plus bf16 when ``precision`` is bf16).

    Returns:
        The result dict (written to JSON by :func:`write_result`).

    Raises:
        DsvError: unknown precision, or ``--vs hf`` with MTP depth > 0 cannot be compared.
    """
    if precision not in DTYPES:
        raise DsvError(f"--precision {precision} is not one of {sorted(DTYPES)}")
    if steps < 1 or reps < 1:
        raise DsvError("--steps and --reps must be >= 1")
    from dsv3.model import flops_per_token

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = copy.deepcopy(cfg)
    notes = []
    if vs_hf and cfg.model.mtp_depth:
        cfg.model.mtp_depth = 0
        notes.append("model.mtp_depth set to 0: transformers' DeepseekV3ForCausalLM has no MTP modules")
    B, T = cfg.parallel.micro_batch_size, cfg.data.seq_len
    seed = cfg.train.seed
    batches = _batches(cfg, B, T, 4, dev)
    peaks = machine_peaks(dev)
    fpt = flops_per_token(cfg.model, T)

    sides = []
    model = build_dsv3(cfg, dev, precision, compile_model=compile_model, seed=seed)
    sides.append(Side("dsv3", model, make_optimizer(model, cfg, precision, master=True), _dsv3_loss(cfg),
                      cfg.train.grad_clip))
    if checkpointing and not compile_model:  # (a second compilation would double the start-up time)
        m2 = build_dsv3(cfg, dev, precision, checkpointing=True, seed=seed)
        sides.append(Side("dsv3+ckpt", m2, make_optimizer(m2, cfg, precision, master=True), _dsv3_loss(cfg),
                          cfg.train.grad_clip))
    parity = None
    if vs_hf:
        parity = hf_parity(cfg, seed)
        state = _dsv3_state(cfg, seed)
        for hp in hf_precisions or (("fp32", "bf16") if precision == "bf16" else ("fp32",)):
            for ex in HF_EXPERTS:
                hm = build_hf(cfg, state, dev, DTYPES[hp], experts=ex)
                sides.append(Side(f"hf:{hp}:{ex}", hm, make_optimizer(hm, cfg, hp, master=False), _hf_loss,
                                  cfg.train.grad_clip))

    memory = {}
    for s in sides:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            s.step(*batches[0])
            _sync(dev)
            memory[s.name] = {"peak_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20}
        memory.setdefault(s.name, {})["activation_mib"] = activation_bytes(s, *batches[0]) / 2**20

    def reprobe():  # the best probe counts: other processes slow some of them down
        for name, value in machine_peaks(dev).items():
            peaks[name] = max(peaks[name], value)

    _time_sides(sides, batches, steps, reps, warmup, dev, between=reprobe)
    tokens = B * T
    rows = {}
    peak_ref = peaks[precision]
    for s in sides:
        t = min(s.times)  # the least disturbed step: other processes share this machine
        tps = tokens / t
        tflops = fpt * tps / 1e12
        rows[s.name] = {"step_time_s": t, "median_step_time_s": statistics.median(s.times),
                        "cpu_time_s": min(s.cpu_times), "tokens_per_s": tps,
                        "model_tflops": tflops, "mfu": tflops / peak_ref, "mfu_vs_bf16_peak": tflops / peaks["bf16"],
                        **memory.get(s.name, {})}
    result = {
        "kind": "train", "precision": precision, "device": _device_name(dev), "batch": B, "seq_len": T,
        "tokens_per_step": tokens, "flops_per_token": fpt, "peak_tflops": peaks, "compile": compile_model,
        "optimizer": "fp32-master AdamW (bf16 weights)" if precision != "fp32" else "AdamW (fp32)",
        "timing": f"best of {steps * reps} steps per side, interleaved step by step, after {warmup} warm-up step(s); "
                  f"peaks: best of {reps + 1} probes spread over the run",
        "results": rows, "notes": notes, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "rss_peak_mib": _rss_mib(), "model": dict(vars(cfg.model)),
    }
    result.update(rows["dsv3"])
    if vs_hf:
        hf_rows = {k: v for k, v in rows.items() if k.startswith("hf:")}
        best = max(hf_rows, key=lambda k: hf_rows[k]["tokens_per_s"])
        result["hf_parity_max_abs_logit_diff"] = parity
        result["hf_best"] = best
        result["hf_tokens_per_s"] = hf_rows[best]["tokens_per_s"]
        result["speedup_vs_hf"] = rows["dsv3"]["tokens_per_s"] / hf_rows[best]["tokens_per_s"]
        # the same on process CPU time: with one thread it does not count time spent waiting
        # for a core that another process holds, so it is the steadier figure on a busy machine
        best_cpu = min(hf_rows, key=lambda k: hf_rows[k]["cpu_time_s"])
        result["hf_best_by_cpu_time"] = best_cpu
        result["speedup_vs_hf_cpu_time"] = hf_rows[best_cpu]["cpu_time_s"] / rows["dsv3"]["cpu_time_s"]
        import transformers

        result["transformers"] = transformers.__version__
    return result


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- decode


def bench_decode(cfg: Config, precision: str = "fp32", vs_hf: bool = False, batches: tuple[int, ...] = (1, 8),
                 prompt_len: int = 32, new_tokens: int = 64, reps: int = 3, device: str | None = None,
                 compile_model: bool = False) -> dict[str, Any]:
    """Greedy decode tokens/s for each batch size, dsv3's :func:`dsv3.generation.generate_batch`
    against transformers' ``generate`` on the same weights (same prompts, same number of new
    tokens, interleaved repetitions, best run).

    Cache bytes per token are read from the preallocated latent cache tensors and checked
    against ``(kv_lora_rank + qk_rope_head_dim) * n_layers * bytes per value``.

    ``compile_model``: decode with ``torch.compile(model, dynamic=True)`` (one compilation
    for all cache lengths and batch sizes; its time is spent in the untimed warm-up run).

    Raises:
        DsvError: bad precision or lengths.
    """
    from dsv3.generation import generate_batch

    if precision not in DTYPES:
        raise DsvError(f"--precision {precision} is not one of {sorted(DTYPES)}")
    if prompt_len + new_tokens > cfg.model.max_seq_len:
        raise DsvError(f"prompt {prompt_len} + {new_tokens} new tokens exceed model.max_seq_len={cfg.model.max_seq_len}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[precision]
    cfg = copy.deepcopy(cfg)
    seed = cfg.train.seed
    model = build_dsv3(cfg, dev, precision, seed=seed).eval()
    cache = model.new_cache(1, 16)
    per_token = sum(c.kv[0, 0].nbytes + c.pe[0, 0].nbytes for c in cache)
    formula = (cfg.model.kv_lora_rank + cfg.model.qk_rope_head_dim) * cfg.model.n_layers * dtype.itemsize
    if per_token != formula:
        raise AssertionError(f"cache bytes per token {per_token} != formula {formula}")
    runner = torch.compile(model, dynamic=True) if compile_model else model
    hf_models = {}
    if vs_hf:
        state = model.state_dict()
        hf_models = {ex: build_hf(cfg, state, dev, dtype, experts=ex).eval() for ex in HF_EXPERTS}
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, dict[str, Any]] = {}
    for B in batches:
        prompts = torch.randint(0, cfg.model.vocab_size, (B, prompt_len), generator=g)
        runs: dict[str, Callable[[], list[list[int]]]] = {
            "dsv3": lambda p=prompts: [r.ids for r in generate_batch(runner, p.tolist(), new_tokens, temperature=0)],
        }
        for ex, hm in hf_models.items():
            def run_hf(p=prompts, hm=hm):
                with torch.no_grad():
                    out = hm.generate(p.to(dev), attention_mask=torch.ones_like(p).to(dev), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)
                return out[:, prompt_len:].tolist()
            runs[f"hf:{ex}"] = run_hf
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        outs = {}
        for k, f in runs.items():  # warm-up
            outs[k] = f()
        for _ in range(reps):
            for k, f in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                _sync(dev)
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        for k in runs:
            t = min(times[k])
            rows[f"{k}@b{B}"] = {"seconds": t, "cpu_seconds": min(cpu[k]), "tokens_per_s": B * new_tokens / t,
                                 "same_tokens_as_dsv3": outs[k] == outs["dsv3"]}
    result = {"kind": "decode", "precision": precision, "device": _device_name(dev), "prompt_len": prompt_len,
              "new_tokens": new_tokens, "compile": compile_model, "threads": torch.get_num_threads(),
              "cache_bytes_per_token": per_token, "cache_bytes_formula": formula,
              "results": rows, "torch": torch.__version__, "model": dict(vars(cfg.model))}
    for B in batches:
        result[f"tokens_per_s_b{B}"] = rows[f"dsv3@b{B}"]["tokens_per_s"]
        if vs_hf:
            hf_best = max((v["tokens_per_s"] for k, v in rows.items() if k.startswith("hf:") and k.endswith(f"@b{B}")))
            result[f"hf_tokens_per_s_b{B}"] = hf_best
            result[f"speedup_vs_hf_b{B}"] = rows[f"dsv3@b{B}"]["tokens_per_s"] / hf_best
            hf_cpu = min(v["cpu_seconds"] for k, v in rows.items() if k.startswith("hf:") and k.endswith(f"@b{B}"))
            result[f"speedup_vs_hf_cpu_time_b{B}"] = hf_cpu / rows[f"dsv3@b{B}"]["cpu_seconds"]
    return result


# --------------------------------------------------------------------------- data


def bench_data(cfg: Config) -> dict[str, Any]:
    """The data pipeline benchmark: :func:`data_pipeline.bench.bench_data`.

    Raises:
        DsvError: this installation has no ``data_pipeline.bench``.
    """
    try:
        from data_pipeline.bench import bench_data as run
    except ImportError as err:
        raise DsvError(f"dsv3 bench data needs data_pipeline.bench.bench_data, which this installation lacks ({err}); "
                       "update dsv3 to a version with the data pipeline benchmark") from err
    result = dict(run(cfg))
    result.setdefault("kind", "data")
    return result


# --------------------------------------------------------------------------- output


def result_path(out_dir: str | Path, kind: str, config_name: str, precision: str, when: datetime | None = None) -> Path:
    """``<out_dir>/<kind>-<config>-<precision>-<YYYYmmdd-HHMMSS>.json``."""
    when = when or datetime.now(timezone.utc)
    return Path(out_dir) / f"{kind}-{config_name}-{precision}-{when.strftime('%Y%m%d-%H%M%S')}.json"


def write_result(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` as JSON atomically; returns the path."""
    atomic_write_text(path, json.dumps(result, indent=1, sort_keys=False, default=str) + "\n")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a result: one row per side (or per key for flat results)."""
    lines = []
    rows = result.get("results")
    if isinstance(rows, dict) and rows:
        cols = []
        for r in rows.values():
            for c in r:
                if c not in cols and not isinstance(r[c], (dict, list)):
                    cols.append(c)
        table = [["side", *cols]] + [[name, *(_fmt(r.get(c, "")) for c in cols)] for name, r in rows.items()]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            lines.append("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        lines.append("")
    flat = {k: v for k, v in result.items() if k not in ("results", "model") and not isinstance(v, (dict, list))}
    if isinstance(result.get("peak_tflops"), dict):
        flat.update({f"peak_tflops_{k}": v for k, v in result["peak_tflops"].items()})
    w = max((len(k) for k in flat), default=0)
    lines += [f"{k.ljust(w)}  {_fmt(v)}" for k, v in flat.items()]
    return "\n".join(lines)


def run_cli(kind: str, config: str | None, overrides: list[str], precision: str = "fp32", vs: str | None = None,
            compile_model: bool = False, steps: int = 3, reps: int = 3, out_dir: str = "bench") -> Path:
    """``dsv3 bench KIND``: run, write the JSON result, print the table; returns the file."""
    cfg = load_config(config, overrides)
    compile_model = compile_model or cfg.train.compile
    if vs not in (None, "hf"):
        raise DsvError(f"--vs {vs}: the only peer is 'hf' (transformers)")
    name = Path(config).stem if config else "tiny"
    if kind == "train":
        result = bench_train(cfg, precision, vs_hf=vs == "hf", compile_model=compile_model, steps=steps, reps=reps)
    elif kind == "decode":
        result = bench_decode(cfg, precision, vs_hf=vs == "hf", reps=reps, compile_model=compile_model)
    elif kind == "data":
        result = bench_data(cfg)
    else:
        raise DsvError(f"unknown benchmark {kind!r}; use train, decode or data")
    result["config"] = name
    result["command"] = "dsv3 bench " + " ".join(
        [kind] + ([f"--config {config}"] if config else []) + ([f"--vs {vs}"] if vs else [])
        + ([f"--precision {precision}"] if kind != "data" else []) + (["--compile"] if compile_model else [])
        + ([f"--steps {steps}", f"--reps {reps}"] if kind == "train" else []) + list(overrides))
    path = write_result(result, result_path(out_dir, kind, name, precision if kind != "data" else "data"))
    print(format_table(result))
    print(f"wrote {path}")
    return path
