"""Expert parallelism for the DeepSeekMoE layers, applied from outside the plain model.

With ``parallel.ep = P`` the ``E`` routed experts of every MoE layer are split over the P
ranks of an *expert-parallel group* in contiguous blocks: EP rank r holds experts
``[r * E/P, (r + 1) * E/P)``. The gate and the shared experts stay replicated. Each MoE
layer's ``experts`` module is swapped for :class:`ExpertParallelExperts`, which keeps the
same call signature and parameter names (``gate_proj``, ``up_proj`` (E/P, I, D),
``down_proj`` (E/P, D, I)) but holds only the local block, so the model code is unchanged.

Forward of one layer on every rank of the group (DeepSeek-V3 report §3.2.2 describes the same
dispatch / combine pattern; no capacity factor, no token is ever dropped):

1. sort the N*K (token, expert) pairs by global expert id;
2. exchange the per-expert row counts (one small all-to-all), then the rows themselves
   (``all_to_all_single`` with variable split sizes, differentiable);
3. run the local experts as grouped matrix products (:func:`dsv3.model.grouped.grouped_matmul`);
4. send the results back by the reverse all-to-all and combine them on the source rank,
   weighted by the gate (so the gate's gradient stays local).

gloo implements ``all_to_all_single`` with unequal split sizes on CPU (checked with torch
2.13), NCCL does on GPU, so one code path serves both.

Process groups are DeepSpeed's (``deepspeed.utils.groups``, named ``ep_size_P``): EP groups
of P consecutive ranks, and *expert-data-parallel* groups of the ranks that hold the same
experts (world / P ranks, strided). Expert parameters are marked the way DeepSpeed's engine
and ZeRO-1/2 recognize (``param.allreduce = False``, ``param.group_name``), they sit in their
own optimizer group (``moe=True``, see :func:`dsv3.parallel.engine.param_groups`), and
:class:`ExpertParallelExperts` subclasses DeepSpeed's ``MoE`` layer only so that the engine
sets ``has_moe_layers``: it then reduces expert gradients over the expert-data-parallel group
only, ZeRO partitions them there, and checkpoints save each EP rank's optimizer state.

Gradient scale: a local expert's gradient already sums the contributions of the tokens of all
P ranks of its EP group; DeepSpeed sums it over the expert-data-parallel group and divides by
the *whole* data-parallel size, exactly as for the other parameters, so gradients (and their
norm) do not depend on P. ZeRO-1/2 and the bf16 optimizer report a norm that counts each
expert once; where the trainer measures and clips itself (ZeRO stage 0) it uses
:func:`clip_grad_norm_`, which sums the expert squares over the EP group.

Checkpoints: DeepSpeed's MoE save path keeps the experts out of ``mp_rank_00_model_states.pt``
and saves each EP rank's optimizer state (``expp_rank_*`` files at stage 0, ZeRO shards at
stages 1-2); :func:`save_expert_files` writes the expert weights in DeepSpeed's per-expert
files under their global index, which ``engine.load_checkpoint`` reads back for the local
experts and :func:`expert_load_fn` stacks; each EP rank writes its rows of the stacked
experts into the single-file ``model.safetensors`` (:mod:`dsv3.parallel.unsplit_save`). With
the saved ``ep`` and process count DeepSpeed's files resume the run bit for bit; any other
layout resumes from the layout-free optimizer state of :mod:`dsv3.parallel.layout_free`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from dsv3.errors import DsvError
from dsv3.model.grouped import ContiguousGrad, grouped_matmul, pad_groups, padded_rows
from dsv3.model.moe import MoE
from dsv3.parallel import ds_internals
from dsv3.parallel.layout import check_expert_parallel

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def group_name(ep: int) -> str:
    """DeepSpeed's name of the expert-parallel / expert-data-parallel groups of size ``ep``."""
    return f"ep_size_{ep}"


