"""click command `porder info`: what porder runs with on this machine.

Versions (read from the installed distributions' metadata: nothing is imported
for them), the CPU kernels' numba cache, the GPU as CuPy sees it (runtime,
driver, NVRTC, devices) and as torch sees it, the threads porder uses, and the
clash with Planet's unrelated ``porder`` distribution. Every probe is guarded: a
missing or broken package is reported as such, never raised.
"""
from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import click

from .._version import __version__
from ..messages import one_line
from .common import command, emit_json, json_option

DISTRIBUTION = "patch-order"  # porder's distribution; `porder` on the index is Planet's CLI
PLANET = "porder"
# name in the report -> distribution(s); CuPy ships one wheel per CUDA major version
PACKAGES = {"numpy": ("numpy",), "numba": ("numba",), "torch": ("torch",),
            "torchvision": ("torchvision",), "cupy": ("cupy", "cupy-cuda13x", "cupy-cuda12x",
                                                     "cupy-cuda11x"),
            "h5py": ("h5py",), "pillow": ("pillow",)}
GPU_EXTRA = 'pip install "patch-order[cuda13]" (or [cuda12] for CUDA 12)'
HERE = Path(__file__).resolve().parents[1]  # the porder package this command runs from


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # unreadable metadata: as good as absent here
        return None


def _installed(module: str) -> bool:
    """Whether ``module`` can be found (not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def versions(version: Optional[Callable[[str], Optional[str]]] = None) -> dict:
    """porder, Python and each package's version; None where it is not installed.
    CuPy's names its distribution: ``14.0.1 (cupy-cuda13x)``."""
    version = version or _version
    out = {"porder": __version__, "python": platform.python_version()}
    for name, dists in PACKAGES.items():
        found = [(d, v) for d in dists if (v := version(d)) is not None]
        out[name] = None if not found else (
            found[0][1] if len(dists) == 1 else f"{found[0][1]} ({found[0][0]})")
    return out


def cpu_kernels() -> dict:
    """Whether the CPU kernels are compiled and cached, and where (numba's index)."""
    try:
        from ..kernels import cpu

        state = cpu.cache_state()
    except Exception as e:  # numba missing or broken
        return {"cached": False, "folder": None, "index": None, "error": one_line(e)}
    return {"cached": state.cached, "folder": state.folder, "index": state.index,
            "error": state.error}


def _guarded(fn, *args):
    """(value, None) or (None, the error as one line)."""
    try:
        return fn(*args), None
    except Exception as e:
        return None, one_line(e)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def cupy_state(cupy_module: Optional[Callable] = None, installed: Optional[bool] = None) -> dict:
    """The GPU as CuPy sees it: ``state`` is 'ok', 'not installed', 'no gpu' or 'error'.

    ``cupy_module`` is :func:`porder.backend.cupy_module` (the module when CuPy sees a
    GPU, else None); ``installed`` whether CuPy is importable at all. Both are
    parameters for the tests.
    """
    if cupy_module is None:
        from ..backend import cupy_module
    if installed is None:
        installed = _installed("cupy")
    out = {"state": "not installed", "cuda_runtime": None, "cuda_driver": None, "nvrtc": None,
           "devices": [], "error": None}
    if not installed:
        return out
    cp, error = _guarded(cupy_module)
    if cp is None:
        loaded = sys.modules.get("cupy")  # imported by cupy_module, but no device
        if loaded is None:
            out.update(state="error", error=error or "import cupy fails (python -c "
                       "'import cupy' shows why)")
            return out
        count, error = _guarded(lambda: loaded.cuda.runtime.getDeviceCount())
        out.update(state="error" if error else "no gpu",
                   error=error or f"CuPy sees {count or 0} CUDA devices")
        return out
    rt = cp.cuda.runtime
    out["state"] = "ok"
    errors = []
    for key, probe in (("cuda_runtime", lambda: _cuda_version(rt.runtimeGetVersion())),
                       ("cuda_driver", lambda: _cuda_version(rt.driverGetVersion())),
                       ("nvrtc", lambda: ".".join(map(str, cp.cuda.nvrtc.getVersion())))):
        out[key], e = _guarded(probe)
        if e:
            errors.append(f"{key}: {e}")
    devices, e = _guarded(lambda: [_device(rt, i) for i in range(rt.getDeviceCount())])
    out["devices"] = devices or []
    if e:
        errors.append(f"devices: {e}")
    if errors:
        out["error"] = "; ".join(errors)
    return out


