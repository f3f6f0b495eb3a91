"""Compiled CPU kernels against the generic path: identical permutations, swept wide.

What it checks: ``porder.reorder(..., backend='compiled')`` (the numba kernels)
and ``backend='generic'`` (score matrices and porder.ordering, the reference)
give the same permutation of every image, for every scored measure at patches
4, 8 and 16, on

* ``photo``: 20,000 photo-like 32x32 RGB images (``bench_core.images``, seed 0);
* the tie and saturation sets of ``tests/test_kernels_cpu.py`` (``levels``,
  ``saturated``, ``blocks``, ``constant``, ``noise``; 1,000 images each);
* ``spread``: 2,000 images whose patch channels are flat, narrow, two-level or
  full-range at random (``tests/test_kernels_cpu_exact.py``), which makes the
  products of counts that order mi/je/kl candidates span far more than
  float64's range, plus the regression image of issue 21 and the
  twelve-channel exact ties;
* and, smaller: the first 2,000 photo images and the tie sets again at 16 and
  2 bins and in the reversed direction.

It is too slow for the unit suite (864,216 images, each ordered by both paths:
3 minutes on 2 quiet cores, 15 on a busy machine, mostly the generic path), so
``tests/test_kernels_cpu_exact.py`` keeps a targeted slice of it. Prints JSON
with the number of differing images per measure, patch and set and the first
few of them; ``--out DIR`` also writes ``DIR/equivalence.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import porder  # noqa: E402
from benchmarks._report import report  # noqa: E402
from benchmarks.bench_core import images  # noqa: E402
from tests.test_kernels_cpu import image_set  # noqa: E402
from tests.test_kernels_cpu_exact import exact_tie, mismatches, spread_images  # noqa: E402

MEASURES = ["mi", "je", "kl", "l1", "l2", "ssim", "entropy", "psnr"]
PATCHES = (4, 8, 16)
TIE_KINDS = ("levels", "saturated", "blocks", "constant", "noise")
CHUNK = 2_000  # images per call: bounds the generic path's memory
SHOW = 5  # differing images listed per case


def differing(x: np.ndarray, measure: str, patch: int, **kw) -> list[int]:
    """Indices of the images of x whose compiled and generic permutations differ."""
    return [lo + int(i) for lo in range(0, len(x), CHUNK)
            for i in mismatches(x[lo:lo + CHUNK], measure, patch, **kw)]


def image_sets(n_photo: int, n_tie: int, n_spread: int, patch: int) -> dict[str, np.ndarray]:
    """The sets compared at one patch size (spread images are built per patch size)."""
    sets = {"photo": images(n_photo, seed=0)}
    for i, kind in enumerate(TIE_KINDS):
        sets[kind] = image_set(kind, n=n_tie, seed=100 + i)
    sets["spread"] = np.concatenate([spread_images(n_spread, seed=patch, patch=patch),
                                     images(6000, seed=3)[3759:3760]])
    return sets


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a tenth of the images")
    ap.add_argument("--images", type=int, default=20_000, help="photo-like images")
    args = ap.parse_args(argv)
    scale = 10 if args.quick else 1
    n_photo, n_tie, n_spread, n_side = (args.images // scale, 1_000 // scale, 2_000 // scale,
                                        2_000 // scale)
    t0 = time.perf_counter()
    cases: dict = {}
    examples: list = []
    compared = 0

    def check(label: str, x: np.ndarray, measure: str, patch: int, **kw) -> None:
        nonlocal compared
        bad = differing(x, measure, patch, **kw)
        compared += len(x)
        cases.setdefault(measure, {}).setdefault(str(patch), {})[label] = len(bad)
        examples.extend({"measure": measure, "patch": patch, "set": label, "image": i,
                         **kw} for i in bad[:SHOW])
        print(f"{measure:8s} p{patch:<2d} {label:18s} {len(x):6d} images  {len(bad)} differ",
              file=sys.stderr, flush=True)

    ties = np.concatenate([exact_tie(m, swap, rev) for m in ("mi", "je", "kl")
                           for swap in (False, True) for rev in (False, True)])
    for patch in PATCHES:
        sets = image_sets(n_photo, n_tie, n_spread, patch)
        side = np.concatenate([sets["photo"][:n_side]] + [sets[k][:n_side // 10]
                                                          for k in TIE_KINDS])
        for measure in MEASURES:
            for label, x in sets.items():
                check(label, x, measure, patch)
            for bins in (16, 2):
                check(f"side bins={bins}", side, measure, patch, bins=bins)
            flipped = not porder.MEASURES[measure].descending
            check("side reversed", side, measure, patch, descending=flipped)
            if patch == 8:
                check("exact ties C=12", ties, measure, patch)
                check("exact ties reversed", ties, measure, patch, descending=flipped)
    total = sum(v for m in cases.values() for p in m.values() for v in p.values())
    out = {
        "benchmark": "equivalence",
        "machine": {"cpus": os.cpu_count(), "loadavg_after": [round(v, 2)
                                                             for v in os.getloadavg()]},
        "images": {"photo": n_photo, "tie_sets_each": n_tie, "tie_kinds": list(TIE_KINDS),
                   "spread": n_spread + 1, "side_sets": len(side)},
        "orderings_compared": compared,
        "differing": cases,
        "differing_total": total,
        "examples": examples[:50],
        "all_same": total == 0,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return report(out, args.out, "equivalence.json")


if __name__ == "__main__":
    main()
