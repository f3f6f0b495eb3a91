"""Device placement for training: which device, its thread and determinism settings,
mixed precision on CUDA, and waiting for the device."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch

from ..data import resolve_torch_device
from ..kernels.cpu import cores
from .config import TrainConfig


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ValueError if CUDA is missing.

    :func:`porder.data.resolve_torch_device`, whose error names ``--device cpu``.
    """
    return resolve_torch_device(device, fix="--device cpu")


def autocast(device: str, cfg: TrainConfig):
    """Mixed precision for a forward pass: bfloat16 (else float16) on CUDA with ``cfg.amp``."""
    if device == "cuda" and cfg.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def sync(device: str) -> None:
    """Wait for the device's queued work (timings); nothing to wait for on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


# glibc malloc thresholds for CPU training (mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).
MMAP_THRESHOLD = 32 << 20    # blocks up to 32 MiB (glibc's largest) come from the heap, not mmap
TRIM_THRESHOLD = 256 << 20   # freed heap is returned to the system above 256 MiB only


@functools.cache
def tune_cpu_malloc() -> bool:
    """Stop a CPU training step from handing its tensors' memory back to the system and
    faulting it in again on the next step; once per process, on glibc only.

    A step frees its gradients (``zero_grad(set_to_none=True)``) and oneDNN's buffers
    and allocates them again on the next step. With glibc's default, adaptive
    thresholds, blocks of a few MiB were mmapped or trimmed off the heap on free,
    and every step then paid minor page faults for them: at batch 1, a lockstep
    step of 16 VGG models spent 17-27% of its time in the kernel (about 1,100
    faults a step), a batch-32 step alone 8%. With :data:`MMAP_THRESHOLD` and
    :data:`TRIM_THRESHOLD` set, none (``benchmarks/bench_lockstep.py``,
    ``docs/performance.md``); peak RSS did not change. The cost: a process keeps up
    to 256 MiB of freed heap for reuse. Process-wide, like torch's thread count;
    skipped (False) off glibc, when the allocator is replaced (``LD_PRELOAD``), or
    when ``GLIBC_TUNABLES`` already sets malloc options.
    """
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") \
            or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3        # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and \
        bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


@contextmanager
def torch_settings(device: str, deterministic: bool, threads: Optional[int]):
    """Threads and determinism for one run; the previous settings come back after."""
    old = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
           torch.backends.cudnn.benchmark)
    try:
        if device == "cpu":
            torch.set_num_threads(threads or cores())
            tune_cpu_malloc()
        else:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = not deterministic
        # warn_only: a few CUDA backward kernels have no deterministic version.
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        yield
    finally:
        torch.set_num_threads(old[0])
        torch.use_deterministic_algorithms(old[1])
        torch.backends.cudnn.benchmark = old[2]
