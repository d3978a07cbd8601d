"""The ``dsv3`` command with a NaN put into the loss of one training micro-batch.

Usage: ``python tests/scripts/nan_at_step.py WHERE N dsv3-ARGS...`` (also under torchrun).
``WHERE`` is ``model`` (the plain model's forward, every layout without pipelines) or
``pipeline`` (the last pipeline stage's head); the N-th training micro-batch of this process
(N = 3 with one micro-batch per step: optimizer step 3) gets a NaN main loss.
"""

import sys

import torch

where, n = sys.argv[1], int(sys.argv[2])
sys.argv = [sys.argv[0], *sys.argv[3:]]
calls = {"n": 0}


def poisoned(value):
    calls["n"] += 1
    return value * float("nan") if calls["n"] == n else value


if where == "model":
    import dsv3.model.transformer as T

    plain = T.Transformer.forward

    def forward(self, input_ids, labels=None, **kw):
        out = plain(self, input_ids, labels, **kw)
        if labels is not None and self.training:
            out.lm_loss_sum = poisoned(out.lm_loss_sum)
        return out

    T.Transformer.forward = forward
elif where == "pipeline":
    import dsv3.parallel.pipeline as P

    plain_head = P.HeadLayer.forward

    def head_forward(self, inputs):
        lm_sum, mtp, balance, tokens = plain_head(self, inputs)
        if torch.is_grad_enabled():
            lm_sum = poisoned(lm_sum)
        return lm_sum, mtp, balance, tokens

    P.HeadLayer.forward = head_forward
else:
    sys.exit(f"nan_at_step.py: WHERE must be model or pipeline, not {where!r}")

from dsv3.cli import run  # noqa: E402 - after the patch

run()
