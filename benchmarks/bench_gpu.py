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

``--sanitize`` instead runs each kernel once on a few images with the error
flag checked and compares with NumPy (for compute-sanitizer). Writes
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
TARGETS = {("mi", 8): 200_000, ("mi", 4): 100_000}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def photo_like(cp, n: int, seed: int = 0):
    """(n, 32, 32, 3) uint8 on the GPU: gradients, an edge and noise (bench_core's recipe)."""
    rs = cp.random.RandomState(seed)
    y, x = cp.mgrid[0:32, 0:32] / 32.0
    base = rs.uniform(0, 255, (n, 1, 1, 3))
    ramp = (rs.uniform(-80, 80, (n, 1, 1, 3)) * x[None, ..., None]
            + rs.uniform(-80, 80, (n, 1, 1, 3)) * y[None, ..., None])
    edge = (x[None] > rs.uniform(0.2, 0.8, (n, 1, 1)))[..., None] * rs.uniform(-60, 60, (n, 1, 1, 3))
    img = base + ramp + edge + rs.normal(0, 12, (n, 32, 32, 3))
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
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    measures = args.measures.split(",")
    patches = [int(p) for p in args.patches.split(",")]
    import cupy as cp

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
