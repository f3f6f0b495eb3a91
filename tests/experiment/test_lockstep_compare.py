"""`porder compare --lockstep`: the groups runs train in (memory budget, maximum, modes), the
groups in --dry-run, lockstep and one-after-another runs giving the same comparison, a failed
run of a group reported while the others go on, an interrupted lockstep comparison resuming,
the evaluation subset (--eval-images) and --preset paper-cpu."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

import porder.train.group_timing as group_timing
import porder.train.lockstep as lockstep_mod
import porder.train.timing as timing
from porder.cli.train import compare as compare_cmd
from porder.experiment import compare, make_plan
from porder.experiment.groups import MAX_GROUP, data_bytes, make_groups
from porder.experiment.plan import run_config
from porder.experiment.preset import PAPER, PAPER_CPU, PAPER_CPU_FIXED, preset_values
from porder.measures import MEASURES
from porder.train import read_metrics
from porder.train.config import TIMING_FIELDS, TrainConfig, eval_indices
from porder.train.timing import StepTiming

SOURCE = "synthetic:40:2"
KW = dict(archs=["vgg"], width=1 / 16, steps=4, eval_every=2, batch_size=8, size=16,
          device="cpu")


def _plan(tmp_path, **kw):
    return make_plan(SOURCE, tmp_path, **{**KW, "measures": ["mi", "random"], "patches": [8],
                                          "seeds": 3, **kw})


def _bytes(plan, m):
    """What make_groups counts for a group of m of the plan's (one) network."""
    cfg = run_config(plan.settings, plan.runs[0].arch, 0)
    return lockstep_mod.group_bytes(cfg, m, size=plan.settings["size"],
                                    num_classes=plan.counts["classes"]) + m * data_bytes(plan)


@pytest.fixture
def fake_times(monkeypatch):
    """A training step costs 10 ms per image of its batch (all models of a lockstep group)
    plus 5 ms; evaluation 1 ms an image."""
    batches = []

    def time_steps(cfg, *, num_classes, size, **kw):
        batches.append(cfg.batch_size)
        return StepTiming(step_s=0.005 + 0.01 * cfg.batch_size, eval_image_s=0.001,
                          steps_timed=3, warmup=2, eval_images=32, device="cpu", threads=1)

    def time_group_steps(cfg, m, *, num_classes, size, **kw):
        batches.append((m, cfg.batch_size))
        return StepTiming(step_s=0.005 + 0.01 * m * cfg.batch_size, eval_image_s=float("nan"),
                          steps_timed=3, warmup=1, eval_images=0, device="cpu", threads=1)

    monkeypatch.setattr(timing, "time_steps", time_steps)
    monkeypatch.setattr(group_timing, "time_group_steps", time_group_steps)
    return batches


# ------------------------------------------------------------------ the groups
def test_groups_fit_the_memory_budget_and_are_equal(tmp_path):
    plan = _plan(tmp_path)                                    # 9 runs: 3 arms x 3 seeds
    assert len(plan.runs) == 9
    g = make_groups(plan, "auto", budget=(_bytes(plan, 4), "test budget"))
    assert plan.grouping is g and g.max_group == MAX_GROUP["cpu"]
    # M = 4 fits, 5 does not: 9 runs -> 3 equal groups of 3, in the plan's order
    assert [grp.m for grp in g.groups] == [3, 3, 3] and all(grp.lockstep for grp in g.groups)
    assert [r for grp in g.groups for r in grp.runs] == plan.runs
    assert all(grp.bytes == _bytes(plan, 3) <= g.budget for grp in g.groups)
    # the maximum bounds M as well
    g = make_groups(plan, "auto", budget=(10 * _bytes(plan, 9), "big"), max_group=2)
    assert [grp.m for grp in g.groups] == [2, 2, 2, 2, 1]
    g = make_groups(plan, "auto", budget=(10 * _bytes(plan, 9), "big"))
    assert [grp.m for grp in g.groups] == [9]


