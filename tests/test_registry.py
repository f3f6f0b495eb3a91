"""The open measure registry: porder.Measure, porder.register_measure, entry points.

A measure registered from outside has no compiled kernel: porder.reorder runs
it on the generic path whichever backend is asked for, with the same
permutation rules, so a re-implementation of a built-in's formula orders
exactly as the built-in does.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

import porder
from porder import measures
from porder.backend import get_array_module
from porder.kernels import cpu

from .plugin_files import PYTHON, plugin_env, write_plugin


@pytest.fixture
def registry():
    """Whatever a test registers is gone afterwards (other tests list the built-ins)."""
    saved = dict(measures.MEASURES._entries)
    yield porder.register_measure
    measures.MEASURES._entries.clear()
    measures.MEASURES._entries.update(saved)


def mean_abs(a, b, *, bins=256):
    """porder's l1 formula in other code (no matrix, no kernel)."""
    xp = get_array_module(a)
    d = xp.abs(a.astype(xp.int32) - b.astype(xp.int32))  # (..., p, p, C)
    n = d.shape[-3] * d.shape[-2]
    s = d.reshape(d.shape[:-3] + (n, d.shape[-1])).sum(axis=-2)  # (..., C)
    return (s / n).mean(axis=-1)


def brightness(a, *, bins=256):
    """Mean intensity of a patch (standalone)."""
    return a.mean(axis=(-3, -2, -1))


