"""What streaming the training data from the file costs and saves (`porder train`).

What it measures: for a file of N random S x S images (default 4,000 at 224, 600 MB of
pixels, plus 256 test images), the real `porder train` loop (resnet, ``--width 0.125``,
batch 32, one thread, the last evaluation on the whole test split) with the splits held
in memory and streamed from the file (:class:`porder.train.batches.Data`), each mode in
a process of its own, run back to back (peak RSS is a process's high-water mark):

* ``peak_rss_data_mb``: the process's peak resident memory (``resource.getrusage``) after
  making the :class:`Data` and preparing ``steps`` batches three times, before any model;
* ``peak_rss_mb``: the same at the end, after training (model, activations, evaluation);
* ``load_s``: seconds to make the :class:`Data` (reading the splits when held);
* ``images_per_s``, ``data_wait``: of the training steps after the first (the row that
  ``porder train`` writes; steps whose batches are read while the step before trains);
* ``batch_ms``: wall milliseconds of :func:`get_batch` alone (the file in the page cache:
  the second pass over the same batches), best of 3 passes over ``steps`` batches.

The pixels do not change the speed. The file is written once under ``--dir`` (default a
temporary folder) and reused when it is there. Prints JSON; ``--out DIR`` also writes
``DIR/train_streaming.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._report import report as write_report  # noqa: E402

MODES = ("held", "streamed")


def make_file(path: Path, n: int, size: int, classes: int = 10) -> Path:
    """A porder file of n random train images (and 256 test ones), written in batches of 256."""
    import numpy as np

    from porder.store import Writer

    rng = np.random.default_rng(0)
    w = Writer(path, meta={"measure": "none", "patch": 8, "bins": 256, "image_size": size,
                           "source": "bench"}, classes=[f"c{i}" for i in range(classes)],
               chunk=256)
    k = (size // 8) ** 2
    for split, m in (("train", n), ("test", 256)):
        for lo in range(0, m, 256):
            b = min(256, m - lo)
            w.append(split, rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
                     rng.integers(0, classes, b), np.tile(np.arange(k, dtype=np.uint16), (b, 1)),
                     [str(i) for i in range(lo, lo + b)], consumed=lo + b)
    return w.finish()


def child(path: str, mode: str, steps: int, batch: int) -> dict:
    """One mode in this process: load, time get_batch, train ``steps`` steps; peak RSS."""
    import torch

    from porder.train import TrainConfig, batches, get_batch, memory, train

    torch.set_num_threads(1)
    in_memory = mode == "held"
    # porder train decides by its budget; here the budget is set so that it picks `mode`.
    memory.DATA_SHARE = 1e9 if in_memory else 0.0
    cfg = TrainConfig(arch="resnet", width=0.125, batch_size=batch, steps=steps,
                      eval_every=steps, device="cpu", threads=1)
    t0 = time.perf_counter()
    data = batches.Data(path, device="cpu")
    load_s = time.perf_counter() - t0
    assert data.in_memory == {"train": in_memory, "test": in_memory}, data.in_memory
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for s in range(steps):
            get_batch(data, s, cfg)
        best = min(best, (time.perf_counter() - t0) / steps)
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data.close()
    del data
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = train(path, cfg, Path(d) / "run")
        run_s = time.perf_counter() - t0
    row = res.rows[-1]
    return {"mode": mode, "load_s": round(load_s, 2), "batch_ms": round(1e3 * best, 1),
            "images_per_s": round(row["images_per_s"], 1), "data_wait": round(row["data_wait"], 3),
            "train_run_s": round(run_s, 1), "peak_rss_data_mb": round(data_rss),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=None, help="where the file is kept")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.file, a.child, a.steps, a.batch)))
        return
    folder = a.dir or Path(tempfile.mkdtemp(prefix="porder-stream-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"random-{a.images}-{a.size}.h5"
    if not path.exists():
        make_file(path, a.images, a.size)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for mode in MODES:                  # back to back, each in a process of its own
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--file", str(path),
                              "--steps", str(a.steps), "--batch", str(a.batch)],
                             env=env, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    write_report({"file": {"train_images": a.images, "test_images": 256, "size": a.size,
                           "pixel_mb": round(a.images * a.size * a.size * 3 / 2**20)},
                  "arch": "resnet", "width": 0.125, "batch": a.batch, "steps": a.steps,
                  "threads": 1, "runs": runs}, a.out, "train_streaming.json")


if __name__ == "__main__":
    main()
