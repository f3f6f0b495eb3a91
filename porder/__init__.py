"""porder: information-theoretic patch ordering (POR) of image datasets.

Implements Ghebrechristos & Alaghband, "Expediting Training Using Information
Theory-Based Patch Ordering Algorithm". See ``porder --help`` and README.md.
"""
from __future__ import annotations

from ._version import __version__
from .measures import MEASURES, Measure, get_measure, measure, register_measure, score_matrix
from .patches import apply_perm, invert_perm, merge, restore_images, split
from .reorder import permutations, reorder

__all__ = [
    "MEASURES", "Measure", "__version__", "apply_perm", "get_measure", "invert_perm", "load",
    "measure", "merge", "permutations", "register_measure", "reorder", "restore_images",
    "score_matrix", "split",
]

# Imported on first use, so `import porder` stays light (no h5py, no torch):
# porder.store and porder.load (h5py), porder.data (torch), porder.export, porder.transforms.
_LAZY_MODULES = ("data", "export", "store", "transforms")


def __getattr__(name: str):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "load":
        from .store import load

        return load
    raise AttributeError(f"module 'porder' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | {"load"})
