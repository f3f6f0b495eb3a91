"""Running a comparison: build the caches, train every run, write the summary and figures."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

from ..output import lock_folder
from ..store import read_meta
from .estimate import estimate_times
from .groups import check_lockstep, make_groups
from .plan import Plan, make_plan, run_config
from .plots import write_figures
from .summary import (
    paired_comparisons,
    summarise,
    write_csv,
    write_markdown,
    write_paired_csv,
)

Log = Callable[[str], None]


@dataclass
class CompareResult:
    plan: Plan
    runs: list            # per-run summary dicts (SUMMARY_FIELDS)
    means: list           # per (arch, measure, patch): mean rows
    stds: list            # ... and the matching std rows
    files: list           # paths written
    comparisons: list = field(default_factory=list)   # paired verdicts (summary.PAIRED_FIELDS)


def compare(source: str, out, *, measures: Sequence[str] = ("none", "mi"),
            patches: Sequence[int] = (8,), archs: Sequence[str] = ("vgg",), seeds=3,
            steps: int = 1000, width: float = 0.25, lr: float = 1e-3, batch_size: int = 32,
            eval_every: int = 50, size: int = 32, bins: int = 256, test_fraction: float = 0.1,
            device: str = "auto", threads: Optional[int] = None, dry_run: bool = False,
            lockstep: str = "auto", eval_images: Optional[int] = None, norm: str = "batch",
            log: Optional[Log] = None,
            progress_for: Optional[Callable] = None,
            cache_progress: Optional[Callable] = None):
    """Reorder ``source`` per (measure, patch), train every arch x seed, summarise.

    Parameters
    ----------
    source : str
        Any SOURCE ``porder reorder`` accepts (CIFAR, image folder, Kaggle
        folder, ``synthetic:N[:C]``, ``digits``).
    out : path-like
        Output folder (see :mod:`porder.experiment` for its layout).
    measures, patches, archs, seeds
        What to compare; ``none`` is added when missing. A measure orders the
        input images at every patch size; ``fm:POINT:MEASURE:PATCH`` (or
        ``fm:POINT:MEASURE``, at every patch size) trains on the ``none`` cache
        with a feature-map reordering layer at POINT (``porder train
        --fm-reorder``). ``seeds`` is a count (0..n-1) or a list of seeds.
    steps, width, lr, batch_size, eval_every
        Training hyperparameters, the same for every run (see ``TrainConfig``).
    size, bins, test_fraction
        Cache options (as for ``porder reorder``).
    device : {'cpu', 'cuda', 'auto'}
    threads : int, optional
        CPU threads: the caches' decoding and scoring workers, and torch's threads
        for training (default: all cores).
    dry_run : bool
        Only plan: return the :class:`Plan` without building or training, with
        its lockstep groups (``plan.grouping``) and the estimated time of each
        cache to build, each group and each run to train on this machine
        (:func:`porder.experiment.estimate.estimate_times`; not when runs on disk
        conflict with the options).
    lockstep : {'auto', 'on', 'off'}
        ``auto``: runs that share architecture, width, batch size, steps and
        device train in groups of M models in lockstep, M sized to the memory
        (:mod:`porder.experiment.groups`); ``off``: one after another; ``on``:
        as ``auto``, but an error when no group of two fits in memory. Run
        folders, summary, figures and verdicts are the same either way.
    eval_images : int, optional
        Test images of each curve point: a fixed seeded subset of the test
        split, the same for every run (the last step is always evaluated on
        the whole split). None: the whole split at every point.
    norm : str
        ``batch`` (BatchNorm) or ``group`` (GroupNorm) in every network
        (``TrainConfig.norm``; see :func:`porder.train.models.to_group_norm`).
    log : callable(str), optional
        Receives one line per stage.
    progress_for : callable(description) -> Progress, optional
        Makes the progress callback of each training run (may have ``close()``).
    cache_progress : callable(split, done, total), optional
        Progress of cache building.

    Returns
    -------
    Plan (dry run) or CompareResult.

    Raises
    ------
    ValueError
        Bad options, an unreadable source, or an output folder made with other
        options (caches, or runs that ``train`` could not continue: checked
        before anything is written, so ``compare.json`` keeps describing the
        runs on disk).
    """
    log = log or (lambda line: None)
    check_lockstep(lockstep)
    options = dict(measures=measures, patches=patches, archs=archs, seeds=seeds, steps=steps,
                   width=width, lr=lr, batch_size=batch_size, eval_every=eval_every, size=size,
                   bins=bins, test_fraction=test_fraction, device=device,
                   eval_images=eval_images, norm=norm)
    if dry_run:
        plan = make_plan(source, out, **options)
        if not plan.conflicts:      # a plan that cannot go on is not worth timing
            make_groups(plan, lockstep, threads=threads)
            estimate_times(plan, threads=threads, log=log)
        return plan
    first = make_plan(source, out, **options)  # bad options fail before the folder is made
    _refuse_conflicts(first)
    make_groups(first, lockstep, threads=threads)     # --lockstep on that cannot be: the same
    # One comparison per folder at a time: the second fails at once (each cache
    # and run folder is locked on its own as well). Planned again under the lock.
    lock = lock_folder(out, what=f"comparison folder '{out}'")
    try:
        plan = make_plan(source, out, **options)
        _refuse_conflicts(plan)
        return _compare(plan, log, progress_for, cache_progress, device=device,
                        threads=threads, lockstep=lockstep)
    finally:
        lock.release(remove_folder=True)


def _refuse_conflicts(plan: Plan) -> None:
    """ValueError naming the first run on disk that these options cannot continue."""
    if plan.conflicts:
        r = plan.conflicts[0]
        more = f" (and {len(plan.conflicts) - 1} more)" if len(plan.conflicts) > 1 else ""
        raise ValueError(f"run '{r.dir}' cannot go on: {r.reason}{more}; use another output "
                         "folder, delete it, or give the options it was made with (--dry-run "
                         "lists them)")


def _compare(plan: Plan, log, progress_for, cache_progress, *, device, threads, lockstep):
    from ..pipeline import build_cache
    from ..train import resolve_device

    train_device = resolve_device(device)
    (plan.out / "data").mkdir(exist_ok=True)
    (plan.out / "compare.json").write_text(json.dumps(plan.settings, indent=2) + "\n")

    for c in plan.caches:
        if c.state == "ready":
            log(f"cache {c.path}: reusing")
            continue
        log(f"cache {c.path}: {'resuming' if c.state == 'resume' else 'building'}")
        # -j reaches the caches' decoding and scoring too, not only torch
        build_cache(c.spec if threads is None else replace(c.spec, workers=threads),
                    progress=cache_progress)
        c.state = "ready"
    if cache_progress is not None and hasattr(cache_progress, "close"):
        cache_progress.close()

    rows_of = _train_runs(plan, log, progress_for, threads=threads, lockstep=lockstep)

    runs, means, stds = summarise(plan, rows_of)
    meta0 = read_meta(plan.caches[0].path)
    meta = {"train": meta0["splits"].get("train"), "test": meta0["splits"].get("test"),
            "classes": len(meta0["classes"]), "device": train_device}
    figures = write_figures(plan, rows_of)
    csv_path, md_path = plan.out / "summary.csv", plan.out / "summary.md"
    paired_path = plan.out / "paired.csv"
    comparisons = paired_comparisons(plan, runs)
    write_csv(csv_path, runs + [x for pair in zip(means, stds, strict=True) for x in pair])
    write_paired_csv(paired_path, comparisons)
    write_markdown(md_path, plan, runs, means, stds, meta, figures, comparisons)
    log(f"wrote {md_path}, {csv_path}, {paired_path} and {len(figures)} figures")
    return CompareResult(plan=plan, runs=runs, means=means, stds=stds,
                         files=[csv_path, paired_path, md_path, *figures],
                         comparisons=comparisons)


def _desc(plan: Plan, r) -> str:
    return f"[{plan.runs.index(r) + 1}/{len(plan.runs)}] {r.arch} {r.label} seed {r.seed}"


def _train_runs(plan: Plan, log, progress_for, *, threads, lockstep) -> dict:
    """Train the runs left, alone or in lockstep groups; the metrics rows of every run.

    A run of a group that fails (diverges: a non-finite loss) is reported at once and
    the others go on; once every group is done, ValueError names the runs that failed
    (the summary needs them all).
    """
    from ..train import read_metrics, train

    rows_of, failed = {}, []
    for r in plan.runs:
        if r.state == "done":
            log(f"{_desc(plan, r)}: done, skipped")
            rows_of[(r.arch, r.label, r.seed)] = read_metrics(r.dir)
    grouping = make_groups(plan, lockstep, threads=threads)
    together = [g for g in grouping.groups if g.lockstep]
    for note in grouping.notes:
        log(note)
    for g in grouping.groups:
        for r in g.runs:
            log(f"{_desc(plan, r)}: "
                + (f"resuming at step {r.at_step}" if r.state == "resume" else "training")
                + (f" (lockstep group {together.index(g) + 1}/{len(together)}, M={g.m})"
                   if g.lockstep else ""))
        cfgs = [run_config(plan.settings, r.arch, r.seed, r.fm, threads=threads) for r in g.runs]
        if not g.lockstep:
            r = g.runs[0]
            prog = progress_for(_desc(plan, r)) if progress_for else None
            try:
                rows_of[(r.arch, r.label, r.seed)] = train(r.cache, cfgs[0], r.dir, resume=True,
                                                           progress=prog).rows
            finally:
                _close(prog)
            r.state = "done"
            continue
        r0 = g.runs[0]
        desc = (f"[group {together.index(g) + 1}/{len(together)}: {g.m} runs] {r0.arch} "
                f"{r0.label} seed {r0.seed}" + (" ..." if g.m > 1 else ""))
        results = _train_group(plan, g, cfgs, progress_for, desc)
        for r, res in zip(g.runs, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, ValueError):   # not a run's own failure: stop here
                    raise res
                log(f"{_desc(plan, r)}: stopped: {res}")
                failed.append((r, res))
                continue
            rows_of[(r.arch, r.label, r.seed)] = res.rows
            r.state = "done"
    if failed:
        names = "; ".join(f"{r.arch} {r.label} seed {r.seed} ({' '.join(str(e).split())})"
                          for r, e in failed)
        raise ValueError(f"{len(failed)} of {len(plan.runs)} runs stopped, the others are "
                         f"trained; no summary without them: {names}")
    return rows_of


def _train_group(plan: Plan, g, cfgs, progress_for, desc: str) -> list:
    """:func:`porder.train.lockstep.train_group` on group ``g``, with one progress reporter
    for the group (``progress_for(desc)``), told the steps and rows of the group's first run
    (every run of a group is at the same step)."""
    from ..train.lockstep import train_group

    prog = progress_for(desc) if progress_for else None

    def progress(i, step, total, stats):
        if i == 0:
            prog(step, total, stats)

    try:
        return train_group([(r.cache, cfg, r.dir) for r, cfg in zip(g.runs, cfgs, strict=True)],
                           resume=True, progress=progress if prog is not None else None)
    finally:
        _close(prog)


def _close(prog) -> None:
    if prog is not None and hasattr(prog, "close"):
        prog.close()
