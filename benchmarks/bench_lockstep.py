"""Lockstep training (``porder.train.lockstep.train_group``) against runs trained one after another.

What it measures: training images/second (forward, backward, Adam step, batch
preparation; evaluation, start-up and figures excluded: the rate is the one
``metrics.jsonl`` records in ``images_per_s``) of VGG at width 0.125 on 32x32
images, for the runs of a comparison (one seed each, two caches) trained

* alone, one after another with ``porder.train.train`` (every run has the same
  rate, so ``--quick`` times 4 of the 16 runs);
* in lockstep, M models in one step (``train_group``), M = 1, 2, 4, 8, 16.

at batch 1 (the paper's online training) and batch 32. The machine is shared, so
the two are measured interleaved in one process, ``--repeats`` times, and the
speed-up reported is the median of the per-repeat ratios. Targets (issue 22):
>= 8x at batch 1 with M = 16, >= 1.5x at batch 32.

The data are two porder files of 2,048 random 32x32 images of 10 classes
(``bench_train.make_file``; the speed of a step does not depend on the pixels).
Rates are timed by the process's CPU time by default (``--clock``; the loops'
own interval clock is pointed at ``time.process_time``), so other programs on the
machine slow both sides alike instead of whichever ran while they did.
One torch thread by default (``--threads``): under load, two threads on two shared
cores make every small op of a batch-1 run wait (measured: alone at batch 1 fell
from ~270 to 36 images/s), which flatters lockstep.

The ceiling (batch 1, M = 16; ``ceiling`` in the JSON): the most lockstep could
gain on this machine. A lockstep step cannot take less than its convolutions'
matrix products plus its Adam step, so the benchmark times exactly those, with
the same clock and threads: every convolution's three GEMMs (forward, weight
gradient, input gradient; the first layer has no input gradient) as ``torch.bmm``
over the 16 models at the layer's shapes, in the faster of the two operand
orders, and one fused Adam step over 16 models' parameters, best of 5 each.
Everything else a step does (im2col, BatchNorm, ReLU, max-pool, the loss, batch
preparation) counts as free. ``speedup`` is then (16 images / that time) over the
alone rate: a lockstep implementation with GEMM-based convolutions that ran
every GEMM as fast as MKL's batched GEMM runs it, and did nothing else, would
reach it and no more. ``speedup_with_rest`` adds the rest of a real lockstep step
as torch runs it (``rest_ms``: the self times of its ops other than convolutions
and Adam, from torch.profiler, scaled to the unprofiled ``step_ms``): the most a
faster convolution alone could bring.

Prints JSON; ``--out DIR`` also writes ``DIR/lockstep.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._report import report as write_report  # noqa: E402
from benchmarks.bench_train import make_file  # noqa: E402


def _config(batch: int, seed: int, steps: int, warm: int, threads, device: str = "cpu"):
    from porder.train import TrainConfig

    return TrainConfig(arch="vgg", width=0.125, batch_size=batch, steps=warm + steps,
                       eval_every=warm, device=device, seed=seed, threads=threads)


def _rate(rows) -> float:
    """Images/s of one run over its measured interval (the rows after the warm-up row)."""
    return rows[-1]["images_per_s"]


def alone(files, batch, runs, steps, warm, threads, root, device="cpu") -> float:
    """Images/s of ``runs`` runs trained one after another (their training time summed)."""
    from porder.train import train

    images = seconds = 0.0
    for i in range(runs):
        res = train(files[i % 2], _config(batch, i, steps, warm, threads, device),
                    root / f"alone-{time.monotonic_ns()}")
        rate = _rate(res.rows)
        images += steps * batch
        seconds += steps * batch / rate
    return images / seconds


def lockstep(files, batch, m, steps, warm, threads, root, device="cpu") -> float:
    """Images/s of ``m`` runs trained in lockstep (the group's images over its time)."""
    from porder.train.lockstep import train_group

    tag = time.monotonic_ns()
    jobs = [(files[i % 2], _config(batch, i, steps, warm, threads, device), root / f"ls-{tag}-{i}")
            for i in range(m)]
    results = train_group(jobs)
    bad = [r for r in results if isinstance(r, BaseException)]
    if bad:
        raise bad[0]
    return sum(_rate(r.rows) for r in results)


def _best(fn, clock, repeats: int = 5, n: int = 20) -> float:
    """Best seconds per call of ``fn`` over ``repeats`` rounds of ``n`` calls (after a warm-up)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        for _ in range(n):
            fn()
        best = min(best, (clock() - t) / n)
    return best


def conv_gemms(model, size: int = 32, batch: int = 1) -> list[tuple[int, int, int]]:
    """The (rows, inner, cols) of every GEMM a training step of ``model`` does for its
    convolutions on (batch, 3, size, size) inputs: forward (Cout, K) @ (K, N), weight
    gradient (Cout, N) @ (N, K), input gradient (K, Cout) @ (Cout, N), with K = Cin/groups
    * kh * kw and N = batch * output pixels; no input gradient for the first layer."""
    import torch
    from torch import nn

    convs = []

    def hook(mod, args, out):
        convs.append((mod, out.shape[0] * out.shape[2] * out.shape[3]))

    handles = [mod.register_forward_hook(hook) for mod in model.modules()
               if isinstance(mod, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(batch, 3, size, size))
    for h in handles:
        h.remove()
    shapes = []
    for i, (mod, n) in enumerate(convs):
        k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        shapes += [(mod.out_channels, k, n), (mod.out_channels, n, k)]
        if i:
            shapes.append((k, mod.out_channels, n))
    return shapes


def ceiling(alone_rate: float, clock, m: int = 16, batch: int = 1) -> dict:
    """The speed-up over ``alone_rate`` of a lockstep step of ``m`` models that did only
    its convolutions' GEMMs (batched over the models) and its Adam step (module docstring)."""
    import torch

    from porder.train.models import build_model

    model = build_model("vgg", num_classes=10, in_size=32, width=0.125)
    gemm, shapes = 0.0, conv_gemms(model, batch=batch)
    for rows, inner, cols in shapes:
        a, b = torch.randn(m, rows, inner), torch.randn(m, inner, cols)
        at, bt = torch.randn(m, cols, inner), torch.randn(m, inner, rows)   # (AB)^T = B^T A^T
        gemm += min(_best(lambda: torch.bmm(a, b), clock), _best(lambda: torch.bmm(at, bt), clock))
    params = [torch.zeros(m, *p.shape, requires_grad=True) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)
    adam = _best(opt.step, clock, n=5)
    rate = m * batch / (gemm + adam)
    step, rest = rest_of_step(m, batch, clock)
    return {"m": m, "batch": batch, "gemm_ms": round(gemm * 1e3, 3),
            "gemm_gflop_per_s": round(sum(2 * m * r * i * c for r, i, c in shapes) / gemm / 1e9,
                                      1),
            "adam_ms": round(adam * 1e3, 3), "images_per_s": round(rate, 1),
            "speedup": round(rate / alone_rate, 2),
            "step_ms": round(step * 1e3, 3), "rest_ms": round(rest * 1e3, 3),
            "speedup_with_rest": round(m * batch / (gemm + adam + rest) / alone_rate, 2)}


# A step's convolutions and Adam, by the names of their ops (aten's self times).
HEAVY_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward",
             "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::_fused_adam_")