def images(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = (rng.uniform(0, 255, (n, 1, 1, 3)) + rng.uniform(-80, 80, (n, 1, 1, 3)) * x[..., None]
           + rng.normal(0, 20, (n, size, size, 3)))
    img = np.clip(img, 0, 255).astype(np.uint8)
    img[0, :16] = 90  # constant patches: ties
    return img


def test_registered_measure_runs_on_the_generic_path(registry, monkeypatch):
    m = registry(porder.Measure("my-l1", "pairwise", False, "l1, written out", mean_abs))
    assert m.origin == "tests" and porder.MEASURES["my-l1"] is m and "my-l1" in porder.MEASURES
    x = images()
    # the numba backend does not implement it, so reorder never calls the kernels
    assert not cpu.supports(m, size=32, channels=3, patch=8, bins=256)

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran for a measure it does not implement")

    monkeypatch.setattr(cpu, "reorder_batch", no_kernel)
    for patch in (4, 8):
        compiled = porder.reorder(x, "my-l1", patch, backend="compiled")
        generic = porder.reorder(x, "my-l1", patch, backend="generic")
        builtin = porder.reorder(x, "l1", patch, backend="generic")
        for a, b in ((compiled, generic), (compiled, builtin)):
            np.testing.assert_array_equal(a[1], b[1])
            np.testing.assert_array_equal(a[0], b[0])
    # the generic matrix (fn on every pair) equals the built-in's own matrix
    pt = porder.split(x, 8)
    np.testing.assert_array_equal(porder.score_matrix("my-l1", pt), porder.score_matrix("l1", pt))
    np.testing.assert_array_equal(porder.measure("my-l1", pt[:, :1], pt),
                                  porder.measure("l1", pt[:, :1], pt))
    # options and the reference patch work as for any measure
    a = porder.reorder(x, "my-l1", 8, reference=5, descending=True)[1]
    b = porder.reorder(x, "l1", 8, reference=5, descending=True, backend="generic")[1]
    np.testing.assert_array_equal(a, b)


def test_registered_standalone_measure(registry):
    registry(porder.Measure("brightness", "standalone", True, "mean intensity", brightness))
    x = images()
    out, perm = porder.reorder(x, "brightness", 8)
    np.testing.assert_array_equal(perm, porder.reorder(x, "brightness", 8, backend="generic")[1])
    means = brightness(porder.split(x, 8))  # (N, K)
    sorted_means = np.take_along_axis(means, perm, axis=1)
    assert (np.diff(sorted_means, axis=1) <= 1e-9).all()  # highest first
    np.testing.assert_array_equal(porder.restore_images(out, perm, 8), x)


def test_copy_of_a_builtin_formula_uses_its_kernel(registry):
    # the same fn and matrix as l1 under another name: the l1 kernel computes it
    builtin = porder.MEASURES["l1"]
    m = registry(porder.Measure("l1-again", "pairwise", False, "l1 again", builtin.fn,
                                builtin.matrix))
    assert measures.as_builtin(m) is builtin
    assert cpu.supports(m, size=32, channels=3, patch=8, bins=256)
    x = images()
    np.testing.assert_array_equal(porder.reorder(x, "l1-again", 8)[1],
                                  porder.reorder(x, "l1", 8, backend="generic")[1])


def test_a_name_is_registered_once(registry):
    registry(porder.Measure("my-l1", "pairwise", False, "l1, written out", mean_abs))
    for name in ("my-l1", "mi", "none"):
        with pytest.raises(ValueError, match=f"measure '{name}' is already registered") as e:
            registry(porder.Measure(name, "pairwise", False, "again", mean_abs))
        assert "\n" not in str(e.value) and "replace=True" in str(e.value)
    again = registry(porder.Measure("my-l1", "pairwise", True, "replaced", mean_abs),
                     replace=True)
    assert porder.get_measure("my-l1") is again and again.descending


@pytest.mark.parametrize("change,match", [
    (dict(name="My L1"), "name 'My L1' is not valid"),
    (dict(name="fm:x"), "is not valid"),
    (dict(name="a,b"), "is not valid"),
    (dict(name=""), "is not valid"),
    (dict(name="x" * 33), "is not valid"),
    (dict(kind="control"), "kind must be 'standalone' or 'pairwise', got 'control'"),
    (dict(kind="pair"), "kind must be"),
    (dict(fn=None), "fn must be callable"),
    (dict(fn="mean_abs"), "fn must be callable"),
    (dict(descending=1), "descending must be True or False"),
    (dict(summary=""), "summary must be one non-empty line"),
    (dict(summary="two\nlines"), "summary must be one non-empty line"),
    (dict(matrix=42), "matrix must be None"),
    (dict(kind="standalone", matrix=lambda p, b: p), "matrix must be None"),
    (dict(binned="yes"), "binned must be True or False"),
    (dict(origin=""), "origin must be"),
])
def test_bad_measures_are_refused_in_one_line(registry, change, match):
    import dataclasses

    m = dataclasses.replace(
        porder.Measure("ok", "pairwise", False, "fine", mean_abs), **change)
    with pytest.raises(ValueError, match=match) as e:
        registry(m)
    assert "\n" not in str(e.value)
    assert set(porder.MEASURES) >= {"mi"} and "ok" not in porder.MEASURES


def test_register_takes_a_measure(registry):
    with pytest.raises(ValueError, match="takes a porder.Measure, got dict"):
        registry({"name": "x"})


def test_a_plugin_returning_the_wrong_shape_is_named(registry):
    registry(porder.Measure("flat", "pairwise", False, "wrong shape",
                            lambda a, b, *, bins=256: np.zeros(3)))
    with pytest.raises(ValueError, match=r"measure 'flat' \(tests\) returned values of shape"):
        porder.reorder(images(1), "flat", 8)


def test_resolve_options_validates_once():
    from porder.reorder import resolve_options

    o = resolve_options("kl", 8, 32, bins=16, reference=3)
    assert (o.measure, o.patch, o.size, o.bins, o.reference, o.descending) == (
        porder.MEASURES["kl"], 8, 32, 16, 3, False)
    assert (o.grid, o.patches) == (4, 16)
    assert resolve_options("kl", 8, 32, descending=True).descending is True
    for kw, match in [(dict(measure="nope"), "unknown measure 'nope'"),
                      (dict(patch=5), "patch size 5 does not divide the image size 32"),
                      (dict(size=0), "size must be at least 1"),
                      (dict(bins=0), "bins must be an integer from 1 to 256"),
                      (dict(reference=16), "reference patch 16 is out of range 0..15 for patch 8 "
                                           "on 32x32 images")]:
        args = {"measure": "mi", "patch": 8, "size": 32, **kw}
        with pytest.raises(ValueError, match=match):
            resolve_options(args.pop("measure"), args.pop("patch"), args.pop("size"), **args)


def test_plugins_load_from_entry_points_and_a_broken_one_warns_on_one_line(tmp_path):
    folder = write_plugin(tmp_path / "site", {
        "demo-l1": "plugin_mod:DEMO",
        "missing": "plugin_missing:X",
        "number": "plugin_mod:NOT_A_MEASURE",
        "mi-again": "plugin_mod:SAME_NAME_AS_MI",
    })
    code = ("import porder\n"
            "m = porder.get_measure('demo-l1')\n"  # an unknown name loads the plugins
            "print(m.origin, len(porder.MEASURES), porder.get_measure('mi').origin)\n")
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True,
                         env=plugin_env(folder), timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["porder-plugin-demo", "11", "porder"]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 3, res.stderr
    for line, ep, why in zip(lines, ("missing = plugin_missing:X",
                                     "number = plugin_mod:NOT_A_MEASURE",
                                     "mi-again = plugin_mod:SAME_NAME_AS_MI"),
                             ("No module named 'plugin_missing'", "of type int, not porder.Measure",
                              "measure 'mi' is already registered")):
        assert "PluginWarning" in line and f"'{ep}'" in line and "porder-plugin-demo" in line
        assert why in line, line


def test_plugins_load_lazily_and_once(tmp_path):
    folder = write_plugin(tmp_path / "site")
    code = ("import sys, porder\n"
            "from porder import measures\n"
            "porder.reorder  # importing and resolving built-ins loads nothing\n"
            "porder.get_measure('mi')\n"
            "print('plugin_mod' in sys.modules, measures._plugins)\n"
            "names = list(porder.MEASURES)\n"
            "print('plugin_mod' in sys.modules, names[-1], measures._plugins)\n")
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True,
                         env=plugin_env(folder), timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["False new", "True demo-l1 done"]


def test_patch_reorder_takes_a_registered_measure(registry):
    torch = pytest.importorskip("torch")
    from porder.nn import PatchReorder

    registry(porder.Measure("my-l1", "pairwise", False, "l1, written out", mean_abs))
    x = images(3, size=16)  # (N, S, S, C) uint8: full-range maps quantise to themselves
    x[:, 0, 0] = 0
    x[:, 0, 1] = 255
    layer = PatchReorder("my-l1", 4, channels="all")
    layer(torch.from_numpy(x).permute(0, 3, 1, 2).to(torch.float32))
    np.testing.assert_array_equal(layer.last_perm.numpy(), porder.reorder(x, "l1", 4)[1])
