"""End-to-end `porder reorder` against a plain Pillow decode loop, with where the time goes.

What it measures, in one run on this machine (ratios are what to compare; the
load average before and after is recorded, as the machine may be shared):
* ``synthetic:N`` (default 50,000): ``build_cache`` with ``--measure none``,
  ``mi --patch 8`` (the default backend), and a *free measure* (the scoring
  replaced by returning the batch as it is), which shows what the pipeline
  itself (generation, hand-offs, HDF5 writes, progress) can carry.
  Target (issue 14): ``mi`` at least 10,000 img/s.
* Folders of JPEGs (Dogs vs. Cats 1k in ../shared/data; CIFAR-10 JPEG class
  folders given by ``--cifar-jpeg DIR``, the first ``--cifar-classes`` classes):
  a plain loop of Pillow ``open`` + ``convert("RGB")`` + bicubic ``resize`` to
  32x32 in a 2-process pool, then ``build_cache`` with ``none`` and ``mi``
  p8 (listing, identity hashing and decoding included; the default
  ``decoder="auto"``, which takes worker processes from 4096 files), and ``mi``
  with ``decoder="threads"`` to show what the processes bring. Target: ``mi``
  at least 0.8x the plain loop.
* On Dogs vs. Cats: how far porder's decode (JPEG ``draft``: DCT-domain
  down-scaling, on by default) is from the plain full decode (max and mean
  absolute pixel difference), and the plain loop's speed with ``draft``.

``seconds`` of each run: ``decode`` (the main thread waiting for decoded
batches), ``measure``, ``write`` (the writer thread, overlapped),
``write_wait`` (the main thread held up by the writer), ``other``, ``total``.

Prints JSON; ``--out DIR`` also writes ``DIR/e2e.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # pool workers import this module by name
from benchmarks._report import report  # noqa: E402

DOGS = ROOT.parent / "shared" / "data" / "dogs-vs-cats-1k"
EXTS = (".jpg", ".jpeg", ".png")


def plain_decode(path: str, draft: bool = False) -> np.ndarray:
    """The plain loop's work on one file: open, RGB, bicubic resize to 32x32."""
    with Image.open(path) as im:
        if draft:
            im.draft("RGB", (32, 32))
        return np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))


def plain_draft(path: str) -> np.ndarray:
    return plain_decode(path, draft=True)


def list_files(folder: Path) -> list[str]:
    return sorted(os.path.join(root, name)
                  for root, _, names in os.walk(folder, followlinks=True)
                  for name in names if name.lower().endswith(EXTS))


def plain_loop(files: list[str], fn=plain_decode, processes: int = 2) -> float:
    """Images/second of ``fn`` over ``files`` in a ``processes``-process pool (start-up included)."""
    t0 = time.perf_counter()
    with get_context("spawn").Pool(processes) as pool:
        pool.map(fn, files, chunksize=64)
    return len(files) / (time.perf_counter() - t0)


def porder_run(source: str, out: Path, measure: str, **kw) -> dict:
    from porder.pipeline import CacheSpec, build_cache

    t0 = time.perf_counter()
    r = build_cache(CacheSpec(source, out, measure=measure, patch=8, overwrite=True, **kw))
    dt = time.perf_counter() - t0
    rows = sum(r.rows.values())
    return {"images": rows, "img_per_s": round(rows / dt, 1),
            "seconds": {k: round(v, 3) for k, v in r.seconds.items()}}


def free_measure_run(source: str, out: Path) -> dict:
    """``porder_run`` with the scoring replaced by returning the batch unchanged."""
    import porder.pipeline as pipeline

    def free(images, measure, patch, **_):
        k = (images.shape[1] // patch) ** 2
        return images, np.broadcast_to(np.arange(k), (len(images), k))

    original = pipeline.reorder
    pipeline.reorder = free
    try:
        return porder_run(source, out, "none")
    finally:
        pipeline.reorder = original


def folder_bench(folder: Path, tmp: Path, dogs: bool) -> dict:
    files = list_files(folder)
    res: dict = {"files": len(files)}
    res["plain_2proc_img_per_s"] = round(plain_loop(files), 1)
    for m in ("none", "mi"):
        res[f"porder_{m}"] = porder_run(str(folder), tmp / "f.h5", m)
    res["porder_mi_threads"] = porder_run(str(folder), tmp / "f.h5", "mi", decoder="threads")
    res["plain_2proc_again_img_per_s"] = round(plain_loop(files), 1)  # drift check
    plain = (res["plain_2proc_img_per_s"] + res["plain_2proc_again_img_per_s"]) / 2
    for m in ("none", "mi", "mi_threads"):
        res[f"ratio_{m}_to_plain"] = round(res[f"porder_{m}"]["img_per_s"] / plain, 3)
    res["target_mi_ge_0.8x_plain"] = res["ratio_mi_to_plain"] >= 0.8
    if dogs:
        from porder.sources.pillow import decode_file

        res["plain_2proc_draft_img_per_s"] = round(plain_loop(files, plain_draft), 1)
        diff = np.concatenate([
            np.abs(decode_file(f, 32).astype(np.int16) - plain_decode(f)).ravel()
            for f in files])
        res["porder_decode_vs_full_decode"] = {"max_abs": int(diff.max()),
                                               "mean_abs": round(float(diff.mean()), 3)}
    return res


def cifar_subset(root: Path, classes: int, tmp: Path) -> Path:
    """A folder of links to the first ``classes`` class folders of ``root``."""
    sub = tmp / "cifar-jpeg"
    sub.mkdir()
    for d in sorted(p for p in root.iterdir() if p.is_dir())[:classes]:
        (sub / d.name).symlink_to(d.resolve(), target_is_directory=True)
    return sub


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="10,000 synthetic images instead")
    ap.add_argument("--synthetic", type=int, default=50000)
    env = os.environ.get("PORDER_CIFAR_JPEG")
    ap.add_argument("--cifar-jpeg", type=Path, default=Path(env) if env else None,
                    help="CIFAR-10 JPEG class folders (e.g. cifar10/train; default "
                         "$PORDER_CIFAR_JPEG, so that `make bench` finds them); skipped if absent")
    ap.add_argument("--cifar-classes", type=int, default=10,
                    help="class folders to use (10: all of train/, 50,000 files)")
    args = ap.parse_args(argv)
    n = 10000 if args.quick else args.synthetic
    result = {"benchmark": "e2e", "machine": {"cpus": os.cpu_count(),
                                              "load_before": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        syn = f"synthetic:{n}"
        result[f"synthetic_{n}"] = {
            "free_measure": free_measure_run(syn, tmp / "s.h5"),
            "none": porder_run(syn, tmp / "s.h5", "none"),
            "mi": porder_run(syn, tmp / "s.h5", "mi"),
        }
        result[f"synthetic_{n}"]["target_mi_ge_10000"] = (
            result[f"synthetic_{n}"]["mi"]["img_per_s"] >= 10000)
        result["dogs_vs_cats_1k"] = (folder_bench(DOGS, tmp, dogs=True) if DOGS.is_dir()
                                     else f"skipped: {DOGS} is absent")
        if args.cifar_jpeg and args.cifar_jpeg.is_dir():
            sub = cifar_subset(args.cifar_jpeg, args.cifar_classes, tmp)
            result["cifar10_jpeg"] = folder_bench(sub, tmp, dogs=False)
        else:
            result["cifar10_jpeg"] = "skipped: pass --cifar-jpeg DIR or set PORDER_CIFAR_JPEG"
    result["machine"]["load_after"] = os.getloadavg()
    return report(result, args.out, "e2e.json")


if __name__ == "__main__":
    main()
