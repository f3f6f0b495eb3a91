"""How much memory training may use on a device: a share of the memory free now, on the
CPU the RAM that the kernel says is available (``MemAvailable``), on CUDA the device's free
memory (``cudaMemGetInfo``).

:func:`memory_budget` is the budget that :mod:`porder.experiment.groups` sizes a
comparison's lockstep groups to (``compare --lockstep``); :func:`data_budget` the one a
run's data must fit to be held in memory rather than streamed from the file
(:class:`porder.train.batches.Data`).
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

# Data: the share of the memory free at the start a split may take on its device to be
# held there (the train split first, then the test split in what is left): a quarter,
# because the model, its activations and optimizer state, the machine's other processes
# (on a CPU) and the page cache that reading the file fills (which MemAvailable counts as
# free) need the rest. A split above it is streamed from the file.
DATA_SHARE = 0.25


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


def data_budget(device) -> tuple[int, str]:
    """(bytes of images :class:`porder.train.batches.Data` may hold on ``device``, how
    that was found, in words).

    :data:`DATA_SHARE` of the RAM available now, shared among the processes torchrun
    started on this machine (``LOCAL_WORLD_SIZE``: each holds its own copy); on CUDA, of
    the GPU's free memory when that is less (a split held on the GPU passes through the
    host as it is read).
    """
    import torch

    free, where = available_ram(), "the RAM available now"
    try:
        procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        procs = 1
    if procs > 1:
        free, where = free // procs, f"{where} / {procs} processes"
    dev = torch.device(device)
    if dev.type == "cuda":
        gpu, _ = torch.cuda.mem_get_info(dev)
        if gpu < free:
            free, where = gpu, "the GPU's free memory"
    return int(DATA_SHARE * free), f"{DATA_SHARE:.0%} of {where} ({free / 2**30:.1f} GiB)"
