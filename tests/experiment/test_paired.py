"""The verdict of a comparison (paired differences over seeds) and feature-map arms in compare."""
from __future__ import annotations

import csv
import json
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from porder.cli.train import compare as compare_cmd
from porder.experiment import make_plan, paired_comparisons
from porder.experiment.summary import reference_arm

scipy_stats = pytest.importorskip("scipy.stats")

SOURCE = "synthetic:40:2"
TINY = ["--arch", "resnet", "--width", "0.0625", "--steps", "4", "--eval-every", "2", "-b", "8",
        "--size", "16", "--device", "cpu", "-j", "1", "--no-progress"]


class StandIn(torch.nn.Module):
    """Same constructor as porder.nn.PatchReorder; rolls the patches of every map by one."""

    made: list = []

    def __init__(self, measure="mi", patch=4, *, bins=256, reference=0, descending=None,
                 channels="mean", seed=0, **kw):
        super().__init__()
        self.measure, self.patch, self.bins = measure, patch, bins
        StandIn.made.append(self)

    def forward(self, x):                                    # (N, C, S, S)
        n, c, s, _ = x.shape
        p, g = self.patch, s // self.patch
        t = x.reshape(n, c, g, p, g, p).permute(0, 1, 2, 4, 3, 5).reshape(n, c, g * g, p, p)
        t = t.roll(1, dims=2)
        return t.reshape(n, c, g, g, p, p).permute(0, 1, 2, 4, 3, 5).reshape(n, c, s, s)


@pytest.fixture
def stand_in(monkeypatch):
    mod = types.ModuleType("porder.nn")
    mod.PatchReorder = StandIn
    monkeypatch.setitem(sys.modules, "porder.nn", mod)
    StandIn.made = []
    return StandIn


def test_reference_arms():
    assert reference_arm("mi", 8, "none") == ("none", "")
    assert reference_arm("mi", 8, "random") == ("random", 8)
    assert reference_arm("fm:stem:mi", 4, "random") == ("fm:stem:random", 4)


def _fake_runs(plan, values):
    """Per-run rows as summarise() makes them, with given AUC and steps-to-95% per seed."""
    runs = []
    for arm in plan.arms:
        for s in plan.settings["seeds"]:
            auc_, steps_ = values[arm.label][s]
            runs.append({"arch": "vgg", "measure": arm.measure,
                         "patch": "" if arm.measure == "none" else arm.patch, "seed": s,
                         "auc_test_acc": auc_, "steps_to_95": steps_})
    return runs


def test_paired_comparisons_match_scipy(tmp_path):
    plan = make_plan(SOURCE, tmp_path, measures=["mi", "random", "entropy"], patches=[8],
                     seeds=4, size=16)
    values = {
        "none": [(0.60, 400), (0.62, 350), (0.58, 500), (0.61, 400)],
        "mi-p8": [(0.66, 250), (0.65, 300), (0.63, None), (0.67, 200)],
        "random-p8": [(0.59, 450), (0.61, 400), (0.57, 550), (0.62, 350)],
        "entropy-p8": [(0.60, 400), (0.61, 350), (0.59, 500), (0.60, 400)],
    }
    comps = paired_comparisons(plan, _fake_runs(plan, values))
    got = {(c["measure"], c["versus"]): c for c in comps}
    # every ordering vs none and vs random; none and random not against themselves
    assert set(got) == {("mi", "none"), ("mi", "random"), ("random", "none"),
                        ("entropy", "none"), ("entropy", "random")}
    for (m, versus), c in got.items():
        a = values[f"{m}-p8"]
        b = values["none" if versus == "none" else "random-p8"]
        ref = scipy_stats.ttest_rel([x[0] for x in a], [x[0] for x in b])
        ci = ref.confidence_interval(0.95)
        assert c["auc_n"] == 4 and c["n_seeds"] == 4
        assert (c["auc_ci_low"], c["auc_ci_high"]) == (pytest.approx(ci.low, rel=1e-9),
                                                       pytest.approx(ci.high, rel=1e-9))
        assert c["auc_p"] == pytest.approx(ref.pvalue, rel=1e-8)
        pairs = [(x[1], y[1]) for x, y in zip(a, b) if x[1] is not None and y[1] is not None]
        assert c["steps_n"] == len(pairs)
        ref = scipy_stats.ttest_rel(*zip(*pairs))
        ci = ref.confidence_interval(0.95)
        assert c["steps_ci_low"] == pytest.approx(ci.low, rel=1e-9)
        assert c["steps_ci_high"] == pytest.approx(ci.high, rel=1e-9)
    assert got[("mi", "none")]["verdict"] == "faster"            # AUC CI above 0
    assert got[("mi", "none")]["steps_n"] == 3                   # seed 2 never reached 95%
    assert got[("entropy", "none")]["verdict"] == "no detectable difference at 4 seeds"


