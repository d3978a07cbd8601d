"""Where the model states of one rank live under DeepSpeed's ZeRO-Offload and ZeRO-Infinity:
device (GPU) memory, host memory and NVMe, and what moving them costs per step.

The ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", §3.1, §5) accounts 2 + 2 + 12 bytes per parameter for bf16 weights,
gradients and the fp32 master copy + Adam moments; ZeRO-Offload (Ren et al. 2021,
"ZeRO-Offload: Democratizing Billion-Scale Model Training", §3-4) keeps the fp32 state and the
fp32 gradients of the rank's partition on the host and runs Adam there; ZeRO-Infinity
(Rajbhandari et al. 2021, "ZeRO-Infinity: Breaking the GPU Memory Wall for Extreme Scale Deep
Learning", §4-6) also moves them, and the bf16 parameters, to NVMe through pinned host
buffers. The exact host buffers below are those DeepSpeed 0.19.8 allocates
(``runtime/zero/stage_1_and_2.py``, ``runtime/zero/stage3.py``, ``runtime/swap_tensor/``)
under the ZeRO settings dsv3's engine configures (:func:`dsv3.parallel.engine.zero_settings`,
the same values the generated DeepSpeed config carries):

- ZeRO-1/2 with ``offload_optimizer=cpu`` (host, per rank, ``P`` = parameters of the rank's
  optimizer partition, ``a`` = bytes of a parameter, 2 under bf16, 4 under fp32): the fp32
  partition ``4P``, its fp32 ``.grad`` ``4P``, Adam's two moments ``8P``, a parameter-dtype
  copy of the partition that updated weights return to the device through ``aP``, two
  parameter-dtype staging buffers of the largest parameter (``temp_grad_buffer_for_*``) and,
  when a step accumulates several micro-batches, a parameter-dtype accumulation buffer per
  parameter of the partition ``aP``. The device keeps the weights of :func:`static_bytes`;
  ZeRO-1 also its gradients, while ZeRO-2 copies each reduced bucket straight into the host's
  fp32 gradients and keeps only the reduce bucket (measured on a CPU run: no gradient
  partition is left on the device side at the update).
- ZeRO-3 with ``offload_optimizer=cpu``: the fp32 partition ``4P``, the moments ``8P``, an fp32
  gradient buffer per sub-group ``4P`` and the flat gradient partition in the accumulation
  dtype (the parameter dtype by default) ``aP``, all on the host; with ``nvme`` the fp32
  partition, moments and fp32 gradients go to disk (``16P``) and the host keeps the flat
  gradient partition ``aP``, one fp32 gradient buffer of the largest sub-group ``4S`` and
  ``buffer_count`` (4) fp32 swap buffers of it ``16S`` (:func:`largest_sub_group`: sub-groups
  are cut from the optimizer's parameter groups once they reach ``sub_group_size``, which the
  engine sets to 1e8 elements under nvme optimizer offload, else DeepSpeed's 1e9). A sub-group
  under 1 MiB of fp32 is not swapped: its ``16`` bytes per element stay on the host
  (:func:`unswapped_elements`). The fp32 gradient buffer lives while the optimizer state is
  created (start-up); during the update each swapped sub-group's fp32 weights, moments and
  gradients come in through the swap buffers.
- ZeRO-3 with ``offload_param=cpu``: the parameter partition ``aP`` moves from the device to
  the host; with ``nvme`` its files take ``aP`` on disk, the host keeps up to ``max_in_cpu``
  (1e9) elements of it plus ``buffer_count`` x ``buffer_size`` swap buffers (5 x the larger
  of 1e8 elements and the largest parameter), and a swap buffer of the largest sub-group when
  some sub-group is not kept.
- ZeRO-3 on the device, besides :func:`static_bytes`' partitions: the gathered parameters
  (gathering allocates new full tensors, also on one rank) and the gradient reduce bucket
  (``reduce_bucket_size``, 5e8 elements in the parameter dtype; on a CPU run only the part that
  gets written is resident: at most the stage's parameters). Gathered: up to
  ``stage3_max_live_parameters`` (1e9 elements; at least the largest block plus one
  ``stage3_prefetch_bucket_size``, 5e7), at most the stage's parameters. Measured on one CPU
  rank with dsv3's model: after a backward pass the parameters stay gathered until the next
  forward releases them (DeepSpeed's post-backward hooks do not see the tensors inside dsv3's
  ``TrainOutput``), so the peak holds (almost) all of them.
- ZeRO-3 with ``offload_optimizer=nvme``, at the step's last micro-batch: the fp32 copies of
  one reduce bucket's gradient partitions that are written to NVMe,
  ``4 min(P, reduce_bucket_size)`` (``partition_grads``).

On one CPU process running DeepSpeed ZeRO-3 with NVMe optimizer offload on dsv3 models of
143M and 515M parameters (bf16, sub_group_size 2e7, with and without activation
checkpointing), the sum of these terms (with the measured baseline of that process) came
within 2-4% (515M) and 8-12% (143M) below the measured peak resident memory; the rest is
memory the allocator keeps after freeing, not modelled. The swap files took 16 bytes per
parameter on disk, as counted.

Pinned ("page-locked") host memory is counted like any host memory. The async-I/O queue
(``aio`` block size 1 MiB, queue depth 8) is negligible. ``nvme`` for the optimizer state
needs ZeRO-3 (DeepSpeed's ZeRO-1/2 keep it in host memory when given ``nvme``); parameter
offload needs ZeRO-3; any offload needs ZeRO >= 1; dsv3 runs ZeRO-3 only without expert and
pipeline parallelism (:func:`check_offload`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv3.errors import DsvError
from dsv3.parallel.engine import AIO_BLOCK_SIZE, PARAMS_KEPT_IN_HOST, SUB_GROUP_SIZE, ZeroSettings, zero_settings
from dsv3.plan.costs import DTYPE_BYTES, GIB, MemoryPlan

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# Resident memory of one training process before any model state: measured on the CPU host
# (x86-64, torch 2.x, DeepSpeed 0.19.8) as the VmHWM of a process that imported torch,
# deepspeed and dsv3's trainer (0.34 GiB) and loaded DeepSpeed's CPU Adam extension
# (0.40 GiB); rounded up for the process group and the data loader's index.
PROCESS_BASELINE_BYTES = 0.45 * GIB
# Assumed rates for charging offload in the layout ranking (not measured here): the host link
# (PCIe 4.0 x16, 32 GB/s each way nominal, ~25 GB/s achieved), one NVMe drive per GPU
# (~3 GB/s), and the bf16 throughput a GPU sustains in training (400 TFLOP/s, about 40% of
# an H100's dense peak).
HOST_LINK_BYTES_PER_S = 25e9
NVME_BYTES_PER_S = 3e9
DEVICE_FLOPS_PER_S = 400e12


def check_offload(zero_stage: int, ep: int, pp: int, offload_optimizer: str, offload_param: str) -> None:
    """Refuse the combinations the trainer (DeepSpeed 0.19.8 through dsv3) cannot run.

    Raises:
        DsvError: an unknown offload device; offload at ZeRO-0; ``nvme`` optimizer offload or any
            parameter offload below ZeRO-3; ZeRO-3 with expert or pipeline parallelism.
    """
    for key, value in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if value not in OFFLOAD_DEVICES:
            raise DsvError(f"parallel.{key}={value!r} is unknown; use none, cpu or nvme")
    if zero_stage == 3 and (ep > 1 or pp > 1):
        raise DsvError(f"parallel.zero_stage=3 needs parallel.ep=1 and parallel.pp=1 (got ep={ep}, pp={pp})")
    if zero_stage < 1 and (offload_optimizer != "none" or offload_param != "none"):
        raise DsvError("offloading needs parallel.zero_stage >= 1; set zero_stage 1, 2 or 3, or offload none")
    if offload_param != "none" and zero_stage != 3:
        raise DsvError(f"parallel.offload_param={offload_param} needs parallel.zero_stage=3")
    if offload_optimizer == "nvme" and zero_stage != 3:
        raise DsvError("parallel.offload_optimizer=nvme needs parallel.zero_stage=3; use cpu with ZeRO-1/2")


@dataclass
class Placement:
    """Bytes of one rank by where they live; each dict maps a term's name to bytes (0 kept out)."""

    device: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    disk: dict[str, float] = field(default_factory=dict)

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    @property
    def disk_total(self) -> float:
        return sum(self.disk.values())


