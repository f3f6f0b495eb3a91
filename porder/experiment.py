"""The paper's experiment: train the same CNNs on differently ordered copies of a dataset.

:func:`compare` reorders SOURCE once per (measure, patch) into HDF5 caches,
trains every architecture x seed on each with identical hyperparameters (the
same seed gives the same initial weights and the same batch order on every
ordering, so runs are paired), and writes

* ``summary.csv`` / ``summary.md``: per run and mean +- std over seeds: final
  and best test accuracy, steps to reach 90% and 95% of the ``none`` baseline's
  final test accuracy, the speed-up against ``none`` and the area under the
  test-accuracy curve (see :func:`run_summary`);
* ``fig4_accuracy_<arch>_p<patch>.png``: train and test accuracy against steps,
  one line per measure, seed spread shaded (the paper's Fig. 4);
* ``fig5_loss_<arch>.png``: training loss against steps for every patch size
  (the paper's Fig. 5).

Layout of the output folder::

    DIR/compare.json                     the options of the comparison
    DIR/data/none.h5, DIR/data/mi-p8.h5  the caches (reused when complete)
    DIR/runs/<arch>/<measure>[-p<patch>]/seed<k>/   one `porder train` run folder each

Running the same comparison again skips completed runs, resumes a partial run
from its checkpoint and a partial cache from its ``.part`` file.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .measures import get_measure
from .patches import check_patch_size
from .store import partial_path, read_meta

Log = Callable[[str], None]
# Relative tolerance of the accuracy thresholds: 0.95 * 0.8 is 0.7600000000000001 in
# floating point, and an accuracy of 76/100 must count as reaching it.
THRESHOLD_TOL = 1e-9
SUMMARY_FIELDS = ("arch", "measure", "patch", "seed", "n_seeds", "steps", "final_test_acc",
                  "best_test_acc", "target_90", "target_95", "steps_to_90", "steps_to_95",
                  "reached_90", "reached_95", "speedup_95", "auc_test_acc", "run_dir")


@dataclass
class CacheItem:
    measure: str
    patch: int
    path: Path
    state: str = "build"        # ready | resume | build

    @property
    def label(self) -> str:
        return _label(self.measure, self.patch)


@dataclass
class RunItem:
    arch: str
    measure: str
    patch: int
    seed: int
    cache: Path
    dir: Path
    state: str = "new"          # done | resume | new
    at_step: int = 0

    @property
    def label(self) -> str:
        return _label(self.measure, self.patch)


@dataclass
class Plan:
    source: str
    out: Path
    caches: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def describe(self) -> str:
        """The plan as text (``--dry-run``)."""
        s = self.settings
        lines = [f"compare {self.source} -> {self.out}",
                 f"  {len(self.runs)} runs: arch {', '.join(s['archs'])}; "
                 f"measures {', '.join(s['measures'])}; patch {', '.join(map(str, s['patches']))};"
                 f" seeds {', '.join(map(str, s['seeds']))}",
                 f"  each: {s['steps']} steps, batch {s['batch_size']}, Adam lr {s['lr']}, "
                 f"width {s['width']}, eval every {s['eval_every']}, {s['size']}x{s['size']} "
                 f"images, device {s['device']}",
                 "caches:"]
        for c in self.caches:
            lines.append(f"  {c.state:<7} {c.path}")
        lines.append("runs:")
        for r in self.runs:
            st = f"resume (step {r.at_step})" if r.state == "resume" else r.state
            lines.append(f"  {st:<7} {r.arch:<9} {r.label:<12} seed {r.seed}  {r.dir}")
        return "\n".join(lines)


@dataclass
class CompareResult:
    plan: Plan
    runs: list            # per-run summary dicts (SUMMARY_FIELDS)
    means: list           # per (arch, measure, patch): mean rows
    stds: list            # ... and the matching std rows
    files: list           # paths written


def _label(measure: str, patch: int) -> str:
    return "none" if measure == "none" else f"{measure}-p{patch}"


def parse_list(text: str, kind=str) -> list:
    """'a, b,c' -> ['a', 'b', 'c'] (converted by ``kind``), duplicates dropped."""
    items = []
    for part in str(text).split(","):
        part = part.strip()
        if part:
            v = kind(part)
            if v not in items:
                items.append(v)
    return items


# ------------------------------------------------------------------ planning
def make_plan(source: str, out, *, measures: Sequence[str] = ("none", "mi"),
              patches: Sequence[int] = (8,), archs: Sequence[str] = ("vgg",),
              seeds=3, steps: int = 1000, width: float = 0.25, lr: float = 1e-3,
              batch_size: int = 32, eval_every: int = 100, size: int = 32, bins: int = 256,
              test_fraction: float = 0.1, device: str = "auto") -> Plan:
    """Which caches to build and which runs to train, and what is already done.

    ``seeds`` is a count (seeds 0..n-1) or a list. ``none`` is added as the
    baseline when missing; it does not depend on the patch size, so it is
    cached and trained once per arch x seed.
    """
    from .train.loop import IDENTITY, TrainConfig, read_metrics, read_result
    from .train.models import MODELS

    measures = [get_measure(m).name for m in measures]
    if not measures:
        raise ValueError("give at least one measure, e.g. --measures none,mi")
    if "none" not in measures:
        measures = ["none"] + measures
    patches = [int(p) for p in patches]
    if not patches:
        raise ValueError("give at least one patch size, e.g. --patch 8")
    for p in patches:
        check_patch_size(size, p)
    archs = list(archs)
    for a in archs:
        if a not in MODELS:
            raise ValueError(f"unknown architecture {a!r}; choose from {', '.join(MODELS)}")
    seeds = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds or min(seeds) < 0:
        raise ValueError(f"need at least one non-negative seed, got {seeds}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output '{out}' is a file; give a folder with -o")
    settings = dict(source=source, archs=archs, measures=measures, patches=patches, seeds=seeds,
                    steps=steps, width=width, lr=lr, batch_size=batch_size,
                    eval_every=eval_every, size=size, bins=bins, test_fraction=test_fraction,
                    device=device)
    TrainConfig(arch=archs[0], width=width, lr=lr, batch_size=batch_size, steps=steps,
                eval_every=eval_every, device=device).validate()
    plan = Plan(source=source, out=out, settings=settings)

    combos = [("none", patches[0])] + [(m, p) for m in measures if m != "none" for p in patches]
    for m, p in combos:
        path = out / "data" / f"{_label(m, p)}.h5"
        state = "build"
        if path.exists():
            _check_cache(path, source=source, measure=m, patch=p, size=size, bins=bins,
                         test_fraction=test_fraction)
            state = "ready"
        elif partial_path(path).exists():
            state = "resume"
        plan.caches.append(CacheItem(m, p, path, state))

    for arch in archs:
        for seed in seeds:  # seed-major: an interrupted compare has whole seeds done
            for c in plan.caches:
                d = out / "runs" / arch / c.label / f"seed{seed}"
                cfg = TrainConfig(arch=arch, width=width, lr=lr, batch_size=batch_size,
                                  steps=steps, eval_every=eval_every, seed=seed, device=device)
                item = RunItem(arch, c.measure, c.patch, seed, c.path, d)
                res = read_result(d)
                rows = read_metrics(d)
                if res and res.get("steps") == steps and all(
                        res["config"].get(k) == getattr(cfg, k) for k in IDENTITY) \
                        and rows and rows[-1]["step"] == steps:
                    item.state, item.at_step = "done", steps
                elif (d / "checkpoint.pt").exists():
                    item.state = "resume"
                    item.at_step = max((r["step"] for r in rows), default=0)
                plan.runs.append(item)
    return plan


def _check_cache(path: Path, *, source, measure, patch, size, bins, test_fraction):
    meta = read_meta(path)
    want = {"measure": measure, "image_size": size, "source": source, "bins": bins,
            "test_fraction": test_fraction}
    if measure != "none":
        want["patch"] = patch
    diff = [f"{k}: file has {meta.get(k)!r}, now {v!r}" for k, v in want.items()
            if meta.get(k) != v]
    if diff:
        raise ValueError(f"cache '{path}' was made with other options ({'; '.join(diff)}); "
                         "use another output folder or delete it")


# ------------------------------------------------------------------ metrics
def steps_to(rows: Sequence[dict], threshold: float) -> Optional[int]:
    """First evaluated step whose test accuracy reaches ``threshold`` (None if never)."""
    for r in rows:
        if r["test_acc"] >= threshold - THRESHOLD_TOL:
            return int(r["step"])
    return None


def auc(rows: Sequence[dict]) -> float:
    """Area under test accuracy against steps (trapezoid), divided by the step range.

    1.0 would mean perfect accuracy from the first evaluation on; a run that
    learns sooner has a larger area for the same final accuracy.
    """
    s = [float(r["step"]) for r in rows]
    a = [float(r["test_acc"]) for r in rows]
    if len(s) < 2 or s[-1] == s[0]:
        return a[-1] if a else math.nan
    area = sum((s[i + 1] - s[i]) * (a[i] + a[i + 1]) / 2 for i in range(len(s) - 1))
    return area / (s[-1] - s[0])


def run_summary(rows: Sequence[dict], baseline_final: float) -> dict:
    """Final and best test accuracy, steps to 90% / 95% of ``baseline_final``, AUC."""
    return {"steps": int(rows[-1]["step"]),
            "final_test_acc": float(rows[-1]["test_acc"]),
            "best_test_acc": max(float(r["test_acc"]) for r in rows),
            "target_90": 0.90 * baseline_final, "target_95": 0.95 * baseline_final,
            "steps_to_90": steps_to(rows, 0.90 * baseline_final),
            "steps_to_95": steps_to(rows, 0.95 * baseline_final),
            "auc_test_acc": auc(rows)}


def speedup(base_steps: Optional[int], steps: Optional[int]) -> Optional[float]:
    """``base_steps / steps`` (steps to 95% of the baseline): >1 means faster than ``none``."""
    if base_steps is None or steps is None:
        return None
    if steps == 0:
        return 1.0 if base_steps == 0 else math.inf
    return base_steps / steps


def _mean_std(values):
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd


def summarise(plan: Plan, rows_of: dict) -> tuple[list, list, list]:
    """Per-run rows, then mean and std rows per (arch, measure, patch).

    ``rows_of[(arch, label, seed)]`` holds the metrics rows of each run. The
    baseline of an arch is the mean over seeds of ``none``'s final test
    accuracy; the speed-up pairs each run with ``none`` of the same seed.
    Standard deviations are sample ones (n - 1); steps-to figures average the
    seeds that reached the target (``reached_*`` counts them).
    """
    runs, means, stds = [], [], []
    for arch in plan.settings["archs"]:
        base_rows = {s: rows_of[(arch, "none", s)] for s in plan.settings["seeds"]}
        baseline = sum(r[-1]["test_acc"] for r in base_rows.values()) / len(base_rows)
        base95 = {s: steps_to(r, 0.95 * baseline) for s, r in base_rows.items()}
        for c in plan.caches:
            group = []
            for s in plan.settings["seeds"]:
                item = next(r for r in plan.runs
                            if r.arch == arch and r.label == c.label and r.seed == s)
                row = {"arch": arch, "measure": c.measure,
                       "patch": "" if c.measure == "none" else c.patch, "seed": s, "n_seeds": 1,
                       **run_summary(rows_of[(arch, c.label, s)], baseline)}
                row["reached_90"] = int(row["steps_to_90"] is not None)
                row["reached_95"] = int(row["steps_to_95"] is not None)
                row["speedup_95"] = speedup(base95[s], row["steps_to_95"])
                row["run_dir"] = str(item.dir)
                group.append(row)
            runs += group
            m = {k: group[0][k] for k in ("arch", "measure", "patch", "steps", "target_90",
                                          "target_95")}
            m.update(seed="mean", n_seeds=len(group), run_dir="",
                     reached_90=sum(g["reached_90"] for g in group),
                     reached_95=sum(g["reached_95"] for g in group))
            sd = dict(m, seed="std")
            for k in ("final_test_acc", "best_test_acc", "steps_to_90", "steps_to_95",
                      "speedup_95", "auc_test_acc"):
                m[k], sd[k] = _mean_std(g[k] for g in group if g[k] is None or
                                        math.isfinite(g[k]))
            means.append(m)
            stds.append(sd)
    return runs, means, stds


# ------------------------------------------------------------------ reports
def _csv_value(v):
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else v


def write_csv(path, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in SUMMARY_FIELDS})
    Path(path).write_text(buf.getvalue())


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


def _pm(m, s, fmt):
    if m is None:
        return "never"
    return f"{fmt(m)} ± {fmt(s)}"


def write_markdown(path, plan: Plan, runs, means, stds, meta: dict, figures) -> None:
    st = plan.settings
    acc = lambda v: f"{100 * v:.1f}"
    num = lambda v: f"{v:.0f}"
    ratio = lambda v: "inf" if math.isinf(v) else f"{v:.2f}"
    lines = [
        f"# porder compare: `{plan.source}`",
        "",
        f"{len(runs)} runs: {', '.join(st['archs'])} x measures {', '.join(st['measures'])} x "
        f"patch {', '.join(map(str, st['patches']))} x seeds {', '.join(map(str, st['seeds']))}. "
        f"Each: {st['steps']} steps of {st['batch_size']} images, Adam lr {st['lr']}, softmax "
        f"cross-entropy, width {st['width']}, {st['size']}x{st['size']} images "
        f"({meta['train']} train / {meta['test']} test, {meta['classes']} classes), "
        f"test accuracy every {st['eval_every']} steps, device {meta['device']}.",
        "",
    ]
    for arch in st["archs"]:
        base = next(m for m in means if m["arch"] == arch and m["measure"] == "none")
        lines.append(f"Baseline `{arch}` on `none`: final test accuracy {acc(base['final_test_acc'])}%"
                     f" (mean of {base['n_seeds']} seed{'s' if base['n_seeds'] > 1 else ''}); "
                     f"targets: 90% of it = "
                     f"{acc(base['target_90'])}%, 95% = {acc(base['target_95'])}%.")
    lines += [
        "",
        "## Mean ± std over seeds",
        "",
        "| arch | measure | patch | final test acc % | best test acc % | steps to 90% "
        "| steps to 95% | speed-up vs none (95%) | AUC test acc % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, s in zip(means, stds, strict=True):
        n = m["n_seeds"]

        def reach(k, fmt=num):
            cell = _pm(m[k], s[k], fmt)
            r = m["reached_" + k[-2:]]
            return cell + (f" ({r}/{n})" if 0 < r < n else "")

        speed = "–" if m["speedup_95"] is None else _pm(m["speedup_95"], s["speedup_95"], ratio)
        lines.append(f"| {m['arch']} | {m['measure']} | {m['patch'] or '–'} | "
                     f"{_pm(m['final_test_acc'], s['final_test_acc'], acc)} | "
                     f"{_pm(m['best_test_acc'], s['best_test_acc'], acc)} | "
                     f"{reach('steps_to_90')} | {reach('steps_to_95')} | "
                     f"{speed} | "
                     f"{_pm(m['auc_test_acc'], s['auc_test_acc'], acc)} |")
    lines += [
        "",
        "Steps-to columns average the seeds that reached the target ((k/n) when not all "
        "did; \"never\" when none did); the resolution is the evaluation interval. "
        "Speed-up = steps to 95% of `none` (same seed) / steps to 95% of the run. AUC = "
        "area under test accuracy against steps, divided by the step range.",
        "",
        "## Per run",
        "",
        "| arch | measure | patch | seed | final test acc % | best test acc % | steps to 90% "
        "| steps to 95% | speed-up | AUC % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['arch']} | {r['measure']} | {r['patch'] or '–'} | {r['seed']} | "
            f"{acc(r['final_test_acc'])} | {acc(r['best_test_acc'])} | "
            f"{'never' if r['steps_to_90'] is None else r['steps_to_90']} | "
            f"{'never' if r['steps_to_95'] is None else r['steps_to_95']} | "
            f"{'–' if r['speedup_95'] is None else ratio(r['speedup_95'])} | "
            f"{acc(r['auc_test_acc'])} |")
    lines += ["", "## Figures", ""]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    Path(path).write_text("\n".join(lines) + "\n")


def _band(ax, steps, curves, label, color=None):
    """Mean line with the min..max spread over seeds shaded."""
    import numpy as np

    y = np.array(curves, dtype=float)  # (seeds, points)
    (line,) = ax.plot(steps, y.mean(0), label=label, color=color)
    if len(y) > 1:
        ax.fill_between(steps, y.min(0), y.max(0), color=line.get_color(), alpha=0.2, lw=0)


def _curves(rows_list, key):
    """Common steps and per-seed values of ``key`` (rows without it dropped)."""
    steps = [r["step"] for r in rows_list[0] if r.get(key) is not None]
    vals = []
    for rows in rows_list:
        by = {r["step"]: r.get(key) for r in rows}
        vals.append([by.get(s) for s in steps])
    keep = [i for i in range(len(steps)) if all(v[i] is not None for v in vals)]
    return [steps[i] for i in keep], [[v[i] for i in keep] for v in vals]


def _figure(ncols, width=5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def write_figures(plan: Plan, rows_of: dict) -> list[Path]:
    """Fig. 4 (accuracy per measure) and Fig. 5 (training loss per patch size)."""
    st, out, files = plan.settings, plan.out, []
    seeds = st["seeds"]
    for arch in st["archs"]:
        for p in st["patches"]:
            fig, (ax_tr, ax_te) = _figure(2)
            for c in plan.caches:
                if c.measure != "none" and c.patch != p:
                    continue
                rl = [rows_of[(arch, c.label, s)] for s in seeds]
                _band(ax_tr, *_curves(rl, "train_acc"), c.measure)
                _band(ax_te, *_curves(rl, "test_acc"), c.measure)
            for ax, what in ((ax_tr, "training"), (ax_te, "test")):
                ax.set(xlabel="step", ylabel=f"{what} accuracy", ylim=(0, 1),
                       title=f"{what} accuracy, {arch}, patch {p}x{p}")
                ax.grid(alpha=0.3)
                ax.legend()
            f = out / f"fig4_accuracy_{arch}_p{p}.png"
            fig.savefig(f, dpi=100)
            files.append(f)
        ordered = [m for m in st["measures"] if m != "none"] or ["none"]
        fig, axes = _figure(len(ordered))
        for ax, m in zip(axes, ordered, strict=True):
            rl = [rows_of[(arch, "none", s)] for s in seeds]
            _band(ax, *_curves(rl, "train_loss"), "unmodified", color="k")
            if m != "none":
                for p in st["patches"]:
                    rl = [rows_of[(arch, _label(m, p), s)] for s in seeds]
                    _band(ax, *_curves(rl, "train_loss"), f"{m} {p}x{p}")
            ax.set(xlabel="step", ylabel="training loss (cross-entropy)",
                   title=f"training loss, {arch}, {m}")
            ax.grid(alpha=0.3)
            ax.legend()
        f = out / f"fig5_loss_{arch}.png"
        fig.savefig(f, dpi=100)
        files.append(f)
    return files


# ------------------------------------------------------------------ the experiment
def compare(source: str, out, *, measures: Sequence[str] = ("none", "mi"),
            patches: Sequence[int] = (8,), archs: Sequence[str] = ("vgg",), seeds=3,
            steps: int = 1000, width: float = 0.25, lr: float = 1e-3, batch_size: int = 32,
            eval_every: int = 100, size: int = 32, bins: int = 256, test_fraction: float = 0.1,
            device: str = "auto", threads: Optional[int] = None, dry_run: bool = False,
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
        Output folder (see the module docstring for its layout).
    measures, patches, archs, seeds
        What to compare; ``none`` is added when missing. ``seeds`` is a count
        (0..n-1) or a list of seeds.
    steps, width, lr, batch_size, eval_every
        Training hyperparameters, the same for every run (see ``TrainConfig``).
    size, bins, test_fraction
        Cache options (as for ``porder reorder``).
    device : {'cpu', 'cuda', 'auto'}
    threads : int, optional
        CPU threads for torch (default: all cores).
    dry_run : bool
        Only plan: return the :class:`Plan` without building or training.
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
        options.
    """
    from .pipeline import build_cache
    from .train.loop import TrainConfig, read_metrics, resolve_device, train

    log = log or (lambda line: None)
    plan = make_plan(source, out, measures=measures, patches=patches, archs=archs, seeds=seeds,
                     steps=steps, width=width, lr=lr, batch_size=batch_size,
                     eval_every=eval_every, size=size, bins=bins, test_fraction=test_fraction,
                     device=device)
    if dry_run:
        return plan
    train_device = resolve_device(device)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "data").mkdir(exist_ok=True)
    (plan.out / "compare.json").write_text(json.dumps(plan.settings, indent=2) + "\n")

    cache_device = "auto" if device in ("auto", "cuda") else "cpu"
    for c in plan.caches:
        if c.state == "ready":
            log(f"cache {c.path}: reusing")
            continue
        log(f"cache {c.path}: {'resuming' if c.state == 'resume' else 'building'}")
        build_cache(source, c.path, measure=c.measure, patch=c.patch, bins=bins, size=size,
                    test_fraction=test_fraction, seed=0, device=cache_device, resume=True,
                    progress=cache_progress)
        c.state = "ready"
    if cache_progress is not None and hasattr(cache_progress, "close"):
        cache_progress.close()

    rows_of = {}
    for i, r in enumerate(plan.runs, 1):
        key = (r.arch, r.label, r.seed)
        desc = f"[{i}/{len(plan.runs)}] {r.arch} {r.label} seed {r.seed}"
        if r.state == "done":
            log(f"{desc}: done, skipped")
            rows_of[key] = read_metrics(r.dir)
            continue
        log(f"{desc}: " + (f"resuming at step {r.at_step}" if r.state == "resume" else "training"))
        cfg = TrainConfig(arch=r.arch, width=width, lr=lr, batch_size=batch_size, steps=steps,
                          eval_every=eval_every, seed=r.seed, device=device, threads=threads)
        prog = progress_for(desc) if progress_for else None
        try:
            rows_of[key] = train(r.cache, cfg, r.dir, resume=True, progress=prog).rows
        finally:
            if prog is not None and hasattr(prog, "close"):
                prog.close()
        r.state = "done"

    runs, means, stds = summarise(plan, rows_of)
    meta0 = read_meta(plan.caches[0].path)
    meta = {"train": meta0["splits"].get("train"), "test": meta0["splits"].get("test"),
            "classes": len(meta0["classes"]), "device": train_device}
    figures = write_figures(plan, rows_of)
    csv_path, md_path = plan.out / "summary.csv", plan.out / "summary.md"
    write_csv(csv_path, runs + [x for pair in zip(means, stds, strict=True) for x in pair])
    write_markdown(md_path, plan, runs, means, stds, meta, figures)
    log(f"wrote {md_path}, {csv_path} and {len(figures)} figures")
    return CompareResult(plan=plan, runs=runs, means=means, stds=stds,
                         files=[csv_path, md_path, *figures])
