"""The CPU kernels' first compile: said on one line on stderr, and kept out of the
images-per-second rate. The message logic runs with a faked "is cached" probe; one slow test
compiles for real into an empty numba cache folder in a subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.cli.common import COMPILE_MESSAGE
from porder.kernels import cpu

from ..conftest import REPO

COLD = cpu.CacheState(folder="/nowhere", index="/nowhere/x.nbi", cached=False, loaded=False)
COMPILE_S = 1.5


@pytest.fixture
def cold(monkeypatch):
    """A cold cache whose compile takes COMPILE_S seconds; the list of load() calls."""
    calls = []

    def load():
        calls.append(time.perf_counter())
        time.sleep(COMPILE_S)

    monkeypatch.setattr(cpu, "cache_state", lambda: COLD)
    monkeypatch.setattr(cpu, "load", load)
    return calls


def reorder(tmp_path, *args):
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["reorder", "--no-progress", "--json", *args,
                                    "synthetic:64", str(tmp_path / "o.h5")])
    wall = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    return res, json.loads(res.stdout), wall


def test_a_cold_cache_says_so_once_and_the_rate_leaves_the_compile_out(tmp_path, cold):
    res, report, wall = reorder(tmp_path)
    lines = [line for line in res.stderr.splitlines() if "compiling" in line]
    assert len(lines) == 1 and re.fullmatch(re.escape(COMPILE_MESSAGE) + r" \.\.\. done in \d+ s",
                                            lines[0]), res.stderr
    assert res.stderr.index(COMPILE_MESSAGE) < res.stderr.index("train: 0/")  # before the work
    assert len(cold) >= 1
    assert report["compile_seconds"] >= COMPILE_S
    # the clock starts after the compile: the rate is of the images alone
    assert report["seconds"] <= wall - COMPILE_S + 0.2
    assert report["images_per_s"] == pytest.approx(report["processed"] / report["seconds"])
    assert report["processed"] == 64


def test_a_warm_cache_says_nothing(tmp_path):
    assert cpu.cache_state().warm  # the session fixture compiled them
    res, report, _ = reorder(tmp_path)
    assert COMPILE_MESSAGE not in res.stderr and report["compile_seconds"] is None


@pytest.mark.parametrize("args", [["--backend", "generic"], ["--measure", "none"],
                                  ["--measure", "random"]])
def test_runs_that_do_not_use_the_kernels_do_not_compile(tmp_path, cold, args):
    res, report, _ = reorder(tmp_path, *args)
    assert COMPILE_MESSAGE not in res.stderr and report["compile_seconds"] is None
    assert cold == []


def test_train_on_the_fly_says_so_too(tmp_path, cold):
    data = tmp_path / "none.h5"
    assert CliRunner().invoke(main, ["reorder", "--no-progress", "--measure", "none",
                                     "synthetic:24:2", str(data)]).exit_code == 0
    res = CliRunner().invoke(main, ["train", str(data), "-m", "mi", "--steps", "1",
                                    "--eval-every", "1", "-b", "4", "--width", "0.0625",
                                    "--device", "cpu", "-j", "1", "--no-progress", "--json",
                                    "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert res.stderr.count(COMPILE_MESSAGE) == 1
    assert json.loads(res.stdout)["compile_seconds"] >= COMPILE_S


@pytest.mark.slow
def test_a_real_cold_cache_compiles_once_with_the_message(tmp_path):
    """numba's cache in an empty folder (NUMBA_CACHE_DIR): the first run compiles (30-90 s)
    and says so; `porder info` sees the cache before and after; the second run is quiet."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "PYTHONPATH": os.pathsep.join([str(REPO)] + sys.path)}

    def porder(*args):
        res = subprocess.run([sys.executable, "-m", "porder", *map(str, args)], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr
        return res

    before = json.loads(porder("info", "--json").stdout)["cpu_kernels"]
    assert before["cached"] is False and before["folder"].startswith(str(tmp_path / "numba"))
    first = porder("reorder", "--no-progress", "--json", "synthetic:32", "a.h5")
    assert first.stderr.count(COMPILE_MESSAGE) == 1, first.stderr
    report = json.loads(first.stdout)
    assert report["compile_seconds"] > 1 and report["seconds"] < report["compile_seconds"]
    assert json.loads(porder("info", "--json").stdout)["cpu_kernels"]["cached"] is True
    second = porder("reorder", "--no-progress", "--json", "synthetic:32", "b.h5")
    assert COMPILE_MESSAGE not in second.stderr
    assert json.loads(second.stdout)["compile_seconds"] is None
