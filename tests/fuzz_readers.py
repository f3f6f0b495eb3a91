"""Run the torch readers over corrupted caches (in a subprocess): ``PorderDataset``,
``BatchLoader`` and ``PatchOrder.from_file``.

``python -m tests.fuzz_readers BASE.h5 WORKDIR SEED COUNT`` (from the repository
root) makes COUNT seeded corruptions of BASE.h5 (tests/fuzz_files.py's, with more
out-of-range labels and ``perm`` values) and on each copy:

* ``dataset``: ``PorderDataset`` on both splits, with and without ``restore``,
  every item read;
* ``loader``: ``BatchLoader`` on both splits with ``restore``, resident and
  streamed (``buffer=7``), one epoch in order;
* ``patchorder``: ``PatchOrder.from_file``, applied to the batch of every
  original the dataset gives (image j of the batch has index j).

Each reader either gives the right data or raises a StoreError, ValueError or
OSError with a one-line message naming the file. "Right" is judged against
the copy as h5py reads it raw: every label and (restored) image a reader returns
is the raw row's; a row whose label is outside the classes, or whose ``perm``
row is not a permutation when the reader uses it, must be refused, never
returned. PatchOrder must give a permutation of its input's patches, and
exactly the stored image when the copy's pixels, ``perm`` and options are the
base's. One JSON line per reader and case: {case, what, reader, code (0, 1 or
"crash"), output, seconds, problems}; {"start": case} before each case, so that
a crash of the process names it. tests/test_fuzz_readers.py checks the lines.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from porder.data import BatchLoader, PorderDataset
from porder.patches import restore_images, split
from porder.transforms import PatchOrder

from .fuzz_files import KINDS as FILE_KINDS
from .fuzz_files import corrupt, emit

KINDS = FILE_KINDS + ("values", "values")   # labels and perm rows: what the row checks hold
SPLITS = ("train", "test")
OPTIONS = ("measure", "patch", "bins", "reference", "direction", "seed", "image_size")


def raw(path: Path) -> dict:
    """What h5py reads from a copy, unchecked: {split: (images, labels, perm) or None},
    "classes": their count, "attrs": the options (None where unreadable)."""
    out = {"classes": None, "attrs": None}
    try:
        f = h5py.File(path, "r")
    except Exception:  # noqa: BLE001 - unreadable raw: nothing to compare with
        return {**out, **{s: None for s in SPLITS}}
    with f:
        for s in SPLITS:
            try:
                out[s] = (f[s]["images"][()], f[s]["labels"][()].astype(np.int64),
                          f[s]["perm"][()].astype(np.int64))
            except Exception:  # noqa: BLE001
                out[s] = None
        try:
            out["classes"] = int(f["classes"].shape[0])
            out["attrs"] = {k: f.attrs[k] for k in OPTIONS if k in f.attrs}
        except Exception:  # noqa: BLE001
            pass
    return out


def valid_perm(row: np.ndarray) -> bool:
    return row.ndim == 1 and np.array_equal(np.sort(row), np.arange(len(row)))


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return np.array_equal(np.asarray(a), np.asarray(b))


def check_error(e: BaseException, bad: Path) -> list[str]:
    msg = str(e)
    problems = []
    if not isinstance(e, (ValueError, OSError)):
        problems.append(f"undocumented exception type {type(e).__name__}")
    if "\n" in msg or not msg:
        problems.append("not a one-line message")
    if str(bad) not in msg:
        problems.append("the message does not name the file")
    return problems


class Case:
    """One corrupted copy and what h5py reads from it raw."""

    def __init__(self, bad: Path, base: dict):
        self.bad, self.base, self.truth = bad, base, raw(bad)

    def rows(self, s: str):
        """(images, labels, perm, label_ok (N,), perm_ok (N,)) raw, or None when unreadable."""
        t = self.truth[s]
        if t is None or self.truth["classes"] is None:
            return None
        images, labels, perm = t
        label_ok = (labels >= 0) & (labels < self.truth["classes"])
        perm_ok = np.array([valid_perm(p) for p in perm], dtype=bool)
        return images, labels, perm, label_ok, perm_ok

    def want(self, s: str, i: int, restore: bool) -> np.ndarray:
        images, _, perm, _, _ = self.rows(s)
        if not restore:
            return images[i]
        return restore_images(images[i:i + 1], perm[i:i + 1], self.base_patch())[0]

    def base_patch(self) -> int:
        return int(self.truth["attrs"]["patch"])


def run(reader: str, case: int, what: str, bad: Path, fn) -> None:
    """Run ``fn() -> problems`` (a list), timing it and classifying what it raised."""
    t0 = time.perf_counter()
    try:
        problems, code, output = fn(), 0, ""
    except (ValueError, OSError) as e:
        problems, code, output = check_error(e, bad), 1, f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - reported, and failed by the test
        problems, code, output = [f"crash: {type(e).__name__}"], "crash", f"{e}"
    emit(case=case, what=what, reader=reader, code=code, output=output[:500],
         seconds=time.perf_counter() - t0, problems=problems)


def dataset(c: Case, s: str, restore: bool) -> list[str]:
    """Every item of PorderDataset(s, restore): the raw row's, or refused when it must be."""
    ds = PorderDataset(c.bad, s, restore=restore)
    rows = c.rows(s)
    if rows is None:
        return []                         # nothing raw to compare with
    _, labels, _, label_ok, perm_ok = rows
    if not label_ok.all():
        return [f"made on a split with label {labels[~label_ok][0]} outside the classes"]
    problems = []
    for i in range(len(ds)):
        try:
            x, y = ds[i]
        except (ValueError, OSError) as e:
            if restore and not perm_ok[i]:
                problems += check_error(e, c.bad)       # the bad row refused: right
                continue
            raise
        if restore and not perm_ok[i]:
            problems.append(f"row {i}: restored through a perm row that is not a permutation")
        elif not (np.array_equal(x.permute(1, 2, 0).numpy(), c.want(s, i, restore))
                  and y == labels[i]):
            problems.append(f"row {i}: wrong image or label")
    return problems


