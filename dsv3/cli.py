"""The ``dsv3`` command line (docs/design.md). Bad input ends with one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from dsv3.errors import DsvError, StopRequested, TrainingDiverged


def _add_config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--config",
        required=required,
        help="YAML run config (see configs/)" + ("" if required else "; default: the tiny CPU model"),
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=50")


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="DEV=SIZE,...",
        help="dsv3 checkpoints: place whole blocks on GPUs, then CPU memory, then disk (needs "
        "--offload-folder) within these limits, e.g. 0=20GiB,cpu=64GiB (KB/MB/GB = 1000^n, "
        "KiB/MiB/GiB = 1024^n)",
    )
    p.add_argument(
        "--offload-folder",
        default=None,
        metavar="DIR",
        help="dsv3 checkpoints: folder for the weights that fit in no memory; alone, it places "
        "blocks by the memory accelerate finds free",
    )


def _warn_if_incomplete(path: str) -> None:
    """One warning line on stderr when ``path`` resolves to a step folder of a training run
    that is not a complete, intact checkpoint (a save that was interrupted or damaged later)."""
    from pathlib import Path

    from dsv3.checkpoint import checkpoint_problem, resolve_checkpoint

    try:
        folder = resolve_checkpoint(Path(path))
    except DsvError:
        return  # not a dsv3 checkpoint: the loader reports it
    if folder.parent.name == "checkpoints" and folder.name.startswith("step_"):
        problem = checkpoint_problem(folder)
        if problem:
            print(f"warning: checkpoint {folder} is incomplete or damaged: {problem}", file=sys.stderr, flush=True)


def _load_for_inference(args):
    """load_model with the --max-memory / --offload-folder placement, if any."""
    from dsv3 import load_model
    from dsv3.checkpoint.offload import parse_max_memory

    max_memory = parse_max_memory(args.max_memory) if args.max_memory is not None else None
    _warn_if_incomplete(args.ckpt)
    return load_model(args.ckpt, max_memory=max_memory, offload_folder=args.offload_folder)


def _load_tokenizer_for(model, path):
    """The tokenizer of ``path``, checked to fit the model's embedding."""
    from dsv3 import load_tokenizer

    tok = load_tokenizer(path)
    if tok.vocab_size > model.cfg.vocab_size:
        raise DsvError(
            f"the tokenizer of {path} has {tok.vocab_size} entries but the model's vocab_size is "
            f"{model.cfg.vocab_size}; put the tokenizer these weights were trained with next to them"
        )
    return tok


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int | None, temperature: float) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help="token limit" + ("" if max_new_tokens else " per reply (default: min(256, max_seq_len/2))"),
    )
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on seen ids; 1 = off")
    p.add_argument("--seed", type=int, default=None)


