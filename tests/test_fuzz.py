"""A short seeded fuzz of porder files: whatever the corruption, a reader either reads
the file or stops with one ``Error:`` line naming it.

tests/fuzz_files.py (in a subprocess, so that even a crash of HDF5 is caught
and named) corrupts a small valid file 32 ways — truncation, flipped bytes,
deleted or altered attributes and datasets, out-of-range labels and perm
values — and runs ``porder inspect``, ``porder show``, ``porder merge --copy``
and training's data loading on each copy.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from porder.pipeline import CacheSpec, build_cache

REPO = Path(__file__).resolve().parents[1]
CASES = 32            # 4 of each kind of corruption
SECONDS = 20.0        # per reader call: generous bounded time on a loaded machine
MAX_RSS_GIB = 2.0     # the whole worker, torch included
PROGRESS = re.compile(r"^\w+: \d+/\d+ images \(")  # merge --copy's periodic lines


@pytest.mark.parametrize("seed", [0])
def test_corrupted_files_fail_in_one_line(tmp_path, seed):
    base = build_cache(CacheSpec("synthetic:24", tmp_path / "base.h5", measure="entropy",
                                 size=16, patch=4, workers=1)).path
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz_files", str(base), str(work),
                           str(seed), str(CASES)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [r for r in rows if "start" in r]
    assert proc.returncode == 0 and rows and rows[-1].get("done"), (
        f"the fuzz worker died (exit {proc.returncode}) in case {started[-1] if started else '?'}"
        f": {proc.stderr[-2000:]}")
    assert rows[-1]["maxrss_kib"] < MAX_RSS_GIB * 2**20
    results = [r for r in rows if "reader" in r]
    assert len(results) == 4 * CASES
    failures = []
    for r in results:
        bad = str(work / f"bad-{r['case']}.h5")
        lines = [ln for ln in r["output"].strip().splitlines() if ln.strip()]
        problem = None
        if r["code"] not in (0, 1, 2):
            problem = f"exit {r['code']}"
        elif r["code"] and not (lines and lines[-1].startswith("Error: ") and bad in lines[-1]
                                and all(PROGRESS.match(ln) for ln in lines[:-1])):
            problem = "not one Error: line naming the file (after progress lines)"
        elif "Traceback" in r["output"]:
            problem = "traceback"
        elif r["left"]:
            problem = f"left {r['left']}"
        elif r["seconds"] > SECONDS:
            problem = f"took {r['seconds']:.1f} s"
        if problem:
            failures.append(f"{r['reader']} on case {r['case']} ({r['what']}): {problem}: "
                            f"{r['output'][:300]!r}")
    assert not failures, "\n".join(failures)
    # the fuzz does reach the checks: most corruptions are refused, some are harmless
    refused = sum(1 for r in results if r["code"])
    assert refused > len(results) // 2
