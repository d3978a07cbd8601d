"""One expert-parallel MoE layer on every rank against the unsplit layer (forward, backward,
gradient norm), its meta-device build, and its unsplit save.

Usage (2 processes): ``torchrun --nproc_per_node=2 tests/scripts/ep_unit.py DIR``; the layer is
saved to ``DIR/moe.safetensors``. Each rank prints ``rank R OK`` at the end.
"""

# ruff: noqa: E402 - the process group starts before the package is imported

import sys

import torch
import torch.distributed as dist
from common import finish

dist.init_process_group("gloo")
torch.set_num_threads(1)
from dsv3.config import ModelConfig
from dsv3.model.moe import MoE
from dsv3.parallel.expert_parallel import apply_expert_parallel, clip_grad_norm_, is_expert_param

rank, world = dist.get_rank(), dist.get_world_size()
cfg = ModelConfig(
    dim=32,
    moe_inter_dim=16,
    n_routed_experts=8,
    n_activated_experts=2,
    n_expert_groups=2,
    n_limited_groups=1,
    n_shared_experts=1,
    route_scale=2.5,
)


def build(bias):
    gen = torch.Generator().manual_seed(0)
    m = MoE(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        m.gate.e_score_correction_bias.copy_(bias)
    return m


def inputs(r):
    gen = torch.Generator().manual_seed(100 + r)
    n = 5 + 2 * r  # a different number of tokens on each rank
    return torch.randn(1, n, cfg.dim, generator=gen), torch.randn(1, n, cfg.dim, generator=gen)


def check(bias, name):
    # reference: one unsplit layer over the tokens of every rank
    ref = build(bias)
    xs = [inputs(r)[0].requires_grad_() for r in range(world)]
    outs = [ref(x) for x in xs]
    sum((y * inputs(r)[1]).sum() for r, (y, _) in enumerate(outs)).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)

    m = build(bias)
    apply_expert_parallel(m, world)
    x, c = inputs(rank)
    x.requires_grad_()
    y, aux = m(x)
    assert torch.allclose(y, outs[rank][0], atol=1e-5, rtol=1e-5), (name, (y - outs[rank][0]).abs().max())
    assert torch.equal(aux.load, outs[rank][1].load)
    (y * c).sum().backward()
    assert torch.allclose(x.grad, xs[rank].grad, atol=1e-5, rtol=1e-5), (name, "input gradient")
    ex = m.experts
    got = dict(m.named_parameters())
    for n, p in ref.named_parameters():
        g = got[n].grad
        if is_expert_param(got[n]):  # local block: already summed over the tokens of every rank
            want = p.grad[ex.first_expert : ex.first_expert + ex.num_local_experts]
        else:  # replicated: data-parallel sum
            dist.all_reduce(g)
            want = p.grad
        assert torch.allclose(g, want, atol=1e-5, rtol=1e-5), (name, n, (g - want).abs().max())
    norm = clip_grad_norm_(m.parameters(), 1e9)
    assert torch.allclose(norm, ref_norm, rtol=1e-5), (name, norm, ref_norm)
    expert_sq = sum(float(p.grad.pow(2).sum()) for p in m.parameters() if is_expert_param(p))
    sys.stdout.write(
        f"rank {rank} {name}: experts {ex.first_expert}..{ex.first_expert + ex.num_local_experts - 1} "
        f"received {'no' if expert_sq == 0 else 'some'} tokens\n"
    )
    sys.stdout.flush()
    return expert_sq