def _check_sampling(args, max_seq_len: int) -> None:
    if not 0 < args.max_new_tokens < max_seq_len:
        raise DsvError(
            f"--max-new-tokens {args.max_new_tokens} must be positive and below the model's max_seq_len {max_seq_len}"
        )
    if not 0 < args.top_p <= 1:
        raise DsvError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.temperature < 0 or args.top_k < 0:
        raise DsvError("--temperature and --top-k must be >= 0")
    if args.repetition_penalty <= 0:
        raise DsvError(f"--repetition-penalty {args.repetition_penalty} must be positive (1 = off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="Train and run DeepSeek-V3-architecture language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="corpus -> tokenizer -> packed token shards")
    _add_config_args(p, required=True)
    p = sub.add_parser("train", help="pre-train (prepares data first when needed; resumes from out_dir)")
    _add_config_args(p, required=False)
    p.add_argument("--no-sample", action="store_true", help="do not print a generated sample at the end")
    p.add_argument("--check", type=int, default=None, metavar="WORLD", help="only check the config and its "
                   "parallel layout for WORLD processes, then exit (the launch scripts run this first)")  # fmt: skip
    # the deepspeed launcher appends --local_rank=N (the rank is also in $LOCAL_RANK)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("sft", help="supervised fine-tuning on conversations (loss on assistant replies only)")
    _add_config_args(p, required=True)
    p.add_argument("--no-sample", action="store_true", help="do not print a sample reply at the end")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint folder or Hugging Face folder")
    p.add_argument("--prompt", required=True)
    _add_sampling_args(p, max_new_tokens=100, temperature=0.8)
    _add_placement_args(p)
    p.add_argument(
        "--speculative",
        choices=["mtp"],
        default=None,
        help="draft with the MTP module, verify with the main model (greedy only; stats on stderr)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="with --speculative: also decode plainly, check the outputs match, report the speed-up",
    )
    p.add_argument("--cuda-graph", action="store_true", help="decode each step as one replayed CUDA graph (GPU)")
    p = sub.add_parser("chat", help="interactive chat on stdin/stdout (works with a pipe)")
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint folder or Hugging Face folder")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--jsonl",
        action="store_true",
        help='for scripts: read {"content": ...} or {"reset": true} per line, write one JSON line per reply',
    )
    _add_sampling_args(p, max_new_tokens=None, temperature=0.7)
    _add_placement_args(p)
    p = sub.add_parser("convert", help="import / export the Hugging Face DeepSeek-V3 layout")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face folder (config.json + safetensors) to import")
    src.add_argument("--to-hf", metavar="CKPT", help="dsv3 run directory or checkpoint folder to export")
    p.add_argument("--out", required=True, metavar="DIR", help="new output folder")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp32"], default="keep", help="weight dtype to write")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="export shard size limit (GiB)")
    p = sub.add_parser("plan", help="parameter counts, FLOPs and memory per GPU for a layout")
    _add_config_args(p, required=True)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory-gib", type=float, default=None)
    p.add_argument("--propose", action="store_true", help="search layouts that fit --gpu-memory-gib and rank them")
    p.add_argument("--host-memory-gib", type=float, default=None, help="host memory per node that layouts must fit")
    p.add_argument("--disk-gib", type=float, default=None, help="NVMe space per node that layouts must fit")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs (ranks) per node (default min(gpus, 8))")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="a CPU run: --gpus processes on CPU hosts; report the peak resident memory per process",
    )
    p.add_argument(
        "--sub-group-size",
        type=float,
        default=None,
        help="ZeRO-3 sub_group_size in elements, sizes the NVMe swap buffers "
        "(default: the engine's, 1e8 with offload_optimizer nvme, else 1e9)",
    )
    p.add_argument(
        "--dispatch-dtype",
        choices=["fp8", "bf16", "fp32"],
        default=None,
        help="all-to-all dispatch dtype (default train.precision; DeepSeek-V3 used fp8)",
    )
    p.add_argument(
        "--combine-dtype",
        choices=["fp8", "bf16", "fp32"],
        default=None,
        help="all-to-all combine dtype (default train.precision)",
    )
    p = sub.add_parser("eval", help="validation loss per position range of long windows (context extension)")
    p.add_argument("--ckpt", required=True, help="dsv3 run directory or checkpoint folder")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's data.seq_len)")
    p.add_argument("--ranges", type=int, default=4, help="equal position ranges to report (default 4)")
    p.add_argument("--windows", type=int, default=None, help="validation windows to read (default all)")
    p.add_argument(
        "--rope-factor",
        type=float,
        default=None,
        help="apply YaRN with this scale to the weights (default: the checkpoint's)",
    )
    p.add_argument(
        "--original-seq-len", type=int, default=None, help="YaRN's pre-extension context (with --rope-factor)"
    )
    p.add_argument("--data-from", default=None, help="run whose validation split to read (default --ckpt's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p = sub.add_parser(
        "bench", help="benchmarks: training step, decoding, data pipeline, memory per rank (JSON under bench/)"
    )
    p.add_argument("kind", choices=["train", "decode", "data", "memory"])
    _add_config_args(p, required=False)
    p.add_argument(
        "--vs", choices=["hf"], default=None, help="also run transformers' DeepseekV3ForCausalLM; print the ratio"
    )
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32", help="auto: the faster one here")
    p.add_argument("--compile", action="store_true", help="torch.compile dsv3 (train, decode; train: the peers too)")
    p.add_argument("--cuda-graph", action="store_true", help="decode: fixed-shape steps, one CUDA graph on a GPU")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per round (train, default 3); steps per layout (memory, 2)"
    )
    p.add_argument(
        "--layouts",
        action="append",
        default=None,
        metavar="SPEC[;SPEC...]",
        help="memory: layouts to measure, separated by ';' (or the option repeated), each procs=N,KEY=VALUE,... "
        "(e.g. 'procs=1,zero=0;procs=2,ep=2,zero=1,precision=bf16'); 'default' and 'offload' name the built-in lists",
    )
    p.add_argument("--reps", type=int, default=2, help="rounds (train) / repetitions (decode)")
    p.add_argument("--out-dir", default="bench", help="folder for the JSON results")
    p.add_argument("--profile", action="store_true", help="train: per-operator breakdown to <stem>.profile.json")
    return parser


