"""Pipeline parallelism (``parallel.pp`` > 1) with DeepSpeed's ``PipelineModule``.

The plain :class:`dsv3.model.Transformer` is cut into a list of pipeline layers::

    0       embedding            (tied, key "embed": its first use)
    1..L    the L blocks         (one layer each)
    L+1     embedding            (tied, key "embed": read by the MTP modules on the last stage)
    L+2     head                 (final norm, output head, MTP modules, summed cross-entropies)

The layers are thin adapters around the model's own modules (the same parameter objects),
so weights read back under the plain model's names. A model built on the meta device has only
its stage's parameters allocated and initialized (:func:`materialize_stage`, layout-independent
values from :mod:`dsv3.model.init`); the other stages' stay on the meta device. Stage s owns a contiguous run of blocks;
the first stage also owns the embedding, the last one the head and the MTP modules (and a
tied copy of the embedding, kept bitwise equal to the first stage's: DeepSpeed sums the
gradients of both copies over the tie group before each optimizer step, and both copies
then take the same update). Blocks are assigned by parameter count
(``parallel.pp_partition=parameters``) or by explicit per-stage block counts
(``parallel.pp_partition="2,3,3"``).

Activations sent between stages: ``(h (B, T, D), input_ids (B, T) int64, labels (B, T)
int64, balance (scalar fp32))``; ``balance`` is the running sum of the MoE balance losses of
the blocks so far (V3 report eq. 17-20), so the last stage's loss holds every stage's term
and its gradient flows back through the pipe. Micro-batches per step = ``parallel.grad_accum``
(DeepSpeed's 1F1B schedule), or as many as the trainer hands over (fewer during a batch-size
ramp).

The loss is :func:`dsv3.model.objective.training_loss` with the global labelled-token counts
that the trainer computes before the step (passed as the pipeline's "labels"). The trainer
owns the training step for every layout (:meth:`dsv3.training.trainer.Trainer.train_step`);
:meth:`PipelineRun.train_batch` and :meth:`PipelineRun.eval_sums` only run the forward and
backward passes through the stages and return what the stages recorded: the loss sums and
the expert loads, which the trainer sums over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv3.collectives import all_reduce_sum
from dsv3.config import Config
from dsv3.model import IGNORE_INDEX, Transformer, ce_sum, materialize_, training_loss
from dsv3.parallel import ds_internals
from dsv3.parallel.engine import deepspeed_config, make_optimizer, param_groups, restore_buffers, start_engine
from dsv3.parallel.expert_parallel import is_expert_param
from dsv3.parallel.layout import balanced_counts, stage_of_rank, stage_prefixes

TIE_KEY = "embed"


@dataclass
class Recorder:
    """What the stages of this rank saw during one :func:`train_step` or evaluation."""

    loads: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE row -> (E,) int64 summed
    parts: list[tuple[torch.Tensor, ...]] = field(default_factory=list)  # per micro-batch, last stage

    def clear(self) -> None:
        self.loads.clear()
        self.parts.clear()

    def add_load(self, row: int, load: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training forwards only
            load = load.detach().cpu()
            self.loads[row] = self.loads[row] + load if row in self.loads else load


class _Rope:
    """The model's rope tables (fp32), held outside any module so casts leave them alone."""

    def __init__(self, model: Transformer, device: torch.device | str | None = None):
        self.cos, self.sin = model.rope_cos.to(device), model.rope_sin.to(device)


