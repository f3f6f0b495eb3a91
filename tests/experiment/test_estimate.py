"""porder.experiment.estimate and the one time estimate of ``compare --dry-run``.

Training steps and cache reordering are given fixed fake times here (the real
measurement is tested in tests/train/test_timing.py), so every number of the
report is known in advance and nothing depends on the machine's speed.
"""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

import porder.train.timing as timing
from porder.cli.train import compare as compare_cmd
from porder.experiment import estimate as estimate_mod
from porder.experiment import make_plan
from porder.experiment.estimate import estimate_times, evaluations_left
from porder.experiment.plan import duration
from porder.train.timing import StepTiming

STEP_S = {(): 10.0, ("stem:mi:4",): 20.0}   # fake seconds per training step, per network
EVAL_IMAGE_S = 0.5                           # fake seconds of evaluation per test image
REORDER_IMAGE_S = 0.25                       # fake seconds of porder.reorder per image


@pytest.fixture
def fake_times(monkeypatch):
    """Fixed step, evaluation and reorder times; returns the networks timed, in order."""
    seen = []

    def time_steps(cfg, *, num_classes, size, **kw):
        seen.append((cfg.arch, tuple(cfg.fm_reorder), num_classes, size))
        return StepTiming(step_s=STEP_S[tuple(cfg.fm_reorder)], eval_image_s=EVAL_IMAGE_S,
                          steps_timed=3, warmup=2, eval_images=32, device="cpu", threads=1)

    monkeypatch.setattr(timing, "time_steps", time_steps)
    monkeypatch.setattr(estimate_mod, "reorder_seconds", lambda *a, **kw: REORDER_IMAGE_S)
    return seen


def test_evaluations_left():
    assert evaluations_left(0, 10, 5, fresh=True) == 3          # steps 0, 5, 10
    assert evaluations_left(0, 11, 5, fresh=True) == 4          # 0, 5, 10, 11
    assert evaluations_left(5, 11, 5, fresh=False) == 2         # 10, 11
    assert evaluations_left(10, 10, 5, fresh=False) == 0


def test_each_item_gets_its_time_and_the_total_is_their_sum(tmp_path, fake_times):
    plan = make_plan("synthetic:50:3", tmp_path, measures=["mi", "fm:stem:mi:4"], patches=[8],
                     archs=["vgg"], seeds=2, steps=10, eval_every=5, size=16,
                     test_fraction=0.2)
    assert plan.seconds_left is None                             # not estimated yet
    assert [r.label for r in plan.runs[:3]] == ["none", "mi-p8", "fm-stem-mi-p4"]
    plan.runs[0].state, plan.runs[0].at_step = "resume", 5      # none, seed 0: half done
    plan.runs[1].state = "done"                                  # mi, seed 0
    assert estimate_times(plan) is plan
    # one measurement per network, the feature-map layer included
    assert fake_times == [("vgg", (), 3, 16), ("vgg", ("stem:mi:4",), 3, 16)]
    n_test, n_images = 10, 50                                    # 20% of 50 held out
    new = lambda step_s: 10 * step_s + 3 * n_test * EVAL_IMAGE_S  # evaluations at 0, 5, 10
    want = [5 * 10.0 + 1 * n_test * EVAL_IMAGE_S, None, new(20.0), new(10.0), new(10.0),
            new(20.0)]
    assert [r.seconds for r in plan.runs] == pytest.approx(want)
    assert [c.seconds for c in plan.caches] == pytest.approx([REORDER_IMAGE_S * n_images] * 2)
    listed = [c.seconds for c in plan.caches] + [s for s in want if s is not None]
    assert plan.seconds_left == pytest.approx(sum(listed))
    assert len(plan.todo) == 2 + 5

    text = plan.describe()
    assert text.count("total: ~") == 1 and text.splitlines()[-1].startswith("total: ~")
    assert f"total: ~{duration(sum(listed))} = 2 caches to build" in text
    assert "+ 5 runs to train" in text
    assert estimate_mod.REORDER_SAMPLE == 64


