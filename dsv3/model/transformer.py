"""The DeepSeek-V3 model: embedding, blocks, head and Multi-Token Prediction (stages 2, 7, 8).

Source: DeepSeek-V3 report §2 (architecture), §2.2 (MTP, eq. 21-25).

Dims: B batch, T tokens, D = dim, V = vocab_size, E = n_routed_experts.

Module and parameter names equal the Hugging Face ``DeepseekV3ForCausalLM`` keys with the
``model.`` prefix dropped (``embed_tokens``, ``layers.N.self_attn.q_a_proj``, ``norm``,
``lm_head``), so checkpoint import/export is a rename table. MTP module k is stored by
Hugging Face as layer ``n_layers + k - 1``; here it is ``mtp.{k-1}``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model import decode, kernels
from dsv3.model.attention import MLA, LatentCache
from dsv3.model.decode import derived, fast_inference, interleaved_rope_tables
from dsv3.model.init import init_module_
from dsv3.model.moe import MLP, Gate, MoE
from dsv3.model.norm import RMSNorm
from dsv3.model.objective import IGNORE_INDEX, ce_sum, training_loss
from dsv3.model.rope import rope_cos_sin


class Block(nn.Module):
    """Pre-norm transformer block: ``h += MLA(norm(h))``, ``h += FFN(norm(h))``.

    The FFN is a dense SwiGLU :class:`MLP` for the first ``n_dense_layers`` layers, else a
    :class:`MoE` (DeepSeek-V3: 3 dense layers, then 58 MoE layers).
    """

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.is_moe = layer_id >= cfg.n_dense_layers
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, h, cos, sin, cache=None, attn_mask=None, valid=None):
        """Args: h (B, T, D); cos/sin (T, dr/2). Returns (h (B, T, D), MoEAux or None)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, attn_mask)
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, aux = self.mlp(x, valid)
            return h + y, aux
        return h + self.mlp(x), None


