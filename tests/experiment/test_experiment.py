"""`porder compare`: plan, caches, paired runs, tables recomputed from metrics.jsonl, resume."""
from __future__ import annotations

import csv
import json
import math

import pytest
from click.testing import CliRunner

from porder.cli.train import compare as compare_cmd
from porder.experiment import auc, compare, make_plan, speedup, steps_to
from porder.store import read_meta
from porder.train import read_metrics

SOURCE = "synthetic:40:2"
TINY = ["--arch", "vgg", "--width", "0.0625", "--steps", "4", "--eval-every", "2", "-b", "8",
        "--size", "16", "--device", "cpu", "-j", "1", "--no-progress"]


def rows_of(*accs, every=10):
    return [{"step": i * every, "test_acc": a} for i, a in enumerate(accs)]


def test_metric_definitions():
    rows = rows_of(0.5, 0.7, 0.76, 0.8)
    assert steps_to(rows, 0.95 * 0.8) == 20          # 0.76 reaches 0.95 * 0.8 (float-safe)
    assert steps_to(rows, 0.81) is None
    # trapezoid: (0.6 + 0.73 + 0.78) * 10 / 30
    assert auc(rows) == pytest.approx((0.6 + 0.73 + 0.78) / 3)
    assert speedup(30, 10) == 3.0 and speedup(None, 10) is None and speedup(30, None) is None
    assert speedup(0, 0) == 1.0 and math.isinf(speedup(10, 0))


def _float(v):
    return None if v == "" else float(v)


def _recompute(run_dir, baseline):
    """Final/best/steps-to/AUC of one run, straight from its metrics.jsonl."""
    rows = read_metrics(run_dir)
    acc = [r["test_acc"] for r in rows]
    steps = [r["step"] for r in rows]

    def first(t):
        return next((s for s, a in zip(steps, acc) if a >= t - 1e-9), None)

    area = sum((steps[i + 1] - steps[i]) * (acc[i] + acc[i + 1]) / 2 for i in range(len(acc) - 1))
    return {"final_test_acc": acc[-1], "best_test_acc": max(acc),
            "steps_to_90": first(0.9 * baseline), "steps_to_95": first(0.95 * baseline),
            "auc_test_acc": area / (steps[-1] - steps[0])}


def test_compare_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    args = [SOURCE, "-o", str(out), "-m", "mi,random", "-p", "8", "--seeds", "2", *TINY]
    r = CliRunner().invoke(compare_cmd, args + ["--dry-run"])
    assert r.exit_code == 0, r.output
    assert "measures none, mi, random" in r.output and r.output.count(" new ") == 6
    assert not out.exists()

    r = CliRunner().invoke(compare_cmd, args)
    assert r.exit_code == 0, r.output
    assert "# porder compare" in r.output and "## Per run" in r.output
    for name in ("summary.csv", "summary.md", "fig4_accuracy_vgg_p8.png", "fig5_loss_vgg.png",
                 "data/none.h5", "data/mi-p8.h5", "data/random-p8.h5"):
        assert (out / name).exists(), name
    assert read_meta(out / "data" / "mi-p8.h5")["measure"] == "mi"

    table = list(csv.DictReader((out / "summary.csv").open()))
    runs = [t for t in table if t["seed"] not in ("mean", "std")]
    assert len(runs) == 6 and {t["measure"] for t in runs} == {"none", "mi", "random"}
    base = {t["seed"]: t for t in runs if t["measure"] == "none"}
    baseline = sum(read_metrics(t["run_dir"])[-1]["test_acc"] for t in base.values()) / 2
    for t in runs:
        want = _recompute(t["run_dir"], baseline)
        for k, v in want.items():
            got = _float(t[k])
            assert (got is None) == (v is None), (t["run_dir"], k)
            if v is not None:
                assert got == pytest.approx(v, abs=1e-12), (t["run_dir"], k)
        b95 = _recompute(base[t["seed"]]["run_dir"], baseline)["steps_to_95"]
        s = want["steps_to_95"]
        want_speed = None if b95 is None or s is None else (
            (1.0 if b95 == 0 else math.inf) if s == 0 else b95 / s)
        assert _float(t["speedup_95"]) == want_speed
        assert int(t["steps"]) == 4
    # mean and std rows agree with the run rows
    for m in (t for t in table if t["seed"] == "mean"):
        finals = [float(t["final_test_acc"]) for t in runs
                  if t["measure"] == m["measure"] and t["patch"] == m["patch"]]
        assert float(m["final_test_acc"]) == pytest.approx(sum(finals) / 2)
        sd = next(t for t in table if t["seed"] == "std" and t["measure"] == m["measure"])
        assert float(sd["final_test_acc"]) == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
    md = (out / "summary.md").read_text()
    assert "| vgg | mi | 8 |" in md and "fig4_accuracy_vgg_p8.png" in md
    pct = f"{100 * float(runs[0]['final_test_acc']):.1f}"
    assert f"| vgg | none | – | 0 | {pct} |" in md

    # Same command again: nothing is retrained.
    stamp = (out / "runs/vgg/mi-p8/seed1/metrics.jsonl").stat().st_mtime_ns
    r = CliRunner().invoke(compare_cmd, args)
    assert r.exit_code == 0 and r.output.count("done, skipped") == 6
    assert (out / "runs/vgg/mi-p8/seed1/metrics.jsonl").stat().st_mtime_ns == stamp


