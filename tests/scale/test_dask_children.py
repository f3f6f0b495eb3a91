"""`porder reorder --dask local:N` leaves no process behind: every child it started
(the workers, multiprocessing's resource tracker) is reaped before it returns, so none
lingers as a defunct process once porder exits."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_local_dask_run_reaps_every_child(tmp_path):
    out = tmp_path / "dask.h5"
    proc = subprocess.run([sys.executable, "-m", "tests.scale.dask_children", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    report = json.loads(lines[-1])
    assert report["code"] == 0, proc.stderr[-2000:]
    assert out.exists()
    assert report["children"] == [], report["children"]