def _cmd_eval(args) -> None:
    import json

    from dsv3.checkpoint import read_checkpoint_config, resolve_checkpoint
    from dsv3.evaluation import evaluate_positions

    seq_len = args.seq_len or read_checkpoint_config(resolve_checkpoint(args.ckpt)).data.seq_len
    if seq_len < 2 or args.ranges < 1:
        raise DsvError(f"--seq-len {seq_len} and --ranges {args.ranges} must be at least 2 and 1")
    out = evaluate_positions(
        args.ckpt, seq_len, args.ranges, args.windows, args.rope_factor, args.original_seq_len, args.data_from
    )
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"{out['ckpt']}: {out['windows']} validation windows of {seq_len} tokens, rope_factor {out['rope_factor']:g}"
        f" (original_seq_len {out['original_seq_len']})"
    )
    print(f"{'positions':<14}loss")
    for row in out["ranges"]:
        print(f"{row['positions']:<14}{row['loss']:.4f}")
    print(f"{'all':<14}{out['loss']:.4f}")


def _cmd_plan(args) -> None:
    from dsv3.config import load_config
    from dsv3.plan import plan

    print(
        plan(
            load_config(args.config, args.overrides),
            args.gpus,
            args.gpu_memory_gib,
            args.propose,
            args.dispatch_dtype,
            args.combine_dtype,
            host_memory_gib=args.host_memory_gib,
            disk_gib=args.disk_gib,
            gpus_per_node=args.gpus_per_node,
            cpu=args.cpu,
            sub_group_size=args.sub_group_size,
        )
    )


def _cmd_bench(args) -> None:
    from dsv3.bench import run_cli

    run_cli(
        args.kind,
        args.config,
        args.overrides,
        args.precision,
        args.vs,
        args.compile,
        args.steps,
        args.reps,
        args.out_dir,
        profile=args.profile,
        layouts=None if args.layouts is None else [x for arg in args.layouts for x in arg.split(";") if x.strip()],
        cuda_graph=args.cuda_graph,
    )


def _cmd_convert(args) -> None:
    import torch

    from dsv3.checkpoint import export_hf, import_hf

    dtype = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.from_hf:
        out = import_hf(args.from_hf, args.out, dtype=dtype)
    else:
        if args.max_shard_gb <= 0:
            raise DsvError(f"--max-shard-gb {args.max_shard_gb} must be positive")
        _warn_if_incomplete(args.to_hf)
        out = export_hf(args.to_hf, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30), dtype=dtype)
    print(f"wrote {out}")


def _cmd_prepare(args) -> None:
    from data_pipeline.prepare import prepare, prepare_rank_world
    from dsv3.config import load_config

    cfg = load_config(args.config, args.overrides)
    rank, world = prepare_rank_world(cfg.data)
    print(prepare(cfg, rank=rank, world=world))


def _print_sample(run_dir, cfg) -> None:
    from dsv3 import load_model, load_tokenizer
    from dsv3.generation import generate

    model = load_model(run_dir)
    tok = load_tokenizer(run_dir)
    prompt = cfg.train.sample_prompt
    ids = generate(
        model,
        tok.encode(prompt, bos=tok.add_bos),
        cfg.train.sample_tokens,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        seed=cfg.train.seed,
        eos_ids=[tok.eos_id],
    )
    print("----- sample -----")
    print(prompt + tok.decode(ids))
    print("------------------", flush=True)


