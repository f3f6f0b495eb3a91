"""A measure plugin as an installed package ships it, written into a folder for PYTHONPATH.

``plugin_mod.py`` plus ``porder_plugin_demo-0.1.dist-info`` (METADATA and
entry_points.txt): importlib.metadata finds the distribution on ``sys.path``
exactly as it finds one that pip installed. Used by tests/test_registry.py and
tests/cli/test_plugin_cli.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "demo-l1"
DIST = "porder-plugin-demo"

PLUGIN_MOD = '''"""A porder measure plugin: l1 written out again, with no matrix of its own."""
import porder
from porder.backend import get_array_module


def mean_abs(a, b, *, bins=256):
    """Mean absolute difference per channel, averaged: porder's l1, in other code."""
    xp = get_array_module(a)
    d = xp.abs(a.astype(xp.int32) - b.astype(xp.int32))  # (..., p, p, C)
    n = d.shape[-3] * d.shape[-2]
    s = d.reshape(d.shape[:-3] + (n, d.shape[-1])).sum(axis=-2)  # (..., C) exact sums
    return (s / n).mean(axis=-1)


DEMO = porder.Measure("demo-l1", "pairwise", False,
                      "mean absolute pixel difference, from a plugin", mean_abs)
NOT_A_MEASURE = 42
SAME_NAME_AS_MI = porder.Measure("mi", "pairwise", True, "not porder's mi", mean_abs)
'''


def write_plugin(folder: Path, entry_points: dict[str, str] | None = None,
                 dist: str = DIST) -> Path:
    """Write plugin_mod.py and a dist-info declaring ``entry_points`` (name -> object).

    Default: the one good entry point, ``demo-l1 = plugin_mod:DEMO``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plugin_mod.py").write_text(PLUGIN_MOD)
    info = folder / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = entry_points or {NAME: "plugin_mod:DEMO"}
    (info / "entry_points.txt").write_text(
        "[porder.measures]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return folder


def plugin_env(folder: Path) -> dict:
    """The environment of a subprocess that sees the plugin and this checkout's porder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO)]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    return env


PYTHON = sys.executable
