"""Feed-forward layers: the dense SwiGLU MLP and DeepSeekMoE (stage 6).

Source: DeepSeek-V3 report §2.1.2, eq. 12-16 (gate), §2.1.2 "auxiliary-loss-free load
balancing", eq. 17-20 (complementary sequence-wise balance loss); SwiGLU (Shazeer, 2020).

Dims: N tokens (B*T flattened), D = dim, E = n_routed_experts, K = n_activated_experts,
G = n_expert_groups, I = moe_inter_dim.

    h' = h + sum_shared FFN_s(h) + sum_{i in TopK} g_i FFN_i(h)

No token is ever dropped: every token reaches all K of its experts (no capacity factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model import decode, kernels
from dsv3.model.decode import derived, fast_inference
from dsv3.model.grouped import ContiguousGrad, grouped_matmul, grouped_mm_ok, pad_groups, padded_rows


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``.

    Shapes: x (..., dim) -> (..., dim). Used for the dense layers (hidden ``inter_dim``) and
    the shared experts (hidden ``n_shared_experts * moe_inter_dim``).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_inference(self.gate_proj, self.up_proj, self.down_proj):  # one product for gate and up
            wg, wu, wd = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
            shape = (2 * wg.shape[0], wg.shape[1])
            g, u = decode.linear(self, "gate_up", x, (wg, wu), shape, self._gate_up).chunk(2, dim=-1)
            return decode.linear(self, "down", F.silu(g) * u, (wd,), tuple(wd.shape))
        project = decode.project  # (compiled inference on a few rows: maybe prepacked weights)
        return project(self.down_proj, F.silu(project(self.gate_proj, x)) * project(self.up_proj, x))

    def _gate_up(self) -> torch.Tensor:
        return torch.cat([self.gate_proj.weight, self.up_proj.weight])  # (2 hidden, dim)


class Gate(nn.Module):
    """Sigmoid router with a selection-only bias and group-limited top-k (V3 §2.1.2).

    Parameters / buffers (Hugging Face names):
        weight: (E, D) expert centroids ``e_i``.
        e_score_correction_bias: (E,) float32 load-balancing bias ``b_i``; a buffer with no
            gradient, updated by the trainer after each optimizer step (see
            :func:`dsv3.training.balance.update_expert_bias`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens.

        1. ``s_i = sigmoid(x . e_i)`` in fp32;
        2. selection score ``s_i + b_i``;
        3. if G > 1: a group's score is the sum of its two best selection scores; keep the
           ``n_limited_groups`` best groups, mask the rest to -inf;
        4. top-K selection scores pick the experts;
        5. weights are the *unbiased* ``s_i`` of the picked experts, normalized to sum 1, times
           ``route_scale``: the bias decides who wins, never how much.

        Args:
            x: (N, D).

        Returns:
            weights (N, K) float32, indices (N, K) int64, scores (N, E) float32 (the ``s_i``).
        """
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        scores = F.linear(x if x.dtype == torch.float32 else x.float(), w).sigmoid()  # (N, E)
        select = scores + self.e_score_correction_bias  # (N, E)
        if self.n_groups > 1:
            grouped = select.unflatten(-1, (self.n_groups, -1))  # (N, G, E/G)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # True = drop
            select = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(1)  # (N, E)
        indices = select.topk(self.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, indices)  # (N, K)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        return weights, indices, scores

    def route_on_host(self, x: torch.Tensor) -> tuple[list[int], list[list[float]]] | None:
        """:meth:`forward`'s routing for a few tokens (a decoding step on CPU), done in Python on
        the host from the scores: the dozen small operators of the group-limited top-k cost more
        than the arithmetic on E values. Sums and quotients are rounded to float32 as
        :meth:`forward` computes them.

        Args:
            x: (N, D).

        Returns:
            expert ids (N*K, token-major) and weights (N lists of K floats), the values of
            :meth:`forward`'s ``indices`` and ``weights``; or None where a token's last kept
            group or expert ties with the first one left out (``topk`` breaks such ties its own
            way: the caller then routes with :meth:`forward`).
        """
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        scores = F.linear(x if x.dtype == torch.float32 else x.float(), w).sigmoid()  # (N, E)
        select = scores + self.e_score_correction_bias
        f32 = np.float32
        E, G, K = self.n_experts, self.n_groups, self.top_k
        n = E // G
        ids: list[int] = []
        ws: list[list[float]] = []
        for s, sel in zip(scores.tolist(), select.tolist()):
            if G > 1:
                tops = [sorted(sel[g * n : (g + 1) * n], reverse=True) for g in range(G)]
                group = [f32(t[0]) + f32(t[1]) for t in tops]
                order = sorted(range(G), key=lambda g: -group[g])
                if self.topk_groups < G and group[order[self.topk_groups - 1]] == group[order[self.topk_groups]]:
                    return None
                allowed = [e for g in sorted(order[: self.topk_groups]) for e in range(g * n, (g + 1) * n)]
            else:
                allowed = list(range(E))
            ranked = sorted(allowed, key=lambda e: -sel[e])
            if K < len(ranked) and sel[ranked[K - 1]] == sel[ranked[K]]:
                return None
            top = ranked[:K]
            total = f32(0.0)
            for e in top:
                total = total + f32(s[e])
            row = [f32(s[e]) / total for e in top]
            if self.route_scale != 1.0:
                row = [v * f32(self.route_scale) for v in row]
            ids.extend(top)
            ws.append([float(v) for v in row])
        return ids, ws


#: a decoding step routes on the host (:meth:`Gate.route_on_host`) while N * E is at most this
ROUTE_ON_HOST_MAX = 512


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


DENSE_MAX_TOKENS = 16
"""On CPU, inference batches of at most this many tokens whose choices fill at least E expert
slots (N * K >= E) may run every expert on every token (:meth:`Experts._all_experts`), chosen
by measurement against the grouped products (every expert is also the rule where nothing is
measured, e.g. in compiled code, for a layer small enough to measure; a larger one keeps the
grouped products). Measured on the 2-core AVX-512-BF16 CPU (``tiny`` config, compiled, greedy
decoding at batch 8, one thread): bf16 1589 -> 2079 tokens/s, since each small bf16 product has
a large fixed cost. In fp32 the E/K times more arithmetic first made it slower (1346 -> 1271),
and fp32's rule was the grouped products until the eager path ran every expert as two plain
products; on 2026-12-07 every expert measured faster in fp32 too (eager, 0.61 against 0.83 ms
per layer of 8 tokens; compiled ``tiny`` decoding at batch 8, two threads: 2547 against
1952-2171 tokens/s)."""

#: expert weights are measured on synthetic copies: only while the three stacked tensors hold
#: at most this many elements (larger layers keep the fixed rules)
MEASURE_MAX_ELEMENTS = 1 << 26


class Experts(nn.Module):
    """The routed experts of one MoE layer, stored stacked for grouped matrix products.

    Parameters: ``gate_proj`` and ``up_proj`` (E, I, D), ``down_proj`` (E, D, I); expert e's
    SwiGLU is ``down_proj[e] @ (silu(gate_proj[e] @ x) * (up_proj[e] @ x))``. The Hugging Face
    per-expert keys ``experts.{e}.gate_proj.weight`` are slices ``gate_proj[e]``.

    ``first_expert`` (0 here) is the global index of row 0, read by the per-expert
    initialization (:mod:`dsv3.model.init`); an expert-parallel block sets its own.

    Every forward reads all three stacked tensors, whichever experts the tokens chose (none
    on a rank whose batch routes nowhere): a wrapper that gathers a module's parameters around
    its forward (ZeRO-3) then gathers the same tensors in the same order on every rank.
    """

    first_expert = 0

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Send each token to its K experts, run every expert once, combine by the gate weights.

        Tokens are sorted by expert so that each expert's rows are contiguous, then the three
        projections run as grouped matrix products (no Python loop over experts).

        Args:
            x: (N, D); weights: (N, K) float32; indices: (N, K) int64.

        Returns:
            (N, D) weighted sum of expert outputs, dtype of ``x``.
        """
        N, K = indices.shape
        flat = indices.flatten()  # (N*K,)
        # (a CUDA graph being captured cannot read the padded product's block size from the data)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing() and self.kernel(x, N, K) == "bmm"
        if not torch.is_grad_enabled() and (N * K < self.n_experts or capturing):
            if x.device.type == "cpu" and fast_inference(self) and self.few_kernel(x, N, K) == "loop":
                return self._chosen_loop(x, weights, flat, N, K)
            return self._few_tokens(x, weights, flat, N, K)
        if not torch.is_grad_enabled() and N <= DENSE_MAX_TOKENS and x.device.type == "cpu":
            if self.kernel(x, N, K, dense=True) == "all_experts":
                return self._all_experts(x, weights, indices)
        return self._grouped(x, weights, indices, self.kernel(x, N, K))

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, kernel: str) -> torch.Tensor:
        """The grouped path of :meth:`forward` with ``kernel`` (see :func:`grouped_matmul`)."""
        K = indices.shape[1]
        flat = indices.flatten()  # (N*K,)
        order = flat.argsort(stable=True)  # (N*K,) sorted by expert
        token = order // K  # (N*K,) source token of each sorted row
        # scatter_add, not bincount: bincount sizes its output from the data (a host sync on GPU)
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )  # (E,)
        cg = ContiguousGrad.apply if torch.is_grad_enabled() else _same  # an autograd.Function call costs ~10 us
        xs = cg(x.index_select(0, token))  # (N*K, D); backward: index_add_ (8x faster than x[token]'s in bf16)
        dest = None
        # (compiled code pads into a fixed block whose spare rows only grouped_mm leaves alone)
        if kernel == "grouped_mm" or not torch.compiler.is_compiling():
            pad = padded_rows(flat.numel(), self.n_experts, x)
            if pad:
                xs, counts, dest = pad_groups(xs, counts, flat[order], pad)
        offsets = counts.cumsum(0).to(torch.int32)  # (E,)
        h = F.silu(grouped_matmul(xs, self.gate_proj, offsets, kernel)) * grouped_matmul(
            xs, self.up_proj, offsets, kernel
        )
        ys = grouped_matmul(cg(h), self.down_proj, offsets, kernel)  # (N*K, D)
        if dest is not None:
            ys = ys.index_select(0, dest)  # (N*K, D): the padding rows (zero in, zero out) dropped
        ys = ys * weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, cg(ys))

    def kernel(self, x: torch.Tensor, N: int, K: int, dense: bool = False) -> str:
        """The measured choice (:func:`dsv3.model.kernels.choose`) for N tokens of ``x``'s dtype,
        K experts each: with ``dense``, ``all_experts`` or ``grouped`` for a few inference tokens
        (see :data:`DENSE_MAX_TOKENS`); else ``grouped_mm`` or ``bmm`` (padded) for the grouped
        products (:func:`grouped_matmul`), measured forward and backward outside inference."""
        E, I, D = self.gate_proj.shape
        if dense:  # the rule: every expert (see DENSE_MAX_TOKENS)
            candidates = ["all_experts", "grouped"]
        elif grouped_mm_ok(x, I, D) and grouped_mm_ok(x, D, I):
            candidates = ["grouped_mm", "bmm"]
        else:
            return "bmm"
        if dense and not self._measurable():
            return "grouped"  # a large layer: not every expert for a few tokens (E/K times the reads)
        if x.device.type != "cpu" or not self._measurable() or torch.compiler.is_compiling():
            return candidates[0]
        train = not dense and not torch.is_inference_mode_enabled()
        if dense:  # asked on every decoding step: remembered
            key = ("decode_experts", x.dtype, N, K, E, I, D)
            return kernels.remembered(key, lambda: self._measured_kernel(x, N, K, candidates, dense, train))
        return self._measured_kernel(x, N, K, candidates, dense, train)

    def _measured_kernel(self, x: torch.Tensor, N: int, K: int, candidates: list[str], dense: bool, train: bool) -> str:
        E, I, D = self.gate_proj.shape
        rows = N if dense else kernels.bucket(N)
        dtype = str(x.dtype).removeprefix("torch.")
        key = f"{dtype} {'train' if train else 'infer'} N={rows} K={K} E={E} D={D} I={I}"

        def run(name, sets=[]):  # noqa: B006 - the synthetic layers, made on the first call
            if not sets:  # decoding: copies of the layer, as a decoding step meets it (after other layers)
                copies = kernels.stream_copies(self._bytes(x.dtype)) if dense else 1
                sets.extend(self._synthetic(rows, K, x.dtype, train) for _ in range(copies))
            for data in sets:
                layer, (w, ids) = data["layer"], data["w"]
                layer.zero_grad(set_to_none=True)
                with torch.enable_grad() if train else torch.inference_mode():
                    xs = data["x"].detach().requires_grad_(train)
                    if name == "all_experts":
                        y = layer._all_experts(xs, w, ids)
                    else:
                        y = layer._grouped(xs, w, ids, "grouped_mm" if name == "grouped" else name)
                    if train:
                        y.sum().backward()

        if dense:  # the products of all_experts, chosen before it is timed
            decode.choose_linears(x.dtype, rows, ((2 * E * I, D), (D, E * I)))
        op = "decode_experts" if dense else "experts"
        return kernels.choose(op, key, candidates, run, x.device, streamed=dense)

    def _bytes(self, dtype: torch.dtype) -> int:
        """Bytes of this layer's three weights in ``dtype``."""
        return (self.gate_proj.numel() + self.up_proj.numel() + self.down_proj.numel()) * dtype.itemsize

    def _measurable(self) -> bool:
        """Whether this layer is small enough (:data:`MEASURE_MAX_ELEMENTS`) to time candidates
        on a synthetic copy, and to keep stacked copies of its weights for decoding."""
        return self.gate_proj.numel() + self.up_proj.numel() + self.down_proj.numel() <= MEASURE_MAX_ELEMENTS

    def _synthetic(self, N: int, K: int, dtype: torch.dtype, train: bool) -> dict:
        """A layer of this one's sizes with random weights (std 0.02), N random rows and their
        top-K routing (``w``: (weights, indices)), for timing candidates (own generator; made
        outside inference mode, so that copies derived from the weights are kept)."""
        g = kernels.generator()
        E, D = self.n_experts, self.gate_proj.shape[2]
        with torch.inference_mode(False):
            layer = Experts(E, D, self.gate_proj.shape[1])
            for p in ("gate_proj", "up_proj", "down_proj"):
                w = (torch.randn(getattr(self, p).shape, generator=g) * 0.02).to(dtype)
                setattr(layer, p, nn.Parameter(w, requires_grad=train))
            x = torch.randn(N, D, generator=g).to(dtype)
            return {"layer": layer, "x": x, "w": torch.randn(N, E, generator=g).softmax(-1).topk(K)}

    def few_kernel(self, x: torch.Tensor, N: int, K: int) -> str:
        """For fewer token-expert pairs than experts in eager inference on CPU: ``loop``
        (:meth:`_chosen_loop`, the rule) or ``gather`` (:meth:`_few_tokens`), the measured choice
        (:func:`dsv3.model.kernels.choose`, operation ``decode_few``) for N tokens of ``x``'s
        dtype."""
        E, I, D = self.gate_proj.shape
        if not self._measurable():
            return "loop"
        return kernels.remembered(("decode_few", x.dtype, N, K, E, I, D), lambda: self._few_choice(x, N, K))

    def _few_choice(self, x: torch.Tensor, N: int, K: int) -> str:
        E, I, D = self.gate_proj.shape
        key = f"{str(x.dtype).removeprefix('torch.')} N={N} K={K} E={E} D={D} I={I}"

        def run(name, sets=[]):  # noqa: B006 - the synthetic layers, made on the first call
            if not sets:
                copies = kernels.stream_copies(self._bytes(x.dtype))
                sets.extend(self._synthetic(N, K, x.dtype, train=False) for _ in range(copies))
            with torch.inference_mode():
                for data in sets:
                    path = data["layer"]._chosen_loop if name == "loop" else data["layer"]._few_tokens
                    path(data["x"], data["w"][0], data["w"][1].flatten(), N, K)

        decode.choose_linears(x.dtype, 1, ((2 * I, D), (D, I)))  # the loop's products, chosen before it is timed
        return kernels.choose("decode_few", key, ["loop", "gather"], run, x.device, streamed=True)

    def _all_experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Inference on a few tokens that together reach most experts (batched decoding): every
        expert runs on every token and the experts a token did not choose get weight 0.

        Three matrix products in all (``gate_proj`` and ``up_proj`` as one (E*I, D) matrix
        each, ``down_proj`` as one batched product), each reading every expert's weights once,
        instead of three per expert: with so few rows per expert the products are bound by
        reading the weights and by the cost of each call, not by the E/K times more
        arithmetic. Same sum as the grouped path: each chosen expert's output times its
        gate weight.

        Args: x (N, D); weights (N, K) float32; indices (N, K) int64.
        Returns: (N, D), dtype of ``x``.
        """
        N, D = x.shape
        E, I = self.gate_proj.shape[0], self.gate_proj.shape[1]
        w = torch.zeros(N, E, dtype=weights.dtype, device=x.device).scatter_(1, indices, weights)  # (N, E)
        if self._measurable() and fast_inference(self):  # (copies of a small layer's weights)
            # the gate weight inside: sum_e (w_e h_e) W_down,e as one product
            sources = (self.gate_proj, self.up_proj)
            gu = decode.linear(self, "dense gate_up", x, sources, (2 * E * I, D), self._dense_gate_up)
            gu = gu.view(N, E, 2, I)  # expert e's gate then up outputs
            h = (F.silu(gu[:, :, 0]) * gu[:, :, 1]) * w.unsqueeze(-1).to(x.dtype)  # (N, E, I)
            sources = (self.down_proj,)
            return decode.linear(self, "dense down", h.view(N, E * I), sources, (D, E * I), self._dense_down)
        h = F.silu(decode.compiled_linear(x, self.gate_proj)) * decode.compiled_linear(x, self.up_proj)  # (N, E I)
        ys = torch.bmm(h.view(N, E, I).transpose(0, 1), self.down_proj.transpose(1, 2))  # (E, N, D)
        return (ys * w.t().unsqueeze(-1).to(ys.dtype)).sum(0)  # (N, D)

    def _dense_gate_up(self) -> torch.Tensor:
        """(2 E I, D): per expert e its gate rows, then its up rows (rows 2 I e ... 2 I e + 2 I - 1)."""
        E, I, D = self.gate_proj.shape
        return torch.cat([self.gate_proj, self.up_proj], dim=1).reshape(2 * E * I, D)

    def _dense_down(self) -> torch.Tensor:
        """(D, E I): the experts' down projections side by side (columns of expert e: e I ... e I + I - 1)."""
        E, D, I = self.down_proj.shape
        return self.down_proj.permute(1, 0, 2).reshape(D, E * I)

    def _chosen_loop(self, x: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor, N: int, K: int) -> torch.Tensor:
        """Eager inference on CPU with fewer token-expert pairs than experts (decoding): each
        chosen expert's SwiGLU on its token, from views of the stacked weights, each product
        through :func:`dsv3.model.decode.linear` (so possibly from a prepacked copy of the view).

        :meth:`_few_tokens` copies the chosen experts' weights (``index_select``) before its
        batched products, and a (K, I, D) x (K, D, 1) ``bmm`` is slow on CPU; here nothing is
        copied per call (one fp32 expert layer at batch 1 on the ``tiny`` sizes: 46 against
        254 us). The expert ids are read to the host, which is free on CPU.

        Args: x (N, D); weights (N, K) float32; flat (N*K,) expert ids, token-major.
        Returns: (N, D), dtype of ``x``.
        """
        return self._loop(x, flat.tolist(), weights.tolist(), N, K)

    def _loop(self, x: torch.Tensor, ids: list[int], ws: list[list[float]], N: int, K: int) -> torch.Tensor:
        """:meth:`_chosen_loop` with the routing as host lists: ``ids`` (N*K) token-major, ``ws`` N x K."""
        gate_up = (self.gate_proj, self.up_proj)
        per_expert = derived(self, "views", (*gate_up, self.down_proj), self._expert_views)
        E, I, D = self.gate_proj.shape
        rows = []
        for n in range(N):
            xn = x[n : n + 1] if N > 1 else x
            y = None
            for k in range(K):
                e = ids[n * K + k]
                stacked, down = per_expert[e]
                if stacked is None:  # a layer too large for stacked copies
                    g = decode.linear(self, f"gate {e}", xn, gate_up[:1], (I, D), weight=self.gate_proj[e])
                    u = decode.linear(self, f"up {e}", xn, gate_up[1:], (I, D), weight=self.up_proj[e])
                else:
                    g, u = decode.linear(self, f"gate_up {e}", xn, gate_up, (2 * I, D), weight=stacked).chunk(2, -1)
                o = decode.linear(self, f"down {e}", F.silu(g) * u, (self.down_proj,), (D, I), weight=down) * ws[n][k]
                y = o if y is None else y + o
            rows.append(y)
        return rows[0] if N == 1 else torch.cat(rows)

    def _expert_views(self) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """Per expert (its gate and up rows as one (2 I, D) view of :meth:`_dense_gate_up`'s copy,
        or None for a layer too large for that copy, or whose weights are inference tensors, of
        which no copy is kept; ``down_proj[e]``)."""
        E, I = self.gate_proj.shape[:2]
        if not self._measurable() or self.gate_proj.is_inference():
            return [(None, self.down_proj[e]) for e in range(E)]
        stacked = derived(self, "dense gate_up", (self.gate_proj, self.up_proj), self._dense_gate_up)
        return [(stacked[2 * I * e : 2 * I * (e + 1)], self.down_proj[e]) for e in range(E)]

    def _few_tokens(self, x: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor, N: int, K: int) -> torch.Tensor:
        """Inference with fewer token-expert pairs than experts (decoding): gather only the
        chosen experts' weights and run one batched product per projection.

        Args: x (N, D); weights (N, K) float32; flat (N*K,) expert ids, token-major.
        Returns: (N, D), dtype of ``x``.
        """
        xs = x.repeat_interleave(K, dim=0).unsqueeze(-1)  # (N*K, D, 1)
        h = F.silu(torch.bmm(self.gate_proj.index_select(0, flat), xs)) * torch.bmm(
            self.up_proj.index_select(0, flat), xs
        )  # (N*K, I, 1)
        ys = torch.bmm(self.down_proj.index_select(0, flat), h).view(N, K, -1)  # (N, K, D)
        return torch.bmm(weights.to(ys.dtype).unsqueeze(1), ys).squeeze(1)  # (N, D)