def test_modes(tmp_path):
    plan = _plan(tmp_path)
    g = make_groups(plan, "off")
    assert [grp.m for grp in g.groups] == [1] * 9 and not any(grp.lockstep for grp in g.groups)
    tight = (_bytes(plan, 2) - 1, "tight")                     # no group of two fits
    g = make_groups(plan, "auto", budget=tight)
    assert [grp.m for grp in g.groups] == [1] * 9 and not any(grp.lockstep for grp in g.groups)
    assert "a group of two needs about" in g.notes[0]
    with pytest.raises(ValueError, match="--lockstep on: a group of two vgg models needs"):
        make_groups(plan, "on", budget=tight)
    with pytest.raises(ValueError, match="lockstep='sometimes' is not one of auto, on, off"):
        make_groups(plan, "sometimes")
    # done runs are not grouped; a run with no partner trains alone under auto
    for r in plan.runs[1:]:
        r.state = "done"
    g = make_groups(plan, "auto")
    assert [(grp.m, grp.lockstep) for grp in g.groups] == [(1, False)]
    assert [(grp.m, grp.lockstep) for grp in make_groups(plan, "on").groups] == [(1, True)]


def test_runs_of_other_keys_are_not_grouped(tmp_path):
    plan = _plan(tmp_path, archs=["vgg", "resnet"], seeds=1)
    g = make_groups(plan, "auto", budget=(2**40, "big"))
    assert [(grp.runs[0].arch, grp.m) for grp in g.groups] == [("vgg", 3), ("resnet", 3)]
    assert all({r.arch for r in grp.runs} == {grp.runs[0].arch} for grp in g.groups)


def test_dry_run_shows_the_groups_with_memory_and_time(tmp_path, fake_times):
    out = tmp_path / "cmp"
    args = [SOURCE, "-o", str(out), "-m", "mi,random", "-p", "8", "--seeds", "2", "-a", "vgg",
            "--width", "0.0625", "--steps", "4", "--eval-every", "2", "-b", "8", "--size", "16",
            "--device", "cpu", "-j", "1", "--no-progress", "--dry-run"]
    r = CliRunner().invoke(compare_cmd, args)
    assert r.exit_code == 0, r.output
    assert "lockstep: auto; 1 group of models trained together, at most 32 per group" in r.output
    assert "  group 1: vgg M=6 in lockstep, memory est. " in r.output
    assert "none/s0, mi-p8/s0, random-p8/s0, none/s1, mi-p8/s1, random-p8/s1" in r.output
    # a step of the group of 6 x 8 images: 0.485 s; 4 steps, and each run evaluates 4 test
    # images 3 times (1 ms each): 4 x 0.485 + 6 x 12 x 0.001 = 2.012 s
    assert fake_times == [8, (6, 8)]
    assert "485.0 ms per lockstep step of 6 vgg models (median of 3 steps of 6 x 8 random " \
        "inputs, measured)" in r.output
    assert ", est. 2 s:" in r.output and "+ 6 runs to train (~2 s)" in r.output
    js = CliRunner().invoke(compare_cmd, args + ["--json"])
    plan = json.loads(js.stdout)
    assert plan["lockstep"] == "auto" and [g["m"] for g in plan["groups"]] == [6]
    assert plan["groups"][0]["seconds"] == pytest.approx(2.012)
    r = CliRunner().invoke(compare_cmd, args + ["--lockstep", "off"])
    assert r.exit_code == 0 and "lockstep: off (every run trains alone" in r.output
    r = CliRunner().invoke(compare_cmd, args + ["--lockstep", "sometimes"])
    assert r.exit_code == 2 and "'sometimes' is not one of" in r.output


def test_paper_dry_run_shows_its_lockstep_groups(tmp_path, fake_times):
    out = tmp_path / "paper"
    r = CliRunner().invoke(compare_cmd, ["synthetic:64:4", "-o", str(out), "--preset", "paper",
                                         "--size", "16", "-p", "4,8", "--device", "cpu",
                                         "--dry-run"])
    assert r.exit_code == 0, r.output
    # 10 measures: none + 9 orderings x 2 patches = 19 arms x 3 seeds, one key
    assert "57 runs: arch inception" in r.output
    assert "  group 1: inception M=" in r.output and "in lockstep, memory est." in r.output
    assert "eval_images = 1000" in r.output


