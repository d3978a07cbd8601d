"""What the machine is: precisions, measured matmul peaks, and the device's name and features.

Used by ``dsv3 bench`` (peaks, MFU, the device recorded in every result) and by the trainer
(``train.peak_tflops: auto`` measures the peak once at start).
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import time
from pathlib import Path

import torch

#: ``train.precision`` / ``--precision`` name -> parameter and activation dtype
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: CPU flags (``/proc/cpuinfo``) that decide which bf16 kernels are fast
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(
    dtype: torch.dtype, device: torch.device | str = "cpu", n: int | None = None, seconds: float = 0.5
) -> float:
    """Best dense-matmul throughput of this machine for ``dtype``: TFLOP/s of an (n, n) @ (n, n).

    ``2 n^3`` FLOPs per product; the best of several timed rounds (``seconds`` of work in all)
    after a warm-up. n defaults to 1024 on CPU and 8192 on CUDA. The product is taken in the
    faster of two layouts, ``a @ b`` and ``a @ b.T`` (how ``nn.Linear`` multiplies), chosen by
    timing both at n / 4 first: some CPUs run one layout on a far slower path (bf16 without
    AVX-512 on a 2-core AMD EPYC with AVX2 only: ``a @ b`` 0.0013, ``a @ b.T`` 0.017 TFLOP/s),
    and the peak is what the fastest path reaches.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)

    def best_seconds(a: torch.Tensor, b: torch.Tensor, rounds: int, reps: int) -> float:
        best = math.inf
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - t0) / reps)
        return best

    def operands(size: int, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        return a, (b.t() if transposed else b)

    small = max(n // 4, 1)
    probe = {}
    for transposed in (False, True):
        a, b = operands(small, transposed)
        a @ b  # warm-up
        probe[transposed] = best_seconds(a, b, 2, 1)
    a, b = operands(n, min(probe, key=probe.get))
    for _ in range(2):
        a @ b
    one = max(best_seconds(a, b, 1, 1), 1e-6)
    reps = max(1, min(20, int(seconds / 5 / one)))
    return 2 * n**3 / best_seconds(a, b, 5, reps) / 1e12


def machine_peaks(device: torch.device, seconds: float = 0.5) -> dict[str, float]:
    """Measured fp32 and bf16 matmul peaks (TFLOP/s) of ``device``."""
    return {name: measure_peak_tflops(dt, device, seconds=seconds) for name, dt in DTYPES.items()}


def parse_cpuinfo(text: str) -> dict[str, object]:
    """Read a Linux ``/proc/cpuinfo`` text.

    Returns:
        ``{"model": str | None, "flags": set[str], "physical_cores": int | None}``; the cores
        are the distinct ``(physical id, core id)`` pairs (None where the file lists neither,
        as some virtual machines do).
    """
    model, flags, cores = None, set(), set()
    phys = core = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not key:  # a blank line ends one logical CPU's block
            if core is not None:
                cores.add((phys, core))
            phys = core = None
        elif key == "model name" and value:
            model = value
        elif key == "flags":
            flags = set(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
    return {"model": model, "flags": flags, "physical_cores": len(cores) or None}


def _read_cpuinfo() -> dict[str, object]:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return {"model": None, "flags": set(), "physical_cores": None}


def cpu_info() -> dict[str, object]:
    """The CPU's model name and the bf16-relevant ISA features it reports (Linux; elsewhere
    only the platform's processor string): ``{"model": str, "features": [flag, ...]}``."""
    info = _read_cpuinfo()
    model = info["model"] or platform.processor() or platform.machine()
    return {"model": model, "features": [f for f in CPU_FEATURES if f in info["flags"]]}


def machine_info() -> dict[str, object]:
    """What a benchmark ran on, recorded in every ``dsv3 bench`` result as ``machine``.

    Keys: ``cpu_model``; ``cpu_features`` (``{flag: bool}`` for each of :data:`CPU_FEATURES`:
    AVX2, AVX-512F, AVX-512-BF16, AMX-BF16, AMX-TILE, which decide the matmul kernels);
    ``cpu_dispatch`` (the ISA level torch's CPU kernels were dispatched for, e.g. ``AVX512``);
    ``logical_cpus`` (``os.cpu_count()``), ``physical_cores`` (None if unknown),
    ``usable_cpus`` (this process's CPU affinity); ``torch_threads`` and
    ``torch_interop_threads`` (threads torch uses); ``torch``, ``cuda`` (torch's CUDA version,
    None for a CPU build), ``python``; ``gpu`` (name of the current CUDA device, None without
    one) and ``gpu_count``; ``host_allocator`` (the malloc settings of
    :func:`tune_host_allocator`, None if the process kept glibc's defaults).
    """
    import sys

    info = _read_cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        usable = os.cpu_count()
    cuda = torch.cuda.is_available()
    return {
        "cpu_model": info["model"] or platform.processor() or platform.machine(),
        "cpu_features": {f: f in info["flags"] for f in CPU_FEATURES},
        "cpu_dispatch": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": info["physical_cores"],
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "host_allocator": _host_allocator,
    }


#: glibc's malloc settings :func:`tune_host_allocator` applies: allocations below 32 MiB (the
#: largest threshold glibc accepts) come from the heap, not from a fresh ``mmap`` each, and the
#: heap keeps up to 1 GiB of freed memory instead of returning it to the system at once
HOST_ALLOCATOR = {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}
_MALLOPT = {"trim_threshold": -1, "mmap_threshold": -3}  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
_host_allocator: dict[str, int] | None = None


def tune_host_allocator() -> dict[str, int] | None:
    """Keep the memory of freed tensors in the process (glibc's ``mallopt``), once per process.

    By default glibc serves every allocation above a threshold that starts at 128 KiB with its
    own ``mmap`` and returns the heap's free top to the system above 2x that threshold, so a CPU
    training step, which frees and allocates the same activation-sized tensors every step,
    page-faults its way through fresh memory each time. With :data:`HOST_ALLOCATOR` the ``tiny``
    bf16 training step ran 8-15% faster on a 2-core AMD EPYC (5.7-6.0k against 6.5-7.0k
    tokens/s, alternating runs, one thread; ``bench`` bf16 2599 against 2779) at the same peak
    resident memory; a 150-step ``dsv3 train`` of ``tiny`` (fp32, two threads) logged 3698
    against 3478 tokens/s and peaked at 1.09 against 1.05 GB resident. Done by
    the ``dsv3`` command at start; not where the C library is not glibc, nor when the user set
    glibc's malloc up (a ``MALLOC_*`` variable, ``glibc.malloc.*`` in ``GLIBC_TUNABLES``).

    Returns:
        the settings applied (:data:`HOST_ALLOCATOR`), or None where nothing was changed.
    """
    global _host_allocator
    if _host_allocator is not None:
        return _host_allocator
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not all(mallopt(_MALLOPT[k], v) == 1 for k, v in HOST_ALLOCATOR.items()):
        return None
    _host_allocator = dict(HOST_ALLOCATOR)
    return _host_allocator


def device_name(dev: torch.device) -> str:
    """A readable name of ``dev``: the GPU's name, or the CPU model, its bf16-relevant
    features and the thread count."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    info = cpu_info()
    features = ", ".join(info["features"]) or "no avx2"
    return f"cpu ({info['model']}; {features}; {torch.get_num_threads()} threads)"