def loader(c: Case, s: str, restore: bool, buffer) -> list[str]:
    """One epoch of BatchLoader in order: the raw rows, or refused when any must be."""
    batches = list(BatchLoader(c.bad, s, batch_size=5, output="uint8", restore=restore,
                               buffer=buffer))
    rows = c.rows(s)
    if rows is None:
        return []
    images, labels, _, label_ok, perm_ok = rows
    if not label_ok.all() or (restore and not perm_ok.all()):
        return ["returned a split with rows it must refuse"]
    want = np.stack([c.want(s, i, restore) for i in range(len(labels))]) if len(labels) \
        else images
    x = torch.cat([b[0] for b in batches]).permute(0, 2, 3, 1).numpy() if batches else images[:0]
    y = torch.cat([b[1] for b in batches]).numpy() if batches else labels[:0]
    if not (np.array_equal(x, want) and np.array_equal(y, labels)):
        return ["wrong images or labels"]
    return []


def patch_order(c: Case) -> list[str]:
    """PatchOrder.from_file on every original: a permutation of its patches, and the
    stored image itself when the copy's rows and options are the base's."""
    t = PatchOrder.from_file(c.bad, workers=1)
    problems = []
    exact = all(c.truth[s] is not None and same(c.truth[s], c.base[s]) for s in SPLITS) \
        and c.truth["attrs"] is not None and same(c.truth["attrs"], c.base["attrs"])
    for s in SPLITS:
        ds = PorderDataset(c.bad, s, restore=True)
        rows, originals = [], []
        for i in range(len(ds)):
            try:
                originals.append(ds[i][0])                        # (3, S, S) the original
                rows.append(i)
            except (ValueError, OSError) as e:
                problems += check_error(e, c.bad)
        if not rows:
            continue
        x = torch.stack(originals)                                # (n, 3, S, S)
        out = t(x)                    # one batch: image j is dataset image j (index 0 + j)
        if out.shape != x.shape or out.dtype != torch.uint8:
            problems.append(f"{s}: {out.dtype} {tuple(out.shape)} for {tuple(x.shape)}")
            continue
        a, b = (split(v.permute(0, 2, 3, 1).numpy(), t.patch) for v in (x, out))  # (n, K, ...)
        for j, i in enumerate(rows):
            if sorted(map(bytes, a[j])) != sorted(map(bytes, b[j])):   # the same patches
                problems.append(f"{s} row {i}: not a permutation of the input's patches")
            elif exact and rows == list(range(len(ds))) and not np.array_equal(
                    out[j].permute(1, 2, 0).numpy(), c.truth[s][0][i]):
                problems.append(f"{s} row {i}: not the cache's image")
    return problems


def main_(base: Path, work: Path, seed: int, count: int) -> None:
    rng = np.random.default_rng(seed)
    base_truth = raw(base)
    for case in range(count):
        kind = KINDS[case % len(KINDS)]
        bad = work / f"bad-{case}.h5"
        emit(start=case, kind=kind)
        what = f"{kind}: {corrupt(base, bad, rng, kind)}"
        c = Case(bad, base_truth)
        for s in SPLITS:
            for restore in (False, True):
                run(f"dataset {s} restore={restore}", case, what, bad,
                    lambda: dataset(c, s, restore))
            for buffer in (None, 7):        # restore=True: labels and perm rows both used
                run(f"loader {s} buffer={buffer}", case, what, bad,
                    lambda: loader(c, s, True, buffer))
        run("patchorder", case, what, bad, lambda: patch_order(c))
    emit(done=True, maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main_(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
