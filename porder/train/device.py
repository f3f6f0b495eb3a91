"""Device placement for training: which device, its thread and determinism settings,
and mixed precision on CUDA."""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch

from .config import DEVICES, TrainConfig


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ValueError if CUDA is missing."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device 'cuda' asked for, but this torch ({torch.__version__}) sees no "
                         "CUDA GPU; use --device cpu")
    return device


def _autocast(device: str, cfg: TrainConfig):
    if device == "cuda" and cfg.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


@contextmanager
def _torch_settings(device: str, deterministic: bool, threads: Optional[int]):
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
