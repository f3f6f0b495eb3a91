"""Throughput of porder.reorder for every measure and patch size, against a naive baseline.

What it measures: images/second of ``porder.reorder`` on 32x32 RGB uint8 images
(random photo-like content, fixed seed) on this machine's CPU (NumPy, all
cores), for every measure at patches 4, 8 and 16, and in the same run the
throughput of what a user would write by hand: the greedy MI chain with a
Python loop over candidate pairs calling scikit-learn's ``mutual_info_score``
on each channel. Prints JSON; ``--out DIR`` also writes ``DIR/core.json``.

Targets (issue 2, 2-core CPU): mi >= 3,000 img/s at patch 16, >= 1,000 at 8,
>= 500 at 4, and >= 300x the naive baseline at patch 8.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import porder  # noqa: E402
from benchmarks._report import report  # noqa: E402

TARGETS = {"mi": {4: 500, 8: 1000, 16: 3000}}
NAIVE_RATIO_TARGET = 300


def images(n: int, seed: int = 0) -> np.ndarray:
    """Photo-like 32x32 RGB images: smooth gradients, edges and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32] / 32.0
    base = rng.uniform(0, 255, (n, 1, 1, 3))
    ramp = (rng.uniform(-80, 80, (n, 1, 1, 3)) * x[None, ..., None]
            + rng.uniform(-80, 80, (n, 1, 1, 3)) * y[None, ..., None])
    edge = (x[None] > rng.uniform(0.2, 0.8, (n, 1, 1)))[..., None] * rng.uniform(-60, 60, (n, 1, 1, 3))
    img = base + ramp + edge + rng.normal(0, 12, (n, 32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def naive_mi_chain(img: np.ndarray, patch: int) -> list[int]:
    """What a user would write: a Python loop over pairs, sklearn MI per channel."""
    from sklearn.metrics import mutual_info_score

    g = 32 // patch
    pts = [img[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
           for r in range(g) for c in range(g)]
    order, left = [0], list(range(1, len(pts)))
    while left:
        cur = pts[order[-1]]
        best, best_mi = None, -math.inf
        for j in left:
            mi = np.mean([mutual_info_score(cur[..., ch].ravel(), pts[j][..., ch].ravel())
                          for ch in range(3)])
            if mi > best_mi:
                best, best_mi = j, mi
        order.append(best)
        left.remove(best)
    return order


def rate(fn, n: int, min_seconds: float) -> float:
    """Images/second of fn() processing n images, best of repeats within min_seconds."""
    fn()  # warm-up
    best, spent = math.inf, 0.0
    while spent < min_seconds or best == math.inf:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return n / best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer images, shorter timing")
    args = ap.parse_args(argv)
    n = 512 if args.quick else 4096
    secs = 0.3 if args.quick else 2.0
    imgs = images(n)
    results = {}
    for name in porder.MEASURES:
        for patch in (4, 8, 16):
            r = rate(lambda: porder.reorder(imgs, name, patch), n, secs)
            results.setdefault(name, {})[patch] = round(r, 1)
            print(f"{name:8s} patch {patch:2d}: {r:10.0f} img/s", file=sys.stderr)
    nn = 4 if args.quick else 12
    t0 = time.perf_counter()
    for i in range(nn):
        naive_mi_chain(imgs[i], 8)
    naive = nn / (time.perf_counter() - t0)
    # same answers as porder (up to exact ties, which the naive loop breaks the same way)
    _, perm = porder.reorder(imgs[:nn], "mi", 8)
    agree = sum(perm[i].tolist() == naive_mi_chain(imgs[i], 8) for i in range(min(nn, 4)))
    ratio = results["mi"][8] / naive
    out = {
        "benchmark": "core",
        "machine": {"cpus": os.cpu_count(), "device": "cpu"},
        "images": n,
        "img_per_s": results,
        "naive_mi_patch8_img_per_s": round(naive, 2),
        "mi_patch8_vs_naive": round(ratio, 1),
        "naive_agrees_on": f"{agree}/{min(nn, 4)} images",
        "targets": {
            "mi": {str(p): {"target": t, "measured": results["mi"][p],
                            "met": results["mi"][p] >= t} for p, t in TARGETS["mi"].items()},
            "mi_patch8_vs_naive": {"target": NAIVE_RATIO_TARGET, "measured": round(ratio, 1),
                                   "met": ratio >= NAIVE_RATIO_TARGET},
        },
    }
    return report(out, args.out, "core.json")


if __name__ == "__main__":
    main()