check(torch.zeros(cfg.n_routed_experts), "balanced")
bias = torch.zeros(cfg.n_routed_experts)
bias[: cfg.n_routed_experts // world] = 100.0  # route every token to the experts of rank 0
sq = check(bias, "all to rank 0")
assert (sq == 0) == (rank != 0), (rank, sq)

# bf16 with about 200 rows per local expert: the CPU pads each expert's rows
# (dsv3.model.grouped.padded_rows) and computes what the unsplit layer does, to bf16 rounding
import dsv3.parallel.expert_parallel as ep_module

padded = []
plain_pad = ep_module.pad_groups
ep_module.pad_groups = lambda *a: padded.append(a[3]) or plain_pad(*a)
ref16, m16 = build(torch.zeros(cfg.n_routed_experts)).bfloat16(), build(torch.zeros(cfg.n_routed_experts)).bfloat16()
apply_expert_parallel(m16, world)
x16 = torch.randn(1, 400, cfg.dim, generator=torch.Generator().manual_seed(7 + rank)).bfloat16()
xa, xb = x16.clone().requires_grad_(), x16.clone().requires_grad_()
y16, y_ref = m16(xa)[0], ref16(xb)[0]
assert padded == [32], padded  # one padded layer: 200 rows per expert on average -> multiples of 32
assert torch.allclose(y16.float(), y_ref.float(), atol=0.05, rtol=0.05), (y16.float() - y_ref.float()).abs().max()
y16.float().square().sum().backward()
y_ref.float().square().sum().backward()
assert torch.allclose(xa.grad.float(), xb.grad.float(), atol=0.1, rtol=0.05), (xa.grad - xb.grad).abs().max()
ep_module.pad_groups = plain_pad

# built on the meta device: the split allocates nothing, then only this rank's block is allocated,
# with the values the unsplit layer has (per-expert seeds of the global expert indices)
from dsv3.model.init import allocated_elements, init_module_, materialize_

full = MoE(cfg)
init_module_(full, 3, 0.02)
with torch.device("meta"):
    lazy = MoE(cfg)
apply_expert_parallel(lazy, world)
assert allocated_elements(lazy) == 0
n = materialize_(lazy, "cpu", 3, 0.02)
assert n == 8 * 32 + 3 * 32 * 16 + 3 * 4 * 16 * 32 == allocated_elements(lazy), n  # gate, shared, 4 of 8 experts
first = lazy.experts.first_expert
for w in ("gate_proj", "up_proj", "down_proj"):
    p = getattr(lazy.experts, w)
    assert is_expert_param(p) and torch.equal(p, getattr(full.experts, w)[first : first + 4]), w
assert torch.equal(lazy.gate.weight, full.gate.weight) and torch.equal(
    lazy.shared_experts.up_proj.weight, full.shared_experts.up_proj.weight
)

# saved in the unsplit layout: each rank writes its own expert rows and half of each replicated
# tensor into one file, which equals the unsplit layer's state dict; nothing is gathered
from safetensors.torch import load_file

from dsv3.checkpoint.safetensors_io import SafetensorsLayout
from dsv3.parallel.unsplit_save import save_weights

pieces = []
plain_write = SafetensorsLayout.write
SafetensorsLayout.write = lambda self, fd, piece: pieces.append(piece) or plain_write(self, fd, piece)
path = sys.argv[1] + "/moe.safetensors"
assert save_weights(path, lazy, [n for n, _ in lazy.named_parameters()], 0, (rank, world), {}) is None
saved = load_file(path)
assert sorted(saved) == sorted(full.state_dict())
for k, v in full.state_dict().items():
    assert torch.equal(saved[k], v), k
for piece in pieces:
    if piece.key.startswith("experts."):  # exactly this rank's 4 of 8 experts
        row = getattr(full.experts, piece.key.split(".")[1])[0].numel()
        assert (piece.start, piece.values.numel()) == (first * row, 4 * row), piece.key
    elif piece.key != "gate.e_score_correction_bias":  # buffers: rank 0 writes them whole
        n = full.state_dict()[piece.key].numel()
        assert (piece.start, piece.values.numel()) == (rank * n // 2, (rank + 1) * n // 2 - rank * n // 2), piece.key
replicated = [
    v.numel()
    for k, v in full.state_dict().items()
    if k.split(".")[0] in ("gate", "shared_experts") and k != "gate.e_score_correction_bias"
]
assert (
    sum(p.values.numel() for p in pieces)
    == sum((rank + 1) * n // 2 - rank * n // 2 for n in replicated) + 3 * 4 * 16 * 32 + (rank == 0) * 8
)  # + 4 experts' 3 matrices, + the routing biases on rank 0
print(f"rank {rank} OK", flush=True)
dist.barrier()  # no rank leaves while the other still talks to it
finish(0)
