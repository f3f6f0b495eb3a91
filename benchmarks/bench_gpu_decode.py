"""GPU JPEG decoding (``decoder='nvjpeg'``) against Pillow: img/s end to end and pixel differences.

Runs only on a GPU (CuPy, torchvision >= 0.19 and CUDA; exits 2 saying what is
missing otherwise). What it measures, on two folders of JPEGs it writes with
Pillow (quality 90) into a temporary folder:

* ``small``: ``--small`` (default 20,000) photo-like 32x32 JPEGs in 10 class
  folders (CIFAR-sized: no resize, no draft);
* ``photos``: ``--photos`` (default 1,000) photo-like JPEGs of about 500x375
  (one in ten portrait) in 2 class folders, resized to 32x32.

For each folder:

* end to end, ``build_cache(CacheSpec(folder, out, device='cuda', measure='mi',
  patch=8, batch_size=512))`` (listing, identity hashing, decoding, the CUDA kernels and
  HDF5 writes) with ``decoder`` threads, processes and nvjpeg: img/s and where
  the seconds went (``decode`` is the main thread waiting for batches), after
  one warm-up run of each on a few files (kernels compiled, nvJPEG started);
* pixels: nvjpeg's images against Pillow's path (``decoder='threads'``, with
  JPEG draft) and against a plain full Pillow decode with bicubic resize (no
  draft), max and mean absolute difference per value, with porder's draft
  emulation on and off; and, on 100 photos at full resolution (no resize),
  nvJPEG's decode against Pillow's (IDCT and chroma upsampling alone);
* how many files nvJPEG decoded, sent to Pillow, or refused.

Prints lines starting ``decode`` (the table) and the JSON last; ``--out DIR``
also writes ``DIR/bench_gpu_decode.json``. ``--budget`` seconds bound the run:
stages that would start after it are skipped and say so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._report import save  # noqa: E402

DECODERS = ("threads", "processes", "nvjpeg")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def gpu_or_exit() -> dict:
    """Versions of what the benchmark needs; exit 2 naming what is missing."""
    from porder.backend import cuda_available

    try:
        import torch
        import torchvision
    except ImportError as e:
        print(f"bench_gpu_decode: needs torch and torchvision ({e})", file=sys.stderr)
        sys.exit(2)
    if not cuda_available() or not torch.cuda.is_available():
        print("bench_gpu_decode: needs CuPy and torch with a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    import cupy

    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cupy": cupy.__version__,
            "host_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}


# --------------------------------------------------------------------------
# Data


def photo_like(rng, noise: np.ndarray, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: two gradients, a few flat shapes, an edge and noise (a crop of ``noise``)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    img = (rng.uniform(30, 220, 3) + rng.uniform(-80, 80, 3) * x[..., None]
           + rng.uniform(-80, 80, 3) * y[..., None]).astype(np.float32)
    for _ in range(rng.integers(2, 6)):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        img[y0:y0 + rng.integers(h // 8 + 1, h // 2 + 2), x0:x0 + rng.integers(w // 8 + 1, w // 2 + 2)] \
            += rng.uniform(-70, 70, 3)
    oy, ox = rng.integers(0, noise.shape[0] - h + 1), rng.integers(0, noise.shape[1] - w + 1)
    img += noise[oy:oy + h, ox:ox + w]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, n: int, classes: int, sizes, seed: int) -> Path:
    """``n`` JPEGs (quality 90) in ``classes`` class folders; ``sizes(i, rng)`` gives (w, h)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 10, (800, 800, 3)).astype(np.float32)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(n):
        w, h = sizes(i, rng)
        jobs.append((root / f"c{i % classes}" / f"{i:06d}.jpg", photo_like(rng, noise, w, h)))

    def save(job):
        path, a = job
        Image.fromarray(a).save(path, "JPEG", quality=90)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(save, jobs, chunksize=64))
    return root


def photo_size(i: int, rng) -> tuple[int, int]:
    w, h = int(rng.integers(440, 501)), int(rng.integers(330, 376))
    return (h, w) if i % 10 == 9 else (w, h)


