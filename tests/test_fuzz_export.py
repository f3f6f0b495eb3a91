"""A short seeded fuzz of `porder export` (issue 20): over corrupted caches and hostile
output folders, every case ends in a correct export or in one ``Error:`` line, and
nothing is deleted or left that the user did not ask for.

tests/fuzz_export.py (in a subprocess, so that even a crash of HDF5 is caught and
named) builds the cases and checks each outcome; this test reads its report.
"""
from __future__ import annotations

from collections import Counter

import pytest

from .conftest import case_failures, run_fuzz_worker, small_cache

CASES = 48            # half corrupted caches (6 of each corruption), half hostile folders
SECONDS = 20.0        # per export: generous bounded time on a loaded machine


@pytest.mark.parametrize("seed", [0])
def test_export_over_corrupted_caches_and_hostile_folders(tmp_path, seed):
    base = small_cache(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    rows = run_fuzz_worker("fuzz_export", base, work, seed, CASES)
    results = [r for r in rows if "code" in r]
    assert len(results) == CASES
    failures = case_failures(results, SECONDS)
    assert not failures, "\n".join(failures)
    # the fuzz reaches both ends: exports written (onto earlier ones too) and refusals
    codes = Counter((r["case"] % 2, r["code"]) for r in results)
    assert codes[(0, 0)] >= 3 and codes[(0, 1)] >= 6, codes      # corrupted caches
    assert codes[(1, 0)] >= 3 and codes[(1, 1)] >= 10, codes     # hostile folders
