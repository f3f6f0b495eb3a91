"""Device placement for training: which device, its thread and determinism settings,
mixed precision on CUDA, and waiting for the device."""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch

from ..data import resolve_torch_device
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


@contextmanager
def torch_settings(device: str, deterministic: bool, threads: Optional[int]):
    """Threads and determinism for one run; the previous settings come back after."""
    old = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
           torch.backends.cudnn.benchmark)
    try:
        if device == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
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
