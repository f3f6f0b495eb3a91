"""The figures of a comparison: accuracy per measure (the paper's Fig. 4) and training
loss per patch size (Fig. 5), seed spread shaded (min..max) and each seed drawn thin."""
from __future__ import annotations

from pathlib import Path

from .plan import Plan, arm_label, is_fm


def _band(ax, steps, curves, label, color=None):
    """Mean line, the min..max spread over seeds shaded and every seed a thin line."""
    import numpy as np

    y = np.array(curves, dtype=float)  # (seeds, points)
    (line,) = ax.plot(steps, y.mean(0), label=label, color=color)
    if len(y) > 1:
        c = line.get_color()
        ax.fill_between(steps, y.min(0), y.max(0), color=c, alpha=0.15, lw=0)
        for seed_curve in y:
            ax.plot(steps, seed_curve, color=c, lw=0.6, alpha=0.45)


def _curves(rows_list, key):
    """Common steps and per-seed values of ``key`` (rows without it dropped)."""
    steps = [r["step"] for r in rows_list[0] if r.get(key) is not None]
    vals = []
    for rows in rows_list:
        by = {r["step"]: r.get(key) for r in rows}
        vals.append([by.get(s) for s in steps])
    keep = [i for i in range(len(steps)) if all(v[i] is not None for v in vals)]
    return [steps[i] for i in keep], [[v[i] for i in keep] for v in vals]


def _loss_curves(rows_list):
    """Per-step training loss of each seed, as a running mean (``train_loss_steps``);
    the per-evaluation means when a run has no per-step losses."""
    from ..train.metrics import loss_window, running_mean, step_losses

    per = [step_losses(rows) for rows in rows_list]
    steps = per[0][0]
    if any(s != steps for s, _ in per) or len(steps) <= len(rows_list[0]):
        return (*_curves(rows_list, "train_loss"), 1)
    w = loss_window(len(steps))
    return steps, [running_mean(v, w) for _, v in per], w


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
    net = lambda arch: f"{arch} (width {st['width']:g})"
    for arch in st["archs"]:
        for p in st["patches"]:
            fig, (ax_tr, ax_te) = _figure(2)
            for c in plan.arms:   # input orderings at patch p; feature-map ones in every panel
                if c.measure != "none" and c.patch != p and not is_fm(c.measure):
                    continue
                name = f"{c.measure}:{c.patch}" if is_fm(c.measure) else c.measure
                rl = [rows_of[(arch, c.label, s)] for s in seeds]
                _band(ax_tr, *_curves(rl, "train_acc"), name)
                _band(ax_te, *_curves(rl, "test_acc"), name)
            for ax, what in ((ax_tr, "training"), (ax_te, "test")):
                ax.set(xlabel="step", ylabel=f"{what} accuracy", ylim=(0, 1),
                       title=f"{what} accuracy, {net(arch)}, patch {p}x{p}")
                ax.grid(alpha=0.3)
                ax.legend()
            f = out / f"fig4_accuracy_{arch}_p{p}.png"
            fig.savefig(f, dpi=100)
            files.append(f)
        ordered = list(dict.fromkeys(a.measure for a in plan.arms if a.measure != "none"))
        ordered = ordered or ["none"]
        fig, axes = _figure(len(ordered))
        for ax, m in zip(axes, ordered, strict=True):
            steps, curves, w = _loss_curves([rows_of[(arch, "none", s)] for s in seeds])
            _band(ax, steps, curves, "unmodified", color="k")
            patches = []
            for a in plan.arms:
                if a.measure == m != "none":
                    p = a.patch
                    patches.append(p)
                    steps, curves, w = _loss_curves([rows_of[(arch, arm_label(m, p), s)]
                                                     for s in seeds])
                    _band(ax, steps, curves, f"{m} {p}x{p}")
            ax.set(xlabel="step", ylabel="training loss (cross-entropy)"
                   + (f", mean of {w} steps" if w > 1 else ""),
                   title=f"training loss, {net(arch)}, {m}"
                         + (f", patch {', '.join(map(str, patches))}" if patches else ""))
            ax.grid(alpha=0.3)
            ax.legend()
        f = out / f"fig5_loss_{arch}.png"
        fig.savefig(f, dpi=100)
        files.append(f)
    return files