class SharedEmbedding(nn.Module):
    """The token embedding as a tied pipeline layer (``embed_tokens.weight`` is the tie)."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens


def _embed_first(module: SharedEmbedding, inputs):
    """First stage: (input_ids, labels) -> (h, input_ids, labels, balance=0)."""
    input_ids, labels = inputs
    h = module.embed_tokens(input_ids)
    balance = torch.zeros((), dtype=torch.float32, device=h.device, requires_grad=torch.is_grad_enabled())
    return h, input_ids, labels, balance


def _embed_for_mtp(module: SharedEmbedding, inputs):
    """Last stage: append the embeddings of all tokens (MTP depth k reads ``[:, k:]``)."""
    h, input_ids, labels, balance = inputs
    return h, input_ids, labels, balance, module.embed_tokens(input_ids)


class BlockLayer(nn.Module):
    """One :class:`dsv3.model.transformer.Block` as a pipeline layer (adds its balance loss)."""

    def __init__(self, block: nn.Module, rope: _Rope, row: int | None, recorder: Recorder):
        super().__init__()
        self.block = block
        self._rope, self._row, self._rec = rope, row, recorder

    def forward(self, inputs):
        h, input_ids, labels, balance = inputs
        T = h.shape[1]
        h, aux = self.block(h, self._rope.cos[:T], self._rope.sin[:T], None, None, labels != IGNORE_INDEX)
        if aux is not None:
            balance = balance + aux.balance_loss
            self._rec.add_load(self._row, aux.load)
        return h, input_ids, labels, balance


class HeadLayer(nn.Module):
    """Final norm, output head and the MTP modules (V3 §2.2), as in ``Transformer.forward``.

    Returns (lm_loss_sum fp32 scalar, mtp_loss_sum (D_mtp,) fp32, balance fp32 scalar,
    lm_tokens fp32 scalar).
    """

    def __init__(self, model: Transformer, rope: _Rope, first_row: int, recorder: Recorder):
        super().__init__()
        self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        self._rope, self._rec = rope, recorder
        self._rows = []
        row = first_row
        for m in model.mtp:
            self._rows.append(row if m.is_moe else None)
            row += int(m.is_moe)

    def forward(self, inputs):
        h, input_ids, labels, balance, emb = inputs
        valid = labels != IGNORE_INDEX
        h = self.norm(h)
        lm_sum = ce_sum(self.lm_head(h), labels)
        T = input_ids.shape[1]
        sums = []
        for k, (module, row) in enumerate(zip(self.mtp, self._rows), start=1):
            h, aux = module(h[:, : T - k], emb[:, k:], self._rope.cos[: T - k], self._rope.sin[: T - k], valid[:, k:])
            if aux is not None:
                balance = balance + aux.balance_loss
                self._rec.add_load(row, aux.load)
            h = module.shared_head.norm(h)
            sums.append(ce_sum(self.lm_head(h), labels[:, k:]))
        mtp = torch.stack(sums) if sums else lm_sum.new_zeros(0)
        return lm_sum, mtp, balance, valid.sum().float()


class PipelineLoss:
    """The training loss on the last stage (:func:`dsv3.model.objective.training_loss`).

    ``labels`` is ``(1 + D,)`` fp32: the global labelled-token counts (main head, MTP depths).
    ``lam`` (the step's MTP weight) and ``scale`` (micro-batches of the step x data-parallel
    size) are set for each step by :meth:`PipelineRun.train_batch`.
    """

    def __init__(self, mtp_lambda: float, alpha: float, scale: float, recorder: Recorder):
        self.lam, self.alpha, self.scale, self._rec = mtp_lambda, alpha, scale, recorder
        self.__name__ = "PipelineLoss"

    def __call__(self, outputs, labels):
        lm_sum, mtp_sum, balance, _ = outputs
        tokens = labels[0] if isinstance(labels, (tuple, list)) else labels
        self._rec.parts.append(tuple(t.detach() for t in outputs))
        return training_loss(lm_sum, mtp_sum, balance, tokens, self.lam, self.alpha, self.scale)


def build_pipeline_module(
    model: Transformer, cfg: Config, counts: list[int], recorder: Recorder, device: torch.device | str | None = None
):
    """The ``PipelineModule`` over ``model``'s own modules (see the module docstring).

    Collective: every rank must call it (DeepSpeed creates its process groups here).
    DeepSpeed moves this stage's layers to the accelerator; ``device`` is where the rope
    tables go (the same device).
    """
    from deepspeed.pipe import TiedLayerSpec

    rope = _Rope(model, device)
    layers: list[Any] = [
        TiedLayerSpec(
            TIE_KEY,
            SharedEmbedding,
            model.embed_tokens,
            forward_fn=_embed_first,
            tied_weight_attr="embed_tokens.weight",
        )
    ]
    row = 0
    for block in model.layers:
        layers.append(BlockLayer(block, rope, row if block.is_moe else None, recorder))
        row += int(block.is_moe)
    layers.append(
        TiedLayerSpec(
            TIE_KEY,
            SharedEmbedding,
            model.embed_tokens,
            forward_fn=_embed_for_mtp,
            tied_weight_attr="embed_tokens.weight",
        )
    )
    layers.append(HeadLayer(model, rope, row, recorder))
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    parts = [0] + [1 + b for b in bounds[1:-1]] + [len(layers)]
    t, p = cfg.train, cfg.parallel
    dp = dist.get_world_size() // p.pp
    loss = PipelineLoss(t.mtp_lambda, t.balance_loss_alpha, p.grad_accum * dp, recorder)
    with torch.no_grad():  # DeepSpeed broadcasts the tied weight in place here: keep autograd out of it
        return ds_internals.staged_pipeline_class()(
            layers, parts, num_stages=p.pp, loss_fn=loss, partition_method="parameters"
        )


def materialize_stage(
    model: Transformer, counts: list[int], stage: int, device: torch.device | str | None, seed: int, source=None
) -> int:
    """Allocate on ``device`` and initialize the parameters of ``stage`` that are still on the
    meta device (with expert parallelism only the local expert blocks), and every buffer;
    the other stages' parameters stay on the meta device (see :func:`dsv3.model.init.materialize_`).
    With ``source`` (a :class:`dsv3.model.init.WeightsSource`) the values are read from it,
    only this stage's tensors and expert rows.

    Returns:
        Number of parameter elements allocated.
    """
    prefixes = tuple(stage_prefixes(model, counts, stage))
    return materialize_(
        model, device or "cpu", seed, model.cfg.init_std, owned=lambda n: n.startswith(prefixes), source=source
    )


def owned_names(model: Transformer, module: nn.Module) -> list[str]:
    """Plain-model parameter names of the parameters this rank's stage holds."""
    mine = {id(p) for p in module.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in mine]