@dataclass
class MoEAux:
    """Side outputs of one MoE layer for the trainer.

    Attributes:
        balance_loss: scalar float32, ``sum_i f_i P_i`` averaged over the sequences of the
            batch (eq. 17-20, *without* the weight alpha).
        load: (E,) int64 tokens routed to each expert in this forward.
    """

    balance_loss: torch.Tensor
    load: torch.Tensor


class MoE(nn.Module):
    """DeepSeekMoE layer: shared experts + gated routed experts (V3 §2.1.2, eq. 12-16).

    Submodule names follow the Hugging Face checkpoints: ``gate``, ``experts``,
    ``shared_experts``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.n_activated_experts
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = (
            MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        """Apply the layer.

        Args:
            x: (B, T, D).
            valid: optional (B, T) bool, False for padding positions that must not count in
                the load statistics or the balance loss.

        Returns:
            y (B, T, D) (the FFN output, without the residual), and :class:`MoEAux` (None in
            inference: eval mode, no gradients and no ``valid`` mask).
        """
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        routed = None
        if valid is None and not torch.is_grad_enabled() and self._routes_on_host(flat):
            routed = self.gate.route_on_host(flat)  # a decoding step: routed on the host (None: a tie)
        if routed is not None:  # the chosen experts in a loop
            y = self.experts._loop(flat, routed[0], routed[1], B * T, self.top_k)
        else:
            weights, indices, scores = self.gate(flat)
            y = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if routed is not None or (valid is None and not self.training and not torch.is_grad_enabled()):
            return y.view(B, T, D), None  # inference (generation): no load statistics needed
        return y.view(B, T, D), self._aux(indices, scores, B, T, valid)

    def _routes_on_host(self, flat: torch.Tensor) -> bool:
        """Eager inference on CPU with fewer (token, expert) pairs than experts, few enough scores
        (:data:`ROUTE_ON_HOST_MAX`), where the chosen experts run in a loop (``decode_few``)."""
        N, E = flat.shape[0], self.n_experts
        return (
            flat.device.type == "cpu"
            and N * self.top_k < E
            and N * E <= ROUTE_ON_HOST_MAX
            and fast_inference(self.gate, self.experts)
            and self.experts.few_kernel(flat, N, self.top_k) == "loop"
        )

    def _aux(self, indices, scores, B, T, valid) -> MoEAux:
        """Expert load and the sequence-wise balance loss (eq. 17-20).

        ``f_i = E / (K T) * count_i`` and ``P_i = mean_t s_i / sum_j s_j`` per sequence;
        loss = ``sum_i f_i P_i`` averaged over sequences. With ``valid``, T is the number of
        valid tokens of the sequence.
        """
        E, K = self.n_experts, self.top_k
        hits = torch.zeros(B * T, E, device=scores.device).scatter_(1, indices, 1.0)  # (N, E)
        probs = scores / scores.sum(-1, keepdim=True)  # (N, E)
        if valid is not None:
            m = valid.reshape(B * T, 1).float()
            hits, probs = hits * m, probs * m
            n_tok = valid.sum(1).clamp(min=1).float()  # (B,)
        else:
            n_tok = torch.full((B,), float(T), device=scores.device)
        hits = hits.view(B, T, E)
        f = hits.sum(1) * (E / (K * n_tok))[:, None]  # (B, E)
        p = probs.view(B, T, E).sum(1) / n_tok[:, None]  # (B, E)
        balance = (f * p).sum(-1).mean()
        load = hits.sum((0, 1)).round().long()  # (E,)
        return MoEAux(balance_loss=balance, load=load)