def subset(folder: Path, dst: Path, k: int) -> Path:
    """A folder of links to the first ``k`` files of each class of ``folder``."""
    for c in sorted(p for p in folder.iterdir() if p.is_dir()):
        (dst / c.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(c.iterdir())[:k]:
            (dst / c.name / f.name).symlink_to(f)
    return dst


# --------------------------------------------------------------------------
# Measurements


def end_to_end(folder: Path, out: Path, decoder: str, workers) -> dict:
    from porder.pipeline import CacheSpec, build_cache

    t0 = time.perf_counter()
    r = build_cache(CacheSpec(str(folder), out, measure="mi", patch=8, batch_size=512,
                              device="cuda", decoder=decoder, test_fraction=0, overwrite=True,
                              workers=workers))
    dt = time.perf_counter() - t0
    rows = sum(r.rows.values())
    return {"images": rows, "img_per_s": round(rows / dt, 1),
            "seconds": {k: round(v, 3) for k, v in r.seconds.items()}}


def read_images(folder: Path, decoder: str, workers) -> tuple[np.ndarray, list, dict | None]:
    """Every image of ``folder`` as decoded by ``decoder`` (NumPy), its names, nvjpeg's counts."""
    import cupy

    from porder.sources import open_source

    with open_source(str(folder), test_fraction=0, decoder=decoder, workers=workers) as src:
        parts, names = [], []
        for b in src.iter_batches("train", 512):
            parts.append(cupy.asnumpy(b.images) if decoder == "nvjpeg" else b.images)
            names += b.names
        counts = dict(src._gpu.counts) if decoder == "nvjpeg" else None
    return np.concatenate(parts), names, counts


def pillow_full(path: Path, size: int = 32) -> np.ndarray:
    """A plain Pillow decode: full resolution (no draft), EXIF, RGB, bicubic to size."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im)


def diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 4),
            "share_equal": round(float((d == 0).mean()), 4)}


def pixel_report(folder: Path, workers) -> dict:
    import porder.sources.gpu_decode as gd

    nv, names, counts = read_images(folder, "nvjpeg", workers)
    pil, pil_names, _ = read_images(folder, "threads", workers)
    assert names == pil_names, "nvjpeg and Pillow gave other files or another order"
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        full = np.stack(list(pool.map(pillow_full, [folder / n for n in names], chunksize=32)))
    gd._EMULATE_DRAFT = False
    try:
        nv_nodraft = read_images(folder, "nvjpeg", workers)[0]
    finally:
        gd._EMULATE_DRAFT = True
    return {"files": len(names), "counts": counts,
            "nvjpeg_vs_pillow": diff(nv, pil),
            "nvjpeg_vs_pillow_no_draft": diff(nv, full),
            "pillow_vs_pillow_no_draft": diff(pil, full),
            "nvjpeg_no_draft_emulation_vs_pillow": diff(nv_nodraft, pil),
            "nvjpeg_no_draft_emulation_vs_pillow_no_draft": diff(nv_nodraft, full)}


def decode_only(folder: Path, k: int = 100) -> dict:
    """nvJPEG against Pillow at full resolution (no resize): IDCT and upsampling alone."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    files = sorted(folder.rglob("*.jpg"))[:k]
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    out = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
    d = [np.abs(t.permute(1, 2, 0).cpu().numpy().astype(np.int16)
                - np.asarray(Image.open(f).convert("RGB"), dtype=np.int16)).ravel()
         for t, f in zip(out, files)]
    d = np.concatenate(d)
    return {"files": len(files), "max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 4),
            "share_equal": round(float((d == 0).mean()), 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write bench_gpu_decode.json here")
    ap.add_argument("--small", type=int, default=20000, help="32x32 JPEGs")
    ap.add_argument("--photos", type=int, default=1000, help="~500x375 JPEGs")
    ap.add_argument("--workers", type=int, default=None, help="host decoding workers [all]")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds; later stages skip")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    report: dict = {"env": gpu_or_exit(), "args": {k: str(v) for k, v in vars(args).items()}}

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_decode_"))
    try:
        t0 = time.perf_counter()
        folders = {
            "small": write_folder(tmp / "small", args.small, 10, lambda i, rng: (32, 32), 1),
            "photos": write_folder(tmp / "photos", args.photos, 2, photo_size, 2),
        }
        report["generate_seconds"] = round(time.perf_counter() - t0, 2)
        log(f"wrote {args.small} + {args.photos} JPEGs in {report['generate_seconds']} s")
        warm = subset(folders["small"], tmp / "warm", 16)
        for d in DECODERS:  # kernels compiled and loaded, nvJPEG and worker processes started
            end_to_end(warm, tmp / "warm.h5", d, args.workers)
        for name, folder in folders.items():
            res: dict = {}
            for d in DECODERS:
                if left() < 5:
                    res[d] = "skipped: budget spent"
                    continue
                res[d] = end_to_end(folder, tmp / "out.h5", d, args.workers)
                log(f"{name} {d}: {res[d]}")
            report[name] = res
        for name, folder in folders.items():
            if left() < 5:
                report[f"pixels_{name}"] = "skipped: budget spent"
                continue
            report[f"pixels_{name}"] = pixel_report(folder, args.workers)
        report["decode_only_photos"] = (decode_only(folders["photos"]) if left() > 3
                                        else "skipped: budget spent")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)

    def rate(r):
        return f"{r['img_per_s']:>10.0f}" if isinstance(r, dict) else f"{'skipped':>10}"

    print(f"decode {'folder':<7} {'files':>6} " + " ".join(f"{d:>10}" for d in DECODERS)
          + "   img/s, build_cache --device cuda, mi p8")
    for name, n in (("small", args.small), ("photos", args.photos)):
        print(f"decode {name:<7} {n:>6} " + " ".join(rate(report[name][d]) for d in DECODERS))
    for name in folders:
        p = report[f"pixels_{name}"]
        if isinstance(p, dict):
            for key in ("nvjpeg_vs_pillow", "nvjpeg_vs_pillow_no_draft",
                        "nvjpeg_no_draft_emulation_vs_pillow"):
                print(f"decode pixels {name} {key}: max {p[key]['max_abs']} mean "
                      f"{p[key]['mean_abs']}")
            print(f"decode files {name}: {p['counts']}")
    if isinstance(report["decode_only_photos"], dict):
        q = report["decode_only_photos"]
        print(f"decode pixels photos full-resolution nvJPEG vs Pillow: max {q['max_abs']} "
              f"mean {q['mean_abs']}")
    print(json.dumps(report))
    save(report, args.out, "bench_gpu_decode.json")
    return report


if __name__ == "__main__":
    main()
