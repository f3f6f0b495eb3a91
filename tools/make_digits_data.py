"""Build ``porder/sources/data/digits.npz``, the ``digits`` source's data, from scikit-learn.

Run once, by hand (scikit-learn is needed here only):

    python tools/make_digits_data.py

The file holds scikit-learn's copy of the test set of the UCI "Optical Recognition of
Handwritten Digits" data (1,797 8x8 images, grey levels 0..16, and their digits), exactly
as ``sklearn.datasets.load_digits()`` returns it:

* ``images``: (1797, 8, 8) uint8, values 0..16 (``load_digits().images``, integers stored
  as float64 there);
* ``target``: (1797,) uint8, the digit 0..9 (``load_digits().target``).

The zip is written with fixed timestamps, so the same input gives the same bytes.
``tests/sources/test_digits_data.py`` compares the shipped file with ``load_digits()``.
Provenance and licence: ``porder/sources/data/DIGITS-NOTICE.txt``.
"""
from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "porder" / "sources" / "data" / "digits.npz"


def arrays() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images)  # (1797, 8, 8) float64
    target = np.asarray(digits.target)  # (1797,) int
    if images.shape != (1797, 8, 8) or target.shape != (1797,):
        sys.exit(f"unexpected shapes {images.shape}, {target.shape}")
    if not (np.array_equal(images, np.rint(images)) and images.min() >= 0 and images.max() <= 16):
        sys.exit("the images are not integers 0..16")
    if not (target.min() >= 0 and target.max() <= 9):
        sys.exit("the targets are not digits")
    return {"images": images.astype(np.uint8), "target": target.astype(np.uint8)}


def write_npz(path: Path, data: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps (reproducible bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, array in data.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue(), compresslevel=9)


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_npz(OUT, arrays())
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")
