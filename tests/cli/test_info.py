"""`porder info`: versions, the CPU kernels' cache, the GPU (CuPy and torch), threads and the
Planet `porder` name clash, each probe guarded (missing and broken packages are mocked)."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

from click.testing import CliRunner

from porder._version import __version__
from porder.cli import info as info_mod
from porder.cli import main


def info_json(**env) -> dict:
    res = CliRunner().invoke(main, ["info", "--json"], env=env or None)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_info_json_reports_this_machine():
    report = info_json()
    v = report["versions"]
    assert v["porder"] == __version__ and v["python"] == platform.python_version()
    assert set(v) == {"porder", "python", "numpy", "numba", "torch", "torchvision", "cupy",
                      "h5py", "pillow"}
    import numpy

    assert v["numpy"] == numpy.__version__
    # the session fixture (tests/conftest.py) compiled the kernels into numba's cache
    k = report["cpu_kernels"]
    assert k["cached"] is True and k["error"] is None
    assert Path(k["index"]).is_file() and Path(k["index"]).parent == Path(k["folder"])
    assert report["threads"]["workers"] >= 1 and report["threads"]["cpu_count"] >= 1
    clash = report["name_clash"]
    assert clash["distribution"] == "patch-order"
    assert Path(clash["import_porder"]) == Path(info_mod.__file__).resolve().parents[1]
    assert set(report["gpu"]) == {"cupy", "torch"}
    assert report["gpu"]["cupy"]["state"] in ("ok", "not installed", "no gpu", "error")


def test_info_text_says_not_installed(monkeypatch):
    real = info_mod._version
    monkeypatch.setattr(info_mod, "_version",
                        lambda d: None if d in ("torchvision", "h5py") else real(d))
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0, res.output
    assert "torchvision not installed" in res.output and "h5py not installed" in res.output
    assert f"porder {__version__}" in res.output and "CPU kernels:  compiled and cached in" \
        in res.output


def test_versions_name_cupys_distribution_and_none_when_absent():
    table = {"numpy": "2.0", "cupy-cuda12x": "13.3.0", "pillow": "11.0"}
    v = info_mod.versions(table.get)
    assert v["numpy"] == "2.0" and v["cupy"] == "13.3.0 (cupy-cuda12x)" and v["pillow"] == "11.0"
    assert v["torch"] is None and v["torchvision"] is None and v["h5py"] is None


def fake_cupy(*, nvrtc=(13, 0), devices=1, driver=13000, fail=None):
    def maybe(name, value):
        def call(*args):
            if fail == name:
                raise RuntimeError(f"{name} broke")
            return value(*args) if callable(value) else value
        return call

    runtime = SimpleNamespace(
        runtimeGetVersion=maybe("runtime", 13000), driverGetVersion=maybe("driver", driver),
        getDeviceCount=maybe("count", devices),
        getDeviceProperties=maybe("props", lambda i: {"name": b"NVIDIA H100 80GB HBM3",
                                                      "totalGlobalMem": 85_000_000_000,
                                                      "major": 9, "minor": 0}))
    return SimpleNamespace(cuda=SimpleNamespace(runtime=runtime,
                                                nvrtc=SimpleNamespace(getVersion=maybe(
                                                    "nvrtc", nvrtc))))


def test_cupy_present_reports_runtime_driver_nvrtc_and_devices():
    cp = fake_cupy(devices=2)
    g = info_mod.cupy_state(lambda: cp, installed=True)
    assert g["state"] == "ok" and g["error"] is None
    assert (g["cuda_runtime"], g["cuda_driver"], g["nvrtc"]) == ("13.0", "13.0", "13.0")
    assert [d["id"] for d in g["devices"]] == [0, 1]
    assert g["devices"][0] == {"id": 0, "name": "NVIDIA H100 80GB HBM3",
                               "memory_bytes": 85_000_000_000, "compute_capability": "9.0"}
    assert "GPU 0: NVIDIA H100 80GB HBM3 (79.2 GiB" in info_mod._describe_cupy(g)


def test_cupy_without_nvrtc_is_reported_not_raised():
    g = info_mod.cupy_state(lambda: fake_cupy(fail="nvrtc"), installed=True)
    assert g["state"] == "ok" and g["nvrtc"] is None
    assert "nvrtc" in g["error"] and "nvrtc broke" in g["error"]
    assert g["cuda_runtime"] == "13.0" and len(g["devices"]) == 1
    assert "NVRTC missing" in info_mod._describe_cupy(g)


def test_cupy_absent_or_broken(monkeypatch):
    assert info_mod.cupy_state(lambda: None, installed=False)["state"] == "not installed"
    # installed, but `import cupy` fails: cupy_module gives None and no module is loaded
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    g = info_mod.cupy_state(lambda: None, installed=True)
    assert g["state"] == "error" and "import cupy" in g["error"]
    # imported, but the driver is missing
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(fail="count"))
    g = info_mod.cupy_state(lambda: None, installed=True)
    assert g["state"] == "error" and "count broke" in g["error"]
    # imported, no device
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(devices=0))
    g = info_mod.cupy_state(lambda: None, installed=True)
    assert g["state"] == "no gpu" and "0 CUDA devices" in g["error"]
    # a probe that raises is an error string too

    def boom():
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.delitem(sys.modules, "cupy")
    g = info_mod.cupy_state(boom, installed=True)
    assert g["state"] == "error" and "insufficient" in g["error"]


def test_torch_absent_broken_or_present():
    assert info_mod.torch_state(installed=False) == {"cuda": None, "error": None}
    assert info_mod.torch_state(lambda d: "cuda", installed=True) == {"cuda": True,
                                                                      "error": None}

    def broken(device):
        raise OSError("libtorch_cpu.so: cannot open shared object file")

    t = info_mod.torch_state(broken, installed=True)
    assert t["cuda"] is None and "libtorch_cpu.so" in t["error"]
    assert info_mod._describe_torch(t).startswith("error: ")


def test_info_survives_a_broken_torch_and_cupy(monkeypatch):
    import porder.backend

    def boom():
        raise RuntimeError("cupy exploded")

    monkeypatch.setattr(info_mod, "_installed", lambda name: True)
    monkeypatch.setattr(porder.backend, "cupy_module", boom)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setitem(sys.modules, "porder.data", None)  # `from ..data import` fails
    report = info_json()
    assert report["gpu"]["cupy"]["state"] == "error"
    assert "cupy exploded" in report["gpu"]["cupy"]["error"]
    assert report["gpu"]["torch"]["cuda"] is None and report["gpu"]["torch"]["error"]
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0 and "GPU (CuPy):   error: " in res.output


def test_info_survives_a_broken_numba(monkeypatch):
    from porder.kernels import cpu

    def broken():
        raise ImportError("numba needs NumPy 2.3 or less")

    monkeypatch.setattr(cpu, "cache_state", broken)
    k = info_mod.cpu_kernels()
    assert k["cached"] is False and k["error"]


class FakeDist:
    def __init__(self, version, root: Path, files=("porder/__init__.py",)):
        self.version, self.root = version, root
        self.files = [PurePosixPath(f) for f in files]

    def locate_file(self, f):
        return self.root / f


def test_name_clash_absent_beside_or_sharing_the_folder(tmp_path):
    here = tmp_path / "site" / "porder"
    here.mkdir(parents=True)
    (here / "__init__.py").write_text("")
    ours = FakeDist("1.0.0", tmp_path / "site")
    script = tmp_path / "bin" / "porder"
    script.parent.mkdir()
    script.write_text("from porder.cli import main\nmain()\n")
    dists = {"patch-order": ours}
    which = lambda name: str(script)
    c = info_mod.name_clash(dists.get, here, which)
    assert c["clash"] is False and c["planet_porder"] is None and c["advice"] is None
    assert c["installed"] == "1.0.0" and c["command_is"] == "patch-order"

    # Planet's porder in another environment folder: a clash, files apart
    other = tmp_path / "other"
    (other / "porder").mkdir(parents=True)
    dists["porder"] = FakeDist("0.9.2", other)
    c = info_mod.name_clash(dists.get, here, which)
    assert c["clash"] is True and c["planet_porder"] == "0.9.2" and not c["shared_folder"]
    assert "Planet's `porder` 0.9.2 is installed too" in c["advice"]
    assert "pip uninstall porder patch-order" in c["advice"]
    assert c["import_porder"] == str(here) and c["resolves_to"] == "patch-order"

    # both installed into the same folder; the `porder` command is Planet's
    dists["porder"] = FakeDist("0.9.2", tmp_path / "site")
    script.write_text("from porder.porder import main\nmain()\n")
    c = info_mod.name_clash(dists.get, here, which)
    assert c["shared_folder"] is True and "one overwrote the other's" in c["advice"]
    assert c["command_is"] == "porder (Planet)"
    text = info_mod.describe({**info_json(), "name_clash": c})
    assert "Planet's `porder` 0.9.2 is installed too" in text
    assert "`python -m porder` runs porder's" in text


def test_threads_are_the_default_workers():
    t = info_mod.threads()
    if hasattr(os, "sched_getaffinity"):
        assert t["workers"] == len(os.sched_getaffinity(0))
    from porder.kernels import cpu

    assert t["workers"] == cpu.cores()