class PipelineRun:
    """Everything the trainer needs for ``parallel.pp`` > 1: engine, step, evaluation, weights.

    Collective. Parameters of this rank's stage still on the meta device are allocated on
    ``device`` and initialized from ``train.seed`` (or read from ``source``, a
    :class:`dsv3.model.init.WeightsSource`: ``train.init_from`` or a checkpoint resumed under
    another layout) before DeepSpeed starts; the others never are.

    Raises:
        RuntimeError: DeepSpeed put a parameter on this stage that was not materialized.

    Attributes:
        engine: DeepSpeed's ``PipelineEngine``.
        optimizer: the :class:`dsv3.parallel.engine.UpdateGuard` optimizer inside it
            (:func:`dsv3.parallel.engine.make_optimizer`).
        counts: blocks per stage.
        stage, dp_rank, dp: this rank's stage and data-parallel coordinates.
        names: plain-model names of the parameters this rank's stage holds.
    """

    def __init__(
        self,
        model: Transformer,
        cfg: Config,
        counts: list[int] | None,
        device: torch.device | str | None = None,
        source=None,
    ):
        self.cfg, self.model = cfg, model
        self.micro_batches = cfg.parallel.grad_accum  # of the current step
        self.counts = counts or balanced_counts(model, cfg.parallel.pp)
        world = dist.get_world_size()
        # a model built on the meta device: allocate and initialize this rank's stage only
        materialize_stage(
            model, self.counts, stage_of_rank(dist.get_rank(), world, cfg.parallel.pp), device, cfg.train.seed, source
        )
        self.recorder = Recorder()
        module = build_pipeline_module(model, cfg, self.counts, self.recorder, device)
        self.loss: PipelineLoss = module.loss_fn
        opt = make_optimizer(param_groups(module, cfg.train.weight_decay), cfg)
        fp32_buffers = {n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()}
        self.dp = world // cfg.parallel.pp
        self.engine = start_engine(module, opt, deepspeed_config(cfg, self.dp))
        restore_buffers(self.engine.module, fp32_buffers)
        self.optimizer = opt
        self.stage = self.engine.stage_id
        self.dp_rank = self.engine.grid.get_data_parallel_rank()
        self.names = owned_names(model, self.engine.module)
        params = dict(model.named_parameters())
        missing = [n for n in self.names if params[n].is_meta]
        if missing:
            raise RuntimeError(
                f"pipeline stage {self.stage} holds {missing[0]} but it was not materialized "
                "(dsv3's stage split disagrees with DeepSpeed's)"
            )
        self._release_others()
        self._before_update: Callable[[], None] | None = None  # see train_batch
        ds_internals.before_pipeline_update(self.engine, self._run_before_update)

    def _run_before_update(self) -> None:
        if self._before_update is not None:
            self._before_update()

    def _release_others(self) -> None:
        """Drop this rank's copies of the other stages' parameters (they become meta tensors):
        a rank holds one stage's weights; the plain model keeps every buffer (the routing
        biases, updated on every rank) and the names. With a model built on the meta device
        the other stages were never allocated (also with loaded weights, read per stage), so
        this only matters for a model handed over fully allocated."""
        owned = set(self.names)
        for name, p in list(self.model.named_parameters()):
            if name not in owned and not p.is_meta:
                owner, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(owner) if owner else self.model
                module._parameters[leaf] = nn.Parameter(
                    torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                )

    def describe(self) -> str:
        """One start-up line: stages, replicas, the blocks of each stage."""
        first = 0
        spans = []
        for s, c in enumerate(self.counts):
            spans.append(f"stage {s}: blocks {first}-{first + c - 1}")
            first += c
        return (
            f"pipeline parallelism: {len(self.counts)} stages x {self.dp} data-parallel replica(s) "
            f"({'; '.join(spans)}; embedding tied between the first and last stage; "
            "ZeRO-2/3 are not available with pipelines)"
        )

    @torch.no_grad()
    def grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 gradient norm over all stages (the tied embedding counted once), clipping
        to ``max_norm`` in place (``torch.nn.utils.clip_grad_norm_`` on the unsplit model).

        Collective over all ranks. Gradients must already be reduced (equal in a replica group;
        expert parameters within their expert-data-parallel group).
        """
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        sq = torch.zeros(1, dtype=torch.float64)
        for p in params:
            if ds_internals.is_tied_copy(p):
                continue  # the last stage's copy of the tied embedding
            if is_expert_param(p):  # one copy per expert-data-parallel group
                first = ds_internals.expert_data_parallel_coords(p.group_name)[0] == 0
            else:
                first = self.dp_rank == 0
            if first:
                sq += torch.linalg.vector_norm(p.grad.detach().float()).double().pow(2).cpu()
        all_reduce_sum(sq)
        total = sq.sqrt().float()[0]
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for p in params:
                p.grad.detach().mul_(coef.to(p.grad.device))
        return total

    def batches(self, batches: list[tuple[torch.Tensor, torch.Tensor]], norm: torch.Tensor) -> Iterator:
        """The engine's data iterator: ((input_ids, labels), norm) per micro-batch."""
        dev = self.engine.device
        for inputs, labels in batches:
            yield (inputs.to(dev), labels.to(dev)), norm.to(dev)

    def loads(self, n_rows: int, n_experts: int) -> torch.Tensor:
        """(L_moe, E) int64: this rank's recorded expert loads in their rows, zeros elsewhere."""
        out = torch.zeros(n_rows, n_experts, dtype=torch.long)
        for row, load in self.recorder.loads.items():
            out[row] += load
        return out

    # ------------------------------------------------------------------ forward and backward
    def stats(self) -> torch.Tensor:
        """(3 + D,) float64 on the CPU: this rank's summed main-head cross-entropy, balance loss
        (divided by the step's micro-batches x ``dp``, so the sum over ranks is the global mean),
        0, and the MTP sums, of the micro-batches the last stage has seen since
        :meth:`train_batch` began (zeros on the other stages)."""
        out = torch.zeros(3 + self.cfg.model.mtp_depth, dtype=torch.float64)
        for lm_sum, mtp_sum, balance, _ in self.recorder.parts:
            out[0] += lm_sum.double().cpu()
            out[1] += balance.double().cpu() / (self.micro_batches * self.dp)
            out[3:] += mtp_sum.double().cpu()
        return out

    def train_batch(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        tokens: torch.Tensor,
        before_update: Callable[[], None],
        mtp_lambda: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of this rank's micro-batches through the stages (1F1B), then
        the optimizer step.

        Args:
            batches: the step's micro-batches ``(input_ids, labels)``, (B, T) int64 each:
                ``grad_accum`` of them, or fewer during a batch-size ramp (every rank the same
                number).
            tokens: (1 + D,) fp32, the global labelled-token counts (:func:`training_loss`).
            before_update: called on every rank once the gradients are reduced, before the
                optimizer step (to measure, clip and decide whether to apply the update).
            mtp_lambda: the step's MTP loss weight; None keeps ``train.mtp_lambda``.

        Returns:
            (:meth:`stats`, the (L_moe, E) int64 expert loads this rank's stages recorded, or
            None for a model without MoE layers).
        """
        self.recorder.clear()
        if len(batches) != self.engine.gradient_accumulation_steps():  # the schedule runs that many
            self.engine.set_train_batch_size(len(batches) * self.cfg.parallel.micro_batch_size * self.dp)
        self.micro_batches = len(batches)
        self.loss.scale = len(batches) * self.dp  # undo DeepSpeed's mean over micro-batches and ranks
        if mtp_lambda is not None:
            self.loss.lam = mtp_lambda
        self._before_update = before_update
        try:
            self.engine.train_batch(self.batches(batches, tokens))
        finally:
            self._before_update = None
        gates = self.model.moe_gates()
        load = self.loads(len(gates), self.cfg.model.n_routed_experts) if gates else None
        return self.stats(), load

    @torch.no_grad()
    def eval_sums(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(2,) float64: the summed main-head cross-entropy and labelled positions of
        ``batches`` (full micro-batches; rows whose labels are all ignored add nothing),
        through the stages, on the last stage (zeros elsewhere)."""
        self.recorder.clear()
        ones = torch.ones(1 + self.cfg.model.mtp_depth)
        self.engine.eval_batch(
            self.batches(batches, ones), reduce_output=None, bcast_loss=False, num_micro_batches=len(batches)
        )
        totals = torch.zeros(2, dtype=torch.float64)
        for lm_sum, _, _, lm_tokens in self.recorder.parts:
            totals[0] += lm_sum.double().cpu()
            totals[1] += lm_tokens.double().cpu()
        self.recorder.clear()
        return totals
