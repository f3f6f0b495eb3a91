"""How much memory a comparison's lockstep groups may use on a device (``compare --lockstep``).

:func:`memory_budget` is the budget that :mod:`porder.experiment.groups` sizes its groups
of models to: a share of the memory free now, on the CPU the RAM that the kernel says is
available (``MemAvailable``), on CUDA the device's free memory (``cudaMemGetInfo``).
"""
from __future__ import annotations

import os

# Shares of the free memory a group may take, with their reasons.
# CPU: half, because the machine's other processes (and the caches' page cache, which
# MemAvailable counts as free) need the rest, and a group's estimate leaves out the
# allocator's fragmentation; swapping would make a group far slower than training alone.
CPU_SHARE = 0.5
# CUDA: 80%, because the device is ours alone while a comparison runs, and the rest covers
# the CUDA context's workspaces (cuDNN, cuBLAS) that the estimate leaves out.
CUDA_SHARE = 0.8


def memory_budget(device: str) -> tuple[int, str]:
    """(bytes a lockstep group may use on ``device``, how that was found, in words)."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(CUDA_SHARE * free), (f"{CUDA_SHARE:.0%} of the GPU's free memory "
                                        f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB)")
    free = available_ram()
    return int(CPU_SHARE * free), (f"{CPU_SHARE:.0%} of the RAM available now "
                                   f"({free / 2**30:.1f} GiB)")


def available_ram() -> int:
    """Bytes of RAM available to a new process: /proc/meminfo's MemAvailable, else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 4 * 2**30      # unknown (not Linux): assume a small machine