def test_one_seed_shows_no_spread(tmp_path):
    from porder.experiment import CacheItem, Plan, RunItem, summarise, write_csv, write_markdown
    from porder.experiment.plan import Arm

    settings = dict(archs=["vgg"], measures=["none", "mi"], patches=[8], seeds=[0], steps=20,
                    batch_size=8, lr=1e-3, width=0.25, eval_every=10, size=32)
    plan = Plan("synthetic:10", tmp_path, settings=settings,
                caches=[CacheItem("none", 8, tmp_path / "a.h5"), CacheItem("mi", 8, tmp_path / "b.h5")])
    plan.runs = [RunItem("vgg", c.measure, 8, 0, c.path, tmp_path / c.label) for c in plan.caches]
    plan.arms = [Arm(c.measure, c.patch, c.path) for c in plan.caches]
    curves = {("vgg", "none", 0): rows_of(0.1, 0.5, 0.6), ("vgg", "mi-p8", 0): rows_of(0.1, 0.6, 0.7)}
    runs, means, stds = summarise(plan, curves)
    assert means[1]["final_test_acc"] == pytest.approx(0.7)
    assert stds[1]["final_test_acc"] is None          # undefined from one value, not 0.0
    write_markdown(tmp_path / "s.md", plan, runs, means, stds,
                   {"train": 9, "test": 1, "classes": 2, "device": "cpu"}, [])
    md = (tmp_path / "s.md").read_text()
    assert "±" not in md.split("## Per run")[0].split("## One seed")[1]
    assert "| vgg | mi | 8 | 70.0 | 70.0 | 10 | 10 | 2.00 |" in md
    write_csv(tmp_path / "s.csv", runs + means + stds)
    std_rows = [r for r in csv.DictReader((tmp_path / "s.csv").open()) if r["seed"] == "std"]
    assert std_rows and all(r["final_test_acc"] == "" for r in std_rows)


class Stop(Exception):
    pass


def test_interrupted_compare_resumes(tmp_path):
    kw = dict(measures=["mi"], patches=[8], archs=["resnet"], seeds=1, steps=4, eval_every=2,
              width=1 / 16, batch_size=8, size=16, device="cpu", threads=1)

    def killer(desc):
        def progress(step, total, stats):
            if desc.startswith("[2/2]") and step == 3:
                raise Stop
        return progress

    with pytest.raises(Stop):
        compare(SOURCE, tmp_path, progress_for=killer, lockstep="off", **kw)
    plan = make_plan(SOURCE, tmp_path, **{k: v for k, v in kw.items() if k != "threads"})
    assert [c.state for c in plan.caches] == ["ready", "ready"]
    assert [(r.state, r.at_step) for r in plan.runs] == [("done", 4), ("resume", 2)]
    assert "resume (step 2)" in plan.describe()
    first = (tmp_path / "runs/resnet/none/seed0/metrics.jsonl").read_text()
    lines = []
    res = compare(SOURCE, tmp_path, log=lines.append, **kw)
    assert any("done, skipped" in line for line in lines)
    assert any("resuming at step 2" in line for line in lines)
    assert (tmp_path / "runs/resnet/none/seed0/metrics.jsonl").read_text() == first
    assert [r["steps"] for r in res.runs] == [4, 4]
    assert json.loads((tmp_path / "compare.json").read_text())["measures"] == ["none", "mi"]


