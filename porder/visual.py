"""Pictures of reordered data: originals beside reordered images (paper Fig. 3)."""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from .patches import restore_images
from .store import StoreError, read_labels, read_meta, read_split


def across_classes(labels: np.ndarray, samples: int) -> np.ndarray:
    """Row indices of up to ``samples`` images spread over the classes.

    Round-robin over the classes present, in label order: the first image of
    each class, then the second of each, and so on (rows of a split are often
    sorted by class, so its first rows would all show one class).

    Parameters
    ----------
    labels : int array (N,)
    samples : int

    Returns
    -------
    int64 array (min(samples, N),)
    """
    labels = np.asarray(labels)
    rows = [np.flatnonzero(labels == c) for c in np.unique(labels)]   # per class, in order
    picked: list[int] = []
    for k in range(max((len(r) for r in rows), default=0)):
        for r in rows:
            if k < len(r):
                picked.append(int(r[k]))
                if len(picked) == samples:
                    return np.array(picked, dtype=np.int64)
    return np.array(picked, dtype=np.int64)


def comparison_grid(path, *, split: str = "train", samples: int = 8, scale: int = 4,
                    start: Optional[int] = None) -> Image.Image:
    """A PNG-ready grid: per sample, the original (recovered through ``perm``)
    beside the reordered image, upscaled ``scale`` times with nearest neighbours.

    ``start=None`` picks samples across the classes (:func:`across_classes`);
    an integer shows ``samples`` consecutive rows from ``start``.

    Returns
    -------
    PIL.Image.Image (RGB)

    Raises
    ------
    ValueError
        Bad ``samples``/``scale``, an empty split, or ``start`` past its end.
    """
    if samples < 1 or scale < 1:
        raise ValueError("samples and scale must be at least 1")
    meta = read_meta(path)
    n = meta["splits"].get(split, 0)
    if n == 0:
        raise StoreError(f"'{path}' has no images in split {split!r}")
    if start is None:
        rows = [read_split(path, split, start=i, stop=i + 1)
                for i in across_classes(read_labels(path, split), samples).tolist()]
        data = {k: (sum((r[k] for r in rows), []) if k == "names"
                    else np.concatenate([r[k] for r in rows])) for k in rows[0]}
    else:
        if not 0 <= start < n:
            raise ValueError(f"--start {start} is past the end of split {split!r}, which has "
                             f"{n} images (rows 0..{n - 1})")
        data = read_split(path, split, start=start, stop=min(n, start + samples))
    imgs = data["images"]  # (B, S, S, 3)
    orig = restore_images(imgs, data["perm"], int(meta["patch"]))
    b, s = imgs.shape[0], imgs.shape[1] * scale
    pad, head = 4, 14
    cols = 2
    grid = Image.new("RGB", (cols * s + (cols + 1) * pad + 120, b * (s + pad) + pad + head),
                     "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 1), "original", fill="black")
    draw.text((s + 2 * pad, 1), f"{meta['measure']} p{meta['patch']}", fill="black")
    for i in range(b):
        y = head + pad + i * (s + pad)
        for j, arr in enumerate((orig[i], imgs[i])):
            tile = Image.fromarray(np.ascontiguousarray(arr)).resize((s, s), Image.NEAREST)
            grid.paste(tile, (pad + j * (s + pad), y))
        label = meta["classes"][int(data["labels"][i])]
        draw.text((cols * (s + pad) + pad, y + s // 2 - 6), f"{label}\n{data['names'][i]}"[:60],
                  fill="black")
    return grid
