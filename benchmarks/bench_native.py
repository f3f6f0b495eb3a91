"""Native resolution: porder's compiled CPU backend against an independent chain, 32 to 256 px.

What it measures, on this machine's CPU (2 threads unless ``--threads``; the
load average before and after is recorded: the machine may be shared, so trust
the ratios of one run, not the absolute figures):

* **img/s by size x patch x measure.** Sizes 32 (patches 4, 8, 16), 64 and 128
  (16), 224 (16, 32) and 256 (8, 32). For ``mi`` and ``je``, porder's default
  (``porder.reorder``, compiled backend) and the independent chain of
  ``benchmarks/independent_chain.py`` run in the same process on the same
  images, interleaved (porder, chain, porder, chain, ...; best of the repeats),
  their permutations compared image by image, and the ratio porder / chain;
  ``kl``, ``l1``, ``l2`` and ``ssim`` are porder alone. Images: at 32 px
  bench_core's photo-like 32x32 images; at every size, photos of Dogs vs. Cats
  1k (``../shared/data/dogs-vs-cats-1k``) resized by porder's own decoder (what
  ``porder reorder --size S`` reads: squashed, bicubic, JPEG draft) and, from
  128 px, centre crops at native resolution (photos smaller than the crop are
  left out). Without the photos those rows are skipped with the reason. The
  chain's permutations are also checked against porder's generic path on the
  first ``generic_checked`` images of each row (all timed images in a full run
  except where the generic path takes minutes: its count is in each row).
* **Per-stage profile at 224 p16 (mi, one thread, resized photos).** porder's
  kernel stages, each timed alone over the same images by calling porder's
  numba kernels in a loop (split into quantised patches, marginals, the whole
  mi chain as ``reorder_range`` runs it, marginals included, and the chain
  without them: the reference's classes, the lane products, the band's exact
  scores; gather). Private kernel names: when porder's kernels change, the
  rows that no longer apply say so. The HDF5 write is the writer thread's busy
  seconds per image of the ``--size 224`` end-to-end run. The independent
  chain's own stages are given beside it (split and marginals, the
  reference's classes, vector products, scatter tables, best/band/moves,
  gather), timed the same way.
* **The limit at 224 p16 (mi).** From the class sizes of the resized photos,
  in the order the chain takes them (identical for both): the 32-lane byte
  compares per image (sum over steps of ceil(m / 32) times the reference's
  sum of squared class sizes, classes of 2..64 pixels), the pixels folded
  into products and the scatter-table pixels; divided by the machine's
  vector throughput, both as assumed (2 compare+subtract pairs of 32 bytes per
  cycle per core at the nominal clock of /proc/cpuinfo, 1 cycle per folded
  pixel per 32 lanes, 1 cycle per scatter pixel per lane) and as measured
  (the chain's own compare loop on a class of 64 pixels, in cache).
* **End to end**: ``build_cache`` (the work of ``porder reorder``) on Dogs vs.
  Cats 1k at ``--size 128`` and ``--size 224``, ``--measure mi --patch 16``,
  2 workers, split by the pipeline's own timing (BuildResult.seconds: decode
  = the main thread waiting for decoded batches, measure, write = the writer
  thread's busy time, overlapped, write_wait, other), beside the same decode
  alone (the source's batches iterated with nothing else).

``--quick`` uses few images (about 2 minutes once both sides are compiled:
compiling the independent chain the first time adds about a minute). Prints
a Markdown table and JSON; ``--out DIR`` writes ``DIR/native.json``.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import porder  # noqa: E402
from benchmarks import independent_chain as chain  # noqa: E402
from benchmarks._report import report  # noqa: E402
from benchmarks.bench_core import images as core_images  # noqa: E402

# ../shared/data beside the checkout (or beside the folder of git worktrees)
DOGS = next((p / "shared" / "data" / "dogs-vs-cats-1k" for p in (ROOT.parent, ROOT.parent.parent)
             if (p / "shared" / "data" / "dogs-vs-cats-1k").is_dir()),
            ROOT.parent / "shared" / "data" / "dogs-vs-cats-1k")
CASES = {32: (4, 8, 16), 64: (16,), 128: (16,), 224: (16, 32), 256: (8, 32)}
BOTH = ("mi", "je")
ALONE = ("kl", "l1", "l2", "ssim")
# Images timed per (size, patch), quick and full; the generic path checks at most
# GENERIC_CAP of them (it takes 10-20 s an image at 256 p8).
COUNTS = {"quick": {32: 1000, 64: 64, 128: 16, 224: 6, 256: 4},
          "full": {32: 4000, 64: 400, 128: 64, 224: 24, 256: 8}}
PATCH_SCALE = {(224, 32): 2, (256, 32): 2, (256, 8): 0.5}
GENERIC_CAP = {"quick": {32: 10**9, 64: 10**9, 128: 4, 224: 2, 256: 1},
               "full": {32: 10**9, 64: 10**9, 128: 10**9, 224: 10**9, 256: 10**9}}
GENERIC_CAP_SLOW = {(256, 8): {"quick": 1, "full": 2}}


# --------------------------------------------------------------------------
# Images


def photo_files() -> list[str]:
    return sorted(glob.glob(str(DOGS / "*.jpg")))


def photos(size: int, n: int, kind: str) -> np.ndarray | None:
    """n Dogs vs. Cats photos as (n, size, size, 3) uint8: 'resize' (porder's decoder)
    or 'crop' (centre crop of the full decode; smaller photos left out)."""
    files = photo_files()
    if not files:
        return None
    if kind == "resize":
        from porder.sources.pillow import decode_file

        return np.stack([decode_file(f, size) for f in files[:n]])
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            w, h = im.size
            if min(w, h) < size:
                continue
            x0, y0 = (w - size) // 2, (h - size) // 2
            out.append(np.asarray(im.convert("RGB").crop((x0, y0, x0 + size, y0 + size))))
        if len(out) == n:
            break
    return np.stack(out) if out else None


def image_sets(size: int, n: int) -> dict:
    """name -> images (or a reason string) for one size."""
    sets: dict = {}
    if size == 32:
        sets["core32"] = core_images(n, seed=7)
    if not DOGS.is_dir():
        sets["photos"] = f"skipped: {DOGS} is absent"
        return sets
    sets["photo-resize"] = photos(size, n if size > 32 else n // 4, "resize")
    if size >= 128:
        crops = photos(size, max(2, n // 2), "crop")
        sets["photo-crop"] = crops if crops is not None else "skipped: no photo that large"
    return sets


# --------------------------------------------------------------------------
# Timing


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def interleaved(fns: list, n: int, repeats: int) -> tuple[list[float], list]:
    """img/s of each fn over n images, best of `repeats` rounds run in turn, and their
    last results (each fn runs once first, untimed)."""
    res = [f() for f in fns]
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            dt, res[i] = timed(f)
            best[i] = min(best[i], dt)
    return [n / b for b in best], res


def case_rows(name: str, x: np.ndarray, size: int, patch: int, threads: int, repeats: int,
              cap: int) -> list[dict]:
    rows = []
    n = len(x)
    for m in BOTH:
        (rp, rc), (pr, cr) = interleaved(
            [lambda m=m: porder.reorder(x, m, patch, workers=threads),
             lambda m=m: chain.reorder(x, m, patch, workers=threads)], n, repeats)
        same = int((np.asarray(pr[1]) == cr[1]).all(axis=1).sum())
        k = min(n, cap)
        generic_bad = chain.check(x[:k], m, patch, perm=cr[1][:k]) if k else None
        rows.append({"size": size, "patch": patch, "measure": m, "images": name, "n": n,
                     "porder_img_per_s": round(rp, 1), "chain_img_per_s": round(rc, 1),
                     "ratio": round(rp / rc, 3), "same_perms": f"{same}/{n}",
                     "generic_checked": k, "chain_vs_generic_differ": generic_bad})
        print(f"{size:3d} p{patch:<2d} {m:4s} {name:12s} porder {rp:9.1f}  chain {rc:9.1f}  "
              f"x{rp / rc:5.2f}  same {same}/{n}  generic {k} checked, "
              f"{generic_bad} differ", file=sys.stderr, flush=True)
    for m in ALONE:
        (rp,), _ = interleaved([lambda m=m: porder.reorder(x, m, patch, workers=threads)], n,
                               repeats)
        rows.append({"size": size, "patch": patch, "measure": m, "images": name, "n": n,
                     "porder_img_per_s": round(rp, 1)})
        print(f"{size:3d} p{patch:<2d} {m:4s} {name:12s} porder {rp:9.1f}", file=sys.stderr,
              flush=True)
    return rows


def throughput(mode: str, threads: int) -> list[dict]:
    rows: list[dict] = []
    repeats = 2 if mode == "quick" else 3
    for size, patches in CASES.items():
        for patch in patches:
            n = max(2, int(COUNTS[mode][size] * PATCH_SCALE.get((size, patch), 1)))
            cap = GENERIC_CAP_SLOW.get((size, patch), {mode: GENERIC_CAP[mode][size]})[mode]
            for name, x in image_sets(size, n).items():
                if isinstance(x, str) or x is None:
                    rows.append({"size": size, "patch": patch, "images": name,
                                 "skipped": x or "no images"})
                    continue
                rows += case_rows(name, x, size, patch, threads, repeats, cap)
    return rows


# --------------------------------------------------------------------------
# Per-stage profile at 224 p16 (mi, one thread)


def _best_us(fn, n: int, repeats: int = 3, clock=time.thread_time) -> float:
    fn()
    b = math.inf
    for _ in range(repeats):
        t0 = clock()
        fn()
        b = min(b, clock() - t0)
    return round(b / n * 1e6, 1)


def porder_stages(x: np.ndarray, patch: int) -> dict:
    """porder's kernel stages on one thread, microseconds per image (private kernels:
    what no longer exists is reported, not guessed)."""
    try:
        from numba import njit

        from porder.kernels import _cpu_kernels as k
        from porder.kernels.cpu import _CONSTANTS, _tables
    except ImportError as e:
        return {"unavailable": f"{type(e).__name__}: {e}"}
    n_img, size = len(x), x.shape[1]
    kk, c, npx = (size // patch) ** 2, x.shape[3], patch * patch
    if npx <= 64:
        return {"unavailable": "patches of at most 64 pixels take the bitmask path"}
    try:
        @njit(cache=True)
        def split_all(x, p, qtab, q):
            for i in range(x.shape[0]):
                k._split(x[i], p, qtab, q[i])

        @njit(cache=True)
        def marginals_all(q, nu, nuc, h, ltab, log2n, hist):
            for i in range(q.shape[0]):
                k._marginals(q[i], nu[i], nuc[i], h[i], ltab, log2n, hist)

        @njit(cache=True)
        def chain_all(q, ltab, clogc, log2n, tab, hist, joint, scale, perm):
            # porder's whole mi chain as reorder_range runs it (value-class lanes above 64
            # pixels, marginals included)
            go = np.zeros(1, np.uint8)
            for i in range(q.shape[0]):
                k._mi_je(q[i], True, 256, 0, True, ltab, clogc, log2n, tab, hist, joint, scale,
                         perm[i], go)

        @njit(cache=True)
        def gather_all(x, perm, p, out):
            for i in range(x.shape[0]):
                k._gather(x[i], perm[i], p, out[i])

        qtab, ltab, clogc, _, _ = _tables("mi", npx, 256)
        log2n = math.log2(npx)
        q = np.empty((n_img, kk, c, npx), np.uint8)
        nu = np.empty((n_img, kk, c, npx), np.int32)
        nuc = np.empty((n_img, kk, c), np.int32)
        h = np.empty((n_img, kk, c))
        perm = np.empty((n_img, kk), np.int64)
        out = np.empty_like(x)
        hist, tab = np.zeros(256, np.int32), np.zeros(1024, np.uint64)
        joint = np.zeros(65536 + 256 * k.CL, np.int32)   # cpu._scratch's size for mi above 64 px
        res = {"split_quantise": _best_us(lambda: split_all(x, patch, qtab, q), n_img),
               "marginals": _best_us(lambda: marginals_all(q, nu, nuc, h, ltab, log2n, hist),
                                     n_img),
               "chain": _best_us(lambda: chain_all(q, ltab, clogc, log2n, tab, hist, joint,
                                                   _CONSTANTS.round_scale, perm), n_img)}
        # the chain's own work beside the marginals it starts with (classes, lanes, band)
        res["chain_without_marginals"] = round(max(0.0, res["chain"] - res["marginals"]), 1)
        res["gather"] = _best_us(lambda: gather_all(x, perm, patch, out), n_img)
        same = bool((perm == porder.reorder(x, "mi", patch, workers=1)[1]).all())
        res["replayed_perms_equal_porder"] = same
        # porder.reorder runs its kernels on a pool thread: process time, not the caller's
        res["whole_reorder_1_thread"] = _best_us(
            lambda: porder.reorder(x, "mi", patch, workers=1), n_img, clock=time.process_time)
        return res
    except Exception as e:  # the private kernels changed: say so
        return {"unavailable": f"porder's kernels changed: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}"}


def profile(x: np.ndarray | None, patch: int = 16) -> dict:
    if x is None:
        return {"skipped": f"{DOGS} is absent"}
    return {"images": len(x), "how": "best of 3, one thread, us per image (thread time of "
                                     "each stage's loop; process time of a whole reorder)",
            "porder": porder_stages(x, patch),
            "independent_chain": chain.stage_times(x, "mi", patch)}


# --------------------------------------------------------------------------
# The limit at 224 p16


def nominal_ghz() -> float | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return None


def limit(x: np.ndarray | None, patch: int = 16) -> dict:
    if x is None:
        return {"skipped": f"{DOGS} is absent"}
    perms = chain.reorder(x, "mi", patch)[1]
    work = chain.class_work(x, patch, perms)
    ghz = nominal_ghz() or 2.5
    cycles = work["compares"] / 2 + work["folded_pixels"] + work["scatter_pixel_lanes"]
    rate = chain.compare_rate()
    measured_s = (work["compares"] + 6 * work["folded_pixels"]) / rate \
        + work["scatter_pixel_lanes"] / (ghz * 1e9)
    return {
        "images": len(x), "per_image": {k: round(v) for k, v in work.items()},
        "assumed": {"clock_ghz": ghz, "compares_per_cycle": 2, "cycles_per_folded_pixel": 1,
                    "cycles_per_scatter_pixel_lane": 1,
                    "img_per_s_per_core": round(ghz * 1e9 / cycles, 1)},
        "measured_compare_loop": {"compares_per_s": round(rate), "fold_costs_compares": 6,
                                  "img_per_s_per_core": round(1 / measured_s, 1)},
        "note": "vector work only: splitting, classes, bookkeeping and gather come on top; "
                "512-bit vectors do not raise the bound on this Zen 4 (double-pumped 256-bit)",
    }


# --------------------------------------------------------------------------
# End to end


def e2e(size: int, files: list[str], threads: int, tmp: Path) -> dict:
    from porder.pipeline import CacheSpec, build_cache
    from porder.sources import open_source

    folder = tmp / f"photos{size}"
    folder.mkdir()
    for f in files:
        (folder / os.path.basename(f)).symlink_to(f)
    t0 = time.perf_counter()
    src = open_source(str(folder), size=size, workers=threads)
    try:
        for split in ("train", "test"):
            for _ in src.iter_batches(split, 256, start=0, stop=src.count(split)):
                pass
    finally:
        src.close()
    decode_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = build_cache(CacheSpec(str(folder), tmp / f"e2e{size}.h5", measure="mi", patch=16,
                              size=size, workers=threads, overwrite=True))
    total = time.perf_counter() - t0
    rows = sum(r.rows.values())
    return {"images": rows, "img_per_s": round(rows / total, 1),
            "seconds": {k: round(v, 2) for k, v in r.seconds.items()},
            "decode_alone_s": round(decode_alone, 2),
            "decode_alone_img_per_s": round(len(files) / decode_alone, 1),
            "write_ms_per_image": round(r.seconds["write"] / rows * 1e3, 2)}


# --------------------------------------------------------------------------
# Report


def markdown(rows: list[dict]) -> str:
    out = ["| size | patch | measure | images | n | porder img/s | chain img/s | ratio "
           "| same perms | chain = generic |",
           "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['size']} | {r['patch']} | | {r['images']} | | {r['skipped']} |"
                       " | | | |")
            continue
        ch = r.get("chain_img_per_s")
        chs = "" if ch is None else f"{ch:,.1f}"
        ratio = "" if ch is None else f"{r['ratio']:.2f}x"
        gen = ("" if ch is None else
               f"{r['generic_checked'] - r['chain_vs_generic_differ']}/{r['generic_checked']}")
        out.append(f"| {r['size']} | {r['patch']} | {r['measure']} | {r['images']} | {r['n']} | "
                   f"{r['porder_img_per_s']:,.1f} | {chs} | {ratio} | "
                   f"{r.get('same_perms', '')} | {gen} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="few images (about 2 minutes)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    t_start = time.perf_counter()
    result: dict = {"benchmark": "native", "mode": mode,
                    "machine": {"cpus": os.cpu_count(), "threads": args.threads,
                                "loadavg_before": [round(v, 2) for v in os.getloadavg()]}}
    result["throughput"] = throughput(mode, args.threads)
    x224 = photos(224, 8 if args.quick else 24, "resize") if DOGS.is_dir() else None
    result["profile_224_p16_mi"] = profile(x224)
    result["limit_224_p16_mi"] = limit(x224)
    files = photo_files()
    if files:
        files = files[:64] if args.quick else files
        with tempfile.TemporaryDirectory() as d:
            result["e2e_mi_p16"] = {f"size_{s}": e2e(s, files, args.threads, Path(d))
                                    for s in (128, 224)}
    else:
        result["e2e_mi_p16"] = f"skipped: {DOGS} is absent"
    result["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    table = markdown(result["throughput"])
    result["markdown"] = table
    print(table, file=sys.stderr)
    return report(result, args.out, "native.json")


if __name__ == "__main__":
    main()
