"""``dsv3 plan``: parameter counts, FLOPs and the memory, bubble and traffic of a layout.

Counts come from building the model on the meta device (no memory). For a layout (``gpus``,
``parallel.pp`` / ``ep`` / ``zero_stage`` / ``micro_batch_size`` / ``grad_accum`` /
``activation_checkpointing``, ``offload_optimizer`` / ``offload_param``, ``data.seq_len``,
``train.precision``) the plan gives, for the worst pipeline stage, the memory per GPU
(weights, gradients, optimizer state, activations, all-to-all buffers, ZeRO-3's buffers), the
host memory and NVMe per node under ZeRO-Offload / ZeRO-Infinity (:mod:`dsv3.plan.offload`),
the pipeline bubble and the all-to-all volume per step, and proposes layouts that fit when none
is given. For a CPU run (``dsv3 plan --cpu``) it gives the peak resident memory of a process.

Layout semantics (those of the trainer and DeepSpeed):

- ``pp`` pipeline stages take contiguous blocks as the trainer places them
  (``parallel.pp_partition``: balanced by parameter count by default, or the given counts;
  :meth:`dsv3.plan.layouts.ModelParts.stage_counts`); stage 0 also holds the embedding, the
  last stage the final norm, the output head and the MTP modules (and, with ``pp > 1``, a
  tied copy of the embedding, which DeepSpeed's ``TiedLayerSpec`` keeps on the last stage).
- ``dp = gpus / pp`` data-parallel ranks per stage. Expert parallelism is carved out of them
  (DeepSpeed's expert-data-parallel groups): routed experts are split over ``ep`` ranks and
  expert parameters are data parallel over ``dp / ep`` ranks; every other parameter is data
  parallel over ``dp``.
- One optimizer step runs ``grad_accum`` micro-batches of ``micro_batch_size`` sequences of
  ``seq_len`` tokens on each pipeline; the global batch is ``micro_batch_size * grad_accum * dp``.

- Activations are the tensors autograd keeps for the backward pass
  (:func:`dsv3.plan.costs.activation_bytes_per_token`), with the attention kernel the run
  will use (:func:`dsv3.plan.costs.planned_activations`): on a GPU flash attention, on a CPU
  the kernel recorded for the machine, or, before it has measured one, the candidate that
  keeps the most (the (T, T) probabilities of SDPA's math kernel or the matmul attention).
- Weights, gradients and optimizer state are what a rank holds between the gradient
  reduction and the update (:func:`dsv3.plan.costs.static_bytes`); ``dsv3 bench memory``
  measures the same from the tensors and agrees within 0.01% on the layouts dsv3 trains.

Not counted: temporaries that live inside one operator (e.g. the logits' gradient) or one
step (ZeRO's reduction bucket during the backward pass, the fp32 gradient partition and
Adam's temporaries during the update, the fp32 weights before a bf16 cast at start-up), the
CUDA context and allocator fragmentation (typically 1-3 GiB on a GPU) and NCCL's own buffers;
on a CPU in bf16, the zero rows that pad each routed expert's rows
(:func:`dsv3.model.grouped.padded_rows`: about 1/16 more expert rows, at most 1/4).
"""

from dsv3.plan.costs import (
    ATTENTION_FORMS,
    DTYPE_BYTES,
    GB,
    GIB,
    ActivationBytes,
    MemoryPlan,
    a2a_buffer_bytes,
    a2a_volume_per_step,
    activation_bytes_per_token,
    check_divisible,
    in_flight_micro_batches,
    pipeline_bubble,
    planned_activations,
    split_counts,
    stage_layers,
    static_bytes,
)
from dsv3.plan.layouts import (
    Layout,
    ModelParts,
    StagePlan,
    candidate_layouts,
    global_batch,
    plan_layout,
    propose,
    relative_step_time,
)
from dsv3.plan.offload import (
    OFFLOAD_DEVICES,
    PROCESS_BASELINE_BYTES,
    Placement,
    check_offload,
    cpu_resident,
    largest_sub_group,
    offload_seconds,
    offload_traffic,
    place_states,
    sub_group_sizes,
    unswapped_elements,
)
from dsv3.plan.report import plan

__all__ = [
    "ATTENTION_FORMS",
    "DTYPE_BYTES",
    "GB",
    "GIB",
    "ActivationBytes",
    "Layout",
    "MemoryPlan",
    "ModelParts",
    "OFFLOAD_DEVICES",
    "PROCESS_BASELINE_BYTES",
    "Placement",
    "StagePlan",
    "a2a_buffer_bytes",
    "a2a_volume_per_step",
    "activation_bytes_per_token",
    "candidate_layouts",
    "check_divisible",
    "check_offload",
    "cpu_resident",
    "global_batch",
    "in_flight_micro_batches",
    "largest_sub_group",
    "sub_group_sizes",
    "unswapped_elements",
    "offload_seconds",
    "offload_traffic",
    "place_states",
    "pipeline_bubble",
    "plan",
    "plan_layout",
    "planned_activations",
    "propose",
    "relative_step_time",
    "split_counts",
    "stage_layers",
    "static_bytes",
]
