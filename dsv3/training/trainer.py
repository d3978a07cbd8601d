"""The pre-training loop (``dsv3 train``): DeepSpeed engine, global-batch losses, aux-free balancing.

One optimizer step consumes a global batch of ``micro_batch_size * grad_accum * dp`` packed
windows (fewer, in whole micro-batches per rank, during a batch-size ramp), the next ones of
the sample stream (:func:`data_pipeline.sampling.stream_indices`) at the cursor that the step
number alone determines (:class:`dsv3.training.schedule.BatchSchedule`), so the sample
sequence does not depend on the number of processes, and a resumed run reads exactly what an
uninterrupted one would. The learning rate, the MTP weight and the bias update speed of a
step are pure functions of the step too (:class:`dsv3.training.schedule.Schedules`).

Losses are means over the whole global batch: each micro-batch's summed cross-entropy is
divided by the number of labelled tokens of the global batch (counted before the step and
all-reduced), then scaled by the step's micro-batches x ``dp`` to undo DeepSpeed's averaging
over micro-batches and ranks. Total loss = LM + lambda/D * sum_k MTP_k + alpha * balance
(V3 report §2.1.2 eq. 17-20, §2.2 eq. 25).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from data_pipeline.chat_data import ChatDataset, prepare_chat
from data_pipeline.dataset import PackedDataset, document_attention_mask
from data_pipeline.prepare import given_tokenizer, prepare
from data_pipeline.sampling import check_loader_state, loader_state, rank_micro_batches, stream_indices
from dsv3.checkpoint import (
    CHECKPOINTS,
    CONFIG,
    MANIFEST,
    WEIGHTS,
    CheckpointWeights,
    read_checkpoint_config,
    resume_candidates,
    saved_world_size,
    tag_for,
)
from dsv3.collectives import all_gather_object, all_reduce_sum, barrier
from dsv3.config import Config, save_config
from dsv3.errors import DsvError, StopRequested, TrainingDiverged
from dsv3.hardware import DTYPES, measure_peak_tflops
from dsv3.model import IGNORE_INDEX, Transformer, kernels, label_counts, materialize_, training_loss
from dsv3.model.init import allocated_elements
from dsv3.parallel import expert_parallel, layout_free
from dsv3.parallel.checkpointing import apply_activation_checkpointing
from dsv3.parallel.distributed import DistInfo, init_distributed
from dsv3.parallel.ds_internals import full_shape
from dsv3.parallel.engine import build_engine, remove_swap_files, trainer_clips
from dsv3.parallel.layout import check_launch
from dsv3.parallel.pipeline import PipelineRun
from dsv3.tokenizer_files import open_tokenizer
from dsv3.training.balance import update_expert_bias
from dsv3.training.checkpoint import load_kernels, load_rng, pick_checkpoint, save_checkpoint, seed_everything
from dsv3.training.init_from import with_init_from
from dsv3.training.metrics import Console, MetricsLogger, perf_record, step_record
from dsv3.training.schedule import Schedules, schedule_warning, tokens_text
from dsv3.training.signals import StopSignal


def _log(info: DistInfo, msg: str | None) -> None:
    if info.is_main and msg:
        print(msg, flush=True)


class Trainer:
    """Pre-trains a :class:`Transformer` as ``cfg`` says; :meth:`run` does the whole job."""

    def __init__(self, cfg: Config):
        self.info = init_distributed()
        cfg, init_source, changed = with_init_from(cfg)
        precision, note = kernels.resolve_precision(cfg.train.precision, self.info.device)  # (auto: measured)
        cfg.train.precision = all_gather_object(precision)[0]  # rank 0's: every node trains alike
        self.cfg = cfg
        _log(self.info, note)
        _log(self.info, changed and f"context extension of {cfg.train.init_from}: {changed}")
        self.ep = cfg.parallel.ep
        self.pipe = None  # a dsv3.parallel.pipeline.PipelineRun with parallel.pp > 1
        stage_blocks = check_launch(cfg, self.info.world_size)  # the same checks as `dsv3 train --check`
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_root = self.out_dir / CHECKPOINTS
        self.dp = dp = self.info.world_size // cfg.parallel.pp
        self.global_batch = cfg.parallel.micro_batch_size * cfg.parallel.grad_accum * dp  # after the batch ramp, if any
        self.schedules = Schedules(cfg, dp)  # every scheduled value of every step; checks the ramp

        for turn in ("main", "others"):  # rank 0 prepares (or finds the cache), then the others read it
            if self.info.is_main == (turn == "main"):
                self.data_dir = self._prepare(progress=self.info.is_main)
            barrier()
        if cfg.data.format == "chat":
            self.train_data, self.val_data = ChatDataset(self.data_dir, "train"), ChatDataset(self.data_dir, "val")
        else:
            self.train_data = PackedDataset(self.data_dir, "train", cfg.data.seq_len)
            self.val_data = PackedDataset(self.data_dir, "val", cfg.data.seq_len)
        if len(self.train_data) < self.global_batch:
            raise DsvError(
                f"the training split has {len(self.train_data)} windows of data.seq_len={cfg.data.seq_len}, "
                f"fewer than one global batch of {self.global_batch}; use a bigger corpus or a smaller batch"
            )

        # the checkpoint to resume, picked before anything is written into out_dir
        self.resume_tag = pick_checkpoint(self.ckpt_root, lambda msg: _log(self.info, msg))
        self.tokenizer_files: list[Path] = []  # the run's tokenizer files (rank 0), copied into each checkpoint
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(exist_ok=True)
            save_config(cfg, self.out_dir / CONFIG)
            self.tokenizer_files = open_tokenizer(self.data_dir).save(self.out_dir)
        barrier()

        seed_everything(cfg.train.seed + self.info.rank)
        # another parallel layout than the save's: resume from plain-name weights + per-parameter
        # optimizer state (dsv3.parallel.layout_free) instead of DeepSpeed's layout-bound files
        self.layout_free = False
        if self.resume_tag is not None:  # (and the saved run's kernels, before any is chosen here)
            load_kernels(self.ckpt_root / self.resume_tag)
            self.layout_free = layout_free.resumes_layout_free(cfg, self.ckpt_root / self.resume_tag, dp)
        # each rank allocates only what it holds: built on the meta device, split (EP, PP), then
        # materialized with layout-independent values (dsv3.model.init) or read from the weights
        # file, only this rank's tensors and expert rows (dsv3.checkpoint.weights)
        source = init_source if self.resume_tag is None else None
        if self.layout_free:
            source = CheckpointWeights(self.ckpt_root / self.resume_tag / WEIGHTS, cfg.model, "the run's config")
        with torch.device("meta"):
            model = Transformer(cfg.model)
        if source is not None and source is init_source:
            _log(self.info, f"initialized weights from {cfg.train.init_from}")
        if self.ep > 1:  # before moving to the device: only this rank's experts go there
            expert_parallel.apply_expert_parallel(model, self.ep, pp=cfg.parallel.pp)
            _log(self.info, expert_parallel.describe(model))
        if cfg.parallel.pp == 1:  # with pipelines each rank allocates / moves only its stage (dsv3.parallel.pipeline)
            materialize_(model, self.info.device, cfg.train.seed, cfg.model.init_std, source=source)
            model.to(self.info.device)
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.parallel.pp > 1:
            self.pipe = PipelineRun(model, cfg, stage_blocks, self.info.device, source=source)
            _log(self.info, self.pipe.describe())
            self.engine, self.optimizer, self.model = self.pipe.engine, self.pipe.optimizer, model
            self.dp_rank = self.pipe.dp_rank
        else:
            self.engine, self.optimizer = build_engine(model, cfg, dp)
            self.model: Transformer = self.engine.module
            self.dp_rank = self.info.rank
        if self.ep > 1 or cfg.parallel.pp > 1:
            _log(self.info, f"parameters allocated on rank 0: {allocated_elements(model):,}")
        self.manual_clip = trainer_clips(cfg)
        if cfg.train.compile:
            self.engine.compile()
            _log(self.info, "train.compile: the model runs through torch.compile (the first steps compile it)")
        self.peak_tflops = cfg.train.peak_tflops
        if self.peak_tflops == "auto":
            self.peak_tflops = measure_peak_tflops(DTYPES[cfg.train.precision], self.info.device)
            _log(self.info, f"measured matmul peak: {self.peak_tflops:.3g} TFLOP/s ({cfg.train.precision}) per process")
        self.start_step = 0
        # called once a step's gradients are reduced, before its update (dsv3.bench.memory's counts)
        self.before_update: list[Callable[[], None]] = []
        self._resume()

    def _prepare(self, progress: bool) -> Path:
        if self.cfg.data.format == "chat":
            if not self.cfg.data.tokenizer:
                raise DsvError(
                    "fine-tuning on conversations needs the model's tokenizer: set train.init_from to "
                    "the run to fine-tune, or data.tokenizer"
                )
            return prepare_chat(self.cfg, given_tokenizer(self.cfg.data), progress=progress)
        return prepare(self.cfg, progress=progress)

    def _resume(self) -> None:
        tag = self.resume_tag
        if tag is None:
            return
        if self.layout_free:
            folder = self.ckpt_root / tag
            names = self.pipe.names if self.pipe is not None else [n for n, _ in self.model.named_parameters()]
            self.start_step = layout_free.resume_layout_free(
                folder, self.model, names, self.optimizer, self.engine.optimizer
            )
            self.engine.global_steps = self.start_step
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            self._check_loader(manifest.get("data"), str(folder))
            saved_cfg = read_checkpoint_config(folder)
            saved, saved_train, now = saved_cfg.parallel, saved_cfg.train, self.cfg.parallel
            saved_world = saved_world_size(folder)
            same = (saved.pp, saved.ep, saved_world) == (now.pp, now.ep, self.dp)
            if not same or not load_rng(folder, self.info.rank):
                seed_everything(self.cfg.train.seed + 1_000_003 * self.start_step + self.info.rank)
            _log(
                self.info,
                f"resumed from {folder} at step {self.start_step}"
                + (
                    ""
                    if same
                    else f" (saved with pp={saved.pp} ep={saved.ep} dp={saved_world}, now pp={now.pp} ep={now.ep} "
                    f"dp={self.dp})"
                )
                + (f"; ZeRO stage {saved.zero_stage} -> {now.zero_stage}" if saved.zero_stage != now.zero_stage else "")
                + (
                    f"; precision {saved_train.precision} -> {self.cfg.train.precision}"
                    if saved_train.precision != self.cfg.train.precision
                    else ""
                ),
            )
            return
        load_fn = expert_parallel.expert_load_fn(self.model) if self.ep > 1 else None
        _, state = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag, custom_load_fn=load_fn)
        if state is None:
            raise DsvError(f"checkpoint {self.ckpt_root / tag} could not be loaded; delete it or its 'latest' pointer")
        self.start_step = int(state["step"])
        self._check_loader(state.get("data"), str(self.ckpt_root / tag))
        same_layout = state.get("world_size") == self.dp
        if not load_rng(self.ckpt_root / tag, self.info.rank) or not same_layout:
            # a new process count (replicated ZeRO-0 state): fresh per-rank streams, still a
            # function of seed, step and rank only
            seed_everything(self.cfg.train.seed + 1_000_003 * self.start_step + self.info.rank)
        _log(
            self.info,
            f"resumed from {self.ckpt_root / tag} at step {self.start_step}"
            + ("" if same_layout else f" (saved with {state.get('world_size')} process(es), now {self.dp})"),
        )

    def _check_loader(self, saved: dict | None, where: str) -> None:
        """The checkpoint's loader position must be this run's after ``start_step`` steps."""
        check_loader_state(
            saved,
            self.start_step,
            self.global_batch,
            len(self.train_data),
            self.cfg.train.seed,
            self._data_key(),
            where,
            consumed=self.schedules.batch.consumed(self.start_step),
            batch_ramp=self.schedules.batch.state(),
        )

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, step: int) -> dict[str, float]:
        """Run optimizer step ``step`` (0-based) over its global batch; return its metrics.

        The same step for every layout: this rank's micro-batches of the global batch, the
        global labelled-token counts (every rank agrees on them before any forward), the
        learning rate, forward and backward (through the DeepSpeed engine, or through the
        pipeline stages with ``parallel.pp`` > 1), one decision whether to apply the update
        (:meth:`_decide`), the balancing-bias update, and the logged values.
        """
        cfg, p = self.cfg, self.cfg.parallel
        values = self.schedules.values(step)  # global_batch, lr, mtp_lambda, bias_update_speed
        batch = values["global_batch"]
        n_micro = batch // (p.micro_batch_size * self.dp)  # = grad_accum after the ramp
        t_data = time.perf_counter()
        indices = stream_indices(self.schedules.batch.consumed(step), batch, len(self.train_data), cfg.train.seed)
        micro = rank_micro_batches(indices, self.dp_rank, self.dp, p.micro_batch_size, n_micro)
        batches = [self._batch(self.train_data, mb) for mb in micro]
        self._data_time = time.perf_counter() - t_data
        depth = cfg.model.mtp_depth
        counts = torch.zeros(1 + depth, dtype=torch.float64)
        for _, labels, *extra in batches:
            counts += label_counts(labels, depth, *extra)
        all_reduce_sum(counts)
        counts /= p.pp  # with pipelines every stage of a replica counted the same batch
        tokens = counts.clamp(min=1).float()
        lr, lam = values["lr"], values["mtp_lambda"]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        decision: dict[str, object] = {}
        if self.pipe is not None:

            def decide() -> None:
                decision.update(self._decide(self.pipe.stats()))

            stats, load = self.pipe.train_batch(batches, tokens, decide, mtp_lambda=lam)
        else:
            stats, load = self._forward_backward(batches, tokens.to(self.info.device), decision, lam)
        finite, grad_norm = decision["finite"], decision["grad_norm"]
        all_reduce_sum(stats)
        self.last_load = None
        if load is not None and load.numel():
            all_reduce_sum(load)
            if finite:  # every rank updates every router (with pipelines its copies of other stages' too)
                update_expert_bias(self.model.moe_gates(), load, values["bias_update_speed"])
                self.last_load = load
        lm = (stats[0] / counts[0].clamp(min=1)).item()
        mtp = (stats[3:] / counts[1:].clamp(min=1)).mean().item() if depth else 0.0
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        rec = step_record(lm, mtp, stats[1].item(), lam, cfg.train.balance_loss_alpha, lr, grad_norm, finite, load)
        rec.update(global_batch=batch, mtp_lambda=lam, bias_update_speed=values["bias_update_speed"])
        return rec

    def _forward_backward(
        self, batches: list[tuple], tokens: torch.Tensor, decision: dict, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of this rank's micro-batches through the DeepSpeed engine, the
        update decided before the last ``engine.step()``; returns (the loss sums as
        :meth:`dsv3.parallel.pipeline.PipelineRun.stats`, the (L_moe, E) expert loads).

        During a batch-size ramp the number of micro-batches changes from step to step: the
        engine is told the step's batch (its loss scaling) and, before each micro-batch, whether
        it ends the step (its gradient reduction and update), instead of counting micro-steps."""
        cfg, dev = self.cfg, self.info.device
        n = len(batches)
        scale = n * self.dp  # undo DeepSpeed's mean over micro-batches and ranks
        alpha = cfg.train.balance_loss_alpha
        if self.schedules.ramped:
            if n != self.engine.gradient_accumulation_steps():
                self.engine.set_train_batch_size(n * cfg.parallel.micro_batch_size * self.dp)
        # loss statistics and expert loads accumulate on the device: no host sync per micro-batch
        stats = torch.zeros(3 + cfg.model.mtp_depth, dtype=torch.float64, device=dev)  # lm, balance, 0, mtp sums
        load = None
        for i, (inputs, labels, *extra) in enumerate(batches):
            if self.schedules.ramped:
                self.engine.set_gradient_accumulation_boundary(i == n - 1)
            out = self.engine(inputs.to(dev), labels.to(dev), **self._doc_kwargs(extra))
            self.engine.backward(
                training_loss(out.lm_loss_sum, out.mtp_loss_sum, out.balance_loss, tokens, lam, alpha, scale)
            )
            stats[0] += out.lm_loss_sum.detach().double()
            stats[1] += out.balance_loss.detach().double() / scale
            stats[3:] += out.mtp_loss_sum.detach().double()
            if i == len(batches) - 1:  # gradients are all-reduced now; decide before the update
                decision.update(self._decide(stats))
            self.engine.step()
            load = out.expert_load.detach() if load is None else load + out.expert_load.detach()
        return stats.cpu(), (load.cpu() if load is not None else None)

    def _decide(self, stats: torch.Tensor) -> dict[str, object]:
        """Once the gradients are reduced and before the update: measure and clip the gradient
        norm where the trainer does (:func:`dsv3.parallel.engine.trainer_clips`), and decide on
        every rank alike whether to apply the update (every loss sum and the norm finite). The
        step's one host sync. Returns ``{"finite": bool, "grad_norm": tensor or None}``."""
        for hook in self.before_update:
            hook()
        grad_norm = None
        if self.manual_clip:
            clip = self.cfg.train.grad_clip
            if self.pipe is not None:
                grad_norm = self.pipe.grad_norm(clip)
            elif self.ep > 1:
                grad_norm = expert_parallel.clip_grad_norm_(self.model.parameters(), clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        bad = (~torch.isfinite(stats).all()).float().reshape(1)
        if grad_norm is not None:
            bad = bad + (~torch.isfinite(torch.as_tensor(grad_norm))).float().to(bad.device)
        finite = all_reduce_sum(bad.cpu()).item() == 0
        self.optimizer.skip_next = not finite
        return {"finite": finite, "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss (main head) over the first ``eval_batches`` global batches of
        validation windows (the same windows whatever the parallel layout).

        With expert parallelism or pipelines every rank takes part in every forward (the
        all-to-all, the pipeline schedule), so every rank runs as many micro-batches as the
        busiest one, padded with windows whose labels are all ignored (they add nothing)."""
        cfg = self.cfg
        n = min(len(self.val_data), cfg.train.eval_batches * self.global_batch)
        mbs = cfg.parallel.micro_batch_size
        mine = list(range(self.dp_rank, n, self.dp))
        chunks = [mine[i : i + mbs] for i in range(0, len(mine), mbs)]
        if self.ep > 1 or self.pipe is not None:
            most = (n + self.dp - 1) // self.dp  # rank 0's share, the largest
            chunks += [[]] * ((most + mbs - 1) // mbs - len(chunks))
        batches = []
        for chunk in chunks:  # pipelines need full micro-batches; the engine takes any size
            width = mbs if self.pipe is not None else max(len(chunk), 1)
            inputs, labels, *extra = self._batch(self.val_data, chunk + [0] * (width - len(chunk)))
            labels[len(chunk) :] = IGNORE_INDEX
            batches.append((inputs, labels, *extra))
        if self.pipe is not None:
            totals = self.pipe.eval_sums(batches)
        else:
            totals = torch.zeros(2, dtype=torch.float64)
            self.engine.eval()
            for inputs, labels, *extra in batches:
                out = self.model(inputs.to(self.info.device), labels.to(self.info.device), **self._doc_kwargs(extra))
                totals[0] += out.lm_loss_sum.double().cpu()
                totals[1] += out.lm_tokens.double().cpu()
            self.engine.train()
        all_reduce_sum(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()

    def _batch(self, data, indices) -> tuple:
        """(inputs, labels) of samples ``indices``, plus position_ids with document-aware packing."""
        if self.cfg.data.document_aware and isinstance(data, PackedDataset):
            return data.batch_documents(indices)
        return data.batch_xy(indices)

    def _doc_kwargs(self, extra: list) -> dict:
        """Model keyword arguments of document-aware packing: restarting positions and the
        block-diagonal causal mask, built on the device."""
        if not extra:
            return {}
        pos = extra[0].to(self.info.device)
        return {"position_ids": pos, "attn_mask": document_attention_mask(pos)}

    def _data_key(self) -> str | None:
        meta = getattr(self.train_data, "meta", None)
        return meta.get("key") if isinstance(meta, dict) else None

    def client_state(self, step: int) -> dict:
        sched = self.schedules.batch
        state = {
            "step": step,
            "tokens": sched.tokens(step),
            "data": loader_state(
                step,
                self.global_batch,
                len(self.train_data),
                self.cfg.train.seed,
                self._data_key(),
                consumed=sched.consumed(step),
                batch_ramp=sched.state(),
            ),
            "world_size": self.dp,
            # lets deepspeed.checkpoint.ds_to_universal re-partition the ZeRO state
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
        }
        if self.ep > 1:  # DeepSpeed's MoE save reserves this key; EP checkpoints resume on their own layout only
            del state["universal_checkpoint_info"]
        return state

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after: int | None = None) -> Path:
        """Train from ``start_step`` to ``train.steps``; returns the run directory.

        Args:
            stop_after: save a checkpoint and return after this optimizer step, as an
                interrupted run would (a later :meth:`run` on the same out_dir resumes).
        """
        cfg, t = self.cfg, self.cfg.train
        sched = self.schedules.batch
        stop = StopSignal()
        logger = MetricsLogger(
            self.out_dir, self.start_step, self.info.is_main, yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        )
        console = Console(self.info.is_main, self.start_step, t.steps)
        n_params = sum(math.prod(full_shape(p)) for p in self.model.parameters())  # ZeRO-3: whole shapes
        n_params += (self.ep - 1) * sum(p.numel() for n, p in self.model.named_parameters() if ".experts." in n)
        ramp = (
            f" (ramp from {sched.ramp.start} over the first {tokens_text(sched.ramp.tokens)} tokens, "
            f"until step {sched.ramp_end_step})"
            if sched.ramp is not None
            else ""
        )
        console.write(
            f"training {cfg.model.n_layers}-layer model, {n_params:,} parameters, "
            f"{self.info.world_size} process(es), global batch {self.global_batch}{ramp} x "
            f"{cfg.data.seq_len} tokens, steps {self.start_step}->{t.steps}, out_dir {self.out_dir}"
        )
        warnings = [schedule_warning(t)] + self.schedules.warnings()
        for warning in warnings:
            if warning and self.start_step < t.steps:
                console.write(warning)
        if self.start_step == 0 and t.eval_every > 0:
            val = self.evaluate()
            logger.log({"step": 0, "val_loss": val, "tokens": 0})
            console.write(f"step 0 | val_loss {val:.4f}")
        t0 = time.perf_counter()
        for step in range(self.start_step, t.steps):
            rec = self.train_step(step)
            done = step + 1
            rec = {"step": done, **rec, "tokens": sched.tokens(done)}
            elapsed = time.perf_counter() - t0
            rec["step_time_s"] = elapsed
            rec["tokens_per_s"] = (sched.tokens(done) - sched.tokens(step)) / max(elapsed, 1e-9)
            rec.update(
                perf_record(
                    self.cfg,
                    rec["tokens_per_s"],
                    self._data_time,
                    elapsed,
                    self.peak_tflops,
                    self.info.world_size,
                    self.info.device,
                )
            )
            if rec.get("skipped"):
                what = f"non-finite loss or gradient at step {done} (loss {rec['loss']}, grad_norm {rec['grad_norm']})"
                if t.nonfinite == "stop":
                    logger.log(rec)
                    logger.close()
                    console.close()
                    good = resume_candidates(self.ckpt_root)
                    last = next((tag for tag, problem in good if problem is None), None)
                    raise TrainingDiverged(
                        f"{what}; stopped without updating the weights; the last good checkpoint "
                        f"is {last or 'none'}; lower train.lr, check the data, or set "
                        "train.nonfinite=skip"
                    )
                console.write(f"warning: skipped the update of step {done}: {what}")
            if t.eval_every > 0 and (done % t.eval_every == 0 or done == t.steps):
                rec["val_loss"] = self.evaluate()
            due = done % t.log_every == 0 or done == 1 or done == t.steps or "val_loss" in rec
            if due:
                logger.log(rec)
                if self.last_load is not None:
                    bias = torch.stack([g.e_score_correction_bias.detach().cpu() for g in self.model.moe_gates()])
                    logger.log_expert_load(done, self.last_load, bias)
            console.step(rec, t.steps, due)
            signalled = stop.agreed()
            stopping = signalled or (stop_after is not None and done >= stop_after)
            if done % cfg.ckpt.every == 0 or done == t.steps or stopping:
                save_checkpoint(
                    self.engine,
                    cfg,
                    self.ckpt_root,
                    done,
                    self.client_state(done),
                    self.tokenizer_files,
                    self.info.rank,
                    pipe=self.pipe,
                )
            if signalled and done < t.steps:
                logger.close()
                console.close()
                raise StopRequested(
                    f"stopped by signal at step {done} after saving {self.ckpt_root / tag_for(done)}; "
                    "run the same command again to resume"
                )
            if stopping:
                break
            t0 = time.perf_counter()  # evaluation and saving do not count as step time
        console.close()
        if self.start_step < t.steps and "val_loss" in rec:
            logger.log_hparams(
                {f"{sec}.{k}": v for sec, d in cfg.to_dict().items() for k, v in d.items()},
                {"hparam/final_val_loss": rec["val_loss"]},
            )
        logger.close()
        return self.out_dir


def train(cfg: Config) -> Path:
    """Run ``dsv3 train`` for ``cfg``: prepare data if needed, train, checkpoint, resume.

    Returns:
        The run directory.
    """
    trainer = Trainer(cfg)
    out = trainer.run()
    remove_swap_files(cfg, trainer.info.rank)  # nvme offload: the swap files, once the run is over
    return out
