"""The time a comparison will take on this machine, from short measurements (``--dry-run``).

Training: for each distinct network of the plan (architecture and feature-map
layers), :func:`porder.train.timing.time_steps` times a few training steps and
an evaluation forward pass on random inputs on the comparison's device; the
estimate is ``remaining steps x step time + remaining evaluations x test images
x evaluation time per image`` summed over the runs not done. Caches: ``porder
.reorder`` on a batch of random images per (measure, patch) still to build, per
image, times the dataset size; decoding the source's files is not included.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .plan import Plan, step_timing
from .plan import _evaluations as evaluations_left

REORDER_SAMPLE = 64    # random images reordered to time a cache


@dataclass
class Estimate:
    total_s: float
    train_s: float
    cache_s: float
    runs_left: int
    lines: list = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(self.lines)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, rem = divmod(s, 3600)
    m = rem // 60
    return f"{h} h {m:02d} min" if h else f"{m} min {s % 60:02d} s"


def _evaluations(at_step: int, steps: int, every: int, fresh: bool) -> int:
    """Evaluations still to run: step 0 (fresh runs), each multiple of ``every``, the last."""
    return evaluations_left(at_step, steps, every) + int(fresh)


def dataset_sizes(plan: Plan) -> tuple[int, int, int]:
    """(train images, test images, classes): ``plan.counts`` (set by ``make_plan``), else from
    the ``none`` cache when built, else the source."""
    from ..store import read_meta

    if plan.counts:
        return plan.counts["train"], plan.counts["test"], plan.counts["classes"]
    c = plan.caches[0]
    if c.state == "ready":
        meta = read_meta(c.path)
        return int(meta["splits"]["train"]), int(meta["splits"]["test"]), len(meta["classes"])
    from ..sources import open_source

    st = plan.settings
    with open_source(plan.source, size=st["size"], test_fraction=st["test_fraction"]) as src:
        return src.count("train"), src.count("test"), len(src.classes)


def estimate(plan: Plan, *, threads: Optional[int] = None,
             log: Optional[Callable[[str], None]] = None) -> Estimate:
    """Estimate the wall time of the rest of ``plan`` by timing a few steps here.

    Parameters
    ----------
    plan : Plan
        From :func:`porder.experiment.make_plan`.
    threads : int, optional
        CPU threads for torch, as the comparison will use.
    log : callable(str), optional
        Told what is being measured (it takes a few seconds per network).

    Returns
    -------
    Estimate
        Totals and the lines ``--dry-run`` prints (each measurement described).
    """
    from .. import reorder

    log = log or (lambda line: None)
    st = plan.settings
    n_train, n_test, n_classes = dataset_sizes(plan)
    if not plan.counts:  # a plan built by hand: step_timing needs the class count
        plan.counts = {"train": n_train, "test": n_test, "classes": n_classes}
    todo = [r for r in plan.runs if r.state != "done"]
    lines = [f"time estimate ({len(todo)} of {len(plan.runs)} runs to train; "
             f"{n_train} train / {n_test} test images, {n_classes} classes):"]
    keys = []
    train_s = 0.0
    for r in todo:
        key = (r.arch, tuple(r.fm))
        if key not in keys:
            keys.append(key)
            if key not in plan.timings:
                log(f"timing {r.arch}" + (f" with --fm-reorder {r.fm[0]}" if r.fm else "")
                    + " ...")
        t = step_timing(plan, r.arch, r.fm, threads=threads)
        n_eval = _evaluations(r.at_step, st["steps"], st["eval_every"], r.state == "new")
        train_s += (st["steps"] - r.at_step) * t.step_s + n_eval * n_test * t.eval_image_s
    for key in keys:
        cfg, t = plan.timings[key]
        lines.append(f"  {t.describe(cfg)}")
    if todo:
        per_run = train_s / len(todo)
        lines.append(f"  training: {len(todo)} runs x ~{_hms(per_run)} = ~{_hms(train_s)} "
                     f"(steps left x step time + evaluations left x {n_test} test images x "
                     "time per image)")
    cache_s = 0.0
    build = [c for c in plan.caches if c.state != "ready"]
    if build:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (REORDER_SAMPLE, st["size"], st["size"], 3), dtype=np.uint8)
        for c in build:
            t0 = time.perf_counter()
            reorder(images, c.measure, c.patch, bins=st["bins"])
            cache_s += (time.perf_counter() - t0) / REORDER_SAMPLE * (n_train + n_test)
        lines.append(f"  caches: {len(build)} to build, ~{_hms(cache_s)} (porder.reorder of "
                     f"{REORDER_SAMPLE} random images per measure and patch, scaled to "
                     f"{n_train + n_test} images; decoding the source not included)")
    total = train_s + cache_s
    load = ""
    if hasattr(os, "getloadavg"):
        load = (f"; measured at a load average of {os.getloadavg()[0]:.1f} on "
                f"{os.cpu_count()} CPUs: other work slows it down")
    lines.append(f"  total: ~{_hms(total)} on this machine"
                 + ("" if todo or build else " (everything is done)") + load)
    return Estimate(total_s=total, train_s=train_s, cache_s=cache_s, runs_left=len(todo),
                    lines=lines)