def place_states(
    mem: MemoryPlan,
    shard: float,
    stage_params: float,
    largest_block: float,
    zero_stage: int,
    precision: str,
    micro_batches: int,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    cpu: bool = False,
    sub_group_size: float | None = None,
    sub_group: float | None = None,
    largest_param: float = 0,
    unswapped: float = 0,
) -> Placement:
    """Split one rank's memory (``mem``, from :func:`static_bytes` plus activations) into device,
    host and disk terms under the offload options (the accounting is in the module docstring).

    Args:
        mem: the rank's weights, gradients, optimizer state, activations and all-to-all buffers.
        shard: parameters of the rank's partition ``P`` (non-expert / dp + expert / expert dp).
        stage_params: parameters of the rank's pipeline stage (its experts divided by ep).
        largest_block: parameters of the stage's largest block (ZeRO-3's gathered working set).
        zero_stage, precision, micro_batches: the layout's; ``micro_batches`` per step.
        offload_optimizer, offload_param: ``"none"``, ``"cpu"`` or ``"nvme"`` (checked by
            :func:`check_offload` beforehand).
        cpu: a CPU run (device = host): count only the written part of the reduce bucket.
        sub_group_size: ZeRO-3's ``sub_group_size`` (elements): the NVMe swap buffers are
            sized by the largest sub-group; None: the engine's for ``offload_optimizer``
            (:func:`dsv3.parallel.engine.zero_settings`: 1e8 under nvme, else 1e9).
        sub_group: the largest ZeRO-3 sub-group's elements on this rank
            (:func:`largest_sub_group`); None: ``min(P, sub_group_size)``.
        largest_param: elements of the largest parameter (the engine sizes the parameter swap
            buffers of ``offload_param: nvme`` to hold it); 0: unknown (buffers of 1e8).
        unswapped: elements of the partition in sub-groups too small to swap
            (:func:`unswapped_elements`): under ``offload_optimizer: nvme`` their fp32 weights,
            fp32 gradients and moments stay in host memory.

    Returns:
        :class:`Placement` in bytes; ``device`` keeps the names ``weights``, ``gradients``,
        ``optimizer``, ``activations``, ``all-to-all buffers`` and adds ZeRO-3's terms.
    """
    a = DTYPE_BYTES[precision]
    P = shard
    z: ZeroSettings = zero_settings(offload_optimizer, int(largest_param))
    if sub_group_size is None:
        sub_group_size = z.sub_group_size
    device = {
        "weights": mem.weights,
        "gradients": mem.grads,
        "optimizer": mem.optimizer,
        "activations": mem.activations,
        "all-to-all buffers": mem.a2a_buffers,
    }
    host: dict[str, float] = {}
    disk: dict[str, float] = {}
    if zero_stage >= 3:
        gathered = min(stage_params, max(z.max_live_parameters, largest_block + z.prefetch_bucket_size))
        device["gathered parameters"] = a * gathered
        bucket = min(z.reduce_bucket_size, stage_params) if cpu else z.reduce_bucket_size
        device["reduce bucket"] = a * bucket
        if precision == "fp32" and offload_optimizer == "none":
            # DeepSpeed's ZeRO-3 updates fp32 parameter partitions in place (no separate master copy)
            device["optimizer"] = 8.0 * P
    if offload_optimizer != "none":
        device["optimizer"] = 0.0
        if zero_stage < 3:
            host["fp32 master weights"] = 4 * P
            host["fp32 gradients"] = 4 * P
            host["Adam moments"] = 8 * P
            host["weight copy-back buffer"] = a * P
            if micro_batches > 1:
                host["gradient accumulation"] = a * P
            # two parameter-dtype staging buffers of the largest parameter (one each side of the link)
            host["gradient staging buffers"] = 2 * a * largest_param
            if zero_stage == 2:  # each reduced bucket goes straight to the host's fp32 gradients
                device["gradients"] = 0.0
                device["reduce bucket"] = a * (min(z.reduce_bucket_size, stage_params) if cpu else z.reduce_bucket_size)
        else:
            device["gradients"] = 0.0  # the flat gradient partition lives where the optimizer runs
            host["gradient partition"] = a * P
            S = min(P, sub_group_size) if sub_group is None else sub_group
            if offload_optimizer == "cpu":
                host["fp32 master weights"] = 4 * P
                host["fp32 gradients"] = 4 * P
                host["Adam moments"] = 8 * P
            else:
                K = min(P, unswapped)
                disk["fp32 master weights"] = 4 * (P - K)
                disk["fp32 gradients"] = 4 * (P - K)
                disk["Adam moments"] = 8 * (P - K)
                host["fp32 master weights"] = 4 * K
                host["fp32 gradients"] = 4 * K
                host["Adam moments"] = 8 * K
                host["fp32 gradient buffer"] = 4 * S
                host["optimizer swap buffers"] = z.optimizer_swap_buffers * 4 * S
                host["fp32 gradient copies"] = 4 * min(P, z.reduce_bucket_size)
    if offload_param != "none":
        device["weights"] = 0.0
        if offload_param == "cpu":
            host["parameter partition"] = a * P
        else:
            disk["parameter partition"] = a * P
            host["parameter partition"] = a * min(P, z.params_kept_in_host)
            host["parameter swap buffers"] = a * z.param_swap_buffers * z.param_swap_buffer_size
            if P > z.params_kept_in_host:
                host["parameter swap-out buffer"] = a * min(P, sub_group_size)
    return Placement(
        device={k: v for k, v in device.items() if v or k in ("weights", "gradients", "optimizer", "activations")},
        host={k: v for k, v in host.items() if v},
        disk={k: v for k, v in disk.items() if v},
    )


