"""Compiled CPU kernels against the generic NumPy path: img/s of every measure.

What it measures, on this machine's CPU with ``--threads`` threads (default 2):

* img/s of ``porder.reorder(..., backend='compiled')`` (numba kernels) on
  20,000 photo-like 32x32 RGB images (smooth gradients, an edge and noise;
  fixed seed), for every measure at patches 4, 8 and 16, and in the same run
  img/s of ``backend='generic'`` on the first 1,000 of them, the ratio, and
  whether both gave the same permutations there;
* the cost of compiling the kernels: the first call in a fresh process with an
  empty numba cache (a temporary ``NUMBA_CACHE_DIR``), then again with that
  cache warm (``--no-compile`` skips both);
* a per-stage profile of the ``mi`` kernel on one thread (split into patches,
  equality masks or histograms, the chain, the gather of the output image),
  in microseconds per image.

The load average is recorded: the machine may be shared, and img/s drops
when other processes compete for the cores.

Targets (issue 14, 2 threads): mi >= 20,000 img/s at patch 4, 25,000 at 8 and
40,000 at 16, and >= 10x the generic path at patches 4 and 8; je, ssim, kl,
l1, l2, entropy and psnr >= 15,000 img/s at every patch.

Prints JSON; ``--out DIR`` also writes ``DIR/kernels.json``.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import porder  # noqa: E402
from benchmarks._report import report  # noqa: E402

MEASURES = ["mi", "je", "kl", "l1", "l2", "ssim", "entropy", "psnr"]
PATCHES = (4, 8, 16)
TARGETS = {"mi": {4: 20_000, 8: 25_000, 16: 40_000}}
OTHER_TARGET = 15_000
RATIO_TARGET = {4: 10.0, 8: 10.0}

COMPILE_CHILD = r"""
import time, numpy as np
t0 = time.perf_counter()
import porder
from porder.kernels import cpu
t1 = time.perf_counter()
x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
porder.reorder(x, "mi", 8, backend="compiled")
t2 = time.perf_counter()
print(round(t1 - t0, 3), round(t2 - t1, 3))
"""


def images(n: int, seed: int = 0) -> np.ndarray:
    """Photo-like 32x32 RGB images (the recipe of bench_core.py)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32] / 32.0
    base = rng.uniform(0, 255, (n, 1, 1, 3))
    ramp = (rng.uniform(-80, 80, (n, 1, 1, 3)) * x[None, ..., None]
            + rng.uniform(-80, 80, (n, 1, 1, 3)) * y[None, ..., None])
    edge = ((x[None] > rng.uniform(0.2, 0.8, (n, 1, 1)))[..., None]
            * rng.uniform(-60, 60, (n, 1, 1, 3)))
    img = base + ramp + edge + rng.normal(0, 12, (n, 32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def rate(fn, n: int, repeats: int) -> float:
    """Images/second of fn() over n images: best of `repeats` runs after a warm-up."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def compile_cost() -> dict:
    """First-call seconds in fresh processes: empty numba cache, then warm cache."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", COMPILE_CHILD], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            runs.append([float(v) for v in out])
    return {"import_s": runs[1][0], "first_call_cold_cache_s": runs[0][1],
            "first_call_warm_cache_s": runs[1][1]}


def stages(n: int) -> dict:
    """Single-thread microseconds per image of each stage of the mi kernel."""
    from numba import njit

    from porder.kernels import _cpu_kernels as k
    from porder.kernels.cpu import _CONSTANTS, _tables

    @njit(cache=True)
    def split_all(x, p, qtab, q):
        for i in range(x.shape[0]):
            k._split(x[i], p, qtab, q[i])

    @njit(cache=True)
    def masks_all(q, e, nu, nuc, h, ltab, log2n, tab, hist):
        for i in range(q.shape[0]):
            if q.shape[3] <= 64:
                k._masks(q[i], e[i], nu[i], nuc[i], h[i], ltab, log2n, tab)
            else:
                k._marginals(q[i], nu[i], nuc[i], h[i], ltab, log2n, hist)

    @njit(cache=True)
    def chain_all(q, e, nu, nuc, h, ltab, clogc, log2n, band, every, scale, perm, joint):
        kk = q.shape[1]
        go = np.zeros(1, np.uint8)  # the kernels' stop flag, never set here
        for i in range(q.shape[0]):
            if q.shape[3] <= 64:
                k._chain_masks(k._mask_lanes(e[i], True, every),
                               (e[i], nu[i], nuc[i], h[i], ltab, log2n, True), False, band,
                               every > 0, kk, 0, True, scale, perm[i], go)
            else:
                xs = (q[i], 256, nu[i], nuc[i], h[i], clogc, log2n, True, joint)
                k._chain_dense(xs, xs, False, 1.0, False, kk, 0, True, scale, perm[i], go)

    @njit(cache=True)
    def gather_all(x, perm, p, out):
        for i in range(x.shape[0]):
            k._gather(x[i], perm[i], p, out[i])

    x = images(n, seed=1)
    result = {}
    for p in PATCHES:
        kk, c, npx = (32 // p) ** 2, 3, p * p
        qtab, ltab, clogc, _, _ = _tables("mi", npx, 256)
        log2n = math.log2(npx)
        q = np.empty((n, kk, c, npx), np.uint8)
        e = np.empty((n, kk, c, npx), np.uint16 if npx <= 16 else np.uint64)
        nu = np.empty((n, kk, c, npx), np.int32)
        nuc = np.empty((n, kk, c), np.int32)
        h = np.empty((n, kk, c))
        perm = np.empty((n, kk), np.int64)
        out = np.empty_like(x)
        tab, hist, joint = (np.zeros(1024, np.uint64), np.zeros(256, np.int32),
                            np.zeros(65536, np.int32))
        scale = _CONSTANTS.round_scale
        band = 2.0 ** (-c * npx * k.BAND_STEPS / scale)
        every = k._renorm_every(c, npx * math.log2(max(npx, 2)))
        steps = {
            "split": lambda: split_all(x, p, qtab, q),
            "masks" if npx <= 64 else "histograms":
                lambda: masks_all(q, e, nu, nuc, h, ltab, log2n, tab, hist),
            "chain": lambda: chain_all(q, e, nu, nuc, h, ltab, clogc, log2n, band, every,
                                       scale, perm, joint),
            "gather": lambda: gather_all(x, perm, p, out),
        }
        row = {}
        for name, fn in steps.items():
            fn()
            best = math.inf
            for _ in range(7):
                t0 = time.thread_time()
                fn()
                best = min(best, time.thread_time() - t0)
            row[name] = round(best / n * 1e6, 2)
        row["total"] = round(sum(row.values()), 2)
        result[str(p)] = row
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer images, no compile timing")
    ap.add_argument("--images", type=int, default=20_000, help="images for the compiled path")
    ap.add_argument("--generic-images", type=int, default=1_000,
                    help="images for the generic path (it is much slower)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-cost runs")
    args = ap.parse_args(argv)
    n = 2_000 if args.quick else args.images
    ng = min(n, 200 if args.quick else args.generic_images)
    repeats = 1 if args.quick else 3
    load_before = os.getloadavg()
    compile_s = None if (args.quick or args.no_compile) else compile_cost()
    x = images(n)
    w = args.threads
    rows, met = {}, {}
    for name in MEASURES:
        for p in PATCHES:
            fast = rate(lambda: porder.reorder(x, name, p, backend="compiled", workers=w),
                        n, repeats)
            slow = rate(lambda: porder.reorder(x[:ng], name, p, backend="generic", workers=w),
                        ng, 1)
            same = bool((porder.reorder(x[:ng], name, p, backend="compiled")[1]
                         == porder.reorder(x[:ng], name, p, backend="generic")[1]).all())
            rows.setdefault(name, {})[str(p)] = {
                "compiled_img_per_s": round(fast), "generic_img_per_s": round(slow),
                "ratio": round(fast / slow, 1), "same_perms": same}
            target = TARGETS.get(name, {}).get(p, OTHER_TARGET)
            ok = fast >= target and same
            if name == "mi" and p in RATIO_TARGET:
                ok = ok and fast / slow >= RATIO_TARGET[p]
            met[f"{name} p{p}"] = ok
            print(f"{name:8s} p{p:<2d} compiled {fast:9.0f}  generic {slow:7.0f}  "
                  f"x{fast / slow:5.1f}  same={same}", file=sys.stderr, flush=True)
    out = {
        "benchmark": "kernels",
        "machine": {"cpus": os.cpu_count(), "threads": w,
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
        "images": {"compiled": n, "generic": ng, "kind": "photo-like 32x32x3"},
        "img_per_s": rows,
        "compile": compile_s,
        "mi_stages_us_per_image_1_thread": stages(500 if args.quick else 2000),
        "targets": {"mi": TARGETS["mi"], "mi_vs_generic": RATIO_TARGET,
                    "others": OTHER_TARGET, "met": met, "all_met": all(met.values())},
    }
    return report(out, args.out, "kernels.json")


if __name__ == "__main__":
    main()