def test_speeds_from_the_runs_on_disk_are_per_network(tmp_path, fake_times):
    """The metrics of the runs without a feature-map layer do not time the one with it."""
    plan = make_plan("synthetic:50:3", tmp_path, measures=["mi", "fm:stem:mi:4"], patches=[8],
                     archs=["vgg"], seeds=1, steps=10, eval_every=5, size=16, batch_size=8,
                     test_fraction=0.2)
    for r in plan.runs[:2]:                                      # none and mi-p8: history
        r.dir.mkdir(parents=True)
        (r.dir / "config.json").write_text(json.dumps(
            {"device": "cpu", "config": {"width": 0.25, "batch_size": 8}}))
        rows = [{"step": s, "test_loss": 1.0, "test_acc": 0.5, "images_per_s": ips,
                 "eval_s": 2.0} for s, ips in ((5, 3.0), (10, 5.0))]
        (r.dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    estimate_times(plan)
    assert fake_times == [("vgg", ("stem:mi:4",), 3, 16)]        # only the fm network timed
    # history: 4 img/s training (mean of 3 and 5), 10 test images / 2 s = 5 img/s evaluating
    assert plan.runs[0].seconds == pytest.approx(10 * 8 / 4.0 + 3 * 10 / 5.0)
    assert plan.runs[2].seconds == pytest.approx(10 * 20.0 + 3 * 10 * EVAL_IMAGE_S)
    text = plan.describe()
    assert f"vgg: 4 img/s training, 5 img/s evaluating (from the metrics of the runs in " \
           f"{tmp_path})" in text
    assert "--fm-reorder stem:mi:4) on cpu" in text


def _seconds(text: str) -> tuple[float, float]:
    """A printed ``porder.experiment.plan.duration`` -> (seconds, half its rounding step)."""
    if text == "<1 s":
        return 0.5, 0.5
    value, unit = text.split()
    scale, half = {"s": (1, 0.5), "min": (60, 3), "h": (3600, 180)}[unit]
    return float(value) * scale, half


def _report(output: str) -> tuple[list, list, str]:
    """(times listed for the caches, times listed for the runs, the total line)."""
    section, caches, runs = None, [], []
    for line in output.splitlines():
        if line in ("caches:", "runs:"):
            section = caches if line == "caches:" else runs
        elif not line.startswith("  "):
            section = None
        m = re.search(r"  ~(<1 s|[\d.]+ (?:s|min|h))$", line)
        if section is not None and m:
            section.append(_seconds(m.group(1)))
    totals = [line for line in output.splitlines() if line.startswith("total: ")]
    assert len(totals) == 1, output                              # one report, one total
    return caches, runs, totals[0]


def test_cli_dry_run_prints_one_estimate_whose_total_is_the_sum_listed(tmp_path, fake_times):
    out = tmp_path / "cmp"
    r = CliRunner().invoke(compare_cmd, [
        "synthetic:64:2", "-o", str(out), "-m", "mi,fm:stem:mi:4", "-p", "8", "-a", "vgg",
        "--seeds", "1", "--steps", "6", "--eval-every", "3", "--size", "16", "--width",
        "0.0625", "--device", "cpu", "-j", "1", "--no-progress", "--lockstep", "off",
        "--dry-run"])
    assert r.exit_code == 0, r.output
    assert not out.exists()
    caches, runs, total = _report(r.output)
    # 58 train / 6 test images; a new run evaluates at steps 0, 3 and 6
    run = lambda step_s: 6 * step_s + 3 * 6 * EVAL_IMAGE_S
    want_runs, want_caches = [run(10.0), run(10.0), run(20.0)], [REORDER_IMAGE_S * 64] * 2
    for got, want in zip(caches + runs, want_caches + want_runs, strict=True):
        assert abs(got[0] - want) <= got[1], (got, want)
    m = re.match(r"total: ~(.+?) = 2 caches to build \(~(.+?)\) \+ 3 runs to train \(~(.+?)\) "
                 r"on this machine", total)
    assert m, total
    (t, half), (c, c_half), (tr, tr_half) = (_seconds(g) for g in m.groups())
    listed = sum(v for v, _ in caches + runs)
    rounding = sum(h for _, h in caches + runs)
    assert abs(t - listed) <= half + rounding                    # the total is the sum listed
    assert abs(c - sum(v for v, _ in caches)) <= c_half + sum(h for _, h in caches)
    assert abs(tr - sum(v for v, _ in runs)) <= tr_half + sum(h for _, h in runs)
    assert abs(t - sum(want_caches + want_runs)) <= half
    # the report of the old second estimate is gone
    assert "time estimate (" not in r.output and "estimated training time" not in r.output
    assert r.output.count("how the times were found") == 1
    assert r.output.count("ms per training step") == 2           # vgg, vgg with the layer


def test_no_estimate_when_runs_conflict(tmp_path, fake_times):
    out = tmp_path / "cmp"
    plan = make_plan("synthetic:40:2", out, measures=["none"], seeds=1, size=16, steps=4)
    d = plan.runs[0].dir
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"steps": 9}))
    r = CliRunner().invoke(compare_cmd, ["synthetic:40:2", "-o", str(out), "-m", "none",
                                         "--seeds", "1", "--size", "16", "--steps", "4",
                                         "--device", "cpu", "--dry-run"])
    assert r.exit_code == 1 and "will fail: it is at step 9, beyond --steps 4" in r.output
    assert "total:" not in r.output and "~" not in r.output and fake_times == []