def test_compare_rejects_bad_options(tmp_path):
    r = CliRunner().invoke(compare_cmd, [SOURCE, "-o", str(tmp_path), "-m", "none,nope"])
    assert r.exit_code == 2 and "'nope' is not a valid measure" in r.output
    r = CliRunner().invoke(compare_cmd, [SOURCE, "-o", str(tmp_path), "-p", "5", "--dry-run"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    r = CliRunner().invoke(compare_cmd, [SOURCE, "-o", str(tmp_path), "-a", "lenet"])
    assert r.exit_code == 2
    r = CliRunner().invoke(compare_cmd, [SOURCE, "-o", str(tmp_path), "-p", "4,eight"])
    assert r.exit_code == 2 and "'4,eight' is not a comma-separated list of patch sizes" in r.output
    # A cache made from another source is not silently reused.
    kw = dict(measures=["none"], patches=[8], seeds=1, size=16)
    (tmp_path / "data").mkdir()
    from porder.pipeline import CacheSpec, build_cache

    build_cache(CacheSpec("synthetic:20:2", tmp_path / "data" / "none.h5", measure="none",
                          patch=8, size=16))
    with pytest.raises(ValueError, match="other options"):
        make_plan(SOURCE, tmp_path, **kw)


def test_dry_run_checks_the_source_and_the_runs_on_disk(tmp_path):
    out = tmp_path / "cmp"
    run = lambda *extra: CliRunner().invoke(compare_cmd, [SOURCE, "-o", str(out), "--seeds", "1",
                                                          *TINY, *extra])
    r = CliRunner().invoke(compare_cmd, [str(tmp_path / "nope"), "-o", str(out), "--dry-run"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: source") and "does not exist" in r.output
    assert not out.exists()
    r = run("-b", "37", "--dry-run")                 # synthetic:40 holds 36 training images
    assert r.exit_code == 1 and "--batch-size 37 is larger than the training split" in r.output

    r = run("--dry-run")
    assert r.exit_code == 0, r.output
    assert r.output.count(" new ") == 2 and "training on cpu):" in r.output
    assert r.output.count("ms per training step: median of") == 1   # one network, timed once
    # each cache and run has its time, and one total line sums them (tests/experiment/test_estimate.py)
    assert r.output.count("  ~") == 2 + 2 and r.output.count("total: ~") == 1
    assert "= 2 caches to build (~" in r.output and "+ 2 runs to train (~" in r.output

    assert run().exit_code == 0
    settings = (out / "compare.json").read_bytes()
    r = run("--dry-run")
    assert r.exit_code == 0 and r.output.count(" done ") == 2 and "nothing left to train" in r.output
    assert "~" not in r.output and "total:" not in r.output

    r = run("--lr", "0.01", "--dry-run")             # other options: train would refuse them
    assert r.exit_code == 1 and r.output.count("  conflict vgg") == 2
    assert "will fail: options differ (lr: 0.001 -> 0.01)" in r.output
    r = run("--steps", "2", "--dry-run")             # fewer steps than done
    assert r.exit_code == 1 and "will fail: it is at step 4, beyond --steps 2" in r.output
    r = run("--steps", "6", "--dry-run")             # more steps: they resume
    assert r.exit_code == 0 and r.output.count("resume (step 4)") == 2
    assert "vgg: " in r.output and f"(from the metrics of the runs in {out})" in r.output
    assert "ms per training step" not in r.output                 # nothing timed now
    assert r.output.count("total: ~") == 1 and "= 2 runs to train (~" in r.output

    r = run("--lr", "0.01")                          # fails before writing anything
    assert r.exit_code == 1 and "cannot go on: options differ (lr: 0.001 -> 0.01)" in r.output
    assert (out / "compare.json").read_bytes() == settings


def test_defaults_agree_between_the_cli_and_the_library():
    import inspect

    from porder.cli.reorder import reorder as reorder_cmd
    from porder.cli.train import train as train_cmd

    defaults = lambda cmd: {p.name: p.default for p in cmd.params}
    cli = defaults(compare_cmd)
    for fn in (compare, make_plan):
        lib = inspect.signature(fn).parameters
        for name in ("width", "eval_every", "steps", "lr", "batch_size", "device"):
            assert lib[name].default == cli[name], (fn.__name__, name)
    # Where commands differ, their help says why.
    assert defaults(train_cmd)["width"] == 1.0 and cli["width"] == 0.25
    text = lambda cmd: " ".join(CliRunner().invoke(cmd, ["--help"]).output.split())
    assert "not train's 1.0" in text(compare_cmd) and "not train's 100" in text(compare_cmd)
    assert "compare defaults to 0.25" in text(train_cmd)
    # One grammar (issue 19): --device defaults to auto in every command.
    assert defaults(reorder_cmd)["device"] == defaults(train_cmd)["device"] == cli["device"] == "auto"


def test_workers_reach_the_cache_builds(tmp_path, monkeypatch):
    """`compare -j N` sets the caches' decoding and scoring workers, not only torch's threads."""
    import porder.pipeline as pipeline

    seen = []
    real = pipeline.build_cache

    def spy(spec, **kw):
        seen.append(spec.workers)
        return real(spec, **kw)

    monkeypatch.setattr(pipeline, "build_cache", spy)
    args = [SOURCE, "-o", str(tmp_path / "cmp"), "-m", "mi", "-p", "8", "--seeds", "1", *TINY]
    r = CliRunner().invoke(compare_cmd, args)            # TINY has -j 1
    assert r.exit_code == 0, r.output
    assert seen == [1, 1]          # none and mi-p8, each built with one worker
