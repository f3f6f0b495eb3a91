"""A measure from an installed package (entry point ``porder.measures``) through the CLI.

The plugin (tests/plugin_files.py) is porder's l1 formula written out again,
without a matrix or kernel: `porder measures` lists it with its origin,
`porder reorder -m` and `porder compare -m` take it, and its files order
exactly as l1's do.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from porder.store import read_meta, read_split

from ..plugin_files import DIST, NAME, PYTHON, plugin_env, write_plugin


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    return write_plugin(tmp_path_factory.mktemp("site"))


def porder_cli(plugin, *args, cwd, timeout=120):
    res = subprocess.run([PYTHON, "-m", "porder", *map(str, args)], capture_output=True,
                         text=True, env=plugin_env(plugin), cwd=cwd, timeout=timeout)
    assert res.returncode == 0, f"porder {' '.join(map(str, args))}\n{res.stdout}\n{res.stderr}"
    return res


def test_measures_lists_the_plugin_with_its_origin(plugin, tmp_path):
    res = porder_cli(plugin, "measures", cwd=tmp_path)
    rows = {line.split()[0]: line for line in res.stdout.splitlines()}
    assert rows[NAME].split()[:5] == [NAME, "pairwise", "lower", "is", "more"]
    assert f" {DIST} " in rows[NAME] and rows[NAME].endswith("from a plugin")
    assert " porder " in rows["mi"] and rows["mi"].endswith("co-located pixels (bits)")
    assert res.stderr == ""
    import json

    listed = {m["name"]: m for m in json.loads(porder_cli(plugin, "measures", "--json",
                                                          cwd=tmp_path).stdout)}
    assert listed[NAME]["origin"] == DIST and listed["l1"]["origin"] == "porder"


def test_reorder_takes_the_plugin_measure(plugin, tmp_path):
    out = tmp_path / "demo.h5"
    porder_cli(plugin, "reorder", "-m", NAME, "-p", "8", "synthetic:40", out,
               "--no-progress", cwd=tmp_path)
    assert read_meta(out)["measure"] == NAME
    porder_cli(plugin, "reorder", "-m", "l1", "-p", "8", "synthetic:40", tmp_path / "l1.h5",
               "--no-progress", cwd=tmp_path)
    for split in ("train", "test"):
        got, want = read_split(out, split), read_split(tmp_path / "l1.h5", split)
        np.testing.assert_array_equal(got["perm"], want["perm"])
        np.testing.assert_array_equal(got["images"], want["images"])


def test_compare_takes_the_plugin_measure(plugin, tmp_path):
    # the smallest comparison of tests/experiment/test_experiment.py
    out = tmp_path / "cmp"
    porder_cli(plugin, "compare", "synthetic:40:2", "-o", out, "-m", NAME, "-p", "8",
               "--seeds", "1", "--arch", "vgg", "--width", "0.0625", "--steps", "4",
               "--eval-every", "2", "-b", "8", "--size", "16", "--device", "cpu", "-j", "1",
               "--no-progress", cwd=tmp_path, timeout=300)
    assert read_meta(out / "data" / f"{NAME}-p8.h5")["measure"] == NAME
    assert NAME in (out / "summary.md").read_text()