def _device(rt, i: int) -> dict:
    props = rt.getDeviceProperties(i)
    name = props.get("name", b"?")
    return {"id": i, "name": name.decode(errors="replace") if isinstance(name, bytes) else name,
            "memory_bytes": int(props.get("totalGlobalMem", 0)),
            "compute_capability": f"{props.get('major', '?')}.{props.get('minor', '?')}"}


def torch_state(resolve: Optional[Callable[[str], str]] = None,
                installed: Optional[bool] = None) -> dict:
    """The GPU as torch sees it (what ``train --device auto`` picks); ``cuda`` None when
    torch is not installed or fails to import (``error`` says why)."""
    if installed is None:
        installed = _installed("torch")
    if not installed:
        return {"cuda": None, "error": None}
    try:
        if resolve is None:
            from ..data import resolve_torch_device as resolve  # imports torch
        return {"cuda": resolve("auto") == "cuda", "error": None}
    except Exception as e:
        return {"cuda": None, "error": one_line(e)}


def threads() -> dict:
    """``workers``: the default of ``-j/--workers`` (the CPUs this process may run on)."""
    try:
        workers = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        workers = os.cpu_count() or 1
    return {"workers": workers, "cpu_count": os.cpu_count()}


def _owns(dist, folder: Path) -> bool:
    """Whether distribution ``dist`` installed ``porder/__init__.py`` into ``folder``."""
    for f in dist.files or ():
        if f.as_posix() == "porder/__init__.py":
            try:
                return Path(dist.locate_file(f)).resolve().parent == folder
            except OSError:
                return False
    return False


def _distribution(name: str):
    try:
        return metadata.distribution(name)
    except Exception:
        return None


def name_clash(distribution: Optional[Callable] = None, here: Path = HERE,
               which: Callable = shutil.which) -> dict:
    """Planet's ``porder`` distribution beside porder's ``patch-order``: both are imported
    as ``porder``. Says which one ``import porder`` resolves to, and which one the
    ``porder`` command on PATH runs."""
    distribution = distribution or _distribution
    ours, planet = distribution(DISTRIBUTION), distribution(PLANET)
    out = {"distribution": DISTRIBUTION, "installed": ours.version if ours else None,
           "planet_porder": planet.version if planet else None, "clash": planet is not None,
           "import_porder": str(here), "resolves_to": DISTRIBUTION, "shared_folder": False,
           "command": which("porder"), "command_is": None, "advice": None}
    if out["command"]:
        try:
            text = Path(out["command"]).read_text(errors="replace")[:4000]
            out["command_is"] = DISTRIBUTION if "porder.cli" in text else f"{PLANET} (Planet)"
        except OSError:
            pass
    if planet is None:
        return out
    # This command runs from the package `import porder` gives, so that is porder's;
    # Planet's files may share its folder (the same name in the same site-packages).
    out["shared_folder"] = _owns(planet, here)
    out["advice"] = (
        f"Planet's `porder` {planet.version} is installed too and is also imported as "
        f"`porder`" + (": its files share the folder of porder's package, so one overwrote "
                       "the other's. " if out["shared_folder"] else ". ")
        + f"Use separate virtual environments, or `pip uninstall {PLANET} {DISTRIBUTION}` "
          f"then `pip install {DISTRIBUTION}`.")
    return out


