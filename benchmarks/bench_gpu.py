"""GPU throughput of porder's reorder paths: fused CUDA kernels, generic CuPy, and the host.

What it measures, on 50,000 synthetic photo-like 32x32x3 uint8 images already
on the GPU, for every measure at patches 4, 8 and 16 (images/second):

* ``kernels``: ``porder.reorder(x, device='cuda', backend='compiled')`` (the
  fused kernels of porder/kernels/cuda.py) on the whole batch: CUDA events,
  one warm-up (compilation excluded, reported apart), median of repeats;
* ``generic``: the generic CuPy path (``backend='generic'``) on a subset;
* ``cpu``: the compiled CPU backend (``porder.kernels.cpu``, all host cores) if
  it imports, on a subset; ``numpy``: the generic NumPy path on a smaller one;
* ``same``: whether the kernels' permutations equal the generic CuPy path's on
  that subset;
* end to end: ``python -m porder reorder --device cuda synthetic:50000 out.h5``,
  wall seconds (the CLI as it is: it picks its own backend);
* a roofline note for ``mi`` at patch 8: bytes in and out against a measured
  device-to-device copy, integer operations against the chip's INT32 rate.

Targets (issue 13, one H100): mi >= 200,000 img/s at patch 8 and >= 100,000 at
patch 4; every other pairwise measure within 2x of mi at the same patch.

``--large`` instead measures the kernels at native resolution (issue 21), where
they run in stream mode (cuda_geometry.py): cells 128 p16, 224 p16, 224 p32
and 256 p32 (``--cells``) for ``--large-measures`` (default mi, je, kl, l1,
ssim, entropy) on photo-like images on the GPU: kernels img/s (CUDA events,
batch sized to about a second), the layout (mode, threads, shared and global
bytes per block, grid), the generic CuPy path on a few images (the path these
cases took before: the cliff), and ``same``: the kernels' permutations against
the compiled CPU kernels (``--large-check`` images; the generic NumPy path when
numba is missing). It also times mi at 32 p4/p8/p16 in shared mode against
stream mode forced (``mode='stream'``), the data for choosing the mode by
geometry. Writes ``bench_gpu_large.json`` (and the same JSON on one line of stderr).

``--sanitize`` instead runs each kernel once on a few images with the error
flag checked and compares with NumPy (for compute-sanitizer); with
``--large``, the stream-mode cells instead (3 images each). Writes
``bench_gpu.json`` to ``--out`` (default ``$OUT``, else benchmarks/results) and
prints one table last. Every stage is bounded by ``--budget`` seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import porder  # noqa: E402
from porder.kernels import cuda as kc  # noqa: E402

MEASURES = ["mi", "je", "kl", "l1", "l2", "ssim", "entropy", "psnr"]
PATCHES = [4, 8, 16]
LARGE_CELLS = [(128, 16), (224, 16), (224, 32), (256, 32)]  # the cells
LARGE_MEASURES = ["mi", "je", "kl", "l1", "ssim", "entropy"]
TARGETS = {("mi", 8): 200_000, ("mi", 4): 100_000}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def photo_like(cp, n: int, seed: int = 0, size: int = 32):
    """(n, size, size, 3) uint8 on the GPU: gradients, an edge and noise (bench_core's recipe)."""
    rs = cp.random.RandomState(seed)
    y, x = cp.mgrid[0:size, 0:size] / float(size)
    base = rs.uniform(0, 255, (n, 1, 1, 3))
    ramp = (rs.uniform(-80, 80, (n, 1, 1, 3)) * x[None, ..., None]
            + rs.uniform(-80, 80, (n, 1, 1, 3)) * y[None, ..., None])
    edge = (x[None] > rs.uniform(0.2, 0.8, (n, 1, 1)))[..., None] * rs.uniform(-60, 60, (n, 1, 1, 3))
    img = base + ramp + edge + rs.normal(0, 12, (n, size, size, 3))
    return cp.clip(img, 0, 255).astype(cp.uint8)


def gpu_seconds(cp, fn, repeats: int) -> list[float]:
    """Seconds of fn() per repeat, timed with CUDA events after one warm-up."""
    fn()
    cp.cuda.Device().synchronize()
    out = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return out


def wall_seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def copy_bandwidth(cp) -> float:
    """Device-to-device copy, bytes read plus written per second (median of 5)."""
    a = cp.empty(2**30, dtype=cp.uint8)
    b = cp.empty_like(a)
    a.fill(1)
    t = statistics.median(gpu_seconds(cp, lambda: b.__setitem__(slice(None), a), 5))
    return 2 * a.nbytes / t


def sm_clock_mhz(cp, props: dict) -> tuple[float, str]:
    """The SM clock: from the runtime, else nvidia-smi's maximum, else an H100's boost."""
    rt = cp.cuda.runtime
    for how, get in (("props", lambda: props["clockRate"] / 1e3),
                     ("attribute", lambda: rt.deviceGetAttribute(rt.cudaDevAttrClockRate,
                                                                 cp.cuda.Device().id) / 1e3)):
        try:
            mhz = float(get())
            if mhz > 0:
                return mhz, how
        except Exception:  # CUDA 13 dropped clockRate from the properties
            pass
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
        return float(r.stdout.split()[0]), "nvidia-smi max"
    except Exception:
        return 1980.0, "assumed (H100 SXM boost)"


def device_info(cp) -> dict:
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props.get("name", "?")
    name = name.decode() if isinstance(name, bytes) else str(name)
    mhz, how = sm_clock_mhz(cp, props)
    info = {"name": name, "cc": f"{props.get('major')}.{props.get('minor')}",
            "sms": kc.device_limits().sm_count, "clock_mhz": mhz, "clock_from": how,
            "cupy": cp.__version__, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "limits": dataclasses.asdict(kc.device_limits())}
    try:
        import torch

        info["torch"] = torch.__version__
    except Exception as e:  # torch is optional here
        info["torch"] = f"unavailable ({type(e).__name__})"
    return info


def cpu_backend():
    try:
        from porder.kernels import cpu  # noqa: F401
    except Exception as e:  # not merged yet, or numba missing: report why
        return f"{type(e).__name__}: {e}"
    return None


def sanitize(cp, measures, patches) -> int:
    """Each kernel once on 12 images, error flag checked, perms against NumPy."""
    x = photo_like(cp, 12, seed=3)
    x[6:] = (x[6:] // 64) * 64  # tie-heavy half
    xh = cp.asnumpy(x)
    bad = 0
    for m in measures:
        for p in patches:
            out, perm = kc.reorder_batch(x, porder.get_measure(m), p, bins=256, reference=0,
                                         descending=porder.get_measure(m).descending,
                                         check=True)
            _, ref = porder.reorder(xh, m, p, backend="generic")
            same = bool(np.array_equal(cp.asnumpy(perm), ref))
            bad += not same
            print(f"sanitize {m} p{p}: {'ok' if same else 'PERMS DIFFER'}", flush=True)
    return bad


def compile_report(measures, patches) -> int:
    """Compile every kernel now: one line each (registers, spills), errors in full."""
    rows = kc.compile_kernels(measures, patches)
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']}: COMPILE ERROR\n{r['error']}\n")
        else:
            print(f"{r['kernel']:26} {r['measure']:8} p{r['patch']:<3} {r['seconds']:6.2f} s "
                  f"{r['registers']:4} regs {r['local_bytes']:4} B local {r['smem_bytes']:7} B "
                  f"smem {r['threads']:4} threads {r['blocks_per_sm']:3} blocks/SM")
    print(json.dumps(rows))
    return sum("error" in r for r in rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or
                                                    Path(__file__).parent / "results"))
    ap.add_argument("--n", type=int, default=50_000, help="images on the GPU")
    ap.add_argument("--measures", default=",".join(MEASURES))
    ap.add_argument("--patches", default=",".join(map(str, PATCHES)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--subset", type=int, default=4096, help="images for the generic CuPy path")
    ap.add_argument("--host-subset", type=int, default=2000, help="images for the CPU paths")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds for the whole run")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end CLI run")
    ap.add_argument("--sanitize", action="store_true", help="correctness pass only (see doc)")
    ap.add_argument("--compile", action="store_true", help="compile the kernels and report")
    ap.add_argument("--quick", action="store_true", help="5,000 images, 3 repeats")
    ap.add_argument("--large", action="store_true", help="native-resolution cells (see doc)")
    ap.add_argument("--cells", default=",".join(f"{s}p{p}" for s, p in LARGE_CELLS),
                    help="--large: SIZEpPATCH cells")
    ap.add_argument("--large-measures", default=",".join(LARGE_MEASURES))
    ap.add_argument("--large-check", type=int, default=48,
                    help="--large: images checked against the CPU kernels per cell")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    measures = args.measures.split(",")
    patches = [int(p) for p in args.patches.split(",")]
    import cupy as cp

    if args.large:
        cells = [tuple(int(v) for v in c.split("p")) for c in args.cells.split(",")]
        large_measures = args.large_measures.split(",")
        if args.sanitize:
            sys.exit(1 if sanitize_large(cp, large_measures, cells) else 0)
        return run_large(cp, args, large_measures, cells, t_start)
    if args.sanitize:
        sys.exit(1 if sanitize(cp, measures, patches) else 0)
    if args.compile:
        sys.exit(1 if compile_report(measures, patches) else 0)
    if args.quick:
        args.n, args.repeats = min(args.n, 5000), 3

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    res = {"n_images": args.n, "device": device_info(cp), "rows": [], "notes": []}
    args.out.mkdir(parents=True, exist_ok=True)
    # `timeout` sends SIGTERM: stop measuring, still write the JSON and the table
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        measure_all(cp, args, res, measures, patches, left)
    except Interrupted:
        res["notes"].append(f"interrupted (SIGTERM) after {time.perf_counter() - t_start:.0f} s")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        res["seconds"] = time.perf_counter() - t_start
        roofline(args, res)
        save(args.out, res)
        print_table(res)
    return res


class Interrupted(BaseException):  # not caught by the per-measurement `except Exception`
    pass


def _interrupt(signum, frame):
    raise Interrupted()


def save(out: Path, res: dict) -> None:
    (out / "bench_gpu.json").write_text(json.dumps(res, indent=1, default=str))


def measure_all(cp, args, res, measures, patches, left) -> None:
    log("device:", json.dumps(res["device"]))
    res["copy_bytes_per_s"] = copy_bandwidth(cp)
    x = photo_like(cp, args.n)
    sub = x[: min(args.subset, args.n)]
    hsub = cp.asnumpy(x[: min(args.host_subset, args.n)])
    cpu_missing = cpu_backend()
    if cpu_missing:
        res["notes"].append(f"compiled CPU backend not measured: {cpu_missing}")
    res["host_cores"] = os.cpu_count()
    try:
        res["kernels"] = kc.compile_kernels(measures, patches)
    except Exception as e:  # the table still says which rows failed
        res["kernels"] = [{"error": str(e)}]
    for m in measures:
        for p in patches:
            row = {"measure": m, "patch": p}
            res["rows"].append(row)
            if left() < 5:
                row["skipped"] = "time budget"
                continue
            measure_row(cp, args, row, x, sub, hsub, cpu_missing, left)
            save(args.out, res)
            log(f"{m} p{p}: kernels {row.get('kernels', 0):,.0f} img/s, generic "
                f"{row.get('generic', 0):,.0f}, cpu {row.get('cpu', 0):,.0f}, numpy "
                f"{row.get('numpy', 0):,.0f}, same {row.get('same')}")
    if not args.no_e2e and left() > 30:
        end_to_end(args, res, left)


def measure_row(cp, args, row, x, sub, hsub, cpu_missing, left) -> None:
    """One (measure, patch): kernels, generic CuPy (and the comparison), CPU, NumPy."""
    m, p = row["measure"], row["patch"]
    mm = porder.get_measure(m)
    g = kc.launch_geometry(m, 32, 3, p, limits=kc.device_limits())
    row.update(threads=g.threads, smem_bytes=g.smem_bytes, fused=g.supported)
    try:
        t0 = time.perf_counter()
        porder.reorder(x[:64], m, p, device="cuda", backend="compiled")
        cp.cuda.Device().synchronize()
        row["first_call_s"] = round(time.perf_counter() - t0, 3)  # compile or cache load
        # size the timed batch to the kernel's speed: about a second per repeat at most
        probe = x[:2000]
        t = statistics.median(gpu_seconds(cp, lambda: porder.reorder(
            probe, m, p, device="cuda", backend="compiled"), 1))
        n = int(min(args.n, max(len(probe), len(probe) / t)))
        xs = x[:n]
        ts = gpu_seconds(cp, lambda: porder.reorder(xs, m, p, device="cuda", backend="compiled"),
                         args.repeats)
        row.update(timed_images=n, kernels_s=statistics.median(ts),
                   kernels_spread=(max(ts) - min(ts)) / statistics.median(ts))
        row["kernels"] = n / row["kernels_s"]
        _, perm = kc.reorder_batch(sub, mm, p, bins=256, reference=0,
                                   descending=mm.descending, check=True)
    except Exception as e:
        row["kernels_error"] = f"{type(e).__name__}: {e}"[:2000]
        log(f"{m} p{p} kernels FAILED: {row['kernels_error']}")
        return
    if left() > 20:
        try:
            porder.reorder(sub[:64], m, p, device="cuda", backend="generic")  # warm-up
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            _, gperm = porder.reorder(sub, m, p, device="cuda", backend="generic")
            end.record()
            end.synchronize()
            row["generic"] = len(sub) / (cp.cuda.get_elapsed_time(start, end) / 1e3)
            diff = cp.nonzero((perm != gperm).any(axis=1))[0]
            row["same"] = int(diff.size) == 0
            row["compared"] = len(sub)
            if diff.size:
                i = int(diff[0])
                row["first_mismatch"] = {"image": i, "kernels": cp.asnumpy(perm[i]).tolist(),
                                         "generic": cp.asnumpy(gperm[i]).tolist()}
        except Exception as e:
            row["generic_error"] = f"{type(e).__name__}: {e}"[:500]
    if left() > 20 and not cpu_missing:
        try:
            porder.reorder(hsub[:16], m, p, backend="compiled")  # JIT warm-up
            row["cpu"] = len(hsub) / wall_seconds(
                lambda: porder.reorder(hsub, m, p, backend="compiled"))
        except Exception as e:
            row["cpu_error"] = f"{type(e).__name__}: {e}"[:500]
    if left() > 20:
        h = hsub[:500]
        row["numpy"] = len(h) / wall_seconds(lambda: porder.reorder(h, m, p, backend="generic"))


def run_large(cp, args, measures, cells, t_start) -> dict:
    """--large: the stream-mode cells, and shared vs forced stream mode at 32x32."""
    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    res = {"device": device_info(cp), "rows": [], "ab": [], "notes": []}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "bench_gpu_large.json"
    cpu_missing = cpu_backend()
    if cpu_missing:
        res["notes"].append(f"perms checked against the generic NumPy path: {cpu_missing}")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for size, p in cells:
            x = photo_like(cp, 512, seed=size + p, size=size)
            x[256:] = (x[256:] // 32) * 32  # a tie-heavier half
            for m in measures:
                row = {"measure": m, "size": size, "patch": p}
                res["rows"].append(row)
                if left() < 10:
                    row["skipped"] = "time budget"
                    continue
                large_row(cp, args, row, x, cpu_missing, left)
                out.write_text(json.dumps(res, indent=1, default=str))
                log(f"{m} {size} p{p} {row.get('mode')}: kernels {row.get('kernels', 0):,.1f} "
                    f"img/s, generic {row.get('generic', 0):,.1f}, same {row.get('same')}")
        # shared mode vs stream mode forced, mi at 32x32 (the mode choice by geometry)
        x = photo_like(cp, 20000)
        for p in PATCHES:
            if left() < 10:
                break
            ab = {"measure": "mi", "size": 32, "patch": p}
            for mode in ("shared", "stream"):
                g = kc.launch_geometry("mi", 32, 3, p, limits=kc.device_limits(), mode=mode)
                try:
                    ab[mode] = len(x) / statistics.median(gpu_seconds(
                        cp, lambda g=g: _launch(cp, x, g), 3))
                except Exception as e:
                    ab[mode + "_error"] = f"{type(e).__name__}: {e}"[:300]
            res["ab"].append(ab)
            log(f"mi 32 p{p}: shared {ab.get('shared', 0):,.0f} img/s, stream "
                f"{ab.get('stream', 0):,.0f}")
    except Interrupted:
        res["notes"].append(f"interrupted (SIGTERM) after {time.perf_counter() - t_start:.0f} s")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        res["seconds"] = time.perf_counter() - t_start
        out.write_text(json.dumps(res, indent=1, default=str))
        # the JSON in the log too (gpu_check.sh brings back a fixed set of files)
        log("bench_gpu_large.json: " + json.dumps(res, default=str))
        print_large(res)
    return res


def _launch(cp, x, g):
    """The fused kernel in geometry g's mode (launch() directly: reorder() picks the mode)."""
    out = cp.empty(x.shape, dtype=cp.uint8)
    perm = cp.empty((len(x), g.patches), dtype=cp.int64)
    kc.launch(x, g, out, perm)
    return out, perm


def large_row(cp, args, row, x, cpu_missing, left) -> None:
    """One (measure, size, patch) in the mode launch_geometry picks: layout, img/s, same."""
    m, size, p = row["measure"], row["size"], row["patch"]
    g = kc.launch_geometry(m, size, 3, p, limits=kc.device_limits())
    row.update(mode=g.mode, fused=g.supported, kernel=g.kernel, threads=g.threads,
               smem_bytes=g.smem_bytes, gmem_bytes=g.gmem_bytes, blocks_per_sm=g.blocks_per_sm,
               grid=g.grid(10**6), global_regions=sorted(g.global_regions))
    try:
        t0 = time.perf_counter()
        _, perm = kc.reorder_batch(x[: args.large_check], porder.get_measure(m), p, bins=256,
                                   reference=0, descending=porder.get_measure(m).descending,
                                   check=True)
        cp.cuda.Device().synchronize()
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        probe = x[:64]
        t = statistics.median(gpu_seconds(cp, lambda: _launch(cp, probe, g), 1))
        n = int(min(len(x), max(len(probe), len(probe) / max(t, 1e-9))))
        xs = x[:n]
        ts = gpu_seconds(cp, lambda: _launch(cp, xs, g), 3)
        row.update(timed_images=n, kernels_s=statistics.median(ts),
                   kernels=n / statistics.median(ts))
        if g.mode == "shared":  # it fits shared memory (at low occupancy?): stream mode too
            gs = kc.launch_geometry(m, size, 3, p, limits=kc.device_limits(), mode="stream")
            row["stream_forced"] = n / statistics.median(
                gpu_seconds(cp, lambda: _launch(cp, xs, gs), 3))
    except Exception as e:
        row["kernels_error"] = f"{type(e).__name__}: {e}"[:2000]
        log(f"{m} {size} p{p} kernels FAILED: {row['kernels_error']}")
        return
    host = cp.asnumpy(x[: args.large_check])
    if left() > 20:
        try:
            backend = "generic" if cpu_missing else "compiled"
            t0 = time.perf_counter()
            _, ref = porder.reorder(host, m, p, backend=backend)
            row["cpu" if backend == "compiled" else "numpy"] = len(host) / (time.perf_counter() - t0)
            got = cp.asnumpy(perm)
            bad = np.nonzero((got != ref).any(axis=1))[0]
            row.update(same=not bad.size, compared=len(host), checked_against=backend)
            if bad.size:
                i = int(bad[0])
                row["first_mismatch"] = {"image": i, "kernels": got[i].tolist(),
                                         "cpu": ref[i].tolist()}
        except Exception as e:
            row["check_error"] = f"{type(e).__name__}: {e}"[:500]
    if left() > 20:
        try:  # the generic CuPy path: what these cases ran on before (few images)
            xs = x[:8]
            porder.reorder(xs[:2], m, p, device="cuda", backend="generic")
            t = statistics.median(gpu_seconds(cp, lambda: porder.reorder(
                xs, m, p, device="cuda", backend="generic"), 1))
            row["generic"] = len(xs) / t
        except Exception as e:
            row["generic_error"] = f"{type(e).__name__}: {e}"[:300]


def sanitize_large(cp, measures, cells) -> int:
    """--large --sanitize: each stream-mode cell on 3 images, flag checked, vs NumPy."""
    bad = 0
    for size, p in cells:
        x = photo_like(cp, 3, seed=5, size=size)
        x[2] = (x[2] // 64) * 64
        xh = cp.asnumpy(x)
        for m in measures:
            _, perm = kc.reorder_batch(x, porder.get_measure(m), p, bins=256, reference=0,
                                       descending=porder.get_measure(m).descending, check=True)
            _, ref = porder.reorder(xh, m, p, backend="generic")
            same = bool(np.array_equal(cp.asnumpy(perm), ref))
            bad += not same
            print(f"sanitize {m} {size} p{p}: {'ok' if same else 'PERMS DIFFER'}", flush=True)
    return bad


def print_large(res: dict) -> None:
    d = res["device"]
    print(f"\n{d['name']} ({d['sms']} SMs): fused kernels at native resolution, img/s "
          f"(generic CuPy on 8 images; perms vs the CPU kernels)")
    print(f"{'measure':8} {'cell':>8} {'mode':>7} {'kernels':>10} {'generic':>9} {'CPU':>8} "
          f"{'x generic':>9} {'same':>5} {'smem':>7} {'gmem':>8} {'grid':>5}  note")
    for r in res["rows"]:
        k, gen = r.get("kernels"), r.get("generic")
        ratio = f"{k / gen:,.1f}x" if k and gen else "-"
        same = {True: "yes", False: "NO"}.get(r.get("same"), "-")
        note = r.get("skipped") or r.get("kernels_error", "")[:50] or r.get("check_error", "")[:50]
        if r.get("stream_forced"):
            note = note or f"stream mode forced: {_fmt1(r['stream_forced'])} img/s"
        print(f"{r['measure']:8} {str(r['size']) + ' p' + str(r['patch']):>8} "
              f"{r.get('mode', '-'):>7} {_fmt1(k):>10} {_fmt1(gen):>9} "
              f"{_fmt1(r.get('cpu', r.get('numpy'))):>8} {ratio:>9} {same:>5} "
              f"{r.get('smem_bytes', 0):>7} {r.get('gmem_bytes', 0):>8} {r.get('grid', 0):>5}  {note}")
    for ab in res["ab"]:
        s, t = ab.get("shared"), ab.get("stream")
        print(f"mi 32 p{ab['patch']}: shared mode {_fmt(s)} img/s, stream mode forced {_fmt(t)}"
              + (f" ({t / s:.2f}x)" if s and t else ""))
    for note in res["notes"]:
        print("note:", note)


def _fmt1(v) -> str:
    return f"{v:,.1f}" if isinstance(v, (int, float)) else "-"


def roofline(args, res) -> None:
    """mi at patch 8: bytes against the copy bandwidth, integer work against the INT32 rate."""
    mi8 = next((r for r in res["rows"] if r["measure"] == "mi" and r["patch"] == 8
                and "kernels_s" in r), None)
    if mi8:
        n, k, c, px = mi8["timed_images"], 16, 3, 64
        bytes_io = n * (32 * 32 * 3 * 2 + k * 8)
        # integer work: masks (C*n*K words x n/4 groups x ~8 ops) + chain (K(K-1)/2 pairs x C x n
        # pixels x ~8 ops: two loads, and, popcount, table load, add)
        ops = n * (c * px * k * (px // 4) * 8 + k * (k - 1) // 2 * c * px * 8)
        sms, mhz = res["device"]["sms"], res["device"]["clock_mhz"]
        int_rate = sms * 64 * mhz * 1e6  # INT32 lanes per SM per clock on sm_80/sm_90
        t = mi8["kernels_s"]
        res["roofline_mi_p8"] = {
            "seconds": t, "bytes": bytes_io, "achieved_bytes_per_s": bytes_io / t,
            "copy_bytes_per_s": res["copy_bytes_per_s"],
            "memory_floor_s": bytes_io / res["copy_bytes_per_s"],
            "int_ops_estimate": ops, "int_ops_per_s": ops / t, "int_peak_per_s": int_rate,
            "compute_floor_s": ops / int_rate,
        }


def end_to_end(args, res, left) -> None:
    """`porder reorder --device cuda synthetic:N out.h5` (the CLI as it is), wall seconds."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "porder", "reorder", "--measure", "mi", "--patch", "8",
               "--device", "cuda", "--no-progress", f"synthetic:{args.n}", str(Path(d) / "out.h5")]
        try:
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, left() - 5))
            res["e2e"] = {"cmd": " ".join(cmd[1:]), "seconds": time.perf_counter() - t0,
                          "rc": r.returncode, "stderr_tail": r.stderr[-800:]}
        except subprocess.TimeoutExpired:
            res["e2e"] = {"cmd": " ".join(cmd[1:]), "timeout_s": round(left(), 1)}


def _fmt(v) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "-"


def print_table(res: dict) -> None:
    d = res["device"]
    print(f"\n{d['name']} ({d['sms']} SMs), {res['n_images']:,} images 32x32x3 on the GPU; "
          f"img/s; generic/cpu/numpy on subsets; host cores {res.get('host_cores')}")
    mi = {r["patch"]: r.get("kernels") for r in res["rows"] if r["measure"] == "mi"}
    print(f"{'measure':8} {'patch':>5} {'kernels':>12} {'generic CuPy':>13} {'CPU compiled':>13} "
          f"{'NumPy':>9} {'x generic':>10} {'same':>5}  note")
    for r in res["rows"]:
        note = r.get("skipped") or r.get("kernels_error", "")[:60]
        target = TARGETS.get((r["measure"], r["patch"]))
        k = r.get("kernels")
        if target and k:
            note = note or f"target {target:,}: {'met' if k >= target else 'MISSED'}"
        elif k and mi.get(r["patch"]) and r["measure"] in kc.PAIRWISE:
            note = note or ("within 2x of mi" if k * 2 >= mi[r["patch"]] else "SLOWER than mi/2")
        ratio = "-"
        if k and r.get("generic"):
            ratio = f"{k / r['generic']:.1f}x" if k < 10 * r["generic"] else f"{k / r['generic']:,.0f}x"
        same = {True: "yes", False: "NO"}.get(r.get("same"), "-")
        print(f"{r['measure']:8} {r['patch']:>5} {_fmt(k):>12} {_fmt(r.get('generic')):>13} "
              f"{_fmt(r.get('cpu')):>13} {_fmt(r.get('numpy')):>9} {ratio:>10} {same:>5}  {note}")
    rf = res.get("roofline_mi_p8")
    if rf:
        print(f"mi p8 roofline: {rf['seconds'] * 1e3:.2f} ms; memory floor "
              f"{rf['memory_floor_s'] * 1e3:.3f} ms ({rf['achieved_bytes_per_s'] / 1e9:.0f} of "
              f"{rf['copy_bytes_per_s'] / 1e9:.0f} GB/s copy); compute floor "
              f"{rf['compute_floor_s'] * 1e3:.3f} ms ({rf['int_ops_per_s'] / 1e12:.2f} of "
              f"{rf['int_peak_per_s'] / 1e12:.1f} T int ops/s, estimated ops)")
    e2e = res.get("e2e")
    if e2e:
        print(f"end to end: {e2e['cmd']}: "
              + (f"{e2e['seconds']:.1f} s, rc {e2e['rc']}" if "seconds" in e2e
                 else f"timed out after {e2e['timeout_s']} s"))
    for note in res["notes"]:
        print("note:", note)


if __name__ == "__main__":
    main()
