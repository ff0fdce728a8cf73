"""Throughput accounting: peak FLOP/s for MFU, a measured CPU matmul peak, and a profiler for chosen steps."""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


@functools.lru_cache(maxsize=None)  # once per process: a sweep trains many runs in one (1.2 s each on 2 cores)
def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul (what MFU is measured against on CPU)."""
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (dropout, resumes) alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, configured: float = 0.0) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BF16_PEAK.items():
            if key in name:
                return value
        return matmul_peak_flops(device, n=8192, dtype=torch.bfloat16)
    return matmul_peak_flops(device)


# glibc's mmap threshold for CPU training (tune_cpu_allocator). Engines that hold the whole model keep
# freed blocks in the heap: their steps reuse memory instead of page-faulting it in again. Engines
# that shard map each buffer of 1 MB and more on its own, so the whole layers they gather and free
# every step go back to the OS. Measured at GAM 187M on 2 ranks (FSDP2, per rank): peak RSS 4.56 GiB
# with heap reuse (4.08 GiB of heap for 1.52 GiB of live allocations), 2.04 GiB with each buffer mapped.
REUSE_THE_HEAP = 1 << 30
MAP_EACH_BUFFER = 1 << 20


def tune_cpu_allocator(mmap_threshold: int = REUSE_THE_HEAP) -> bool:
    """Keep freed large blocks in the heap instead of returning them to the OS (glibc only).

    By default glibc serves allocations above a dynamic threshold (<= 32 MB) with fresh mmap()s
    and gives them back on free, so every training step page-faults its activations in again
    (seen as high system time: 1m43s of 9m55s CPU in one quickstart). Fixed thresholds let steps
    reuse memory. Process-wide; memory is not handed back until exit.

    A small `mmap_threshold` does the opposite, for deferred init: every tensor of 1 MB and more is
    mapped on its own and unmapped when freed, so the whole units it frees leave no holes in the heap.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        return libc.mallopt(M_TRIM_THRESHOLD, max(mmap_threshold, 1 << 20)) == 1 and ok
    except (OSError, AttributeError):
        return False


class StepProfiler:
    """train.profile_steps: a torch.profiler trace of steps [first, last] (1-based), written by each
    rank to <run dir>/profile/ when the last of them ends."""

    def __init__(self, steps: list[int], run_dir: Path, rank: int, device: torch.device, say):
        self.steps, self.say, self.active = steps, say, None
        self.path = run_dir / "profile" / (f"steps_{steps[0]}-{steps[1]}_rank{rank:05d}.json" if steps else "")
        self.activities = [torch.profiler.ProfilerActivity.CPU] + \
            ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            self.active = torch.profiler.profile(activities=self.activities)
            self.active.__enter__()

    def after(self, step: int) -> None:
        if self.active is not None and step == self.steps[1]:
            self.close()
            self.path.parent.mkdir(exist_ok=True)
            self.done.export_chrome_trace(str(self.path))
            self.say(f"profile of steps {self.steps[0]}-{self.steps[1]}: {self.path} (chrome://tracing, Perfetto)")

    def close(self) -> None:
        if self.active is not None:
            self.active.__exit__(None, None, None)
            self.done, self.active = self.active, None
