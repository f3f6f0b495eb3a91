"""A short seeded fuzz of the torch readers (issue 20): ``PorderDataset``, ``BatchLoader``
and ``PatchOrder`` over corrupted caches. Every case gives the right data, or a
StoreError/ValueError/OSError whose one-line message names the file; none hangs or
crashes, and a row read is a row checked (a bad label or ``perm`` row is never returned).

tests/fuzz_readers.py (in a subprocess, so that even a crash of HDF5 is caught and
named) builds the cases and judges each outcome against the copy as h5py reads it.
"""
from __future__ import annotations

from collections import Counter

import pytest

from .conftest import case_failures, run_fuzz_worker, small_cache

CASES = 30            # 3 of each of 10 kinds (labels and perm values weighted up)
SECONDS = 20.0        # per reader call: generous bounded time on a loaded machine
READERS = 9           # per case: 4 dataset, 4 loader, 1 patchorder
MAX_RSS_GIB = 2.0


@pytest.mark.parametrize("seed", [0])
def test_torch_readers_over_corrupted_caches(tmp_path, seed):
    base = small_cache(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    rows = run_fuzz_worker("fuzz_readers", base, work, seed, CASES)
    assert rows[-1]["maxrss_kib"] < MAX_RSS_GIB * 2**20
    results = [r for r in rows if "reader" in r]
    assert len(results) == READERS * CASES
    failures = case_failures(results, SECONDS)
    assert not failures, "\n".join(failures)
    # the fuzz reaches both ends: data read and checked, and refusals (the row checks among them)
    codes = Counter(r["code"] for r in results)
    assert codes[0] >= READERS * 3 and codes[1] >= READERS * CASES // 3, codes
    row_refusals = [r for r in results if r["code"] == 1 and " row " in r["output"]]
    assert len({r["case"] for r in row_refusals}) >= 3, row_refusals
