"""Activation checkpointing per block, applied from outside the model.

Each block (and MTP module) recomputes its forward during the backward pass instead of
keeping its activations: memory per micro-batch drops to about one block's activations plus
the block inputs, at the price of one more forward. The model's own code is unchanged and
its parameter names stay the same (the wrapper replaces ``forward`` on the instance).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsv3.model import Transformer


def apply_activation_checkpointing(model: Transformer) -> None:
    """Make every block of ``model`` recompute its activations in backward (in place).

    Only training forwards with gradients enabled are checkpointed; evaluation and
    generation run the plain forward. Outputs, gradients and the MoE load statistics are
    those of the un-checkpointed model (the recomputation's side outputs are discarded).
    """
    for block in list(model.layers) + list(model.mtp):
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward
