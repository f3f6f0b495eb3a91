"""POR as a transform: :class:`PatchOrder` reorders the patches of any image on the fly.

``PatchOrder(measure, patch, ...)`` is a picklable callable that gives an image
exactly as ``porder reorder`` stores it in a cache: the same measure, patch
size and options, the same pixels (it calls :func:`porder.reorder`, the code
the cache builder runs). Put it in a ``torchvision.transforms.Compose`` (or any
chain of callables) to apply POR to a dataset porder never cached::

    Compose([Resize((32, 32)), PILToTensor(), PatchOrder("mi", 8), Normalize(...)])

It takes what torchvision's transforms take, and gives back the same kind:

* a torch tensor (C, S, S) uint8 (CHW), or a batch (N, C, S, S), on any device
  (a CUDA tensor is ordered on the GPU when CuPy is installed);
* a NumPy (or CuPy) array (S, S, C) uint8 (HWC), or a batch (N, S, S, C);
* a PIL image, converted to RGB by porder's one conversion rule
  (:func:`porder.sources.pillow.to_rgb`: alpha composited on black, 16-bit
  scaled), returned as an RGB PIL image.

Images are taken at the size they have: resize them first (porder's caches
squash each image to ``size x size`` with Pillow's bicubic filter, see
:mod:`porder.sources.pillow`), and the result is the cache's image of an image
that resizes to the input.

This module imports neither torch nor torchvision (tensors are handled through
:func:`porder.reorder`'s one torch hand-off); :class:`porder.data.Normalize`,
which needs torch, is reachable as ``porder.transforms.Normalize``.
"""
from __future__ import annotations

import numpy as np

from .kernels import check_backend
from .measures import check_bins, get_measure
from .reorder import reorder
from .validate import whole

__all__ = ["PatchOrder"]   # and Normalize, from porder.data when asked for


def _is_tensor(x) -> bool:
    """A torch tensor, told without importing torch."""
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "permute")


def _is_pil(x) -> bool:
    return type(x).__module__.split(".")[0] == "PIL" and hasattr(x, "mode")