def ensure_groups(ep: int, pp: int = 1) -> str:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep`` (once).

    With ``pp`` pipeline stages (ranks ``stage * world/pp + data_rank``), both kinds of group
    stay inside one stage.

    Collective: every rank must call it. ``torch.distributed`` must be initialized (DeepSpeed's
    communication layer is started on top of it if needed).

    Returns:
        The group name (``ep_size_{ep}``).
    """
    import deepspeed
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():  # torch.distributed started without DeepSpeed
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    name = group_name(ep)
    ds_internals.ensure_expert_groups(ep, pp, name)
    return name


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` over the first dimension with variable splits.

    Forward sends ``x[in_splits chunk i]`` to rank i of ``group`` and receives
    ``out_splits[j]`` rows from rank j; backward is the same exchange with the splits swapped.
    """

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # noqa: D102
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Exchange rows of ``x`` (M, ...) with the ranks of ``group`` (autograd-aware).

    Args:
        x: (sum(in_splits), ...) rows to send, ``in_splits[i]`` of them to rank i.
        out_splits: rows to receive from each rank.
        in_splits: rows to send to each rank.
        group: a ``torch.distributed`` process group.

    Returns:
        (sum(out_splits), ...) received rows, grouped by source rank, dtype of ``x``.
    """
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(DeepSpeedMoE):
    """The local block of one MoE layer's routed experts, fed by all-to-all.

    A drop-in replacement for :class:`dsv3.model.moe.Experts` (same ``forward(x, weights,
    indices)`` and parameter names) holding experts ``[first, first + n_local)`` of
    ``num_experts``. It derives from DeepSpeed's ``MoE`` only to be recognized by the engine
    (``isinstance`` test that sets ``has_moe_layers``); DeepSpeed's gate, capacity and
    experts are not used (its ``__init__`` is deliberately skipped).

    Parameters: ``gate_proj``, ``up_proj`` (n_local, I, D) and ``down_proj`` (n_local, D, I),
    marked ``allreduce = False`` with ``group_name`` = ``ep_size_P``. Built from real experts,
    they are copies of this rank's block; built from experts on the meta device, they stay
    on the meta device (no memory for any expert) until :func:`dsv3.model.init.materialize_`
    allocates the block and draws expert ``first_expert + j`` from its own seed, the values
    the unsplit model has, or reads rows ``[first_expert, first_expert + n_local)`` from a
    weights file (``first_expert``: the global index of row 0).

    Attributes read by DeepSpeed: ``num_experts``, ``num_local_experts``, ``ep_size``,
    ``expert_group_name``; :meth:`set_deepspeed_parallelism` is its hook at engine start.
    """

    def __init__(self, experts: nn.Module, ep: int, name: str):
        nn.Module.__init__(self)
        E = experts.n_experts
        self.num_experts = E
        self.n_experts = E
        self.ep_size = ep
        self.num_local_experts = E // ep
        self.expert_group_name = name
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.group = ds_internals.expert_parallel_group(name)
        self.ep_rank = dist.get_rank(group=self.group)
        self.first_expert = (
            self.ep_rank * self.num_local_experts
        )  # global index of row 0 (also read by dsv3.model.init)
        block = slice(self.first_expert, self.first_expert + self.num_local_experts)
        for w in EXPERT_WEIGHTS:
            full = getattr(experts, w)
            if full.is_meta:  # nothing to copy: the block is allocated and initialized later (materialize_)
                local = torch.empty((self.num_local_experts,) + tuple(full.shape[1:]), dtype=full.dtype, device="meta")
            else:  # real weights (initialized or loaded): copy this rank's block
                local = full.detach()[block].clone()
            param = nn.Parameter(local, requires_grad=full.requires_grad)
            param.allreduce = False  # deepspeed.moe.utils.is_moe_param
            param.group_name = name
            setattr(self, w, param)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine at start-up; the groups already exist (see
        :func:`ensure_groups`), so this only checks that the layout is the one built."""
        if use_data_before_expert_parallel_:
            raise DsvError(
                "DeepSpeed's use_data_before_expert_parallel is not supported by dsv3's expert "
                "parallelism; remove it from the DeepSpeed config"
            )

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Dispatch tokens to the ranks holding their experts, run them, combine the results.

        Collective over the EP group: every rank of the group must call it for the same layer,
        also when it has no token for some (or all) of its experts.

        Args:
            x: (N, D) this rank's tokens; weights: (N, K) float32 gate weights; indices:
                (N, K) int64 global expert ids.

        Returns:
            (N, D) gate-weighted sum of the K expert outputs of each token, dtype of ``x``;
            equal (up to float rounding) to :class:`dsv3.model.moe.Experts` with all experts.
        """
        N, K = indices.shape
        P, n = self.ep_size, self.num_local_experts
        flat = indices.flatten()  # (N*K,)
        order = flat.argsort(stable=True)  # (N*K,) sorted by global expert, hence by destination rank
        token = order // K  # (N*K,) source token of each sorted row
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,) rows for each global expert
        recv_counts = torch.empty_like(counts)  # (P*n,): [s*n + j] = rows from rank s for local expert j
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits = counts.view(P, n).sum(1).tolist()
        recv_splits = recv_counts.view(P, n).sum(1).tolist()
        xs = ContiguousGrad.apply(x.index_select(0, token))  # (N*K, D) (index_select: backward index_add_)
        xr = all_to_all(xs, recv_splits, send_splits, self.group)  # (M, D) by source rank, then local expert
        local = torch.arange(n, device=x.device).repeat(P)  # (P*n,) local expert of each received chunk
        perm = torch.repeat_interleave(local, recv_counts).argsort(stable=True)  # (M,) rows by local expert
        local_counts = recv_counts.view(P, n).sum(0)  # (n,)
        xe = ContiguousGrad.apply(xr.index_select(0, perm))  # (M, D)
        dest = None
        if pad := padded_rows(xe.shape[0], n, xe):  # (CPU bf16: shapes that oneDNN's kernel cache keeps)
            group = torch.repeat_interleave(torch.arange(n, device=x.device), local_counts)  # (M,)
            xe, local_counts, dest = pad_groups(xe, local_counts, group, pad)
        offsets = local_counts.cumsum(0).to(torch.int32)  # (n,)
        h = F.silu(grouped_matmul(xe, self.gate_proj, offsets)) * grouped_matmul(xe, self.up_proj, offsets)
        ye = grouped_matmul(ContiguousGrad.apply(h), self.down_proj, offsets)  # (M, D)
        if dest is not None:
            ye = ye.index_select(0, dest)  # the padding rows dropped
        yr = ContiguousGrad.apply(ye.index_select(0, perm.argsort()))  # (M, D) back in received order
        ys = all_to_all(yr, send_splits, recv_splits, self.group)  # (N*K, D) in the order of xs
        ys = ys * weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ContiguousGrad.apply(ys))

    def extra_repr(self) -> str:
        return (
            f"experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1} of {self.num_experts}, "
            f"ep={self.ep_size}"
        )


def apply_expert_parallel(model: nn.Module, ep: int, pp: int = 1) -> list[ExpertParallelExperts]:
    """Split the routed experts of every :class:`dsv3.model.moe.MoE` in ``model`` over ``ep`` ranks.

    Collective (creates the process groups). Each MoE's ``experts`` is replaced in place by an
    :class:`ExpertParallelExperts` holding this rank's contiguous block: copied from the full
    weights when they are real (initialized or loaded; the full tensors are then released),
    left on the meta device when the model was built there (then
    :func:`dsv3.model.init.materialize_` allocates and initializes only the local block, from
    the per-expert seeds of its global indices, or reads only its rows from a weights file,
    so no rank ever holds another rank's experts). Call it before ``deepspeed.initialize``
    (which then broadcasts expert weights only within their expert-data-parallel group).

    Args:
        model: any module containing dsv3 MoE layers (a :class:`~dsv3.model.Transformer`).
        ep: expert-parallel degree (> 1).
        pp: pipeline stages (the EP groups lie within a stage's data-parallel ranks).

    Returns:
        The new modules, in ``model.named_modules()`` order.

    Raises:
        DsvError: impossible layout (see :func:`dsv3.parallel.layout.check_expert_parallel`).
    """
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    world = dist.get_world_size() if dist.is_initialized() else 1
    for m in moes:
        check_expert_parallel(ep, m.n_experts, world // pp, pp)
    name = ensure_groups(ep, pp)
    for m in moes:
        m.experts = ExpertParallelExperts(m.experts, ep, name)
    return ep_modules(model)


def ep_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    """The :class:`ExpertParallelExperts` of ``model`` in ``named_modules`` order (DeepSpeed's
    MoE layer order, ``layer_id`` of its expert checkpoint files)."""
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def ep_module(model: nn.Module | None, name: str) -> ExpertParallelExperts | None:
    """The expert-parallel module owning parameter ``name`` of ``model``, or None."""
    owner, _, _ = name.rpartition(".")
    if model is None or not owner:
        return None
    module = model.get_submodule(owner)
    return module if isinstance(module, ExpertParallelExperts) else None


def _named_ep_modules(model: nn.Module) -> Iterator[tuple[str, ExpertParallelExperts]]:
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            yield name, m


def is_expert_param(p: torch.Tensor) -> bool:
    """True for a parameter that lives on one EP rank only (DeepSpeed's ``is_moe_param``)."""
    return getattr(p, "allreduce", True) is False


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Global L2 gradient norm with expert parallelism, and clipping to ``max_norm``, in place.

    The gradients must already be reduced (replicated parameters equal on all ranks, expert
    parameters equal within their expert-data-parallel group). The squared norm of the expert
    gradients is summed over the EP group (each expert counted once), that of the replicated
    ones is taken locally; the result equals ``torch.nn.utils.clip_grad_norm_`` on the full,
    unsplit model. Scaling as torch's: ``min(1, max_norm / (norm + 1e-6))``.

    Args:
        parameters: iterable of parameters (expert ones marked, see :func:`is_expert_param`).
        max_norm: clipping threshold (> 0); 0 or less only measures.

    Returns:
        Scalar float32 tensor, the total norm before clipping (NaN/Inf propagate).
    """
    params = [p for p in parameters if p.grad is not None]
    dev = params[0].grad.device if params else torch.device("cpu")
    sq = torch.zeros(2, dtype=torch.float32, device=dev)  # replicated, expert
    group = None
    for p in params:
        s = torch.linalg.vector_norm(p.grad.detach().float()).pow(2)
        if is_expert_param(p):
            sq[1] += s
            group = ds_internals.expert_parallel_group(p.group_name)
        else:
            sq[0] += s
    if group is not None:
        expert = sq[1:].clone()
        dist.all_reduce(expert, group=group)
        sq[1:] = expert
    total = sq.sum().sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.device))
    return total


def expert_file_keys(prefix: str, expert: int) -> dict[str, str]:
    """Per-expert keys of a saved expert file: stacked name -> Hugging Face-style name with the
    global expert index (``layers.1.mlp.experts.gate_proj`` -> ``layers.1.mlp.experts.5.gate_proj.weight``)."""
    return {w: f"{prefix}.{expert}.{w}.weight" for w in EXPERT_WEIGHTS}


def save_expert_files(model: nn.Module, ckpt_root: Path, tag: str) -> list[Path]:
    """Write this rank's experts into DeepSpeed's per-expert checkpoint files.

    One file per (MoE layer, global expert), ``layer_{L}_expert_{e}_mp_rank_00_model_states.pt``
    (the names ``engine.load_checkpoint`` reads back for a model with MoE layers), holding the
    expert's three matrices under Hugging Face-style keys with its *global* index (see
    :func:`expert_file_keys`). Only expert-data-parallel rank 0 of each block writes.
    Not collective.

    Returns:
        The files written by this rank.

    Raises:
        OSError: the files could not be written.
    """
    written = []
    for layer_id, (prefix, m) in enumerate(_named_ep_modules(model)):
        if ds_internals.expert_data_parallel_coords(m.expert_group_name)[0] != 0:
            continue
        for j in range(m.num_local_experts):
            e = m.first_expert + j
            keys = expert_file_keys(prefix, e)
            state = {keys[w]: getattr(m, w).detach()[j].cpu().clone() for w in EXPERT_WEIGHTS}
            path = ds_internals.expert_checkpoint_file(ckpt_root, layer_id, e, tag)
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(state, tmp)
            tmp.replace(path)
            written.append(path)
    return written


def expert_load_fn(model: nn.Module) -> Callable:
    """A ``custom_load_fn`` for ``engine.load_checkpoint`` that restores the local expert blocks.

    DeepSpeed adds the per-expert entries of this rank's experts (read from the files of
    :func:`save_expert_files`) to the module state; the function stacks them back into the
    local ``gate_proj`` / ``up_proj`` / ``down_proj`` and loads everything strictly.

    Returns:
        ``fn(src, dst)`` as DeepSpeed calls it.

    Raises (from ``fn``):
        RuntimeError: an expert of this rank is missing, or keys / shapes do not match.
    """

    def load(src: dict, dst: nn.Module) -> None:
        state = dict(src)
        for prefix, m in _named_ep_modules(dst):
            for w in EXPERT_WEIGHTS:
                rows = []
                for e in range(m.first_expert, m.first_expert + m.num_local_experts):
                    key = expert_file_keys(prefix, e)[w]
                    if key not in state:
                        raise RuntimeError(f"the checkpoint has no weights for expert {e} ({key})")
                    rows.append(state.pop(key))
                state[f"{prefix}.{w}"] = torch.stack(rows)
        dst.load_state_dict(state, strict=True)

    return load


def describe(model: nn.Module) -> str:
    """One line: how the routed experts are split (for the start-up log)."""
    mods = ep_modules(model)
    if not mods:
        return "experts not split"
    m = mods[0]
    return (
        f"expert parallelism ep={m.ep_size}: {m.num_local_experts} of {m.num_experts} routed experts per rank "
        f"in each of {len(mods)} MoE layer(s)"
    )


__all__ = [
    "ExpertParallelExperts",
    "all_to_all",
    "apply_expert_parallel",
    "clip_grad_norm_",
    "describe",
    "ensure_groups",
    "ep_module",
    "ep_modules",
    "expert_load_fn",
    "group_name",
    "is_expert_param",
    "save_expert_files",
]
