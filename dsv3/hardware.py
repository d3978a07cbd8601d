"""What the machine is: precisions, measured matmul peaks, and the device's name and features.

Used by ``dsv3 bench`` (peaks, MFU, the device recorded in every result) and by the trainer
(``train.peak_tflops: auto`` measures the peak once at start).
"""

from __future__ import annotations

import math
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
    after a warm-up. n defaults to 1024 on CPU and 8192 on CUDA.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    a @ b
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(20, int(seconds / 5 / one)))
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12


def machine_peaks(device: torch.device, seconds: float = 0.5) -> dict[str, float]:
    """Measured fp32 and bf16 matmul peaks (TFLOP/s) of ``device``."""
    return {name: measure_peak_tflops(dt, device, seconds=seconds) for name, dt in DTYPES.items()}


def cpu_info() -> dict[str, object]:
    """The CPU's model name and the bf16-relevant ISA features it reports (Linux; elsewhere
    only the platform's processor string): ``{"model": str, "features": [flag, ...]}``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "features": [f for f in CPU_FEATURES if f in flags]}


def device_name(dev: torch.device) -> str:
    """A readable name of ``dev``: the GPU's name, or the CPU model, its bf16-relevant
    features and the thread count."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    info = cpu_info()
    features = ", ".join(info["features"]) or "no avx2"
    return f"cpu ({info['model']}; {features}; {torch.get_num_threads()} threads)"
