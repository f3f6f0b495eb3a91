"""The files of a run folder other than the checkpoint: ``metrics.jsonl`` (one row per
evaluation, with the loss of every step since the previous one), ``config.json``,
``result.json`` and ``curves.png``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

METRICS, CONFIG, RESULT, CURVES = "metrics.jsonl", "config.json", "result.json", "curves.png"


def read_metrics(out) -> list[dict]:
    """The rows of ``out/metrics.jsonl`` (an empty list when absent).

    ValueError naming the file and line when a row is not a JSON object with an
    integer ``step`` and numbers ``test_loss`` and ``test_acc``.
    """
    p = Path(out) / METRICS
    if not p.exists():
        return []
    rows = []
    for number, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not _is_row(row):
            raise ValueError(f"'{p}' line {number} is not a metrics row (a JSON object with an "
                             f"integer 'step' and numbers 'test_loss', 'test_acc'); repair or "
                             f"delete the file")
        rows.append(row)
    return rows


def _is_row(row) -> bool:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return (isinstance(row, dict) and isinstance(row.get("step"), int)
            and not isinstance(row["step"], bool) and number(row.get("test_loss"))
            and number(row.get("test_acc")))


def write_metrics(out: Path, rows: list[dict]) -> None:
    """Write every row to ``out/metrics.jsonl`` atomically (a temporary file, then a rename)."""
    tmp = out / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / METRICS)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_result(out) -> Optional[dict]:
    """``out/result.json`` of a finished run, or None."""
    p = Path(out) / RESULT
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def step_losses(rows: list[dict]) -> tuple[list[int], list[float]]:
    """The training loss of every step of a run: (steps, losses).

    From each row's ``train_loss_steps`` (the steps just before the row's own);
    a row without it (written by an older porder) gives its interval mean
    ``train_loss`` at its step.
    """
    steps: list[int] = []
    losses: list[float] = []
    for r in rows:
        per = r.get("train_loss_steps")
        if per:
            steps += range(int(r["step"]) - len(per) + 1, int(r["step"]) + 1)
            losses += per
        elif r.get("train_loss") is not None:
            steps.append(int(r["step"]))
            losses.append(r["train_loss"])
    return steps, losses


def loss_window(n_steps: int) -> int:
    """Steps averaged by the plotted training loss: about a fiftieth of the run, 1..100."""
    return max(1, min(100, n_steps // 50))


def running_mean(values, window: int) -> list[float]:
    """Trailing mean of the last ``window`` values (fewer at the start)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)                 # (n,)
    c = np.concatenate([[0.0], np.cumsum(v)])
    hi = np.arange(1, len(v) + 1)
    lo = np.maximum(0, hi - window)
    return ((c[hi] - c[lo]) / (hi - lo)).tolist()


def plot_curves(rows: list[dict], path, *, title: str = "") -> None:
    """Loss and accuracy (train and test) against steps, written as a PNG.

    The training loss is drawn for every step (faint) and as a running mean over
    :func:`loss_window` steps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_l, ax_a = fig.subplots(1, 2)
    tr = [r for r in rows if r.get("train_loss") is not None]
    steps = [r["step"] for r in rows]
    s, loss = step_losses(rows)
    w = loss_window(len(s))
    if w > 1:
        ax_l.plot(s, loss, color="C0", alpha=0.25, lw=0.8)
    ax_l.plot(s, running_mean(loss, w), color="C0",
              label=f"train (mean of {w} steps)" if w > 1 else "train")
    ax_l.plot(steps, [r["test_loss"] for r in rows], color="C1", label="test")
    ax_a.plot([r["step"] for r in tr], [r["train_acc"] for r in tr], label="train")
    ax_a.plot(steps, [r["test_acc"] for r in rows], label="test")
    ax_l.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_a.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)



def run_title(cfg, path, meta: dict) -> str:
    """What a run trained: network, width, file, measure and patch (figure titles)."""
    if cfg.reorder:
        how = f"{cfg.reorder}, patch {cfg.patch} (reordered on the fly)"
    elif meta.get("measure") in (None, "none"):
        how = "unmodified (measure none)"
    else:
        how = f"{meta['measure']}, patch {meta.get('patch')}"
    return f"{cfg.arch}, width {cfg.width:g}, on {Path(path).name}: {how}"


def write_result(path, cfg, out, rows, step, wall, device, world, meta: dict) -> None:
    """curves.png and result.json of a finished run."""
    from .config import effective_config

    try:
        plot_curves(rows, out / CURVES, title=run_title(cfg, path, meta))
    except Exception as e:  # a figure must never lose a finished run
        import warnings

        warnings.warn(f"could not draw {out / CURVES}: {e}", stacklevel=2)
    final = rows[-1]
    write_json(out / RESULT, {
        "complete": True, "steps": step, "config": effective_config(cfg, device),
        "device": device,
        "world_size": world,
        "final_test_acc": final["test_acc"], "final_test_loss": final["test_loss"],
        "best_test_acc": max(r["test_acc"] for r in rows), "wall_s": wall,
        "mean_images_per_s": _mean([r["images_per_s"] for r in rows[1:]]),
        "mean_data_wait": _mean([r["data_wait"] for r in rows[1:]])})


def _mean(values) -> Optional[float]:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None
