"""Cutting images into square patches, putting them back, and permuting them.

Patches are indexed row-major: in a grid of G x G patches, patch (r, c) has
index ``r * G + c``. A permutation ``perm`` of shape (N, K) means that output
position j holds source patch ``perm[:, j]``.
"""
from __future__ import annotations

from functools import partial

import numpy as np

from .backend import get_array_module, to_numpy


def _is_torch(x) -> bool:
    """True for a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "__dlpack__")


def from_torch(x):
    """View a torch tensor as a NumPy or CuPy array; pass anything else through.

    Returns ``(array, back)``: ``array`` shares memory with ``x`` through DLPack
    (a NumPy array for a CPU tensor, a CuPy array for a CUDA tensor when CuPy is
    installed), and ``back(result)`` turns a NumPy or CuPy result into a tensor
    on ``x``'s device (without a copy where the result already is there). A CUDA
    tensor without CuPy, or a tensor on another device, is copied to the host.
    For a non-tensor ``x``, ``array`` is ``x`` and ``back`` returns its argument.

    This is porder's one torch -> array hand-off: :func:`porder.reorder` calls
    it, and torch code (``porder.nn``, ``porder train --measure``) passes its
    tensors to ``reorder``.
    """
    if not _is_torch(x):
        return x, lambda a: a
    t = x.detach()
    back = partial(_to_torch, device=t.device)
    if t.device.type == "cpu":
        return np.from_dlpack(t), back
    if t.device.type == "cuda":
        from .backend import cuda_available

        if cuda_available():
            import cupy

            return cupy.from_dlpack(t), back
    return np.from_dlpack(t.cpu()), back


def _to_torch(a, device):
    """A NumPy or CuPy array as a tensor on torch ``device`` (no copy where it already is there)."""
    import torch

    if type(a).__module__.startswith("cupy"):
        return torch.from_dlpack(a).to(device)      # no copy on the same GPU
    return torch.from_numpy(to_numpy(a)).to(device)


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
    array, shape (N, K, p, p, C)
        A copy, with K = (S // p) ** 2 patches per image.
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
    n, k = patches.shape[:2]
    if tuple(perm.shape) != (n, k):
        raise ValueError(f"perm has shape {tuple(perm.shape)}, patches need ({n}, {k})")
    perm = perm.astype(xp.intp)
    if perm.size and (int(perm.min()) < 0 or int(perm.max()) >= k):
        raise IndexError(f"perm holds patch indices outside 0..{k - 1}")
    # One row gather over (N*K, patch values): contiguous copies, where
    # take_along_axis would broadcast an index to every value (about 7x slower).
    rows = (perm + xp.arange(n, dtype=xp.intp)[:, None] * k).reshape(-1)
    values = int(np.prod(patches.shape[2:], dtype=np.int64))
    return xp.take(patches.reshape(n * k, values), rows, axis=0).reshape(patches.shape)


def invert_perm(perm):
    """The permutation that undoes ``perm`` (its argsort), same shape (N, K)."""
    xp = get_array_module(perm)
    return xp.argsort(perm, axis=-1).astype(perm.dtype)


def _check_perm(perm, n: int, k: int, size: int, patch: int) -> None:
    """ValueError unless ``perm`` is (n, k): a perm made with another patch size
    would otherwise give a silently wrong image."""
    if tuple(perm.shape) == (n, k):
        return
    if perm.ndim == 2 and perm.shape[0] == n:
        g = int(round(perm.shape[1] ** 0.5))
        hint = (f"; it fits patch={size // g}" if g * g == perm.shape[1] and g and size % g == 0
                else "")
        raise ValueError(f"perm has {perm.shape[1]} patches per image, but patch={patch} cuts "
                         f"{size}x{size} images into {k}; pass the patch size the images were "
                         f"reordered with (a porder file's 'patch' attribute){hint}")
    raise ValueError(f"perm must have shape (N, K) = ({n}, {k}) for {n} images of {size}x{size} "
                     f"in {patch}x{patch} patches, got {tuple(perm.shape)}")


def permute_images(images, perm, patch: int):
    """Rebuild images with their patches in the order ``perm``.

    Parameters
    ----------
    images : array (N, S, S, C): NumPy, CuPy or a torch tensor
    perm : integer array (N, K), K = (S // patch) ** 2: output patch j is input
        patch ``perm[:, j]``
    patch : int

    Returns
    -------
    array (N, S, S, C), the same array type (and device) as ``images``

    Raises
    ------
    ValueError
        When ``perm``'s shape does not fit N images cut into ``patch`` patches
        (e.g. a perm made with another patch size).
    """
    images, back = from_torch(images)
    perm, _ = from_torch(perm)
    pt = split(images, patch)                    # (N, K, p, p, C)
    _check_perm(perm, pt.shape[0], pt.shape[1], images.shape[1], patch)
    return back(merge(apply_perm(pt, perm)))


def restore_images(images, perm, patch: int):
    """Recover original images from reordered ones and their ``perm``.

    ``images`` (N, S, S, C) and ``perm`` (N, K) as returned by
    :func:`porder.reorder` (or stored in a porder file), ``patch`` the patch
    size they were made with; returns the originals (N, S, S, C), the same
    array type as ``images``. ValueError when ``perm`` does not fit ``patch``.
    """
    perm, _ = from_torch(perm)
    return permute_images(images, invert_perm(perm), patch)
