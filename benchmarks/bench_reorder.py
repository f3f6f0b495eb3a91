"""End-to-end `porder reorder` throughput and memory, split into decode, measure and write.

What it measures (this machine's CPU, all cores):
* ``reorder --measure mi --patch 8`` on the 1,000 Kaggle Dogs-vs-Cats JPEGs in
  ../shared/data (skipped if absent) and on 50,000 synthetic 32x32 images:
  end-to-end images/second, and seconds spent decoding (the source alone),
  measuring (``porder.reorder``) and writing (HDF5 appends). Target (issue 3):
  decoding and writing never cost more than the measure at patch 8.
* Peak memory (max RSS of a fresh process) of the same job on 20,000 and on
  200,000 synthetic images: it must not grow with the dataset.

Prints JSON; ``--out DIR`` also writes ``DIR/reorder.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._report import report  # noqa: E402

# The 1,000 Dogs-vs-Cats photographs: $PORDER_PHOTOS, else ../shared/data beside the repo.
DOGS = Path(os.environ.get("PORDER_PHOTOS") or ROOT.parent / "shared" / "data" / "dogs-vs-cats-1k")

CHILD = r"""
import json, resource, sys, time
from porder.pipeline import CacheSpec, build_cache
src, out, measure = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
r = build_cache(CacheSpec(src, out, measure=measure, patch=8, batch_size=512, overwrite=True))
dt = time.perf_counter() - t0
rows = sum(r.rows.values())
print(json.dumps({"images": rows, "seconds": round(dt, 3), "img_per_s": round(rows / dt, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "seconds_split": {k: round(v, 3) for k, v in r.seconds.items()}}))
"""


def decode_only(spec: str) -> float:
    """Seconds to read and resize every sample of a source, nothing else."""
    from porder.sources import open_source

    src = open_source(spec)
    t0 = time.perf_counter()
    for split in src.splits():
        for _ in src.iter_batches(split, 512):
            pass
    src.close()
    return time.perf_counter() - t0


def measure_only(spec: str) -> float:
    """Seconds of porder.reorder(mi, 8) over the decoded images of a source."""
    from porder import reorder
    from porder.sources import open_source

    src = open_source(spec)
    batches = [b.images for s in src.splits() for b in src.iter_batches(s, 512)]
    src.close()
    t0 = time.perf_counter()
    for b in batches:
        reorder(b, "mi", 8)
    return time.perf_counter() - t0


def child(spec: str, out: Path, measure: str = "mi") -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, spec, str(out), measure], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def end_to_end(spec: str, tmp: Path) -> dict:
    run = child(spec, tmp / "e2e.h5")
    dec, mea = decode_only(spec), measure_only(spec)
    write = run["seconds_split"]["write"]
    run.update(decode_alone_s=round(dec, 3), measure_alone_s=round(mea, 3),
               write_s=round(write, 3),
               target_decode_and_write_le_measure=bool(dec <= mea and write <= mea))
    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="5,000 / 20,000 images instead")
    args = ap.parse_args(argv)
    n_syn, n_small, n_big = (5000, 5000, 20000) if args.quick else (50000, 20000, 200000)
    result = {"benchmark": "reorder", "machine": {"cpus": os.cpu_count(), "device": "cpu"}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if DOGS.is_dir():
            result["dogs_vs_cats_1k"] = end_to_end(str(DOGS), tmp)
        else:
            result["dogs_vs_cats_1k"] = f"skipped: {DOGS} is absent"
        result[f"synthetic_{n_syn}"] = end_to_end(f"synthetic:{n_syn}", tmp)
        small = child(f"synthetic:{n_small}", tmp / "small.h5")
        big = child(f"synthetic:{n_big}", tmp / "big.h5")
        result["memory"] = {
            f"peak_rss_mib_{n_small}": small["peak_rss_mib"],
            f"peak_rss_mib_{n_big}": big["peak_rss_mib"],
            "growth_ratio": round(big["peak_rss_mib"] / small["peak_rss_mib"], 3),
            f"img_per_s_{n_big}": big["img_per_s"],
        }
    return report(result, args.out, "reorder.json")


if __name__ == "__main__":
    main()
