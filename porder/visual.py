"""Pictures of reordered data: originals beside reordered images (paper Fig. 3)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .patches import restore_images
from .store import StoreError, read_meta, read_split


def comparison_grid(path, *, split: str = "train", samples: int = 8, scale: int = 4,
                    start: int = 0) -> Image.Image:
    """A PNG-ready grid: per sample, the original (recovered through ``perm``)
    beside the reordered image, upscaled ``scale`` times with nearest neighbours.

    Returns
    -------
    PIL.Image.Image (RGB)
    """
    if samples < 1 or scale < 1:
        raise ValueError("samples and scale must be at least 1")
    meta = read_meta(path)
    n = meta["splits"].get(split, 0)
    if n == 0:
        raise StoreError(f"'{path}' has no images in split {split!r}")
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
