"""Impossible work is refused up front with what is feasible (issue 20, class 4)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import porder
from porder.pipeline import CacheSpec
from porder.reorder import MAX_MATRIX_PATCHES, MAX_PAIR_WORK, check_work, resolve_options


def test_the_issue_case_is_one_error_line_naming_a_feasible_patch(tmp_path):
    out = tmp_path / "out.h5"
    proc = subprocess.run([sys.executable, "-m", "porder", "reorder", "--size", "4096", "--patch",
                           "1", "-b", "1", "synthetic:3", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: patch 1 on 4096x4096 images"), proc.stderr
    assert "16,777,216 patches" in lines[0] and "--patch 64" in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("size, patch, smallest", [(4096, 1, 64), (1024, 2, 4), (2048, 1, 16)])
def test_the_suggested_patch_is_the_smallest_that_fits(size, patch, smallest):
    m = porder.get_measure("mi")
    with pytest.raises(ValueError, match=f"at least {smallest} "):
        check_work(m, patch, size, generic=False)
    check_work(m, smallest, size, generic=False)
    k = (size // smallest) ** 2
    assert k * size * size // 2 <= MAX_PAIR_WORK
    below = [p for p in range(patch, smallest) if size % p == 0]
    assert all((size // p) ** 2 * size * size // 2 > MAX_PAIR_WORK for p in below)


def test_the_generic_path_bounds_its_score_matrix():
    # 224 / 2 = 112 patches a side, K = 12,544: fine for the compiled chain, not for a (K, K) matrix.
    resolve_options("mi", 2, 224)
    with pytest.raises(ValueError, match=f"more than {MAX_MATRIX_PATCHES} patches.*at least 4 "):
        resolve_options("mi", 2, 224, backend="generic")
    with pytest.raises(ValueError, match="generic path"):
        CacheSpec("synthetic:4", "x.h5", patch=2, size=224, backend="generic")


def test_standalone_and_control_measures_are_not_bounded():
    for name in ("entropy", "psnr", "none", "random"):
        resolve_options(name, 1, 1024)


def test_library_calls_refuse_before_any_work():
    x = np.zeros((1, 1024, 1024, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="patches per image"):
        porder.reorder(x, "mi", 1)