# ------------------------------------------------------- training in lockstep
def _table(out):
    return [{k: v for k, v in row.items() if k != "run_dir"}
            for row in csv.DictReader((out / "summary.csv").open())]


def _rows(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS}
            for row in read_metrics(run_dir)]


def test_lockstep_and_one_after_another_give_the_same_comparison(tmp_path):
    kw = dict(KW, measures=["mi", "random"], patches=[8], seeds=2, threads=1)
    lines = []
    on = compare(SOURCE, tmp_path / "on", lockstep="on", log=lines.append, **kw)
    off = compare(SOURCE, tmp_path / "off", lockstep="off", **kw)
    assert sum("(lockstep group 1/1, M=6)" in line for line in lines) == 6
    for a, b in zip(on.runs, off.runs, strict=True):
        assert a["final_test_acc"] == pytest.approx(b["final_test_acc"], abs=1e-12)
        assert a["auc_test_acc"] == pytest.approx(b["auc_test_acc"], abs=1e-6)
        ra, rb = _rows(a["run_dir"]), _rows(b["run_dir"])
        assert [r["step"] for r in ra] == [r["step"] for r in rb]
        for x, y in zip(ra, rb, strict=True):
            assert x["test_acc"] == y["test_acc"]
            if y["train_loss"] is not None:
                assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
    # the same run folders, laid out as `porder train` lays them out
    for a in on.runs:
        names = sorted(p.name for p in __import__("pathlib").Path(a["run_dir"]).iterdir())
        assert "result.json" in names and "checkpoint.pt" in names and "metrics.jsonl" in names
    assert [c["verdict"] for c in on.comparisons] == [c["verdict"] for c in off.comparisons]
    assert (tmp_path / "on/summary.md").exists() and (tmp_path / "on/fig5_loss_vgg.png").exists()


class Stop(Exception):
    pass


def test_interrupted_lockstep_compare_resumes(tmp_path):
    kw = dict(KW, measures=["mi"], patches=[8], seeds=1, threads=1)

    descs = []

    def killer(desc):
        descs.append(desc)

        def progress(step, total, stats):
            if step == 3:
                raise Stop
        return progress

    with pytest.raises(Stop):
        compare(SOURCE, tmp_path / "cut", lockstep="on", progress_for=killer, **kw)
    assert descs == ["[group 1/1: 2 runs] vgg none seed 0 ..."]    # one reporter per group
    plan = make_plan(SOURCE, tmp_path / "cut", **{k: v for k, v in kw.items()
                                                   if k != "threads"})
    assert all(r.state in ("resume", "done") for r in plan.runs)
    assert any(r.state == "resume" and r.at_step == 2 for r in plan.runs)
    lines = []
    res = compare(SOURCE, tmp_path / "cut", lockstep="on", log=lines.append, **kw)
    assert any("resuming at step 2" in line for line in lines)
    whole = compare(SOURCE, tmp_path / "whole", lockstep="on", **kw)
    assert [r["steps"] for r in res.runs] == [4, 4]
    for a, b in zip(res.runs, whole.runs, strict=True):
        assert _rows(a["run_dir"]) == _rows(b["run_dir"])


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    from porder.train.loop import TrainingDiverged

    real = lockstep_mod.train_group

    def one_diverges(jobs, **kw):
        results = real(jobs, **kw)
        results[1] = TrainingDiverged("training diverged: the train loss is nan at step 3")
        return results

    monkeypatch.setattr(lockstep_mod, "train_group", one_diverges)
    lines = []
    kw = dict(KW, measures=["mi", "random"], patches=[8], seeds=1, threads=1)
    with pytest.raises(ValueError, match=r"1 of 3 runs stopped, the others are trained; no "
                                         r"summary without them: vgg mi-p8 seed 0 \(training "
                                         r"diverged"):
        compare(SOURCE, tmp_path, lockstep="on", log=lines.append, **kw)
    assert any("[2/3] vgg mi-p8 seed 0: stopped: training diverged" in line for line in lines)
    assert (tmp_path / "runs/vgg/random-p8/seed0/result.json").exists()
    assert (tmp_path / "runs/vgg/none/seed0/result.json").exists()
    assert not (tmp_path / "summary.md").exists()


