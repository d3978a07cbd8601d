"""The benchmark runs: ``bench train``, ``bench decode``, ``bench data``."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from dsv3.bench.profile import profile_train
from dsv3.bench.sides import (
    HF_EXPERTS,
    Side,
    activation_bytes,
    build_dsv3,
    build_hf,
    dsv3_loss,
    dsv3_state,
    hf_loss,
    hf_parity,
    make_optimizer,
    rss_mib,
)
from dsv3.config import Config
from dsv3.errors import DsvError
from dsv3.hardware import DTYPES, device_name, machine_peaks, sync

# --------------------------------------------------------------------------- train


def synthetic_batches(
    cfg: Config, batch: int, seq: int, n: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(cfg.train.seed)
    out = []
    for _ in range(n):
        w = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=g)
        out.append((w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)))
    return out


def _time_sides(
    sides: list[Side],
    batches,
    steps: int,
    reps: int,
    warmup: int,
    device: torch.device,
    between: Callable[[], None] | None = None,
) -> None:
    """Warm up every side, then ``steps * reps`` timed steps per side, interleaved step by step
    (side A, side B, ..., side A, ...) so that load from other processes hits all sides alike.
    ``between`` runs after every ``steps`` rounds (used to re-probe the matmul peak)."""
    for s in sides:
        for i in range(warmup):
            s.step(*batches[i % len(batches)])
        sync(device)
    for k in range(steps * reps):
        x, y = batches[k % len(batches)]
        for s in sides:
            t0, c0 = time.perf_counter(), time.process_time()
            s.step(x, y)
            sync(device)
            s.times.append(time.perf_counter() - t0)
            s.cpu_times.append(time.process_time() - c0)
        if between is not None and (k + 1) % steps == 0:
            between()


#: bytes of model state per parameter of a training side: bf16 weights with fp32 masters
#: (weight, gradient, master, its gradient, two moments), fp32, and pure bf16 (the peers)
STATE_BYTES = {("bf16", True): 20, ("fp32", True): 16, ("fp32", False): 16, ("bf16", False): 8}


def side_room(
    device_bytes: int | None, params: int, precision: str, notes: list[str]
) -> Callable[[str, str, bool], bool]:
    """A check ``room(name, precision, master)`` that one more side's model state
    (:data:`STATE_BYTES` per parameter; the first side, dsv3 in ``precision``, already counted)
    keeps every side's state within 3/4 of ``device_bytes`` (the rest for activations); a side
    that does not fit is noted in ``notes`` and left out. ``device_bytes`` None (CPU, whose
    benchmarks are small): every side fits."""
    if device_bytes is None:
        return lambda name, prec, master: True
    budget = device_bytes * 3 // 4
    used = [params * STATE_BYTES[(precision, True)]]

    def room(name: str, prec: str, master: bool) -> bool:
        need = params * STATE_BYTES[(prec, master)]
        if used[0] + need > budget:
            notes.append(f"{name} left out: its model state ({need / 2**30:.1f} GiB) would not fit beside the others")
            return False
        used[0] += need
        return True

    return room


def bench_train(
    cfg: Config,
    precision: str = "fp32",
    vs_hf: bool = False,
    compile_model: bool = False,
    steps: int = 3,
    reps: int = 3,
    warmup: int = 1,
    checkpointing: bool = True,
    hf_precisions: tuple[str, ...] | None = None,
    device: str | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Time optimizer steps of dsv3 (and the transformers peer); see the module doc.

    Args:
        cfg: run config; batch = ``parallel.micro_batch_size``, sequence = ``data.seq_len``.
        precision: ``fp32`` or ``bf16``.
        vs_hf: also time transformers' DeepseekV3ForCausalLM in each setting.
        compile_model: ``torch.compile`` the dsv3 model and each transformers peer (its sides
            are then named ``hf:<precision>:<experts>:compiled``).
        steps, reps, warmup: timed steps per round, rounds, untimed warm-up steps per side.
        checkpointing: also time dsv3 with activation checkpointing (not with ``compile_model``).
        hf_precisions: peer precisions (default: fp32, plus bf16 when ``precision`` is bf16).
        profile: after the timed steps, profile extra dsv3 steps
            (:func:`dsv3.bench.profile.profile_train`); its breakdown is returned under the key
            ``profile`` (which :func:`dsv3.bench.run_cli` writes to its own file).

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
    batches = synthetic_batches(cfg, B, T, 4, dev)
    peaks = machine_peaks(dev)
    fpt = flops_per_token(cfg.model, T)

    sides = []
    model = build_dsv3(cfg, dev, precision, compile_model=compile_model, seed=seed)
    sides.append(
        Side("dsv3", model, make_optimizer(model, cfg, precision, master=True), dsv3_loss(cfg), cfg.train.grad_clip)
    )
    cuda_bytes = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    room = side_room(cuda_bytes, sum(p.numel() for p in model.parameters()), precision, notes)
    if checkpointing and compile_model:
        notes.append("no dsv3+ckpt side with --compile (the model is not compiled twice)")
    if checkpointing and not compile_model and room("dsv3+ckpt", precision, True):  # (not compiled twice)
        m2 = build_dsv3(cfg, dev, precision, checkpointing=True, seed=seed)
        sides.append(
            Side("dsv3+ckpt", m2, make_optimizer(m2, cfg, precision, master=True), dsv3_loss(cfg), cfg.train.grad_clip)
        )
    parity = None
    if vs_hf:
        parity = hf_parity(cfg, seed)
        state = dsv3_state(cfg, seed)
        for hp in hf_precisions or (("fp32", "bf16") if precision == "bf16" else ("fp32",)):
            for ex in HF_EXPERTS:
                name = f"hf:{hp}:{ex}" + (":compiled" if compile_model else "")
                if not room(name, hp, False):
                    continue
                hm = build_hf(cfg, state, dev, DTYPES[hp], experts=ex)
                opt = make_optimizer(hm, cfg, hp, master=False)  # (on the parameters: before compiling)
                hm = torch.compile(hm) if compile_model else hm  # the peer compiled too: like for like
                sides.append(Side(name, hm, opt, hf_loss, cfg.train.grad_clip))

    memory = {}
    for s in sides:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            s.step(*batches[0])
            sync(dev)
            memory[s.name] = {"peak_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20}
        memory.setdefault(s.name, {})["activation_mib"] = activation_bytes(s, *batches[0]) / 2**20

    def reprobe():  # the best probe counts: other processes slow some of them down
        for name, value in machine_peaks(dev).items():
            peaks[name] = max(peaks[name], value)

    _time_sides(sides, batches, steps, reps, warmup, dev, between=reprobe)
    prof = profile_train(sides[0], batches, dev, peaks[precision]) if profile else None
    tokens = B * T
    rows = {}
    peak_ref = peaks[precision]
    for s in sides:
        t = min(s.times)  # the least disturbed step: other processes share this machine
        tps = tokens / t
        tflops = fpt * tps / 1e12
        rows[s.name] = {
            "step_time_s": t,
            "median_step_time_s": statistics.median(s.times),
            "cpu_time_s": min(s.cpu_times),
            "tokens_per_s": tps,
            "model_tflops": tflops,
            "mfu": tflops / peak_ref,
            "mfu_vs_bf16_peak": tflops / peaks["bf16"],
            **memory.get(s.name, {}),
        }
    result = {
        "kind": "train",
        "precision": precision,
        "device": device_name(dev),
        "batch": B,
        "seq_len": T,
        "tokens_per_step": tokens,
        "flops_per_token": fpt,
        "peak_tflops": peaks,
        "compile": compile_model,
        "optimizer": "fp32-master AdamW (bf16 weights)" if precision != "fp32" else "AdamW (fp32)",
        "timing": f"best of {steps * reps} steps per side, interleaved step by step, after {warmup} warm-up step(s); "
        f"peaks: best of {reps + 1} probes spread over the run",
        "results": rows,
        "notes": notes,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rss_peak_mib": rss_mib(),
        "model": dict(vars(cfg.model)),
    }
    result.update(rows["dsv3"])
    if prof is not None:
        result["profile"] = {
            "precision": precision,
            "tokens_per_step": tokens,
            "model_flops_per_step": fpt * tokens,
            **prof,
        }
    hf_rows = {k: v for k, v in rows.items() if k.startswith("hf:")}
    if vs_hf and hf_rows:
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


# --------------------------------------------------------------------------- decode


def bench_decode(
    cfg: Config,
    precision: str = "fp32",
    vs_hf: bool = False,
    batches: tuple[int, ...] = (1, 8),
    prompt_len: int = 32,
    new_tokens: int = 64,
    reps: int = 3,
    device: str | None = None,
    compile_model: bool = False,
    cuda_graph: bool = False,
) -> dict[str, Any]:
    """Greedy decode tokens/s for each batch size, dsv3's :func:`dsv3.generation.generate_batch`
    against transformers' ``generate`` on the same weights (same prompts, same number of new
    tokens, interleaved repetitions, best run).

    Cache bytes per token are read from the preallocated latent cache tensors and checked
    against ``(kv_lora_rank + qk_rope_head_dim) * n_layers * bytes per value``.

    ``compile_model``: decode with ``torch.compile(model, dynamic=True)`` (one compilation
    for all cache lengths and batch sizes; its time is spent in the untimed warm-up run).
    ``cuda_graph``: decode at fixed shapes (``generate_batch(cuda_graph=True)``: one captured
    CUDA graph per step on a GPU, captured in the warm-up run; the fixed-shape step eagerly
    elsewhere).

    Raises:
        DsvError: bad precision or lengths, or ``cuda_graph`` with ``compile_model``.
    """
    from dsv3.generation import generate_batch

    if precision not in DTYPES:
        raise DsvError(f"--precision {precision} is not one of {sorted(DTYPES)}")
    if cuda_graph and compile_model:
        raise DsvError("--cuda-graph decodes the eager model; drop --compile (or --cuda-graph)")
    if prompt_len + new_tokens > cfg.model.max_seq_len:
        raise DsvError(
            f"prompt {prompt_len} + {new_tokens} new tokens exceed model.max_seq_len={cfg.model.max_seq_len}"
        )
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
            "dsv3": lambda p=prompts: [
                r.ids for r in generate_batch(runner, p.tolist(), new_tokens, temperature=0, cuda_graph=cuda_graph)
            ],
        }
        for ex, hm in hf_models.items():

            def run_hf(p=prompts, hm=hm):
                with torch.no_grad():
                    out = hm.generate(
                        p.to(dev),
                        attention_mask=torch.ones_like(p).to(dev),
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                    )
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
                sync(dev)
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        for k in runs:
            t = min(times[k])
            rows[f"{k}@b{B}"] = {
                "seconds": t,
                "cpu_seconds": min(cpu[k]),
                "tokens_per_s": B * new_tokens / t,
                "same_tokens_as_dsv3": outs[k] == outs["dsv3"],
            }
    result = {
        "kind": "decode",
        "precision": precision,
        "device": device_name(dev),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "compile": compile_model,
        "cuda_graph": cuda_graph,
        "threads": torch.get_num_threads(),
        "cache_bytes_per_token": per_token,
        "cache_bytes_formula": formula,
        "results": rows,
        "torch": torch.__version__,
        "model": dict(vars(cfg.model)),
    }
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
        raise DsvError(
            f"dsv3 bench data needs data_pipeline.bench.bench_data, which this installation lacks ({err}); "
            "update dsv3 to a version with the data pipeline benchmark"
        ) from err
    result = dict(run(cfg))
    result.setdefault("kind", "data")
    return result
