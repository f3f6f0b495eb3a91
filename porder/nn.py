"""POR inside a network: :class:`PatchReorder` reorders the patches of feature maps.

The paper asks whether the patch ordering it applies to training images can
also be applied "to feature maps deep in the learning pipeline".
:class:`PatchReorder` is that layer: per sample it cuts a feature map
(N, C, H, W) into square patches, orders them with porder's own POR chain
(:func:`porder.reorder`, the measure registry and its kernels) and reassembles
the map with its patches in that order.

* The permutation is computed without gradient from a uint8 "image" made of
  the map (see :func:`quantise`); the gather that applies it
  (:func:`permute_patches`) is an ordinary differentiable torch op, so the layer
  trains end to end and the gradient reaching its input is the output gradient
  with its patches moved back by the inverse permutation.
* It runs where its input lives: the uint8 image is a tensor on the map's
  device, and :func:`porder.reorder` takes it as it is (CPU tensors as NumPy,
  CUDA tensors as CuPy through DLPack, without copies) and returns the
  permutation as a tensor there; without CuPy a CUDA map's uint8 image is
  copied to the CPU to be ordered, and the permutation is copied back
  (documented fallback).

torch is imported here, and nowhere in the array core of porder: import this
module explicitly (``import porder.nn``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .backend import cuda_available
from .measures import get_measure
from .reorder import reorder

CHANNEL_MODES = ("mean", "all")
LEVELS = 256  # quantisation levels of a feature map: one uint8 intensity each


# --------------------------------------------------------------------------
# Validation


def _check_map(x, patch: int) -> int:
    """Validate a feature map (N, C, S, S) and a patch size; return the grid side G."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor feature map (N, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"feature maps must have shape (N, C, H, W), got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}; add a batch axis with x.unsqueeze(0) for a single map"
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"feature maps must be real-valued, got dtype {x.dtype}")
    n, c, h, w = x.shape
    if c < 1:
        raise ValueError(f"feature maps need at least one channel, got shape {tuple(x.shape)}")
    if h != w:
        raise ValueError(
            f"feature maps must be square (H == W) to be patch-ordered, got {h}x{w}; "
            "crop or pad the map to a square"
        )
    if not isinstance(patch, (int, np.integer)) or isinstance(patch, bool) or patch < 1:
        raise ValueError(f"patch size must be a positive integer, got {patch!r}")
    if h % patch:
        raise ValueError(
            f"patch size {patch} does not divide the feature map size {h}x{w}; "
            f"choose a divisor of {h}"
        )
    return h // int(patch)


def _check_channels(channels):
    """Normalise the ``channels`` option: 'mean', 'all', an int k or a tuple of indices."""
    if isinstance(channels, str):
        if channels not in CHANNEL_MODES:
            raise ValueError(
                f"channels={channels!r} is not one of 'mean', 'all', a positive int or a "
                "sequence of channel indices"
            )
        return channels
    if isinstance(channels, (int, np.integer)) and not isinstance(channels, bool):
        if channels < 1:
            raise ValueError(f"channels={channels} must be at least 1 (or 'mean' / 'all')")
        return int(channels)
    if isinstance(channels, Sequence) and len(channels) > 0 and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in channels):
        idx = tuple(int(i) for i in channels)
        if len(set(idx)) != len(idx) or min(idx) < 0:
            raise ValueError(f"channel indices must be distinct and non-negative, got {channels!r}")
        return idx
    raise ValueError(
        f"channels={channels!r} is not one of 'mean', 'all', a positive int or a non-empty "
        "sequence of channel indices"
    )