def rest_of_step(m: int, batch: int, clock) -> tuple[float, float]:
    """(seconds of one lockstep step of ``m`` VGG models at width 0.125, 32x32, the part of
    it that is neither a convolution nor Adam): the step as ``group_step`` runs it, best of
    3 rounds; the part from torch.profiler's self times of its ops (every op but
    :data:`HEAVY_OPS`, the Python between them excluded), scaled to the unprofiled step."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from porder.train.lockstep import StackedNet, group_adam
    from porder.train.models import build_model

    models = [build_model("vgg", num_classes=10, in_size=32, width=0.125) for _ in range(m)]
    net = StackedNet(models, [torch.Generator().manual_seed(i) for i in range(m)])
    opt = group_adam(net, 1e-4)
    x, y = torch.randn(batch, m * 3, 32, 32), torch.randint(0, 10, (m, batch))

    def one():
        logits = net.forward(x, True)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        opt.zero_grad(set_to_none=True)
        loss.view(m, -1).mean(1).sum().backward()
        opt.step()

    step = _best(one, clock, repeats=3, n=10)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            one()
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in ops)
    heavy = sum(e.self_cpu_time_total for e in ops if e.key in HEAVY_OPS)
    prof_step = sum(e.self_cpu_time_total for e in prof.key_averages()) / 10 / 1e6
    return step, (total - heavy) / 10 / 1e6 * min(1.0, step / prof_step) if prof_step else 0.0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer steps, runs and repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--clock", choices=("process", "wall"), default="process",
                    help="time the rates by the process's CPU time (default: robust to other "
                         "programs on a shared machine) or by the wall clock")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine two threads "
                         "wait on each other at every small op, and the alone runs suffer most)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where both sides train (cuda: timed by the wall clock, the loops "
                         "synchronise the device)")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        args.clock = "wall"   # CPU time says nothing of the GPU's
    import types

    import torch

    from porder.train import lockstep as lockstep_module
    from porder.train import loop, metrics

    metrics.plot_curves = lambda rows, path, title="": None     # figures are not training
    if args.clock == "process":   # the loops' interval clocks count this process's CPU time
        clock = types.SimpleNamespace(perf_counter=time.process_time)
        loop.time = lockstep_module.time = clock
    quick = args.quick
    repeats = args.repeats or (2 if quick else 3)
    runs = 4 if quick else 16
    plan = {1: dict(steps=60 if quick else 200, warm=10), 32: dict(steps=8 if quick else 30, warm=3)}
    ms = (1, 2, 4, 8, 16)
    out = {"what": "training images/s, VGG width 0.125, 32x32; alone = runs one after "
                   "another, lockstep = train_group", "device": args.device,
           "threads": args.threads or os.cpu_count(),
           "cpus": os.cpu_count(), "clock": args.clock,
           "torch": torch.__version__, "runs_alone_timed": runs, "repeats": repeats,
           "batches": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        files = [make_file(root / "a.h5"), make_file(root / "b.h5")]
        for batch, p in plan.items():
            curve = {m: [] for m in (ms if batch == 1 else (16,))}
            alone_rates, ratios = [], []
            for _ in range(repeats):
                a = alone(files, batch, runs, p["steps"], p["warm"], args.threads, root,
                          args.device)
                alone_rates.append(a)
                for m in curve:
                    curve[m].append(lockstep(files, batch, m, p["steps"], p["warm"],
                                             args.threads, root, args.device) / a)
                ratios.append(curve[16][-1])
            out["batches"][str(batch)] = {
                "steps_timed": p["steps"], "alone_images_per_s": round(statistics.median(alone_rates), 1),
                "lockstep16_images_per_s": round(statistics.median(alone_rates) *
                                                 statistics.median(ratios), 1),
                "speedup_16": round(statistics.median(ratios), 2),
                "speedup_vs_m": {str(m): round(statistics.median(v), 2) for m, v in curve.items()},
                "target": 8.0 if batch == 1 else 1.5}
            if batch == 1 and args.device == "cpu":
                torch.set_num_threads(args.threads or os.cpu_count())
                out["ceiling"] = ceiling(statistics.median(alone_rates),
                                         time.process_time if args.clock == "process"
                                         else time.perf_counter)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return write_report(out, args.out, "lockstep.json")


if __name__ == "__main__":
    main()
