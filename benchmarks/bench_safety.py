"""Benchmark: what porder's safety checks cost (issue 10, the output-file half).

Measures, on this machine:

* ``source_identity`` (what --resume and merge compare): a folder of
  ``--files`` small files (names, sizes, times of every file) and an archive
  of ``--archive-mib`` MiB (SHA-256 of every byte), in seconds;
* the checks of every reader: ``read_split`` of a whole file (which checks
  each label and ``perm`` row as it loads, and casts ``perm`` to int64), the
  share of it spent in ``check_rows``, the same rows read with h5py alone, and
  ``describe`` (``porder inspect``: header plus one bounded
  pass over labels and ``perm``), for ``--images`` 32x32 images with patch 8
  (K = 16) and patch 1 (K = 1024);
* ``check_rows`` throughput in perm entries per second.

Usage::

    python benchmarks/bench_safety.py [--images 20000] [--files 2000] [--archive-mib 160]

Prints JSON.
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

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from porder.sources.identity import source_identity  # noqa: E402
from porder.store import Writer, describe, read_split  # noqa: E402
from porder.validate import check_rows  # noqa: E402


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_file(path: Path, n: int, patch: int) -> Path:
    k = (32 // patch) ** 2
    rng = np.random.default_rng(0)
    meta = {"measure": "random", "patch": patch, "image_size": 32, "source": "bench"}
    w = Writer(path, meta=meta, classes=[f"c{i}" for i in range(100)], chunk=1024)
    for split, count in (("train", n), ("test", n // 10)):
        for lo in range(0, count, 1024):
            b = min(1024, count - lo)
            w.append(split, rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8),
                     rng.integers(0, 100, b), np.argsort(rng.random((b, k)), axis=1),
                     [f"x{lo + i}" for i in range(b)], consumed=lo + b)
    return w.finish()


def raw_read(path: Path):
    with h5py.File(path, "r") as f:
        g = f["train"]
        return g["images"][()], g["labels"][()], g["perm"][()], g["names"][()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--archive-mib", type=int, default=160)
    args = ap.parse_args()
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "folder"
        for i in range(args.files):
            d = folder / f"class{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"img{i}.png").write_bytes(os.urandom(64))
        out["identity_folder_s"] = timed(lambda: source_identity(str(folder)))
        out["identity_folder_files"] = args.files
        archive = tmp / "a.tar.gz"
        with open(archive, "wb") as fh:
            for _ in range(args.archive_mib):
                fh.write(os.urandom(2**20))
        s = timed(lambda: source_identity(str(archive)), repeat=2)
        out["identity_archive_s"] = s
        out["identity_archive_mib_per_s"] = args.archive_mib / s
        for patch in (8, 1):
            path = make_file(tmp / f"p{patch}.h5", args.images, patch)
            k = (32 // patch) ** 2
            raw = timed(lambda: raw_read(path))
            checked = timed(lambda: read_split(path, "train"))
            data = read_split(path, "train")
            check = timed(lambda: check_rows(path, "train", 0, data["labels"], data["perm"],
                                             classes=100, k=k))
            out[f"patch{patch}"] = {
                "images": args.images, "k": k, "raw_h5py_read_s": raw,
                "read_split_s": checked, "of_which_check_rows_s": check,
                "check_share_of_read_split": check / checked,
                "describe_s": timed(lambda: describe(path)),
            }
        rng = np.random.default_rng(1)
        perm = np.argsort(rng.random((20000, 256)), axis=1)
        s = timed(lambda: check_rows("x", "train", 0, None, perm, classes=1, k=256))
        out["check_rows_perm_entries_per_s"] = perm.size / s
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
