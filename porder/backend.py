"""Array backend selection: NumPy on the CPU, CuPy on a CUDA GPU.

Every array function in porder starts with ``xp = get_array_module(x)`` and then
calls only ``xp.*``, so the same code runs on both. CuPy is optional
(``pip install "patch-order[cuda13]"`` for CUDA 13, ``"patch-order[cuda12]"`` for
CUDA 12); without it everything runs on NumPy.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from typing import Callable

import numpy as np

DEVICES = ("cpu", "cuda", "auto")


@lru_cache(maxsize=1)
def cupy_module():
    """Return the cupy module when it is installed and sees a GPU, else None."""
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # no driver, no device, broken install: all mean "no GPU"
        return None
    return cupy


def cuda_available() -> bool:
    """True when CuPy is installed and a CUDA device is visible."""
    return cupy_module() is not None


def resolve_device(device: str, *, gpu: Callable[[], bool] | None = None,
                   no_gpu: str | None = None) -> str:
    """Map ``{'cpu', 'cuda', 'auto'}`` to ``'cpu'`` or ``'cuda'``: porder's one resolver of device names.

    Parameters
    ----------
    device : {'cpu', 'cuda', 'auto'}
        'auto' is 'cuda' when a GPU is usable, else 'cpu'.
    gpu : callable, optional
        Whether a GPU is usable; default :func:`cuda_available` (CuPy sees one).
        torch code passes torch's view instead (:func:`porder.data.resolve_torch_device`).
    no_gpu : str, optional
        The error for 'cuda' without a usable GPU; default: how to get CuPy.

    Raises
    ------
    ValueError
        For an unknown device, or ``'cuda'`` without a usable GPU.
    """
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not one of {', '.join(DEVICES)}")
    usable = cuda_available if gpu is None else gpu
    if device == "auto":
        return "cuda" if usable() else "cpu"
    if device == "cuda" and not usable():
        if no_gpu is not None:
            raise ValueError(no_gpu)
        if importlib.util.find_spec("cupy") is None:
            raise ValueError(
                "device='cuda' needs CuPy: install it with `pip install \"patch-order[cuda13]\"` "
                "(CUDA 13; `patch-order[cuda12]` for CUDA 12), or use device='cpu'"
            )
        raise ValueError("device='cuda' but CuPy sees no CUDA GPU; use device='cpu'")
    return device


def array_module(device: str):
    """The array module (numpy or cupy) for a resolved device name."""
    return cupy_module() if resolve_device(device) == "cuda" else np


def get_array_module(x):
    """numpy or cupy, whichever owns array ``x`` (like ``cupy.get_array_module``)."""
    cp = cupy_module() if type(x).__module__.startswith("cupy") else None
    return cp if cp is not None else np


def to_device(x, xp):
    """Move array ``x`` to the module ``xp`` (no copy when it is already there)."""
    if xp is np:
        return to_numpy(x)
    return xp.asarray(x)


def to_numpy(x) -> np.ndarray:
    """A NumPy array from a NumPy or CuPy array."""
    if isinstance(x, np.ndarray):
        return x
    get = getattr(x, "get", None)
    return get() if get is not None else np.asarray(x)
