"""Shared fixtures: the array backends and the real photographs in ../shared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from porder.backend import cuda_available

REPO = Path(__file__).resolve().parents[1]
DOGS_VS_CATS = REPO.parent / "shared" / "data" / "dogs-vs-cats-1k"

XP_PARAMS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]


@pytest.fixture(params=XP_PARAMS)
def xp(request):
    """numpy, and cupy where a CUDA GPU is present (skipped otherwise)."""
    if request.param == "numpy":
        return np
    if not cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available on this machine")
    import cupy

    return cupy


@pytest.fixture(scope="session")
def dogs_vs_cats() -> Path:
    """The 1,000 Kaggle Dogs-vs-Cats JPEGs, or a skip saying why."""
    if not DOGS_VS_CATS.is_dir():
        pytest.skip(f"real photographs not available: {DOGS_VS_CATS} is absent")
    return DOGS_VS_CATS


@pytest.fixture(scope="session")
def real_images(dogs_vs_cats) -> np.ndarray:
    """Twelve real photographs as (12, 32, 32, 3) uint8 (PIL bicubic resize)."""
    from PIL import Image

    files = sorted(dogs_vs_cats.glob("*.jpg"))[::83][:12]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.BICUBIC))
                     for f in files])