class SharedHead(nn.Module):
    """The final norm of an MTP module; the projection itself is the model's ``lm_head``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)


class MTPModule(Block):
    """One Multi-Token Prediction depth k (V3 §2.2, eq. 21-23).

    ``h'_i = W_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]`` (embedding half first, as in
    the released checkpoints), then one transformer block; the shared output head (after this
    module's own norm) predicts ``t_{i+k+1}``. ``enorm``, ``hnorm``, ``eh_proj`` and
    ``shared_head.norm`` follow the Hugging Face key names. The embedding and the output head
    are the main model's (shared, not copied).

    ``h^{k-1}`` is the state the previous depth hands to its output head, i.e. *after* its
    final norm: the main model's ``norm(h)`` for k = 1, ``shared_head.norm(h^{k-1})`` of the
    previous module for k > 1. This is what the released DeepSeek-V3 MTP weights expect
    (transformers' ``MtpModel`` and the serving engines feed the post-norm state; feeding the
    pre-norm state changes the MTP logits completely).
    """

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__(layer_id, cfg)
        self.enorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, emb, cos, sin, valid=None, cache=None, attn_mask=None):
        """Args: h_prev (B, T', D) previous depth's normalized states (see the class doc),
        emb (B, T', D) embeddings of the tokens k ahead, cache: optional decode cache of this
        module's attention (see :meth:`Transformer.mtp_draft`), attn_mask: optional bool
        (B, 1, T', T') mask. Returns (h (B, T', D) before the head norm, MoEAux or None)."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))  # (B, T', D)
        return super().forward(h, cos, sin, cache=cache, attn_mask=attn_mask, valid=valid)


@dataclass
class TrainOutput:
    """What a training forward returns (sums, so the trainer can normalize globally).

    Attributes:
        lm_loss_sum: scalar fp32, summed next-token cross-entropy over labelled positions.
        lm_tokens: scalar int64, number of labelled positions.
        mtp_loss_sum: (D_mtp,) fp32 summed cross-entropy of each MTP depth.
        mtp_tokens: (D_mtp,) int64 labelled positions per depth.
        balance_loss: scalar fp32, sum over MoE layers of the sequence-wise balance loss
            (eq. 17-20), unweighted by alpha.
        expert_load: (L_moe, E) int64 tokens routed to each expert of each MoE layer (main
            layers first, then the MTP modules' layers).
    """

    lm_loss_sum: torch.Tensor
    lm_tokens: torch.Tensor
    mtp_loss_sum: torch.Tensor
    mtp_tokens: torch.Tensor
    balance_loss: torch.Tensor
    expert_load: torch.Tensor

    def local_loss(self, mtp_lambda: float, alpha: float) -> torch.Tensor:
        """:func:`dsv3.model.objective.training_loss` normalized by this batch's own counts
        (means over this batch), a scalar fp32 tensor."""
        tokens = torch.cat([self.lm_tokens.reshape(1), self.mtp_tokens.reshape(-1)]).clamp(min=1).float()
        return training_loss(self.lm_loss_sum, self.mtp_loss_sum, self.balance_loss, tokens, mtp_lambda, alpha)


class Transformer(nn.Module):
    """DeepSeek-V3 language model (main model + MTP modules).

    ``model(input_ids)`` returns the main head's logits, float32 (B, T, V) (docs/design.md
    Python API). ``model(input_ids, labels)`` returns a :class:`TrainOutput`. With a decode
    cache from :meth:`new_cache`, the call processes only the new tokens and appends them to
    the cache.

    Build big configurations on the meta device (``with torch.device("meta"):``) to count
    parameters without memory, then ``to_empty(device=...)`` and :meth:`init_weights`, or
    allocate only some parameters with :func:`dsv3.model.init.materialize_` (same values).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.mtp_depth))
        cos, sin = rope_cos_sin(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialize every parameter (the one place that defines the initial values).

        All linear, embedding, expert and gate weights ~ N(0, ``init_std``) (V3 report §4.2:
        0.006), RMSNorm weights = 1, balancing biases = 0, rope tables recomputed (they are
        non-persistent buffers, so a model built on the meta device needs them).

        Each parameter has its own generator, seeded from (seed, its name); the stacked routed
        experts one per expert, seeded from (seed, name, expert index) (see
        :mod:`dsv3.model.init`). So the values do not depend on the parallel layout: a
        pipeline stage or an expert-parallel rank that materializes only its own parameters
        (:func:`dsv3.model.init.materialize_`) gets exactly these values. Parameters still on
        the meta device are skipped.

        Args:
            seed: the run seed. None draws one from the global torch RNG (so the result then
                depends on ``torch.manual_seed``).
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        init_module_(self, seed, self.cfg.init_std)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self) -> None:
        """(Re)compute the rope tables on the model's device, in float32."""
        cos, sin = rope_cos_sin(self.cfg)
        self.rope_cos = cos.to(self.rope_cos.device)
        self.rope_sin = sin.to(self.rope_sin.device)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list[LatentCache]:
        """Allocate the latent decode cache: one :class:`LatentCache` per main layer.

        Holds ``kv_lora_rank + qk_rope_head_dim`` values per token per layer (576 for 671B).
        """
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        dtype = dtype or self.embed_tokens.weight.dtype
        return [LatentCache(batch, max_len, self.cfg, dtype, module_device(layer)) for layer in self.layers]

    def input_device(self) -> torch.device:
        """The device token ids should be on: where the embedding computes."""
        return module_device(self.embed_tokens)

    def _interleaved_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        return interleaved_rope_tables(self.rope_cos, self.rope_sin)

    def _trunk(self, input_ids, cache=None, attn_mask=None, valid=None, position_ids=None):
        """Embed and run the main blocks. Returns (h (B, T, D) before the final norm, auxes)."""
        B, T = input_ids.shape
        start = cache[0].length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if cache is not None and fast_inference() and not hasattr(self, "hf_device_map"):
            # interleaved tables, shaped once for every layer (a dispatched model, whose hooked
            # layers take the plain path, gets the half tables, which the eager path converts)
            cos, sin = derived(self, "rope", (self.rope_cos, self.rope_sin), self._interleaved_rope)
            if position_ids is None:
                cos, sin = cos[start : start + T, None], sin[start : start + T, None]  # (T, 1, dr)
            else:
                cos, sin = cos[position_ids].unsqueeze(2), sin[position_ids].unsqueeze(2)  # (B, T, 1, dr)
        elif position_ids is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, dr/2)
        else:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]  # (B, T, dr/2)
        h = self.embed_tokens(input_ids)  # (B, T, D)
        auxes = []
        for i, layer in enumerate(self.layers):
            h, aux = layer(h, cos, sin, None if cache is None else cache[i], attn_mask, valid)
            if aux is not None:
                auxes.append(aux)
        return h, auxes

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: list[LatentCache] | None = None,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ):
        """Run the model.

        Args:
            input_ids: (B, T) int64 token ids.
            labels: (B, T) int64 next-token targets (``labels[:, i]`` = token i+1), or
                ``IGNORE_INDEX``. When given, returns a :class:`TrainOutput` including the MTP
                losses: depth k at position i reads the embedding of ``input_ids[:, i+k]`` and
                predicts ``labels[:, i+k]`` = token i+k+1, for i < T-k.
            cache: decode cache from :meth:`new_cache` (inference only).
            attn_mask: optional bool (B, 1, T, S) mask, True = may attend (left padding, or
                the block-diagonal causal mask of document-aware packing).
            position_ids: optional (B, T) int64 rope positions of the tokens (default:
                consecutive from the cache length, or from 0): per-row offsets (left padding),
                or positions restarting at each document of a packed window. With ``labels``,
                MTP depth k masks position i unless ``position_ids[i+k] == position_ids[i] + k``
                (its target would belong to another document).

        Returns:
            logits (B, T, V) float32 if ``labels`` is None, else :class:`TrainOutput`.

        Raises:
            ValueError: the sequence does not fit ``max_seq_len`` or the cache.
        """
        if labels is None:
            if cache is None or not fast_inference():
                h = self.hidden_states(input_ids, cache, attn_mask, position_ids)
                return decode.project(self.lm_head, h).float()
            with kernels.pinned():  # the eager path with a cache: DSV3_KERNELS read once
                plain = self.decode_kernel(input_ids, cache, attn_mask, position_ids) == "plain"
                with decode.plain_products(plain):
                    return self._cached_logits(input_ids, cache, attn_mask, position_ids)
        valid = labels != IGNORE_INDEX  # (B, T)
        h, auxes = self._trunk(input_ids, attn_mask=attn_mask, valid=valid, position_ids=position_ids)
        h = self.norm(h)  # (B, T, D): read by the head and by MTP depth 1
        lm_sum = ce_sum(self.lm_head(h), labels)
        T = input_ids.shape[1]
        mtp_sums, mtp_tokens = [], []
        for k, module in enumerate(self.mtp, start=1):
            emb = self.embed_tokens(input_ids[:, k:])  # (B, T-k, D)
            target = labels[:, k:]  # (B, T-k)
            if position_ids is None:
                cos, sin, mask = self.rope_cos[: T - k], self.rope_sin[: T - k], None
            else:  # document-aware packing: stay inside each document
                pos = position_ids[:, : T - k]
                cos, sin = self.rope_cos[pos], self.rope_sin[pos]
                mask = None if attn_mask is None else attn_mask[:, :, : T - k, : T - k]
                target = target.masked_fill(position_ids[:, k:] != pos + k, IGNORE_INDEX)
            h, aux = module(h[:, : T - k], emb, cos, sin, target != IGNORE_INDEX, attn_mask=mask)
            if aux is not None:
                auxes.append(aux)
            h = module.shared_head.norm(h)  # (B, T-k, D): read by the head and by depth k+1
            mtp_sums.append(ce_sum(self.lm_head(h), target))
            mtp_tokens.append((target != IGNORE_INDEX).sum())
        dev = lm_sum.device
        return TrainOutput(
            lm_loss_sum=lm_sum,
            lm_tokens=valid.sum(),
            mtp_loss_sum=torch.stack(mtp_sums) if mtp_sums else torch.zeros(0, device=dev),
            mtp_tokens=torch.stack(mtp_tokens) if mtp_tokens else torch.zeros(0, dtype=torch.long, device=dev),
            balance_loss=sum((a.balance_loss for a in auxes), torch.zeros((), device=dev)),
            expert_load=torch.stack([a.load for a in auxes]) if auxes else torch.zeros(0, 0, dtype=torch.long),
        )

    def _cached_logits(self, input_ids, cache, attn_mask, position_ids) -> torch.Tensor:
        """:meth:`forward`'s logits on the eager inference path with a cache."""
        h = self.hidden_states(input_ids, cache, attn_mask, position_ids)
        if fast_inference(self.lm_head):  # a few rows: maybe a prepacked head
            w = self.lm_head.weight
            return decode.linear(self, "head", h, (w,), tuple(w.shape)).float()
        return decode.project(self.lm_head, h).float()

    def decode_kernel(self, input_ids, cache, attn_mask=None, position_ids=None) -> str:
        """How the products of an eager decoding step read their weights: ``measured`` (each by
        its own measured choice, ``decode_linear``: plain or prepacked) or ``plain`` (all as they
        are). A choice of :mod:`dsv3.model.kernels` (op ``decode_step``) per dtype, batch and
        the model's shapes, for a CPU model that runs one token per row (else ``measured``),
        timed on this model's own step: the products that measure faster prepacked alone may
        not be inside a step (``tiny`` fp32 at batch 1 on a 2-core AMD EPYC: every product
        plain 987 against 1060 us per step; at batch 8 the measured mix 2159 against 3120 us).

        Timing runs the step on these inputs with each candidate (after one untimed step that
        makes the products' own choices), then restores the cache lengths; the positions it
        writes are written again by the step that follows. Arguments as in :meth:`forward`.
        """
        B, T = input_ids.shape
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        if T != 1 or B > decode.PACK_MAX_ROWS or device.type != "cpu" or not decode.packing(dtype):
            return "measured"
        if hasattr(self, "hf_device_map"):  # dispatched (offloaded layers): no timing of whole steps
            return "measured"
        shapes = self._shapes
        return kernels.remembered(
            ("decode_step", dtype, B, shapes),
            lambda: self._decode_choice(
                f"{str(dtype).removeprefix('torch.')} B={B} {shapes}", input_ids, cache, attn_mask, position_ids
            ),
        )

    @functools.cached_property
    def _shapes(self) -> str:
        """The model's shapes as the key of its whole-step choices (:meth:`decode_kernel`)."""
        c = self.cfg
        return (
            f"dim={c.dim} layers={c.n_layers}/{c.n_dense_layers} heads={c.n_heads} q={c.q_lora_rank} "
            f"kv={c.kv_lora_rank}+{c.qk_rope_head_dim} ffn={c.inter_dim} "
            f"experts={c.n_routed_experts}x{c.moe_inter_dim}/{c.n_activated_experts}+{c.n_shared_experts} "
            f"vocab={c.vocab_size}"
        )

    def _decode_choice(self, key, input_ids, cache, attn_mask, position_ids) -> str:
        lengths = [layer_cache.length for layer_cache in cache]
        candidates = ["measured", "plain"]

        def run(name):
            with decode.plain_products(name == "plain"):
                self._cached_logits(input_ids, cache, attn_mask, position_ids)
            for layer_cache, n in zip(cache, lengths):
                layer_cache.length = n

        if kernels.known("decode_step", key, candidates) is None:
            run("measured")  # the products' own choices, made outside the timing (inside it: the rule)
        return kernels.choose("decode_step", key, candidates, run, self.embed_tokens.weight.device)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: list[LatentCache] | None = None,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The main model's final states *after* the final norm: (B, T, D), parameter dtype.

        ``lm_head`` of them is the logits of :meth:`forward`; they are also what MTP depth 1
        reads (:meth:`mtp_draft`). Arguments as in :meth:`forward`.
        """
        h, _ = self._trunk(input_ids, cache, attn_mask, position_ids=position_ids)
        return self.norm(h)

    def new_mtp_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        """Allocate the decode cache of MTP depth 1's attention (for :meth:`mtp_draft`).

        Raises:
            ValueError: the model has no MTP module, or ``max_len > max_seq_len``.
        """
        if not len(self.mtp):
            raise ValueError("the model has no MTP module (model.mtp_depth = 0)")
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        dtype = dtype or self.embed_tokens.weight.dtype
        return LatentCache(batch, max_len, self.cfg, dtype, module_device(self.mtp[0]))

    def mtp_draft(
        self, h_prev: torch.Tensor, next_ids: torch.Tensor, cache: LatentCache, last_only: bool = False
    ) -> torch.Tensor:
        """Run MTP depth 1 incrementally: logits of the token after ``next_ids``.

        MTP position i combines the main model's post-norm state ``h_i`` (which predicted
        token i+1) with the embedding of token i+1 and predicts token i+2, exactly as in
        training (rope position i, causal attention over MTP positions 0..i). The new
        positions are appended to ``cache`` at ``cache.length``; to discard them set
        ``cache.length`` back.

        Args:
            h_prev: (B, T, D) post-norm main states of positions ``cache.length ...`` (from
                :meth:`hidden_states`).
            next_ids: (B, T) int64 ids of the tokens one ahead of those positions.
            cache: from :meth:`new_mtp_cache`.
            last_only: project only the last position through the head (drafting needs no more).

        Returns:
            (B, T, V) float32 logits of the tokens two ahead ((B, 1, V) with ``last_only``).

        Raises:
            ValueError: no MTP module, or the cache is full.
        """
        if not len(self.mtp):
            raise ValueError("the model has no MTP module (model.mtp_depth = 0)")
        module = self.mtp[0]
        start, T = cache.length, next_ids.shape[1]
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        h, _ = module(h_prev, self.embed_tokens(next_ids), cos, sin, cache=cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(module.shared_head.norm(h)).float()

    def moe_gates(self) -> list[Gate]:
        """Every router, in the order of :attr:`TrainOutput.expert_load` rows."""
        mods = [layer.mlp.gate for layer in self.layers if layer.is_moe]
        return mods + [m.mlp.gate for m in self.mtp if m.is_moe]


def module_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: the execution device that a big-model dispatcher
    (accelerate's hooks, see :mod:`dsv3.checkpoint.offload`) recorded on it, else its first parameter's
    device (a weight offloaded to CPU or disk sits on the meta device until its forward)."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return next(module.parameters()).device


def count_parameters(model: Transformer) -> dict[str, int]:
    """Parameter counts: ``main`` (no MTP), ``mtp``, ``total`` and ``activated`` per token.

    ``activated`` counts the main model with only ``n_activated_experts`` of each MoE layer's
    routed experts (plus embedding and head), the usual "37B activated" figure.
    """
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    main = total - mtp
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    inactive = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert
    return {"main": main, "mtp": mtp, "total": total, "activated": main - inactive}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    ``6 * (activated matmul parameters, embedding excluded)`` + attention scores and values,
    ``6 * n_heads * seq_len * (qk_head_dim + v_head_dim) / 2`` per layer (causal half). The
    MTP modules count too, since every training token goes through them (V3 §2.2): per depth
    its projection ``eh_proj`` (2 dim x dim), one MoE block and the shared output head.
    """
    d, h = cfg.dim, cfg.n_heads
    attn = cfg.q_lora_rank * (d + h * cfg.qk_head_dim) if cfg.q_lora_rank else d * h * cfg.qk_head_dim
    attn += d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (
        cfg.qk_nope_head_dim + cfg.v_head_dim
    )
    attn += h * cfg.v_head_dim * d
    dense_ffn = 3 * d * cfg.inter_dim
    moe_ffn = 3 * d * cfg.moe_inter_dim * (cfg.n_activated_experts + cfg.n_shared_experts) + d * cfg.n_routed_experts
    matmul = cfg.n_layers * attn + cfg.n_dense_layers * dense_ffn + cfg.n_moe_layers * moe_ffn + d * cfg.vocab_size
    layers = cfg.n_layers
    if cfg.mtp_depth:
        ffn = moe_ffn if cfg.n_layers >= cfg.n_dense_layers else dense_ffn  # MTP block k has layer id n_layers + k
        matmul += cfg.mtp_depth * (2 * d * d + attn + ffn + d * cfg.vocab_size)
        layers += cfg.mtp_depth
    attn_scores = layers * h * seq_len * (cfg.qk_head_dim + cfg.v_head_dim) / 2 * 2
    return 6.0 * matmul + 3.0 * attn_scores
