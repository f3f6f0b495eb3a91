"""The files of a run folder other than the checkpoint: ``metrics.jsonl`` (one row per
evaluation), ``config.json``, ``result.json`` and ``curves.png``."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
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


def _write_metrics(out: Path, rows: list[dict]) -> None:
    tmp = out / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / METRICS)


def _atomic_json(path: Path, obj) -> None:
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


def plot_curves(rows: list[dict], path, *, title: str = "") -> None:
    """Loss and accuracy (train and test) against steps, written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_l, ax_a = fig.subplots(1, 2)
    tr = [r for r in rows if r.get("train_loss") is not None]
    steps = [r["step"] for r in rows]
    ax_l.plot([r["step"] for r in tr], [r["train_loss"] for r in tr], label="train")
    ax_l.plot(steps, [r["test_loss"] for r in rows], label="test")
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



def _finish(path, cfg, out, rows, step, wall, device, world) -> None:
    """curves.png and result.json of a finished run."""
    try:
        plot_curves(rows, out / CURVES, title=f"{cfg.arch} on {Path(path).name}"
                    + (f" (reordered on the fly: {cfg.reorder}, patch {cfg.patch})"
                       if cfg.reorder else ""))
    except Exception as e:  # a figure must never lose a finished run
        import warnings

        warnings.warn(f"could not draw {out / CURVES}: {e}", stacklevel=2)
    final = rows[-1]
    _atomic_json(out / RESULT, {
        "complete": True, "steps": step, "config": asdict(cfg), "device": device,
        "world_size": world,
        "final_test_acc": final["test_acc"], "final_test_loss": final["test_loss"],
        "best_test_acc": max(r["test_acc"] for r in rows), "wall_s": wall,
        "mean_images_per_s": _mean([r["images_per_s"] for r in rows[1:]]),
        "mean_data_wait": _mean([r["data_wait"] for r in rows[1:]])})


def _mean(values) -> Optional[float]:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None
