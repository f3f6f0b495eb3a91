"""Benchmark: scaling out `porder reorder` (Dask workers) and the cost of `porder merge`.

Measures, on this machine:

* reorder throughput (measure ``mi``, patch 8, ``synthetic:20000`` 32x32 images)
  of a plain single-process ``build_cache`` (all cores, and one thread), and of
  ``run_dask("local:W")`` for W = 1 and 2 one-thread worker processes. The
  Dask time is end to end: cluster start, shards, the ``--copy`` merge and the
  clean-up; it is split into the shard phase and the merge phase;
  The startup (cluster start, counting the source, submitting) is reported
  apart;
* the overhead of ``merge`` on shards built with ``--shard I/N``: virtual
  datasets and ``copy=True``, in seconds and as a share of build + merge.

Every Dask output is checked to be identical to the single-process one.

Usage::

    python benchmarks/bench_scale.py [--images 20000] [--out DIR]

Prints JSON; with ``--out DIR`` also writes ``DIR/scale.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from porder.pipeline import CacheSpec, build_cache  # noqa: E402
from porder.scale import merge, run_dask  # noqa: E402
from porder.store import SPLITS, read_meta, read_split  # noqa: E402


def identical(a: Path, b: Path, step: int = 4096) -> bool:
    """Same images, labels, perm and names in every split (read in blocks)."""
    ma, mb = read_meta(a), read_meta(b)
    if ma["splits"] != mb["splits"] or ma["classes"] != mb["classes"]:
        return False
    for split in SPLITS:
        for lo in range(0, ma["splits"][split], step):
            x = read_split(a, split, start=lo, stop=lo + step)
            y = read_split(b, split, start=lo, stop=lo + step)
            if x["names"] != y["names"] or not all(
                    np.array_equal(x[k], y[k]) for k in ("images", "labels", "perm")):
                return False
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000, help="synthetic images")
    ap.add_argument("--measure", default="mi")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--workers", default="1,2", help="Dask worker counts, comma-separated")
    ap.add_argument("--merge-shards", type=int, default=4, help="shards for the merge timing")
    ap.add_argument("--out", type=Path, default=None, help="folder for scale.json")
    args = ap.parse_args(argv)

    source = f"synthetic:{args.images}"
    opts = dict(measure=args.measure, patch=args.patch, batch_size=args.batch_size)
    n = args.images
    res: dict = {
        "benchmark": "scale",
        "source": source, "images": n, **opts,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
    }
    with tempfile.TemporaryDirectory(prefix="porder-bench-scale-") as tmp:
        tmp = Path(tmp)
        base = {}
        for label, workers in (("all_cores", None), ("one_thread", 1)):
            t0 = time.perf_counter()
            build_cache(CacheSpec(source, tmp / f"base-{label}.h5", workers=workers, **opts))
            dt = time.perf_counter() - t0
            base[label] = {"seconds": round(dt, 3), "img_per_s": round(n / dt, 1)}
        res["single_process"] = base
        ref = tmp / "base-all_cores.h5"
        best_single = min(v["seconds"] for v in base.values())

        res["dask"] = []
        for w in (int(x) for x in args.workers.split(",")):
            marks: dict = {}

            def progress(stage, done, total, marks=marks):
                marks.setdefault(stage, time.perf_counter())

            out = tmp / f"dask-{w}.h5"
            t0 = time.perf_counter()
            run_dask(f"local:{w}", CacheSpec(source, out, **opts), progress=progress)
            dt = time.perf_counter() - t0
            shard_phase = marks.get("merge", t0 + dt) - t0
            start = marks.get("images", t0) - t0  # cluster up, source counted, tasks sent
            res["dask"].append({
                "workers": w, "shards": 2 * w,
                "seconds": round(dt, 3), "img_per_s": round(n / dt, 1),
                "startup_seconds": round(start, 3),
                "shard_phase_seconds": round(shard_phase, 3),
                "img_per_s_after_startup": round(n / max(dt - start, 1e-9), 1),
                "merge_copy_seconds": round(dt - shard_phase, 3),
                "speedup_vs_best_single_process": round(best_single / dt, 3),
                "identical_to_single_process": identical(ref, out),
            })

        k = args.merge_shards
        t0 = time.perf_counter()
        shards = [build_cache(CacheSpec(source, tmp / f"part-{i}.h5", shard=(i, k),
                                        workers=None, **opts)).path for i in range(k)]
        build_s = time.perf_counter() - t0
        merged = {"shards": k, "build_seconds": round(build_s, 3)}
        for mode, copy in (("virtual", False), ("copy", True)):
            t0 = time.perf_counter()
            out = merge(shards, tmp / f"merged-{mode}.h5", copy=copy)
            dt = time.perf_counter() - t0
            merged[mode] = {"seconds": round(dt, 3),
                            "share_of_total": round(dt / (build_s + dt), 4),
                            "bytes": out.stat().st_size,
                            "identical_to_single_process": identical(ref, out)}
        res["merge"] = merged

    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.json").write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
