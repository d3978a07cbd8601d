"""Auxiliary-loss-free load balancing (DeepSeek-V3 report §2.1.2)."""

from __future__ import annotations

import torch

from dsv3.model.moe import Gate


@torch.no_grad()
def update_expert_bias(gates: list[Gate], load: torch.Tensor, gamma: float) -> None:
    """``b_i += gamma * sign(mean_load - load_i)`` for every MoE layer.

    Overloaded experts (above the layer's mean load) get their selection bias lowered by
    gamma, underloaded ones raised; exactly balanced ones are untouched.

    Args:
        gates: the routers, one per row of ``load``.
        load: (L_moe, E) tokens routed to each expert over the whole global batch (summed
            over micro-batches and data-parallel ranks), any numeric dtype.
        gamma: bias update speed (0.001 for most of training, 0 at the end).
    """
    load = load.float()
    delta = gamma * torch.sign(load.mean(-1, keepdim=True) - load)  # (L_moe, E)
    for gate, d in zip(gates, delta):
        gate.e_score_correction_bias.add_(d.to(gate.e_score_correction_bias.device))
