"""Shared fixtures: the array backends and the real photographs (``$PORDER_PHOTOS``, or
../shared/data/dogs-vs-cats-1k beside the repository)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from porder.backend import cuda_available

REPO = Path(__file__).resolve().parents[1]


def case_failures(results: list[dict], seconds: float) -> list[str]:
    """One line per fuzz case a worker reported problems for or that took over ``seconds``
    (named by its reader first where the worker tries several readers on a case)."""
    def name(r):
        return f"{r['reader'] + ' on ' if 'reader' in r else ''}case {r['case']} ({r['what']})"

    failures = [f"{name(r)}: exit {r['code']}: {'; '.join(r['problems'])}"
                f": {r['output'][-300:]!r}" for r in results if r["problems"]]
    return failures + [f"{name(r)}: took {r['seconds']:.1f} s"
                       for r in results if r["seconds"] > seconds]


def run_fuzz_worker(module: str, *args) -> list[dict]:
    """Run the seeded fuzz worker ``tests.<module>`` in a subprocess and return its JSON rows.

    A worker prints one JSON object a line (``{"start": ...}`` before a case, its result
    after, ``{"done": ...}`` last); a worker that died is an AssertionError naming the case.
    """
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", f"tests.{module}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [r for r in rows if "start" in r]
    assert proc.returncode == 0 and rows and rows[-1].get("done"), (
        f"the fuzz worker died (exit {proc.returncode}) in case "
        f"{started[-1] if started else '?'}: {proc.stderr[-2000:]}")
    return rows


def small_cache(folder: Path) -> Path:
    """The 24-image entropy cache the fuzzers corrupt (16x16, patch 4, one thread)."""
    from porder.pipeline import CacheSpec, build_cache

    return build_cache(CacheSpec("synthetic:24", folder / "base.h5", measure="entropy", size=16,
                                 patch=4, workers=1)).path
PHOTOS_ENV = "PORDER_PHOTOS"


def photos_dir() -> Path:
    """The folder of the 1,000 Dogs-vs-Cats photographs: ``$PORDER_PHOTOS`` when set,
    else ``shared/data/dogs-vs-cats-1k`` beside the repository (where CI lays it)."""
    env = os.environ.get(PHOTOS_ENV)
    return Path(env) if env else REPO.parent / "shared" / "data" / "dogs-vs-cats-1k"


DOGS_VS_CATS = photos_dir()
PHOTOS_MISSING = (f"real photographs not available: {DOGS_VS_CATS} is absent "
                  f"(set {PHOTOS_ENV} to the dogs-vs-cats-1k folder)")

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
        pytest.skip(PHOTOS_MISSING)
    return DOGS_VS_CATS


@pytest.fixture(scope="session")
def real_images(dogs_vs_cats) -> np.ndarray:
    """Twelve real photographs as (12, 32, 32, 3) uint8 (PIL bicubic resize)."""
    from PIL import Image

    files = sorted(dogs_vs_cats.glob("*.jpg"))[::83][:12]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.BICUBIC))
                     for f in files])


@pytest.fixture(scope="session", autouse=True)
def compiled_cpu_kernels():
    """Compile (or load from numba's on-disk cache) the CPU kernels once, first.

    The first compiled call on a machine compiles for about 30 s; doing it here
    keeps that cost out of the tests that time an interrupt or a subprocess (those
    load the kernels from the cache this fills).
    """
    import porder

    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    porder.reorder(x, "mi", 4, backend="compiled")