def collect() -> dict:
    """Everything `porder info` reports, as its --json prints it."""
    return {"versions": versions(), "cpu_kernels": cpu_kernels(),
            "gpu": {"cupy": cupy_state(), "torch": torch_state()}, "threads": threads(),
            "name_clash": name_clash()}


def describe(info: dict) -> str:
    """The report as text."""
    v, k, g, t, n = (info["versions"], info["cpu_kernels"], info["gpu"]["cupy"],
                     info["gpu"]["torch"], info["name_clash"])
    shown = lambda name: v[name] or "not installed"
    lines = [f"porder {v['porder']} ({n['distribution']}), Python {v['python']}, "
             f"from {n['import_porder']}",
             "versions:     " + ", ".join(f"{label} {shown(key)}" for key, label in (
                 ("numpy", "numpy"), ("numba", "numba"), ("torch", "torch"),
                 ("torchvision", "torchvision"), ("cupy", "CuPy"), ("h5py", "h5py"),
                 ("pillow", "Pillow")))]
    if k["error"]:
        lines.append(f"CPU kernels:  unknown ({k['error']})")
    elif k["cached"]:
        lines.append(f"CPU kernels:  compiled and cached in {k['folder']}")
    else:
        lines.append(f"CPU kernels:  not compiled yet: the first reorder compiles them (about "
                     f"30 s, once) and caches them in {k['folder']}")
    lines.append("GPU (CuPy):   " + _describe_cupy(g))
    lines.append("GPU (torch):  " + _describe_torch(t))
    th = info["threads"]
    lines.append(f"threads:      {th['workers']} (the default of -j/--workers; "
                 f"{th['cpu_count']} CPUs in the machine)")
    lines.append("name clash:   " + (n["advice"] if n["clash"] else
                                     f"none (Planet's `{PLANET}` distribution is not installed)"))
    if n["command"] and n["command_is"] and n["command_is"] != DISTRIBUTION:
        lines.append(f"              the `porder` command on PATH ({n['command']}) is "
                     f"{n['command_is']}'s; `python -m porder` runs porder's")
    return "\n".join(lines)


def _describe_torch(t: dict) -> str:
    if t["error"]:
        return f"error: {t['error']}"
    if t["cuda"] is None:
        return "torch not installed"
    return ("CUDA available: train --device auto uses it" if t["cuda"]
            else "no CUDA GPU: training runs on the CPU")


def _describe_cupy(g: dict) -> str:
    if g["state"] == "not installed":
        return f"not installed: porder computes on the CPU; for a GPU, {GPU_EXTRA}"
    if g["state"] != "ok":
        return f"{g['state']}: {g['error']}"
    gpus = "; ".join(f"GPU {d['id']}: {d['name']} ({d['memory_bytes'] / 2**30:.1f} GiB, "
                     f"compute {d['compute_capability']})" for d in g["devices"])
    nvrtc = f"NVRTC {g['nvrtc']}" if g["nvrtc"] else "NVRTC missing (the CUDA kernels need it)"
    text = (f"CUDA runtime {g['cuda_runtime']}, driver {g['cuda_driver']}, {nvrtc}; "
            f"{gpus or 'no devices'}")
    return text + (f" (errors: {g['error']})" if g["error"] else "")


@command()
@json_option
def info(as_json):
    """Show what porder runs with here: versions, the CPU kernels' cache, the GPU, threads.

    The first thing to run when porder is slow or does not use the GPU. It
    reports the versions of porder, Python, numpy, numba, torch, torchvision,
    CuPy, h5py and Pillow; whether the CPU kernels are compiled and cached (and
    where: numba's cache folder); the GPU as CuPy sees it (CUDA runtime and
    driver, NVRTC, each device's name and memory) and as torch sees it; the
    threads porder uses by default; and whether Planet's unrelated `porder`
    package is installed too (both are imported as `porder`).

    \b
    Examples:
      porder info
      porder info --json
    """
    report = collect()
    if as_json:
        emit_json(report)
        return
    click.echo(describe(report))
