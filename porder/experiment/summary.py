"""Summarising a comparison: steps to a share of the baseline's accuracy, speed-up,
area under the accuracy curve, mean and std over seeds; CSV and Markdown tables."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional, Sequence

from .plan import FM_PREFIX, Plan, is_fm
from .stats import LEVEL, PairedDifference, paired_difference, verdict

# Relative tolerance of the accuracy thresholds: 0.95 * 0.8 is 0.7600000000000001 in
# floating point, and an accuracy of 76/100 must count as reaching it.
THRESHOLD_TOL = 1e-9
SUMMARY_FIELDS = ("arch", "measure", "patch", "seed", "n_seeds", "steps", "final_test_acc",
                  "best_test_acc", "target_90", "target_95", "steps_to_90", "steps_to_95",
                  "reached_90", "reached_95", "speedup_95", "auc_test_acc", "run_dir")


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
    """Mean and sample std; the std of one value is None (undefined, not 0)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd


def summarise(plan: Plan, rows_of: dict) -> tuple[list, list, list]:
    """Per-run rows, then mean and std rows per (arch, measure, patch).

    ``rows_of[(arch, label, seed)]`` holds the metrics rows of each run. The
    baseline of an arch is the mean over seeds of ``none``'s final test
    accuracy; the speed-up pairs each run with ``none`` of the same seed.
    Standard deviations are sample ones (n - 1), None from a single value (the
    tables then show the mean alone); steps-to figures average the seeds that
    reached the target (``reached_*`` counts them).
    """
    runs, means, stds = [], [], []
    for arch in plan.settings["archs"]:
        base_rows = {s: rows_of[(arch, "none", s)] for s in plan.settings["seeds"]}
        baseline = sum(r[-1]["test_acc"] for r in base_rows.values()) / len(base_rows)
        base95 = {s: steps_to(r, 0.95 * baseline) for s, r in base_rows.items()}
        for c in plan.arms:
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


# ------------------------------------------------------------ paired verdicts
PAIRED_FIELDS = ("arch", "measure", "patch", "versus", "n_seeds", "auc_n", "auc_diff", "auc_sd",
                 "auc_ci_low", "auc_ci_high", "auc_p", "steps_n", "steps_diff", "steps_sd",
                 "steps_ci_low", "steps_ci_high", "steps_p", "verdict")


def reference_arm(measure: str, patch, versus: str):
    """The (measure, patch) an arm is compared with: ``none``, or the ``random`` control of
    the same kind (input ordering or feature-map layer at the same point) and patch."""
    if versus == "none":
        return "none", ""
    if is_fm(measure):
        point = measure[len(FM_PREFIX):].split(":")[0]
        return f"{FM_PREFIX}{point}:random", patch
    return "random", patch


def paired_comparisons(plan: Plan, runs: Sequence[dict]) -> list[dict]:
    """Every arm against ``none`` and against its ``random`` control, paired by seed.

    For each arch and arm (other than the reference itself), the differences
    arm minus reference over the seeds of the area under the test-accuracy curve
    (``auc_*``) and of the steps to 95% of the baseline (``steps_*``, over the
    seeds where both runs reached it), each with its t interval at
    :data:`~porder.experiment.stats.LEVEL` and paired t-test p-value, and the
    :func:`~porder.experiment.stats.verdict`. Comparisons with ``random`` are
    made when the comparison has that control.

    Parameters
    ----------
    plan : Plan
    runs : list of dict
        The per-run rows of :func:`summarise`.

    Returns
    -------
    list of dict with the keys :data:`PAIRED_FIELDS` (the ``PairedDifference`` of
    each metric also under ``"auc"`` and ``"steps"``).
    """
    seeds = plan.settings["seeds"]
    by = {(r["arch"], r["measure"], r["patch"], r["seed"]): r for r in runs}
    out = []
    for arch in plan.settings["archs"]:
        for arm in plan.arms:
            patch = "" if arm.measure == "none" else arm.patch
            for versus in ("none", "random"):
                ref = reference_arm(arm.measure, patch, versus)
                if ref == (arm.measure, patch) or (arch, *ref, seeds[0]) not in by:
                    continue
                a = [by[(arch, arm.measure, patch, s)] for s in seeds]
                b = [by[(arch, *ref, s)] for s in seeds]
                d_auc = paired_difference([r["auc_test_acc"] for r in a],
                                          [r["auc_test_acc"] for r in b])
                d_steps = paired_difference([r["steps_to_95"] for r in a],
                                            [r["steps_to_95"] for r in b])
                row = {"arch": arch, "measure": arm.measure, "patch": patch,
                       "versus": "none" if versus == "none" else ref[0], "n_seeds": len(seeds),
                       "auc": d_auc, "steps": d_steps,
                       "verdict": verdict(d_auc, d_steps, len(seeds))}
                for key, d in (("auc", d_auc), ("steps", d_steps)):
                    row.update({f"{key}_n": d.n, f"{key}_diff": d.mean, f"{key}_sd": d.sd,
                                f"{key}_ci_low": d.lo, f"{key}_ci_high": d.hi,
                                f"{key}_p": d.p})
                out.append(row)
    return out


