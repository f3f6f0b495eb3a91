"""porder: information-theoretic patch ordering (POR) of image datasets.

Implements Ghebrechristos & Alaghband, "Expediting Training Using Information
Theory-Based Patch Ordering Algorithm". See ``porder --help`` and README.md.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .measures import MEASURES, Measure, get_measure, measure, score_matrix
from .patches import apply_perm, invert_perm, merge, restore_images, split
from .reorder import permutations, reorder

__all__ = [
    "MEASURES", "Measure", "__version__", "apply_perm", "get_measure", "invert_perm",
    "measure", "merge", "permutations", "reorder", "restore_images", "score_matrix", "split",
]