# ----------------------------------------------------------- evaluation budget
def test_eval_indices_are_one_fixed_subset():
    a = eval_indices(1000, 100)
    assert len(a) == 100 and list(a) == sorted(set(a)) and a.max() < 1000
    assert list(eval_indices(1000, 100)) == list(a)            # the same for every run
    assert eval_indices(1000, None) is None and eval_indices(100, 100) is None
    with pytest.raises(ValueError, match="eval_images must be None"):
        TrainConfig(eval_images=0).validate()
    with pytest.raises(ValueError, match="eval_images must be None"):
        TrainConfig(eval_images=True).validate()


def test_subset_curves_end_on_the_whole_split(tmp_path):
    """Training does not see the evaluation: the final accuracies are those of full
    evaluation, and the curve points before the last are scored on the subset."""
    kw = dict(KW, measures=["mi", "random"], patches=[8], seeds=2, threads=1,
              lockstep="off", steps=6, eval_every=2)
    src = "synthetic:120:3"                                   # 12 test images
    full = compare(src, tmp_path / "full", **kw)
    sub = compare(src, tmp_path / "sub", eval_images=5, **kw)
    for a, b in zip(sub.runs, full.runs, strict=True):
        assert a["final_test_acc"] == b["final_test_acc"]
        ra, rb = _rows(a["run_dir"]), _rows(b["run_dir"])
        assert [r.get("train_loss") for r in ra] == [r.get("train_loss") for r in rb]
        assert all(abs(5 * r["test_acc"] - round(5 * r["test_acc"])) < 1e-9 for r in ra[:-1])
    # (The verdicts of 5 noisy test images need not agree with those of 12: the comparison of
    # verdicts on a real dataset is in docs/comparisons.md.)
    md = (tmp_path / "sub/summary.md").read_text()
    assert "fixed seeded subset of 5 of the 12 test images" in md
    assert "subset" not in (tmp_path / "full/summary.md").read_text()
    assert json.loads((tmp_path / "sub/compare.json").read_text())["eval_images"] == 5
    assert "eval_images" not in json.loads((tmp_path / "full/compare.json").read_text())
    # another subset size cannot continue these runs
    plan = make_plan(src, tmp_path / "sub", **{k: v for k, v in kw.items()
                                                if k not in ("threads", "lockstep")},
                     eval_images=6)
    assert {r.state for r in plan.runs} == {"conflict"}
    assert "eval_images: 5 -> 6" in plan.runs[0].reason


# -------------------------------------------------------------- paper-cpu
def test_paper_cpu_keeps_the_papers_structure():
    v, paper = preset_values("paper-cpu"), preset_values("paper")
    assert v["batch_size"] == 1 and v["lr"] == paper["lr"] < 1e-3
    assert v["patches"] == [4, 8, 16] and v["seeds"] == 3 and v["size"] == 32
    assert set(v["measures"]) == set(MEASURES) and v["bins"] == 256
    for table in (PAPER_CPU, PAPER_CPU_FIXED):
        for key, s in table.items():
            assert (s.paper is None) != (s.chosen is None), key
            if s.chosen:
                assert " because " in s.chosen, key
    # what shrank says so, against the paper's value
    for key in ("archs", "width", "steps"):  # shrunk
        assert PAPER_CPU[key].value != PAPER[key].value and PAPER_CPU[key].chosen, key


def test_a_group_step_is_measured():
    cfg = TrainConfig(arch="vgg", width=1 / 16, batch_size=2, device="cpu", threads=1,
                      fm_reorder=["stem:mi:4"])
    t = group_timing.time_group_steps(cfg, 3, num_classes=4, size=16, min_time=0.05)
    assert t.step_s > 0 and t.steps_timed >= 1 and t.device == "cpu" and t.threads == 1