def _signed(v: float, fmt: str) -> str:
    return format(v, "+" + fmt).replace("-", "−")


def _diff_cell(d: PairedDifference, n_seeds: int, scale: float, fmt: str, what: str) -> str:
    """``+1.2 [−0.4, +2.8]``; notes for missing pairs and for no interval."""
    if d.n == 0:
        return f"n/a (no seed where both {what})"
    cell = _signed(scale * d.mean, fmt)
    if d.has_interval:
        cell += f" [{_signed(scale * d.lo, fmt)}, {_signed(scale * d.hi, fmt)}]"
    elif n_seeds == 1:
        cell += " (CI n/a, 1 seed)"
    else:
        cell += " (CI n/a, 1 pair)"
    if 0 < d.n < n_seeds:
        cell += f" ({d.n}/{n_seeds} seeds)"
    return cell


def paired_markdown(comparisons: Sequence[dict], *, has_random: bool) -> list[str]:
    """The "Verdict" section of ``summary.md`` (lines)."""
    pct = int(round(100 * LEVEL))
    lines = ["## Verdict: paired differences over seeds", "",
             "Runs with the same seed start from the same weights and see the same batches, "
             "so each seed gives one paired difference (ordering minus reference). "
             f"Intervals are {pct}% t intervals on the paired differences (Student t, n − 1 "
             "degrees of freedom); p is the paired t test's. ΔAUC is in percentage points of "
             "test accuracy (> 0: learns sooner); Δsteps counts steps to 95% of the `none` "
             "baseline, over the seeds where both runs reached it (< 0: faster).", ""]
    if not comparisons:
        return lines + ["Nothing to compare: add measures besides `none`.", ""]
    lines += ["| arch | measure | patch | vs | ΔAUC, pp [95% CI] | p | Δsteps to 95% [95% CI] "
              "| verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in comparisons:
        p = "–" if c["auc"].p is None else f"{c['auc'].p:.3f}"
        lines.append(
            f"| {c['arch']} | {c['measure']} | {c['patch'] or '–'} | {c['versus']} | "
            f"{_diff_cell(c['auc'], c['n_seeds'], 100, '.2f', 'has a curve')} | {p} | "
            f"{_diff_cell(c['steps'], c['n_seeds'], 1, '.0f', 'reached 95%')} | "
            f"**{c['verdict']}** |")
    lines += ["",
              "Verdict: *faster* when an interval lies on the faster side (ΔAUC above 0 or "
              "Δsteps below 0) and the other does not lie on the slower side; *slower* "
              "likewise; *mixed* when they disagree; otherwise *no detectable difference* at "
              "this number of seeds (more seeds narrow the intervals). "
              + ("" if has_random else "No `random` control in this comparison: add it to "
                 "`--measures` to separate the effect of an ordering from that of shuffling "
                 "patches at all."), ""]
    return lines


# ------------------------------------------------------------------ reports
def _csv_value(v):
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else v


def _write_rows(path, fields: Sequence[str], rows: Sequence[dict]) -> None:
    """``rows`` as CSV with the columns ``fields`` (a missing value is empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in fields})
    Path(path).write_text(buf.getvalue())


def write_csv(path, rows: Sequence[dict]) -> None:
    """The runs and their means and standard deviations as CSV (:data:`SUMMARY_FIELDS`)."""
    _write_rows(path, SUMMARY_FIELDS, rows)


def write_paired_csv(path, comparisons: Sequence[dict]) -> None:
    """The :func:`paired_comparisons` as CSV (:data:`PAIRED_FIELDS`; fractions, not %)."""
    _write_rows(path, PAIRED_FIELDS, comparisons)


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


def _pm(m, s, fmt):
    if m is None:
        return "never"
    return fmt(m) if s is None else f"{fmt(m)} ± {fmt(s)}"


def _subset_note(settings: dict, meta: dict) -> str:
    """What the steps-to and AUC columns read when curve points use a test subset."""
    k, n = settings.get("eval_images"), meta.get("test")
    if not k or not n or k >= n:
        return ""
    return (f" Curve points before the last step are evaluated on a fixed seeded subset of "
            f"{k} of the {n} test images, the same for every run; the last step on all "
            f"{n}: final accuracies, and the targets taken from the baseline's final "
            f"accuracy, are whole-split figures, while the step where a run crosses a "
            f"target, the best accuracy and the AUC are read from the subset curve.")


def write_markdown(path, plan: Plan, runs, means, stds, meta: dict, figures,
                   comparisons: Optional[Sequence[dict]] = None) -> None:
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
    lines.append("")
    if comparisons is None:
        comparisons = paired_comparisons(plan, runs)
    lines += paired_markdown(comparisons,
                             has_random=any(a.measure == "random" for a in plan.arms))
    lines += [
        "",
        "## Mean ± std over seeds" if len(st["seeds"]) > 1 else
        "## One seed (no spread: run more seeds for mean and std)",
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
        "area under test accuracy against steps, divided by the step range."
        + _subset_note(st, meta),
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
