"""The wheel built from this checkout installs as users install it and runs from elsewhere.

The wheel is built from a copy of the package's files (``python -m build --wheel
--no-isolation``: no network, and nothing is written into the checkout), installed
non-editable into a folder of its own (``pip install --no-deps --no-index --target``),
and run as ``python -m porder reorder -m mi -p 8 synthetic:50 out.h5`` from another
folder with only that folder on ``PYTHONPATH``; ``porder.__file__`` must lie in it.
The wheel must hold every module, the CUDA sources and the digits data.

So that the test takes seconds, not the minute the first compile of the CPU kernels
takes on a small machine, numba's cache of this checkout's kernels (filled by the session
fixture ``compiled_cpu_kernels``) is copied beside the installed kernels, whose source is
byte-identical, with the source's modification time (numba's cache key). The compile
itself is tested by tests/test_kernels_cpu.py; without a cache to copy the run compiles.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import pytest

from porder.pipeline import CacheSpec, build_cache
from tests.conftest import REPO
from tests.scale.shards import assert_same_file

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None or not (REPO / "pyproject.toml").is_file(),
    reason="needs the `build` package ([dev]) and the repository's pyproject.toml")

COMMAND = ["reorder", "-m", "mi", "-p", "8", "synthetic:50", "out.h5"]


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the package's own files (the checkout is left untouched)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "porder", src / "porder",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
    res = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                          "--outdir", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("*.whl")
    return wheel


def check_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "porder").rglob("*.py")}
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    cuda = {p.relative_to(REPO).as_posix() for p in (REPO / "porder/kernels/cuda").iterdir()
            if p.suffix in (".cu", ".cuh")}
    assert cuda and not cuda - names, f"CUDA sources missing: {sorted(cuda - names)}"
    assert {"porder/sources/data/digits.npz", "porder/sources/data/DIGITS-NOTICE.txt"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    hard = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("scikit-learn", "scipy", "pyarrow")) for r in hard), hard
    assert any(r.startswith("pyarrow") and 'extra == "parquet"' in r for r in requires)


def install(wheel: Path, target: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                          "--no-compile", "--disable-pip-version-check", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def seed_kernel_cache(target: Path) -> None:
    """Copy this checkout's numba cache of the CPU kernels beside the installed ones."""
    ours = REPO / "porder" / "kernels"
    theirs = target / "porder" / "kernels"
    assert (ours / "_cpu_kernels.py").read_bytes() == (theirs / "_cpu_kernels.py").read_bytes()
    cached = list((ours / "__pycache__").glob("_cpu_kernels.*.nb[ic]"))
    if not cached:
        return  # the run compiles
    (theirs / "__pycache__").mkdir(exist_ok=True)
    for f in cached:
        shutil.copy2(f, theirs / "__pycache__" / f.name)
    st = (ours / "_cpu_kernels.py").stat()
    os.utime(theirs / "_cpu_kernels.py", ns=(st.st_atime_ns, st.st_mtime_ns))


def test_the_wheel_installs_and_reorders_from_another_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    check_contents(wheel)
    site = tmp_path / "site"
    install(wheel, site)
    seed_kernel_cache(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PORDER"))}
    env["PYTHONPATH"] = str(site)
    env["PYTHONNOUSERSITE"] = "1"

    probe = subprocess.run(
        [sys.executable, "-c", "import porder, sys; from porder.sources import open_source; "
         "print(porder.__file__); print(open_source('digits', test_fraction=0).count('train'))"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    where, digits = probe.stdout.split()
    assert Path(where).resolve().is_relative_to(site.resolve()), where
    assert digits == "1797"  # the digits data came with the wheel

    res = subprocess.run([sys.executable, "-m", "porder", *COMMAND, "--no-progress"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Wrote out.h5: train 45, test 5 images" in res.stdout + res.stderr
    out = elsewhere / "out.h5"
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] and f["train/images"].shape == (45, 32, 32, 3)
    # the same file as this checkout writes
    reference = build_cache(CacheSpec("synthetic:50", tmp_path / "ref.h5", measure="mi",
                                      patch=8)).path
    assert_same_file(reference, out)
