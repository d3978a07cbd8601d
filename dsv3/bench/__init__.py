"""Benchmarks (``dsv3 bench train|decode|data|memory``): throughput, MFU, memory, and a peer comparison.

``bench memory`` (:mod:`dsv3.bench.memory`) measures what each rank of a layout holds after a
few real training steps and puts ``dsv3 plan``'s prediction beside it.

``bench train`` times full optimizer steps (forward, backward, gradient clipping, AdamW
update) of the plain :class:`dsv3.model.Transformer` on synthetic token batches, in this
process, without the DeepSpeed engine (its bookkeeping is the same for any model and would
blur the comparison). Precisions:

- ``fp32``: fp32 weights, torch AdamW;
- ``bf16``: bf16 weights and activations, with fp32 master weights and fp32 AdamW moments in
  :class:`MasterWeightAdamW` (what DeepSpeed's bf16 optimizer does in ``dsv3 train``).

``--vs hf`` builds ``transformers``' ``DeepseekV3ForCausalLM`` at the same configuration
with the same weights (exported through :func:`dsv3.checkpoint.export_hf`; logits are checked equal at
step 0), trains it with torch AdamW on the same batches, and times both in the same process,
step by step in turn, so machine noise hits both alike; the best step of each side counts
(wall clock, and process CPU time, which with one thread ignores time spent waiting for a
core held by another process). The peer runs in the settings a user would pick: fp32,
and for a bf16 benchmark also bf16 weights (pure bf16 AdamW, its fastest bf16 option); the
``eager`` expert loop and ``grouped_mm`` experts (``batched_mm`` is left out: on CPU it ran
at 85 tokens/s on ``tiny``, 40x slower); SDPA attention. The ratio is taken against its
fastest setting.

MFU = model FLOPs per token (:func:`dsv3.model.flops_per_token`, 6N + attention) x tokens/s
divided by a peak measured on this machine with a square matmul of the benchmark's dtype (the faster layout)
(:func:`dsv3.hardware.measure_peak_tflops`; the bf16 peak is the reference for the bf16 goal).

Memory per micro-batch: on CUDA ``torch.cuda.max_memory_allocated`` over one step; on CPU
the bytes of tensors autograd saves for the backward pass (activation memory, counted by a
``saved_tensors_hooks`` pass over one forward), reported with and without activation
checkpointing.

Results: ``bench/<kind>-<config>-<precision>-<date>.json`` (atomic write) and a table; every
result holds the ``machine`` it ran on (:func:`dsv3.hardware.machine_info`). ``--profile``
(train) adds a per-operator breakdown of an extra step in ``<same stem>.profile.json``
(:mod:`dsv3.bench.profile`).
"""

from dsv3.bench.report import format_table, result_path, run_cli, write_result
from dsv3.bench.runs import bench_data, bench_decode, bench_train, synthetic_batches
from dsv3.bench.sides import (
    HF_EXPERTS,
    MasterWeightAdamW,
    Side,
    activation_bytes,
    build_dsv3,
    build_hf,
    dsv3_loss,
    hf_parity,
    make_optimizer,
)

__all__ = [
    "HF_EXPERTS",
    "MasterWeightAdamW",
    "Side",
    "activation_bytes",
    "bench_data",
    "bench_decode",
    "bench_train",
    "build_dsv3",
    "build_hf",
    "dsv3_loss",
    "format_table",
    "hf_parity",
    "make_optimizer",
    "result_path",
    "run_cli",
    "synthetic_batches",
    "write_result",
]