def channel_indices(channels, c: int):
    """Channel indices ordered on for the ``channels`` option and C channels.

    Parameters
    ----------
    channels : {'all'} or int or sequence of int
        ``'all'``: every channel; an int k: k channels evenly spaced over the C,
        ``i * C // k`` for i = 0..k-1 (channel 0 first; k = C is ``'all'``);
        a sequence: those channels.
    c : int
        Number of channels of the map.

    Returns
    -------
    list of int, or None for ``'mean'`` (the channel-mean map is ordered on).
    """
    channels = _check_channels(channels)
    if channels == "mean":
        return None
    if channels == "all":
        return list(range(c))
    if isinstance(channels, int):
        if channels > c:
            raise ValueError(
                f"channels={channels} asks for more channels than the map has ({c}); "
                f"use at most {c}, or 'all'"
            )
        return [i * c // channels for i in range(channels)]
    if max(channels) >= c:
        raise ValueError(f"channel index {max(channels)} is out of range for a map of {c} channels")
    return list(channels)


# --------------------------------------------------------------------------
# Feature maps -> uint8 images


def quantise(x):
    """Quantise each channel of each sample to 256 levels between its min and max.

    Parameters
    ----------
    x : real tensor (N, C, H, W)
        Any device; integer tensors are treated as real values.

    Returns
    -------
    uint8 tensor (N, C, H, W)
        On the device of ``x``.

    Raises
    ------
    ValueError
        When ``x`` holds NaN or infinite values.

    Notes
    -----
    With ``lo`` and ``hi`` the minimum and maximum of one channel of one sample
    (over its H x W values), every value becomes the index of one of 256
    equal-width bins of ``[lo, hi]``::

        q = min(floor((x - lo) * 256 / (hi - lo)), 255)

    computed in float64 for float64 maps and in float32 otherwise. A constant
    channel (``hi == lo``) maps to 0. A channel whose values are the integers
    0..255 with min 0 and max 255 maps to itself, so a uint8 image given as a
    float map is left exactly as it is.
    """
    if x.dtype == torch.float64:
        work = x
    else:
        work = x.to(torch.float32)
    if not bool(torch.isfinite(work).all()):
        raise ValueError("feature map holds NaN or infinite values; they cannot be quantised")
    flat = work.flatten(2)  # (N, C, H*W)
    lo = flat.amin(dim=2, keepdim=True)  # (N, C, 1)
    span = flat.amax(dim=2, keepdim=True) - lo  # (N, C, 1)
    safe = torch.where(span > 0, span, torch.ones_like(span))
    q = torch.floor((flat - lo) * LEVELS / safe).clamp_(0, LEVELS - 1)
    q = torch.where(span > 0, q, torch.zeros_like(q))
    return q.to(torch.uint8).reshape(x.shape)


def histogram_input(x, channels="mean"):
    """The uint8 image a feature map is ordered on.

    Parameters
    ----------
    x : real tensor (N, C, S, S)
    channels : {'mean', 'all'} or int or sequence of int
        ``'mean'``: the mean over channels, quantised (one channel);
        ``'all'``: every channel quantised on its own; an int k or a sequence
        of indices: those channels (see :func:`channel_indices`), each
        quantised on its own.

    Returns
    -------
    uint8 tensor (N, S, S, C')
        Channel-last and contiguous, C' = 1 for ``'mean'``, on the device of
        ``x``: the layout :func:`porder.reorder` takes. Its measures average
        over the C' channels (the paper's rule for RGB).
    """
    idx = channel_indices(channels, x.shape[1])
    if idx is None:
        work = x if x.dtype == torch.float64 else x.to(torch.float32)
        sel = work.mean(dim=1, keepdim=True)  # (N, 1, S, S)
    elif idx == list(range(x.shape[1])):
        sel = x
    else:
        sel = x[:, idx]  # (N, C', S, S)
    return quantise(sel).permute(0, 2, 3, 1).contiguous()  # (N, S, S, C')


# --------------------------------------------------------------------------
# The differentiable gather


def permute_patches(x, perm, patch: int):
    """Rebuild feature maps with their patches in the order ``perm``.

    Parameters
    ----------
    x : tensor (N, C, S, S)
    perm : int64 tensor (N, K)
        K = (S // patch) ** 2, on the device of ``x``: output patch j
        (row-major) is input patch ``perm[:, j]``.
    patch : int
        Patch side; must divide S.

    Returns
    -------
    tensor (N, C, S, S)
        Differentiable in ``x``: it is one ``torch.gather`` of pixels, so the
        gradient of the input is the output gradient with its patches permuted
        by the inverse of ``perm`` (``argsort(perm)``).
    """
    g = _check_map(x, patch)
    n, c, s, _ = x.shape
    k = g * g
    if tuple(perm.shape) != (n, k):
        raise ValueError(f"perm must have shape (N, K) = {(n, k)}, got {tuple(perm.shape)}")
    # One gather over flattened pixels (3x faster on a CPU than gathering
    # patch blocks, which needs two transposing copies): output pixel (r, c)
    # lies in output patch (r // p, c // p), whose source patch is perm[...].
    perm = perm.to(device=x.device, dtype=torch.int64)
    r = torch.arange(s, device=x.device)  # (S,)
    src = perm.reshape(n, g, g)[:, r // patch][:, :, r // patch]  # (N, S, S) source patch
    src_r = (src // g) * patch + (r % patch)[:, None]  # (N, S, S) source row
    src_c = (src % g) * patch + (r % patch)[None, :]  # (N, S, S) source column
    idx = (src_r * s + src_c).view(n, 1, s * s).expand(n, c, s * s)
    return x.reshape(n, c, s * s).gather(2, idx).view(n, c, s, s)


# --------------------------------------------------------------------------
# The layer


class PatchReorder(nn.Module):
    """Reorder the patches of each feature map with the POR algorithm.

    Parameters
    ----------
    measure : str
        A name from :data:`porder.MEASURES` (``porder measures`` lists them);
        ``'none'`` makes the layer the identity, ``'random'`` is the seeded
        shuffle control.
    patch : int
        Patch side; must divide the map's side S. Maps must be square.
    bins : int
        Histogram bins of the histogram measures (1..256), as for
        :func:`porder.reorder`.
    reference : int
        Row-major index of the patch the chain starts from (pairwise measures).
    descending : bool, optional
        Override the measure's default direction.
    channels : {'mean', 'all'} or int or sequence of int
        Which uint8 image the map is ordered on (see :func:`histogram_input`).
        ``'mean'`` (default): the channel-mean map, quantised; ``'all'``:
        every channel quantised and the measure averaged over channels, the
        paper's rule for RGB; an int k: k evenly spaced channels; a sequence:
        those channels. The cost of ordering grows with the number of
        channels ordered on; 'mean' costs one channel whatever C is (see
        Notes).
    quantise : {'minmax'}
        How real values become 256 levels: per sample and channel, between its
        min and max (:func:`quantise`). The only rule so far.
    enabled_in_eval : bool
        True (default): the layer reorders in eval mode exactly as in
        training mode. False: in eval mode it is the identity.
    backend : {'compiled', 'generic'}, optional
        Passed to :func:`porder.reorder`; None uses its default.
    seed : int
        Seed of the ``random`` control: sample i of every batch gets the
        permutation porder gives image i of a dataset under this seed, so
        results are deterministic.
    workers : int, optional
        CPU threads for ordering (default: all cores).

    Attributes
    ----------
    last_perm : int64 tensor (N, K) or None
        The permutation applied by the last forward call (None before the
        first, and after an identity call).

    Notes
    -----
    Forward: ``images = histogram_input(x, channels)`` (uint8 (N, S, S, C'),
    no gradient); ``perm = porder.reorder(images, measure, patch, ...)[1]``
    (on the map's device, DLPack exchange); ``y = permute_patches(x, perm,
    patch)`` (differentiable). A feature map that is a valid uint8 image (each
    channel with min 0 and max 255) is ordered exactly as
    :func:`porder.reorder` orders that image.

    Why ``channels='mean'`` is the default: ordering costs grow with the
    number of channels ordered on, and only 'mean' stays at the cost of one
    channel whatever C is. Measured with ``benchmarks/bench_nn.py`` (ms per
    batch, forward, measure 'mi', 16-core Xeon CPU, NumPy path): maps (32,
    64, 16, 16) at patch 4: 'mean' 2.2, 4 channels 6.9, 16 channels 26, 'all'
    53, against 3.4 for a 3x3 Conv2d(64, 64) forward+backward on the same
    map; maps (32, 192, 32, 32) at patch 8: 'mean' 6.1, 'all' 349 (conv 59).
    ``'all'`` is the paper's per-channel rule, exact but costly for wide maps.
    """

    def __init__(self, measure: str = "mi", patch: int = 4, *, bins: int = 256,
                 reference: int = 0, descending: Optional[bool] = None,
                 channels: Union[str, int, Sequence[int]] = "mean", quantise: str = "minmax",
                 enabled_in_eval: bool = True, backend: Optional[str] = None, seed: int = 0,
                 workers: Optional[int] = None):
        super().__init__()
        self.measure = get_measure(measure).name
        if not isinstance(patch, (int, np.integer)) or isinstance(patch, bool) or patch < 1:
            raise ValueError(f"patch size must be a positive integer, got {patch!r}")
        if not isinstance(bins, (int, np.integer)) or not 1 <= bins <= 256:
            raise ValueError(f"bins must be an integer from 1 to 256, got {bins!r}")
        if quantise != "minmax":
            raise ValueError(f"quantise={quantise!r} is not supported; use 'minmax'")
        if backend is not None and backend not in ("compiled", "generic"):
            raise ValueError(f"backend={backend!r} is not one of compiled, generic (or None)")
        if not isinstance(reference, (int, np.integer)) or reference < 0:
            raise ValueError(f"reference must be a non-negative patch index, got {reference!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.patch = int(patch)
        self.bins = int(bins)
        self.reference = int(reference)
        self.descending = descending
        self.channels = _check_channels(channels)
        self.quantise = quantise
        self.enabled_in_eval = bool(enabled_in_eval)
        self.backend = backend
        self.seed = int(seed)
        self.workers = workers
        self.last_perm = None

    def extra_repr(self) -> str:
        return (f"measure={self.measure!r}, patch={self.patch}, channels={self.channels!r}, "
                f"bins={self.bins}, enabled_in_eval={self.enabled_in_eval}")

    def permutation(self, x):
        """POR permutations of a batch of feature maps, without gradient.

        Parameters
        ----------
        x : real tensor (N, C, S, S)

        Returns
        -------
        int64 tensor (N, K) on the device of ``x``: output patch j is input
        patch ``perm[:, j]``.
        """
        g = _check_map(x, self.patch)
        n, k = x.shape[0], g * g
        if self.reference >= k:
            raise ValueError(f"reference patch {self.reference} is out of range 0..{k - 1} "
                             f"for a {x.shape[2]}x{x.shape[3]} map cut into {self.patch}x"
                             f"{self.patch} patches")
        with torch.no_grad():
            if self.measure == "none" or n == 0:
                return torch.arange(k, device=x.device).expand(n, k).clone()
            # The random control depends only on the seed and position: skip quantising.
            images = (torch.zeros((n, x.shape[2], x.shape[3], 1), dtype=torch.uint8, device=x.device)
                      if self.measure == "random" else histogram_input(x.detach(), self.channels))
            kw = dict(bins=self.bins, reference=self.reference, descending=self.descending,
                      seed=self.seed, workers=self.workers)
            if self.backend is not None:
                kw["backend"] = self.backend
            # On CUDA with CuPy, on the GPU; otherwise (the CPU, or CUDA without CuPy) on the CPU.
            device = "cuda" if images.is_cuda and cuda_available() else "cpu"
            _, perm = reorder(images, self.measure, self.patch, device=device, **kw)
            return perm                                      # (N, K) int64, on x's device

    def forward(self, x):  # (N, C, S, S) -> (N, C, S, S)
        _check_map(x, self.patch)
        if self.measure == "none" or (not self.training and not self.enabled_in_eval):
            self.last_perm = None
            return x
        perm = self.permutation(x)  # (N, K)
        self.last_perm = perm
        return permute_patches(x, perm, self.patch)



def insert_after(model, name: str, layer):
    """Run ``layer`` on the output of ``model``'s submodule ``name``, in place.

    Parameters
    ----------
    model : torch.nn.Module
    name : str
        Dotted path of a submodule, as listed by ``model.named_modules()``
        (e.g. ``'stem'`` or ``'layers.3'``).
    layer : torch.nn.Module
        Usually a :class:`PatchReorder`.

    Returns
    -------
    model : torch.nn.Module
        ``model``, whose submodule ``name`` is replaced by
        ``nn.Sequential(submodule, layer)``: it prints, moves (``.to``) and
        switches mode (``.train``, ``.eval``) with the model. The state-dict
        keys below ``name`` gain a ``.0`` (``stem.0.weight`` becomes
        ``stem.0.0.weight``).

    Raises
    ------
    ValueError
        Unknown submodule name.
    """
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        top = ", ".join(n for n in names if "." not in n)
        raise ValueError(f"model has no submodule {name!r}; choose one of {top} "
                         "(or a dotted path below them)")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Sequential(getattr(parent, child), layer))
    return model
