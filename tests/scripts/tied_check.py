"""Train with pipelines and check the tied embedding after every optimizer step.

Usage (2 processes, ``parallel.pp=2``): ``torchrun ... tests/scripts/tied_check.py KEY=VALUE ...``.
After every step the two copies of the tied embedding (first stage, last stage) must be bitwise
equal and must have moved; rank 0 writes ``<train.out_dir>/tied_checks.json`` with the checks
and the names of the parameters rank 0 holds.
"""

import json
import sys

import torch
import torch.distributed as dist
from common import finish

from dsv3.config import load_config
from dsv3.training.trainer import Trainer

t = Trainer(load_config(None, sys.argv[1:]))
start = t.model.embed_tokens.weight.detach().clone()
checks = []
plain = t.train_step


def step(s):
    rec = plain(s)
    w = t.model.embed_tokens.weight.detach().clone()
    ws = [torch.empty_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(ws, w)
    checks.append({"equal": all(torch.equal(ws[0], x) for x in ws), "moved": not torch.equal(w, start)})
    return rec


t.train_step = step
held = sorted(n for n, p in t.model.named_parameters() if not p.is_meta)
t.run()
if dist.get_rank() == 0:
    (t.out_dir / "tied_checks.json").write_text(json.dumps({"checks": checks, "held": held}))
finish(0)
