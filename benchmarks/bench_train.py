"""Training throughput of the three CNNs through the real `porder train` loop.

What it measures: images/second of training (forward, backward, Adam step,
batch preparation; evaluation excluded) and the share of step time spent
waiting for the next batch (``data_wait``, target < 2%), per architecture,
width and batch size, on this machine's CPU (all cores) and, when torch sees
one, on a CUDA GPU (data on the GPU, bfloat16/float16 autocast, channels-last).
The first ``warm`` steps (oneDNN/cuDNN kernel selection) are not counted.
One CPU row also reorders every batch on the fly (``--reorder mi --patch 8``)
to show what that costs in data wait.

The data are 2,048 random 32x32 images of 10 classes in a porder file (the
speed of a step does not depend on the pixels).

Prints JSON; ``--out DIR`` also writes ``DIR/train.json``. ``--quick``: one
width and fewer steps.

The paper's comparison on real photographs is a separate script:
``python benchmarks/compare_dogs_vs_cats.py`` (see its docstring).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._report import report as write_report  # noqa: E402
from benchmarks._report import save  # noqa: E402


def make_file(path: Path, n: int = 2048, size: int = 32, classes: int = 10) -> Path:
    import numpy as np

    from porder.store import Writer

    rng = np.random.default_rng(0)
    w = Writer(path, meta={"measure": "none", "patch": 8, "bins": 256, "image_size": size,
                           "source": "bench"}, classes=[f"c{i}" for i in range(classes)])
    k = (size // 8) ** 2
    for split, m in (("train", n), ("test", 256)):
        w.append(split, rng.integers(0, 256, (m, size, size, 3), dtype=np.uint8),
                 rng.integers(0, classes, m), np.tile(np.arange(k, dtype=np.uint16), (m, 1)),
                 [str(i) for i in range(m)], consumed=m)
    return w.finish()


def measure(path, *, arch, width, batch, device, warm, steps, reorder=None) -> dict:
    """Train warm + steps steps; the rate and data wait of the last ``steps``."""
    from porder.train import TrainConfig, build_model, count_parameters, train

    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(arch=arch, width=width, batch_size=batch, steps=warm + steps,
                          eval_every=warm, device=device, reorder=reorder, patch=8)
        t0 = time.perf_counter()
        res = train(path, cfg, Path(d) / "run")
        total = time.perf_counter() - t0
    rows = [r for r in res.rows if r["step"] > warm]   # steady-state intervals
    imgs = sum((r["step"] - p["step"]) * batch for p, r in zip(res.rows, res.rows[1:])
               if r["step"] > warm)
    secs = sum((r["step"] - p["step"]) * batch / r["images_per_s"]
               for p, r in zip(res.rows, res.rows[1:]) if r["step"] > warm)
    wait = sum(r["data_wait"] * (r["step"] - p["step"]) * batch / r["images_per_s"]
               for p, r in zip(res.rows, res.rows[1:]) if r["step"] > warm)
    params = count_parameters(build_model(arch, num_classes=10, width=width))
    return {"arch": arch, "width": width, "batch_size": batch, "device": res.device,
            "reorder": reorder, "params": params, "steps_timed": steps,
            "images_per_s": round(imgs / secs, 1), "data_wait": round(wait / secs, 4),
            "intervals": len(rows), "seconds_total": round(total, 1)}


def gpu_cases(args) -> dict:
    """ResNet-18 at batch 512 on CUDA, without and with on-the-fly ``--reorder mi`` (patch 8).

    The two are run alternately, twice each, so that the overhead of ``--reorder`` is
    read against the run-to-run spread of the same configuration.
    """
    import statistics

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu-only needs a CUDA device")
    results = []
    with tempfile.TemporaryDirectory() as d:
        path = make_file(Path(d) / "bench.h5", n=8192)
        for reorder in (None, "mi", None, "mi"):
            r = measure(path, arch="resnet", width=1.0, batch=512, device="cuda", warm=10,
                        steps=30, reorder=reorder)
            print(json.dumps(r), flush=True)
            results.append(r)
    rate = {k: [r["images_per_s"] for r in results if r["reorder"] == k] for k in (None, "mi")}
    base, mi = statistics.median(rate[None]), statistics.median(rate["mi"])
    report = {"benchmark": "train-gpu", "cuda": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "results": results,
              "reorder_mi_step_overhead": round(base / mi - 1.0, 4)}
    print(f"train resnet b512 bf16: {base:,.0f} img/s (runs {', '.join(f'{v:,.0f}' for v in rate[None])}; "
          f"data wait {results[0]['data_wait']:.2%}); with --reorder mi: {mi:,.0f} img/s "
          f"(runs {', '.join(f'{v:,.0f}' for v in rate['mi'])}; "
          f"+{report['reorder_mi_step_overhead']:.1%} step time)")
    save(report, args.out, "train_gpu.json")
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write train.json here")
    ap.add_argument("--quick", action="store_true", help="one width, fewer steps")
    ap.add_argument("--archs", default="vgg,resnet,inception")
    ap.add_argument("--gpu-only", action="store_true",
                    help="only the issue-13 GPU cases: resnet, width 1, batch 512, bf16, "
                         "channels-last, with and without --reorder mi on the fly")
    args = ap.parse_args(argv)
    if args.gpu_only:
        return gpu_cases(args)

    import torch

    archs = args.archs.split(",")
    cpu_cases = [(0.125, 32)] if args.quick else [(0.125, 32), (0.25, 32), (0.125, 1)]
    warm, steps = (3, 6) if args.quick else (5, 20)
    results = []
    with tempfile.TemporaryDirectory() as d:
        path = make_file(Path(d) / "bench.h5", n=512 if args.quick else 2048)
        for arch in archs:
            for width, batch in cpu_cases:
                n = steps * (4 if batch == 1 else 1)
                r = measure(path, arch=arch, width=width, batch=batch, device="cpu",
                            warm=warm, steps=n)
                print(json.dumps(r), file=sys.stderr, flush=True)
                results.append(r)
        r = measure(path, arch="vgg", width=0.125, batch=32, device="cpu", warm=warm,
                    steps=steps, reorder="mi")
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
        if torch.cuda.is_available():
            for arch in archs:
                for width, batch in ([(1.0, 128)] if args.quick else [(1.0, 128), (1.0, 1)]):
                    r = measure(path, arch=arch, width=width, batch=batch, device="cuda",
                                warm=10, steps=20 if args.quick else 100)
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    results.append(r)
    report = {
        "benchmark": "train",
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "results": results,
    }
    return write_report(report, args.out, "train.json")


if __name__ == "__main__":
    main()
