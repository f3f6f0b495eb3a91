"""Cutting images into square patches, putting them back, and permuting them.

Patches are indexed row-major: in a grid of G x G patches, patch (r, c) has
index ``r * G + c``. A permutation ``perm`` of shape (N, K) means that output
position j holds source patch ``perm[:, j]``.
"""
from __future__ import annotations

from .backend import get_array_module


def check_patch_size(image_size: int, patch: int) -> int:
    """Return the grid side G = image_size // patch, or raise a clear ValueError."""
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch size must be a positive integer, got {patch!r}")
    if image_size % patch:
        raise ValueError(
            f"patch size {patch} does not divide the image size {image_size}; "
            f"choose a divisor of {image_size} (e.g. 4, 8 or 16 for 32x32 images)"
        )
    return image_size // patch


def split(images, patch: int):
    """Cut square images into row-major patches.

    Parameters
    ----------
    images : array, shape (N, S, S, C)
    patch : int
        Patch side p; must divide S.

    Returns
    -------
    array, shape (N, K, p, p, C) with K = (S // p) ** 2 (a copy).
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must have shape (N, S, S, C), got {tuple(images.shape)}")
    n, s, _, c = images.shape
    g = check_patch_size(s, patch)
    # (N, G, p, G, p, C) -> (N, G, G, p, p, C)
    grid = images.reshape(n, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, g * g, patch, patch, c)


def merge(patches):
    """Inverse of :func:`split`: (N, K, p, p, C) -> (N, S, S, C), K a square."""
    n, k, p, _, c = patches.shape
    g = int(round(k**0.5))
    if g * g != k:
        raise ValueError(f"patch count {k} is not a square")
    grid = patches.reshape(n, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, g * p, g * p, c)


def apply_perm(patches, perm):
    """Reorder patches: ``out[:, j] = patches[:, perm[:, j]]``.

    patches (N, K, ...) and perm (N, K) integer; returns (N, K, ...).
    """
    xp = get_array_module(patches)
    idx = perm.astype(xp.intp).reshape(perm.shape + (1,) * (patches.ndim - 2))
    return xp.take_along_axis(patches, idx, axis=1)


def invert_perm(perm):
    """The permutation that undoes ``perm`` (its argsort), same shape (N, K)."""
    xp = get_array_module(perm)
    return xp.argsort(perm, axis=-1).astype(perm.dtype)


def permute_images(images, perm, patch: int):
    """Rebuild images (N, S, S, C) with their patches in the order ``perm`` (N, K)."""
    return merge(apply_perm(split(images, patch), perm))


def restore_images(images, perm, patch: int):
    """Recover original images from reordered ones and their ``perm``."""
    return permute_images(images, invert_perm(perm), patch)