class PatchOrder:
    """Reorder an image's patches with POR, exactly as a porder cache stores it.

    Parameters
    ----------
    measure : str or porder.Measure
        A name of :data:`porder.MEASURES` (``porder measures`` lists them) or
        a registered entry.
    patch : int
        Patch side; must divide the image side.
    bins : int
        Histogram bins of histogram measures, 1..256.
    reference : int
        Row-major index of the patch a pairwise chain starts from.
    descending : bool, optional
        Override the measure's direction (None: its own).
    seed : int
        Seed of the ``random`` control (see Notes), >= 0.
    backend : {'compiled', 'generic'}
        As for :func:`porder.reorder`; both give identical images.
    workers : int, optional
        CPU threads for a batch (default all cores; 1 suits DataLoader
        workers, which already run in parallel).

    Raises
    ------
    ValueError
        An unknown measure, or an option out of its range or not an integer
        (when made); an image that is not uint8, not square, or whose side
        ``patch`` does not divide (when called).

    Notes
    -----
    ``t(image)`` returns the reordered image; ``t(image, index=i)`` also says
    which image of a dataset it is. Only the ``random`` control uses it: it
    shuffles image i with a key of ``(seed, i)`` alone, so ``t(image, index=i)``
    is image i of a cache built with ``--seed seed``, and a batch gets indices
    ``index, index+1, ...``. Inside a ``Compose`` no index is passed: every
    image gets index 0's permutation (one fixed random order for all images,
    not a new one per image or per epoch). Every other measure ignores
    ``index`` and ``seed``.

    Picklable (``DataLoader`` workers started with ``spawn``): it holds the
    measure's name and its options only. A measure passed as a
    :class:`porder.Measure` entry travels as that object, so its functions
    must be importable (module-level) for spawned workers.

    Examples
    --------
    >>> t = PatchOrder("entropy", 8)                                    # doctest: +SKIP
    >>> t(torch.zeros(3, 32, 32, dtype=torch.uint8)).shape              # doctest: +SKIP
    torch.Size([3, 32, 32])
    """

    def __init__(self, measure, patch: int, *, bins: int = 256, reference: int = 0,
                 descending: bool | None = None, seed: int = 0, backend: str = "compiled",
                 workers: int | None = None):
        m = get_measure(measure)
        self.measure = measure if isinstance(measure, str) else m
        self.patch = whole("patch", patch, lo=1)
        if isinstance(bins, (bool, np.bool_)):
            raise ValueError(f"bins must be an integer from 1 to 256, got {bins!r}")
        self.bins = check_bins(bins)
        self.reference = whole("reference", reference, lo=0)
        if descending is not None and not isinstance(descending, (bool, np.bool_)):
            raise ValueError(f"descending must be True, False or None, got {descending!r}")
        self.descending = None if descending is None else bool(descending)
        self.seed = whole("seed", seed, lo=0)
        self.backend = check_backend(backend)
        self.workers = None if workers is None else whole("workers", workers, lo=1)

    @classmethod
    def from_file(cls, path, **kw) -> PatchOrder:
        """The transform that gives the images of porder file ``path``: its recorded
        measure, patch, bins, reference, direction and seed (``kw`` may set
        ``backend`` and ``workers``). ValueError naming the file when it records
        options this porder cannot use (an unknown measure, for one)."""
        from .store import read_meta

        meta = read_meta(path)
        direction = meta.get("direction")
        if direction not in (None, "ascending", "descending"):
            raise ValueError(f"'{path}' records direction {direction!r}; expected "
                             f"'ascending' or 'descending'")
        try:
            return cls(meta["measure"], meta["patch"], bins=meta.get("bins", 256),
                       reference=meta.get("reference", 0), seed=meta.get("seed", 0),
                       descending=None if direction is None else direction == "descending",
                       **kw)
        except ValueError as e:
            raise ValueError(f"'{path}' records options PatchOrder cannot use: {e}") from None

    @property
    def measure_name(self) -> str:
        return self.measure if isinstance(self.measure, str) else self.measure.name

    def __call__(self, image, index: int = 0):
        index = whole("index", index, lo=0)
        if _is_pil(image):
            return self._pil(image, index)
        if isinstance(image, (list, tuple)):
            raise ValueError(f"PatchOrder takes one image or a batch array, got a "
                             f"{type(image).__name__}; stack the images first")
        if not hasattr(image, "ndim") or not hasattr(image, "dtype"):
            raise ValueError(f"PatchOrder takes a uint8 tensor (C, S, S), an array (S, S, C), a "
                             f"batch of either, or a PIL image; got {type(image).__name__}")
        tensor = _is_tensor(image)
        if image.ndim not in (3, 4):
            want = "(C, S, S) or (N, C, S, S)" if tensor else "(S, S, C) or (N, S, S, C)"
            raise ValueError(f"PatchOrder takes {'a tensor' if tensor else 'an array'} "
                             f"{want}, got shape {tuple(image.shape)}")
        if str(image.dtype) not in ("uint8", "torch.uint8"):
            raise ValueError(f"PatchOrder orders uint8 images (as a cache stores them), got "
                             f"dtype {image.dtype}; put it before the conversion to float")
        single = image.ndim == 3
        x = image[None] if single else image
        if tensor:
            x = x.permute(0, 2, 3, 1)                              # (N, S, S, C) view
        if x.shape[1] != x.shape[2]:
            layout = "(C, H, W)" if tensor else "(H, W, C)"
            raise ValueError(f"PatchOrder orders square images; got {layout} "
                             f"{tuple(image.shape[-3:])}: resize or crop to S x S first")
        out = self._reorder(x, index)                              # (N, S, S, C)
        if tensor:
            out = out.permute(0, 3, 1, 2).contiguous()             # (N, C, S, S)
        return out[0] if single else out

    def _reorder(self, x, index: int):
        out, _ = reorder(x, get_measure(self.measure), self.patch, bins=self.bins,
                         reference=self.reference, descending=self.descending, seed=self.seed,
                         start=index, workers=self.workers, backend=self.backend)
        return out

    def _pil(self, image, index: int):
        from PIL import Image

        from .sources.pillow import to_rgb

        rgb = np.asarray(to_rgb(image), dtype=np.uint8)            # (H, W, 3)
        if rgb.shape[0] != rgb.shape[1]:
            raise ValueError(f"PatchOrder orders square images; got a PIL image of "
                             f"{image.size[0]}x{image.size[1]}: resize or crop to S x S first")
        return Image.fromarray(self._reorder(rgb[None], index)[0])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(measure={self.measure_name!r}, patch={self.patch}, "
                f"bins={self.bins}, reference={self.reference}, descending={self.descending}, "
                f"seed={self.seed}, backend={self.backend!r})")


def __getattr__(name: str):
    if name == "Normalize":          # it needs torch: imported when asked for
        from .data import Normalize

        return Normalize
    raise AttributeError(f"module 'porder.transforms' has no attribute {name!r}")
