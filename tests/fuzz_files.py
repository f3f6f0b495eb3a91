"""Corrupt a porder file many ways and run every reader on each copy (run in a subprocess).

``python -m tests.fuzz_files BASE.h5 WORKDIR SEED COUNT`` (from the repository
root) makes COUNT seeded corruptions of BASE.h5 — truncations, flipped bytes
(anywhere and in the metadata at the start), deleted or altered attributes,
deleted or replaced datasets, out-of-range values — and runs ``porder
inspect``, ``porder show``, ``porder merge --copy`` and training's data
loading (:class:`porder.train.batches.Data`) on each. It prints one JSON line
per run: {case, reader, code, output, seconds, left}; ``code`` is the exit
status (for data loading: 0, or 1 with the error's one-line message, or
"crash" with the exception type of anything that is not a ValueError). Before
each case it prints {"start": case} so that a crash of the whole process
names the case. tests/test_fuzz.py runs it and checks the lines.
"""
from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner

from porder.cli import main


def _objects(f: h5py.File) -> list[str]:
    names = []
    f.visit(names.append)
    return names


def corrupt(base: Path, out: Path, rng: np.random.Generator, kind: str) -> str:
    """Write a corrupted copy of ``base`` to ``out``; returns what was done."""
    shutil.copy(base, out)
    data = bytearray(out.read_bytes())
    if kind == "truncate":
        n = int(rng.integers(0, len(data)))
        out.write_bytes(bytes(data[:n]))
        return f"truncated to {n} bytes"
    if kind in ("flip", "flip-head"):
        hi = min(len(data), 4096) if kind == "flip-head" else len(data)
        where = rng.integers(0, hi, int(rng.integers(1, 9)))
        for i in where:
            data[i] ^= int(rng.integers(1, 256))
        out.write_bytes(bytes(data))
        return f"flipped bytes at {sorted(int(i) for i in where)}"
    with h5py.File(out, "r+") as f:
        objs = _objects(f)
        if kind == "del-attr":
            owner = f if rng.random() < 0.6 else f[str(rng.choice(["train", "test"]))]
            keys = list(owner.attrs)
            key = str(rng.choice(keys))
            del owner.attrs[key]
            return f"deleted attribute {key} of {owner.name}"
        if kind == "set-attr":
            owner = f if rng.random() < 0.7 else f[str(rng.choice(["train", "test"]))]
            key = str(rng.choice(list(owner.attrs)))
            value = [-1, 0, 10**7, 2**40, "false", "", 3.5, np.arange(3), b"\xff\xfe",
                     "porder", 257][int(rng.integers(0, 11))]
            owner.attrs[key] = value
            return f"set attribute {key} of {owner.name} to {value!r}"
        if kind == "del-object":
            name = str(rng.choice(objs))
            del f[name]
            return f"deleted {name}"
        if kind == "replace-dataset":
            name = str(rng.choice([o for o in objs if isinstance(f[o], h5py.Dataset)]))
            n = int(rng.integers(0, 40))
            shape = [(n,), (n, 16), (n, 16, 16, 3), (n, 8, 8, 3), (n, 16, 16, 1)][
                int(rng.integers(0, 5))]
            dtype = [np.uint8, np.int64, np.float32, np.uint16, np.int8][int(rng.integers(0, 5))]
            del f[name]
            f.create_dataset(name, data=rng.integers(0, 300, shape).astype(dtype))
            return f"replaced {name} with {np.dtype(dtype)} {shape}"
        if kind == "values":
            name = str(rng.choice(["train/labels", "test/labels", "train/perm", "test/perm"]))
            ds = f[name]
            i = int(rng.integers(0, ds.shape[0]))
            if ds.ndim == 2:  # perm (uint8 here): out of range, or a patch twice
                row = ds[i]
                j = int(rng.integers(0, ds.shape[1]))
                row[j] = int(rng.choice([16, 255])) if rng.random() < 0.5 else row[j - 1]
                ds[i] = row
                return f"set {name}[{i}, {j}] to {row[j]}"
            bad = int(rng.choice([-1, 10, 99, 16, 255]))
            ds[i] = bad
            return f"set {name}[{i}] to {bad}"
    raise ValueError(kind)


KINDS = ("truncate", "flip", "flip-head", "del-attr", "set-attr", "del-object",
         "replace-dataset", "values")


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def run_case(case: int, bad: Path, work: Path, what: str) -> None:
    from porder.train.batches import Data

    runner = CliRunner()
    grid, merged = work / f"grid-{case}.png", work / f"merged-{case}.h5"
    for reader, args in (("inspect", ["inspect", str(bad)]),
                         ("show", ["show", "-o", str(grid), str(bad)]),
                         ("merge", ["merge", "--copy", str(bad), str(merged)])):
        t0 = time.perf_counter()
        res = runner.invoke(main, args)
        seconds = time.perf_counter() - t0
        left = [str(p) for p in (grid, merged, Path(str(merged) + ".part"))
                if p.exists() and res.exit_code]
        if isinstance(res.exception, Exception) and not isinstance(res.exception, SystemExit):
            emit(case=case, what=what, reader=reader, code="crash", seconds=seconds, left=left,
                 output=f"{type(res.exception).__name__}: {res.exception}")
            continue
        emit(case=case, what=what, reader=reader, code=res.exit_code, output=res.output,
             seconds=seconds, left=left)
        for p in (grid, merged):
            p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        Data(bad, device="cpu")
        code, output = 0, ""
    except ValueError as e:
        code, output = 1, f"Error: {e}"
    except Exception as e:  # noqa: BLE001 - reported, and failed by the test
        code, output = "crash", f"{type(e).__name__}: {e}"
    emit(case=case, what=what, reader="train-load", code=code, output=output,
         seconds=time.perf_counter() - t0, left=[])


def main_(base: Path, work: Path, seed: int, count: int) -> None:
    rng = np.random.default_rng(seed)
    for case in range(count):
        kind = KINDS[case % len(KINDS)]
        bad = work / f"bad-{case}.h5"
        emit(start=case, kind=kind)
        what = corrupt(base, bad, rng, kind)
        run_case(case, bad, work, f"{kind}: {what}")
    emit(done=True, maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__":
    main_(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