def sub_group_sizes(groups: list[list[int]], dp: int, sub_group_size: float = SUB_GROUP_SIZE) -> list[int]:
    """Elements of every ZeRO-3 sub-group on one rank, in order (cut as :func:`largest_sub_group` says)."""
    out = []
    for group in groups:
        sizes = [-(-n // dp) for n in group]
        current = 0
        for n in sizes:
            current += n
            if current >= sub_group_size:
                out.append(current)
                current = 0
        if current:
            out.append(current)
    return out


def unswapped_elements(groups: list[list[int]], dp: int, sub_group_size: float = SUB_GROUP_SIZE) -> int:
    """Elements of one rank's ZeRO-3 sub-groups that NVMe optimizer offload keeps in host memory:
    DeepSpeed 0.19.8 swaps a sub-group only when its fp32 bytes reach max(1 MiB, the aio block
    size) (``OptimizerSwapper.is_swappable_tensor``), :data:`dsv3.parallel.engine.AIO_BLOCK_SIZE`."""
    return sum(n for n in sub_group_sizes(groups, dp, sub_group_size) if 4 * n < max(2**20, AIO_BLOCK_SIZE))


def largest_sub_group(groups: list[list[int]], dp: int, sub_group_size: float = SUB_GROUP_SIZE) -> int:
    """Elements of the largest ZeRO-3 sub-group on one rank, as DeepSpeed 0.19.8 forms them
    (``DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups``): each optimizer parameter group
    whose partition exceeds ``sub_group_size`` is cut, in parameter order, after the parameter
    that makes a sub-group reach ``sub_group_size``; a partition holds ``ceil(n / dp)`` elements
    of a parameter of ``n``.

    Args:
        groups: per optimizer parameter group, the element counts of its parameters in order.
        dp: ranks the parameters are partitioned over.
    """
    best = 0
    for group in groups:
        sizes = [-(-n // dp) for n in group]
        if sub_group_size >= sum(sizes):
            best = max(best, sum(sizes))
            continue
        current = 0
        for n in sizes:
            current += n
            if current >= sub_group_size:
                best, current = max(best, current), 0
        best = max(best, current)
    return best


def offload_traffic(
    shard: float,
    zero_stage: int,
    precision: str,
    micro_batches: int,
    checkpointing: bool,
    offload_optimizer: str = "none",
    offload_param: str = "none",
) -> tuple[float, float]:
    """Bytes one rank moves per optimizer step over the host link and to/from NVMe for offloading.

    Host link (``a`` bytes per parameter, ``P`` = partition, ``m`` micro-batches):

    - optimizer offload, ZeRO-2 (DeepSpeed accumulates through the device): micro-batch 0 sends
      its gradient partition to the host's accumulation buffer, each later one first fetches the
      accumulated partition back, and the last also copies the sum into the fp32 gradients,
      ``2 m a P`` for ``m >= 2``; the updated weights return, ``a P``: ``(2 m + 1) a P``.
      ZeRO-1 reduces only at the step's last micro-batch (fetch, store, fp32 copy, weights
      back): ``4 a P``. With one micro-batch: the fp32 copy and the weights, ``2 a P``.
    - optimizer offload, ZeRO-3: gradients accumulate on the host, ``m a P``; weights return
      ``a P`` (ZeRO-Offload §4.1's ``2 x`` model size per step, times the micro-batches).
    - parameter offload: the partition crosses to the device for the forward and the backward
      of each micro-batch, and once more for the recomputation under checkpointing:
      ``(2 + [checkpointing]) m a P``.

    NVMe (ZeRO-Infinity §5.1): optimizer state is read (fp32 weights, gradients, moments,
    ``16 P``) and written back (weights, moments, ``12 P``) each step, and the fp32 gradients are
    written once, ``4 P``: ``32 P``; offloaded parameters beyond the host-kept ones are read as
    often as they cross the link and written once per step.

    Returns:
        (host-link bytes, NVMe bytes) per step.
    """
    a = DTYPE_BYTES[precision]
    P, m = shard, micro_batches
    link = nvme = 0.0
    if offload_optimizer != "none":
        if zero_stage >= 3:
            link += (m + 1) * a * P
        else:
            link += (2 if m == 1 else 4 if zero_stage == 1 else 2 * m + 1) * a * P
        if offload_optimizer == "nvme":
            nvme += 32 * P
    if offload_param != "none":
        crossings = (2 + (1 if checkpointing else 0)) * m
        link += crossings * a * P
        if offload_param == "nvme":
            on_disk = max(0.0, P - PARAMS_KEPT_IN_HOST)
            nvme += (crossings + 1) * a * on_disk
    return link, nvme


def offload_seconds(link_bytes: float, nvme_bytes: float) -> float:
    """Seconds a step spends moving offloaded state at the assumed rates (``HOST_LINK_BYTES_PER_S``,
    ``NVME_BYTES_PER_S``), taken as not overlapped with compute (a pessimistic bound: DeepSpeed
    overlaps part of it)."""
    return link_bytes / HOST_LINK_BYTES_PER_S + nvme_bytes / NVME_BYTES_PER_S


def cpu_resident(placement: Placement, baseline: float = PROCESS_BASELINE_BYTES) -> dict[str, float]:
    """Resident memory of one process of a CPU run during training, by term (bytes).

    On a CPU run the device is the host, so every device and host term of ``placement`` is
    resident in the process, plus the process baseline (:data:`PROCESS_BASELINE_BYTES`); disk
    terms are not. Terms present in both places (e.g. ``weights``) are distinct allocations
    and are summed; the keys of host terms get a ``(host)`` suffix where a device term has the
    same name. All terms are taken as alive together (activations and the optimizer step's
    buffers in fact peak at different moments, so the sum is an upper bound of the training
    phase). The process's peak is the larger of this sum and :func:`cpu_init_peak`.
    """
    out = {"process baseline": baseline}
    out.update(placement.device)
    for k, v in placement.host.items():
        out[k + (" (host)" if k in out else "")] = v
    return out


def cpu_init_peak(stage_params: float, baseline: float = PROCESS_BASELINE_BYTES) -> float:
    """Resident bytes of a process of a CPU run while the trainer builds the model: its
    parameters materialized in fp32 (``4`` bytes each, :func:`dsv3.model.init.materialize_`)
    before the DeepSpeed engine casts them to bf16 and partitions them, plus the baseline."""
    return baseline + 4 * stage_params