def _cmd_train(args) -> None:
    from dsv3.config import load_config
    from dsv3.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.check is not None:
        from dsv3.parallel.layout import check_launch

        check_launch(cfg, args.check)
        if cfg.train.init_from:  # the model section may change only the context-extension fields
            from dsv3.checkpoint import open_weights
            from dsv3.config import extend_model

            extend_model(open_weights(cfg.train.init_from)[0], cfg, str(cfg.train.init_from))
        from dsv3.training.schedule import Schedules

        Schedules(cfg, args.check // cfg.parallel.pp)  # the batch ramp and lr phases on this layout
        print(f"dsv3: the config and its layout are fine for {args.check} process(es)")
        return
    run_dir = train(cfg)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not args.no_sample:
        _print_sample(run_dir, cfg)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _cmd_sft(args) -> None:
    from dsv3.config import load_config
    from dsv3.training.trainer import train

    cfg = load_config(args.config, [*args.overrides, "data.format=chat"])
    if not cfg.train.init_from:
        raise DsvError("dsv3 sft needs train.init_from=DIR: the run, checkpoint or Hugging Face folder to fine-tune")
    run_dir = train(cfg)
    import torch.distributed as dist

    if (not dist.is_initialized() or dist.get_rank() == 0) and not args.no_sample:
        from dsv3 import load_model, load_tokenizer
        from dsv3.chat_format import chat_stop_ids, encode_chat
        from dsv3.generation import generate

        model, tok = load_model(run_dir), load_tokenizer(run_dir)
        question = cfg.train.sample_prompt
        ids = encode_chat(tok, [{"role": "user", "content": question}])
        stops = chat_stop_ids(tok)
        reply = generate(model, ids, cfg.train.sample_tokens, temperature=0, eos_ids=stops, repetition_penalty=1.3)
        answer = tok.decode([i for i in reply if i not in stops])
        print(f"----- sample -----\nuser: {question}\nassistant: {answer}\n------------------", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _cmd_generate(args) -> None:
    import time

    from dsv3.generation import check_speculative, generate, generate_speculative

    if args.max_new_tokens <= 0:
        raise DsvError(f"--max-new-tokens {args.max_new_tokens} must be positive")
    if args.compare and not args.speculative:
        raise DsvError("--compare only applies with --speculative mtp; add it or drop --compare")
    if args.cuda_graph and args.speculative:
        raise DsvError("--cuda-graph applies to plain decoding; drop --speculative or --cuda-graph")
    if not args.prompt:
        raise DsvError("--prompt is empty; give the text to continue")
    model = _load_for_inference(args)
    tok = _load_tokenizer_for(model, args.ckpt)
    _check_sampling(args, model.cfg.max_seq_len)
    prompt = tok.encode(args.prompt, bos=tok.add_bos)
    if not prompt:
        raise DsvError(f"--prompt {args.prompt!r} encodes to no tokens; give the text to continue")
    if not args.speculative:
        ids = generate(
            model,
            prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
            eos_ids=[tok.eos_id],
            repetition_penalty=args.repetition_penalty,
            cuda_graph=args.cuda_graph,
        )
        print(args.prompt + tok.decode(ids))
        return
    check_speculative(model, args.temperature)
    if args.compare:
        generate(model, prompt, 2, 0.0)  # warm-up, so neither timing pays the first-call cost
    res, st = generate_speculative(model, prompt, args.max_new_tokens, [tok.eos_id], args.repetition_penalty)
    print(args.prompt + tok.decode(res.ids), flush=True)
    print(
        f"speculative mtp: {st.accepted}/{st.drafted} drafts accepted ({st.acceptance_rate:.1%}), "
        f"{st.tokens_per_forward:.2f} tokens per main-model forward, {st.tokens} tokens in {st.seconds:.2f} s "
        f"({st.tokens / max(st.seconds, 1e-9):.1f} tokens/s)",
        file=sys.stderr,
    )
    if args.compare:
        t0 = time.perf_counter()
        plain = generate(
            model, prompt, args.max_new_tokens, 0.0, eos_ids=[tok.eos_id], repetition_penalty=args.repetition_penalty
        )
        dt = time.perf_counter() - t0
        print(
            f"plain greedy: {len(plain)} tokens in {dt:.2f} s; speed-up {dt / max(st.seconds, 1e-9):.2f}x; "
            f"outputs {'identical' if plain == res.ids else 'DIFFER'}",
            file=sys.stderr,
        )


def _cmd_chat(args) -> None:
    from dsv3.chat import chat_loop

    model = _load_for_inference(args)
    tok = _load_tokenizer_for(model, args.ckpt)
    if args.max_new_tokens is None:
        args.max_new_tokens = min(256, model.cfg.max_seq_len // 2)
    _check_sampling(args, model.cfg.max_seq_len)
    chat_loop(
        model,
        tok,
        args.system,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.repetition_penalty,
        jsonl=args.jsonl,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` if None) as :func:`main` reads it (KEY=VALUE anywhere; else exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dsv3`` console script; returns the exit code."""
    args = parse_args(argv)
    if args.command in ("train", "sft", "generate", "chat", "bench", "eval"):  # before the first tensor
        from dsv3.hardware import tune_host_allocator

        tune_host_allocator()
    handlers = {"prepare": _cmd_prepare, "train": _cmd_train, "generate": _cmd_generate, "sft": _cmd_sft,
                "convert": _cmd_convert, "plan": _cmd_plan, "chat": _cmd_chat, "bench": _cmd_bench,
                "eval": _cmd_eval}  # fmt: skip
    try:
        handlers[args.command](args)
    except DsvError as err:
        print(f"dsv3: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except (StopRequested, TrainingDiverged) as err:
        print(f"dsv3: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("dsv3: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The ``dsv3`` console script and ``python -m dsv3``: :func:`main`, then end the process.

    A process that joined a process group ends with ``os._exit`` once its output is flushed
    (every file of the run is written and closed by then). The reason is a race in gloo's
    teardown: after the last collective returns, a gloo worker thread may still be releasing
    that collective's tensors. If the interpreter is already finalizing, the thread's request
    for the GIL ends it with a forced unwind that aborts the whole process (SIGABRT,
    "terminate called without an active exception"), which turns a finished run into a
    failed one under torchrun and SLURM. Skipping finalization leaves nothing to race with.
    """
    from dsv3.parallel.distributed import started

    try:
        code = main()
    except SystemExit:
        raise
    except BaseException:
        if not started():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if started():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
