"""How long the rest of a comparison will take on this machine (``compare --dry-run``).

:func:`estimate_times` gives every cache still to build and every run still to
train its expected seconds (``CacheItem.seconds``, ``RunItem.seconds``);
:meth:`porder.experiment.Plan.describe` lists them and :attr:`Plan.seconds_left`
is their sum, so the dry run prints one set of numbers.

Runs: per network of the plan (architecture and feature-map layers), the
training and evaluation speeds come from the metrics of that network's runs
already in the output folder (same width and batch, on this device), else from
:func:`porder.train.timing.time_steps` (a few training steps and an evaluation
forward pass on random inputs, measured once per network). A run takes
``steps left x step time + evaluations left x test images x evaluation time
per image``. Caches: :func:`porder.reorder` on :data:`REORDER_SAMPLE` random
images per (measure, patch) still to build, per image, times the dataset size;
decoding the source's files is not included.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import numpy as np

from .plan import Plan, run_config

REORDER_SAMPLE = 64    # random images reordered to time a cache


def estimate_times(plan: Plan, *, threads: Optional[int] = None,
                   log: Optional[Callable[[str], None]] = None) -> Plan:
    """Give each cache to build and each run to train of ``plan`` its expected seconds.

    Parameters
    ----------
    plan : Plan
        From :func:`porder.experiment.make_plan` (its ``counts`` set).
    threads : int, optional
        CPU threads for torch, as the comparison will use.
    log : callable(str), optional
        Told what is being measured (a few seconds per network).

    Returns
    -------
    Plan
        ``plan``, with ``seconds`` set on the caches that are not ready and the
        runs that are new or resumed, ``speeds`` (per network: training and
        evaluation images per second and how they were found) and
        ``measured`` (device, load average, how the caches were timed).
    """
    from ..train.device import resolve_device

    log = log or (lambda line: None)
    s, n_test = plan.settings, plan.counts["test"]
    device = resolve_device(s["device"])
    todo = [r for r in plan.runs if r.state in ("new", "resume")]
    for key in dict.fromkeys((r.arch, tuple(r.fm)) for r in todo):
        speed = _history_speed(plan, *key, device=device, n_test=n_test)
        if speed is None:
            log(f"timing a few training steps of {network_name(*key)} (width {s['width']:g}) "
                f"on {device} for the estimate ...")
            t = step_timing(plan, *key, threads=threads)
            speed = {"train": s["batch_size"] / t.step_s, "eval": 1.0 / t.eval_image_s,
                     "how": t.describe(plan.timings[key][0])}
        plan.speeds[key] = speed
    for r in todo:
        sp = plan.speeds[(r.arch, tuple(r.fm))]
        r.seconds = ((s["steps"] - r.at_step) * s["batch_size"] / sp["train"]
                     + eval_images_left(r, s, n_test) / sp["eval"])
    grouping = getattr(plan, "grouping", None)
    for g in (grouping.groups if grouping is not None else []):
        if g.lockstep:
            _estimate_group(plan, g, threads=threads, log=log)
        else:
            g.seconds = g.runs[0].seconds
    build = [c for c in plan.caches if c.state != "ready"]
    if build:
        log(f"timing porder.reorder on {REORDER_SAMPLE} random images for {len(build)} "
            f"cache{'s' if len(build) > 1 else ''} ...")
    n_images = plan.counts["train"] + n_test
    for c in build:        # a partial cache is counted whole
        c.seconds = reorder_seconds(c.measure, c.patch, size=s["size"], bins=s["bins"]) * n_images
    plan.measured = {
        "device": device,
        "load": (os.getloadavg()[0], os.cpu_count()) if hasattr(os, "getloadavg") else None,
        "caches": (f"porder.reorder of {REORDER_SAMPLE} random images per measure and patch, "
                   f"scaled to {n_images} images; decoding the source not included"),
    }
    return plan


def eval_images_left(r, settings: dict, n_test: int) -> int:
    """Test images run ``r`` still evaluates: ``eval_images`` (or the whole split) per curve
    point, the whole split at the last step."""
    evals = evaluations_left(r.at_step, settings["steps"], settings["eval_every"],
                             fresh=r.state == "new")
    k = min(settings.get("eval_images") or n_test, n_test)
    return 0 if evals == 0 else (evals - 1) * k + n_test


def _estimate_group(plan: Plan, g, *, threads: Optional[int], log) -> None:
    """A lockstep group's time: steps left x the group's step time + its evaluations.

    The group's step is measured: a few steps of M stacked models on random inputs
    (:func:`porder.train.group_timing.time_group_steps`, once per network and M).
    Evaluations cost what they cost alone, M times (each model scores its own copy of
    the images; batched across the group, so this errs long).
    """
    from ..train import group_timing

    s, n_test = plan.settings, plan.counts["test"]
    r0 = g.runs[0]
    key = (r0.arch, tuple(r0.fm), g.m)
    if key not in plan.timings:
        cfg = run_config(s, r0.arch, 0, list(r0.fm), threads=threads)
        log(f"timing a few lockstep steps of {g.m} {network_name(r0.arch, r0.fm)} models "
            f"for the estimate ...")
        plan.timings[key] = (cfg, group_timing.time_group_steps(
            cfg, g.m, num_classes=plan.counts["classes"], size=s["size"]))
    t = plan.timings[key][1]
    eval_s = 1.0 / plan.speeds[(r0.arch, tuple(r0.fm))]["eval"]
    steps_left = s["steps"] - min(r.at_step for r in g.runs)
    g.seconds = steps_left * t.step_s + sum(eval_images_left(r, s, n_test) for r in g.runs) * eval_s
    g.how = (f"{1e3 * t.step_s:.1f} ms per lockstep step of {g.m} {r0.arch} models (median of "
             f"{t.steps_timed} steps of {g.m} x {s['batch_size']} random inputs, measured)")
    for r in g.runs:                     # each run's share, so that the runs sum to the total
        r.seconds = g.seconds / g.m


def step_timing(plan: Plan, arch: str, fm=(), *, threads: Optional[int] = None):
    """``StepTiming`` of one network of ``plan`` on this device, measured once.

    Measured with :func:`porder.train.timing.time_steps` per (architecture,
    feature-map layers) and kept in ``plan.timings`` with its ``TrainConfig``.
    """
    from ..train import timing

    key = (arch, tuple(fm))
    if key not in plan.timings:
        cfg = run_config(plan.settings, arch, 0, list(fm), threads=threads)
        plan.timings[key] = (cfg, timing.time_steps(cfg, num_classes=plan.counts["classes"],
                                                    size=plan.settings["size"]))
    return plan.timings[key][1]


def reorder_seconds(measure: str, patch: int, *, size: int, bins: int) -> float:
    """Seconds :func:`porder.reorder` takes per image, timed on :data:`REORDER_SAMPLE`
    random ``size`` x ``size`` RGB images (the same images for every call), after a call
    on two of them (the compiled kernels' first compile, once per process, is not a cost
    per image)."""
    from .. import reorder

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (REORDER_SAMPLE, size, size, 3), dtype=np.uint8)  # (n, S, S, 3)
    reorder(images[:2], measure, patch, bins=bins)   # the kernels' first compile is not timed
    t0 = time.perf_counter()
    reorder(images, measure, patch, bins=bins)
    return (time.perf_counter() - t0) / REORDER_SAMPLE


def evaluations_left(at_step: int, steps: int, every: int, *, fresh: bool) -> int:
    """Evaluations a run still makes after ``at_step``: every ``every`` steps, at the last
    step, and at step 0 when ``fresh`` (a new run)."""
    return steps // every - at_step // every + (1 if steps % every else 0) + int(fresh)


def network_name(arch: str, fm=()) -> str:
    """'vgg', or 'vgg --fm-reorder stem:mi:4' for a network with feature-map layers."""
    return arch + (f" --fm-reorder {','.join(fm)}" if fm else "")


def _history_speed(plan: Plan, arch: str, fm=(), *, device: str,
                   n_test: int) -> Optional[dict]:
    """Mean training and evaluation img/s of this plan's runs of the network
    (``arch``, ``fm``) already on disk, when they trained with the same width and
    batch on ``device``."""
    from ..train.metrics import CONFIG, read_metrics

    s = plan.settings
    train, evals = [], []
    for r in plan.runs:
        if r.arch != arch or tuple(r.fm) != tuple(fm):
            continue
        try:
            rec = json.loads((r.dir / CONFIG).read_text())
        except (OSError, ValueError):
            continue
        c = rec.get("config", {})
        if rec.get("device") != device or c.get("width") != s["width"] \
                or c.get("batch_size") != s["batch_size"] or rec.get("world_size", 1) != 1:
            continue
        for row in read_metrics(r.dir):
            if row.get("images_per_s"):
                train.append(row["images_per_s"])
            if row.get("eval_s"):
                evals.append(n_test / row["eval_s"])
    if not train or not evals:
        return None
    train_s, eval_s = sum(train) / len(train), sum(evals) / len(evals)
    return {"train": train_s, "eval": eval_s,
            "how": f"{network_name(arch, fm)}: {train_s:,.0f} img/s training, {eval_s:,.0f} "
                   f"img/s evaluating (from the metrics of the runs in {plan.out})"}