def test_one_seed_says_na(tmp_path):
    plan = make_plan(SOURCE, tmp_path, measures=["mi"], patches=[8], seeds=1, size=16)
    comps = paired_comparisons(plan, _fake_runs(plan, {"none": [(0.5, 100)],
                                                       "mi-p8": [(0.6, 50)]}))
    (c,) = comps
    assert c["verdict"] == "n/a (1 seed)" and c["auc_ci_low"] is None
    assert c["auc_diff"] == pytest.approx(0.1)


def test_compare_with_feature_map_arms_and_verdict(stand_in, tmp_path):
    out = tmp_path / "cmp"
    args = [SOURCE, "-o", str(out), "-m", "mi,random,fm:stem:mi:4,fm:stage1:random",
            "-p", "8", "--seeds", "2", *TINY]
    r = CliRunner().invoke(compare_cmd, args + ["--dry-run"])
    assert r.exit_code == 0, r.output
    assert "measures none, mi, random, fm:stem:mi:4, fm:stage1:random" in r.output
    assert r.output.count(" new ") == 10 and "fm-stem-mi-p4" in r.output
    assert "+ 10 runs to train (~" in r.output and r.output.count("total: ~") == 1
    # one timing per network: resnet, and resnet with each feature-map layer
    assert r.output.count("ms per training step") == 3
    assert not out.exists()

    r = CliRunner().invoke(compare_cmd, args)
    assert r.exit_code == 0, r.output
    # feature-map arms train on the `none` cache (no cache of their own) with their layer
    assert sorted(p.name for p in (out / "data").glob("*.h5")) == ["mi-p8.h5", "none.h5",
                                                                 "random-p8.h5"]
    for label, spec in (("fm-stem-mi-p4", "stem:mi:4"), ("fm-stage1-random-p8",
                                                           "stage1:random:8")):
        cfg = json.loads((out / "runs/resnet" / label / "seed1/config.json").read_text())
        assert cfg["config"]["fm_reorder"] == [spec]
        assert cfg["file"].endswith("none.h5")
    assert {(m.measure, m.patch) for m in stand_in.made} >= {("mi", 4), ("random", 8)}

    table = list(csv.DictReader((out / "summary.csv").open()))
    runs = {(t["measure"], t["patch"], t["seed"]): t for t in table
            if t["seed"] not in ("mean", "std")}
    assert ("fm:stem:mi", "4", "0") in runs
    paired = list(csv.DictReader((out / "paired.csv").open()))
    pairs = {(p["measure"], p["patch"], p["versus"]) for p in paired}
    assert pairs == {("mi", "8", "none"), ("mi", "8", "random"), ("random", "8", "none"),
                     ("fm:stem:mi", "4", "none"), ("fm:stage1:random", "8", "none")}
    for p in paired:                     # recomputed from summary.csv's per-run AUC
        versus = ("none", "") if p["versus"] == "none" else (p["versus"], p["patch"])
        a = [float(runs[(p["measure"], p["patch"], s)]["auc_test_acc"]) for s in "01"]
        b = [float(runs[(*versus, s)]["auc_test_acc"]) for s in "01"]
        assert float(p["auc_diff"]) == pytest.approx((a[0] - b[0] + a[1] - b[1]) / 2, abs=1e-12)
        if p["auc_ci_low"]:
            ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
            assert float(p["auc_ci_low"]) == pytest.approx(ci.low, rel=1e-9)
        assert p["verdict"] in ("faster", "slower", "no detectable difference at 2 seeds") \
            or p["verdict"].startswith("mixed")
    md = (out / "summary.md").read_text()
    assert "## Verdict: paired differences over seeds" in md
    assert "| resnet | fm:stem:mi | 4 | none |" in md and "| resnet | mi | 8 | random |" in md
    assert "fig4_accuracy_resnet_p8.png" in md and (out / "fig5_loss_resnet.png").exists()

    # Run again: everything is done (the feature-map runs are recognised too).
    r = CliRunner().invoke(compare_cmd, args)
    assert r.exit_code == 0 and r.output.count("done, skipped") == 10


@pytest.mark.parametrize("item, message", [
    ("fm:stage9:mi:4", "resnet has no feature-map point 'stage9'"),
    ("fm:stem:mi:3", "patch 3 does not cut the 16x16 feature map"),
    ("fm:stem:mi:4:2", "is not POINT:MEASURE:PATCH"),
    ("fm:stem:nope:4", "unknown measure 'nope'"),
])
def test_compare_bad_feature_map_items_exit_2(tmp_path, item, message):
    r = CliRunner().invoke(compare_cmd, [SOURCE, "-o", str(tmp_path / "c"), "-m", f"mi,{item}",
                                         *TINY, "--dry-run"])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
