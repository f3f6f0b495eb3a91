"""A short seeded fuzz of `porder train --resume` (issue 20): over mutated run folders and
caches, every case ends in a finished run or in one ``Error:`` line, a cache whose bytes
changed is never trained on, and nothing is deleted or left that the user did not ask for.

tests/fuzz_resume.py (in a subprocess, so that even a crash of HDF5 or torch is caught
and named) builds the cases and checks each outcome; this test reads its report.
"""
from __future__ import annotations

from collections import Counter

import pytest

from .conftest import case_failures, run_fuzz_worker

CASES = 22            # 2 of each of the 11 kinds of mutation
SECONDS = 20.0        # per resume: generous bounded time on a loaded machine


@pytest.mark.parametrize("seed", [0])
def test_resume_over_mutated_runs_and_caches(tmp_path, seed):
    rows = run_fuzz_worker("fuzz_resume", tmp_path, seed, CASES)
    results = [r for r in rows if "code" in r]
    assert len(results) == CASES
    failures = case_failures(results, SECONDS)
    assert not failures, "\n".join(failures)
    # the fuzz reaches both ends: runs finished and resumes refused
    codes = Counter(r["code"] for r in results)
    assert codes[0] >= 8 and codes[1] >= 6, codes
