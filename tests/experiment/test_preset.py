"""`porder compare --preset paper` and the --dry-run time estimate."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from porder.cli.train import compare as compare_cmd
from porder.experiment import estimate as estimate_mod
from porder.experiment import make_plan
from porder.experiment.estimate import _evaluations, estimate
from porder.experiment.preset import PAPER, PAPER_FIXED, Setting, describe_preset, preset_values
from porder.measures import MEASURES
from porder.train.timing import StepTiming

REPO = Path(__file__).resolve().parents[2]
PAPER_MD = [REPO.parent / "shared" / "paper.md", REPO.parents[1] / "shared" / "paper.md"]


def _plain(text: str) -> str:
    """Paper text without markdown emphasis and maths markers, spaces collapsed."""
    text = re.sub(r"[*$]", "", text)
    text = re.sub(r"\s+", " ", text)
    return text.replace(" ,", ",").strip()


def test_every_setting_says_where_it_comes_from():
    for table in (PAPER, PAPER_FIXED):
        for key, s in table.items():
            assert (s.paper is None) != (s.chosen is None), key
            if s.chosen:
                assert " because " in s.chosen, key
    with pytest.raises(ValueError, match="exactly one of"):
        Setting(1)


def test_quotes_are_the_papers_words():
    paper = next((p for p in PAPER_MD if p.exists()), None)
    if paper is None:
        pytest.skip(f"the paper's text is not available ({', '.join(map(str, PAPER_MD))})")
    text = _plain(paper.read_text())
    for table in (PAPER, PAPER_FIXED):
        for key, s in table.items():
            if s.paper:
                assert _plain(s.paper) in text, key


def test_paper_values():
    v = preset_values("paper")
    assert v["archs"] == ["inception"] and v["steps"] == 10_000 and v["batch_size"] == 1
    assert v["patches"] == [4, 8, 16] and v["size"] == 32
    # every measure of the registry, the baseline and the random control
    assert set(v["measures"]) == set(MEASURES)
    assert v["lr"] < 1e-3                        # "slow": below Adam's customary rate
    v["measures"].append("x")                    # a copy: the preset is not changed
    assert "x" not in preset_values("paper")["measures"]
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset_values("nope")
    text = describe_preset("paper", {"steps": 20})
    assert "steps = 20   (given; the preset's 10000: paper)" in text
    assert "lr = 0.0001\n      chosen: 1e-4, because" in text


TINY = ["--width", "0.0625", "--steps", "6", "--eval-every", "3", "-a", "vgg", "--size", "16",
        "-p", "8", "--device", "cpu", "-j", "1", "--no-progress"]


def test_cli_preset_with_overrides_dry_run(tmp_path):
    out = tmp_path / "paper"
    r = CliRunner().invoke(compare_cmd, ["synthetic:40:2", "-o", str(out), "--preset", "paper",
                                         "-m", "none,mi,random", "--seeds", "2", *TINY,
                                         "--dry-run"])
    assert r.exit_code == 0, r.output
    # from the preset: batch 1, lr 1e-4, bins; from the command line: the rest
    assert "each: 6 steps, batch 1, Adam lr 0.0001, width 0.0625, eval every 3, 16x16" in r.output
    assert "6 runs: arch vgg; measures none, mi, random; patch 8; seeds 0, 1" in r.output
    assert "archs = vgg   (given; the preset's inception: paper)" in r.output
    assert "batch_size = 1\n      paper: \"We trained the networks using online training" \
        in r.output
    assert "time estimate (6 of 6 runs" in r.output and "median of" in r.output
    assert "total: ~" in r.output and not out.exists()


def test_cli_preset_alone_is_the_papers_plan(tmp_path):
    r = CliRunner().invoke(compare_cmd, ["synthetic:40:2", "-o", str(tmp_path / "p"),
                                         "--preset", "paper", "--width", "0.0625", "--device",
                                         "cpu", "-j", "1", "--dry-run"])
    assert r.exit_code == 0, r.output
    # 9 orderings x 3 patch sizes + none = 28 arms, x 3 seeds
    assert "84 runs: arch inception; measures none, entropy, psnr, mi, je, kl, l1, l2, ssim, " \
           "random; patch 4, 8, 16; seeds 0, 1, 2" in r.output
    assert "each: 10000 steps, batch 1, Adam lr 0.0001, width 0.0625, eval every 200" in r.output
    assert "caches: 28 to build" in r.output


def test_evaluations_left():
    assert _evaluations(0, 10, 5, True) == 3          # steps 0, 5, 10
    assert _evaluations(0, 11, 5, True) == 4          # 0, 5, 10, 11
    assert _evaluations(5, 11, 5, False) == 2         # 10, 11
    assert _evaluations(10, 10, 5, False) == 0


def test_estimate_is_steps_times_measured_step(tmp_path, monkeypatch):
    fake = StepTiming(step_s=0.5, eval_image_s=0.01, steps_timed=3, warmup=2, eval_images=32,
                      device="cpu", threads=1)
    seen = []

    def time_steps(cfg, **kw):
        seen.append((cfg.arch, tuple(cfg.fm_reorder), kw["num_classes"], kw["size"]))
        return fake

    import porder.train.timing as timing

    monkeypatch.setattr(timing, "time_steps", time_steps)
    plan = make_plan("synthetic:50:3", tmp_path, measures=["mi"], patches=[8], archs=["vgg"],
                     seeds=2, steps=10, eval_every=5, size=16, test_fraction=0.2)
    plan.runs[0].state, plan.runs[0].at_step = "resume", 5      # none, seed 0: half done
    plan.runs[1].state = "done"                                  # mi, seed 0
    est = estimate(plan)
    assert seen == [("vgg", (), 3, 16)]                          # one network, timed once
    n_test = 10                                                  # 20% of 50
    want = (5 * 0.5 + 1 * n_test * 0.01) + 2 * (10 * 0.5 + 3 * n_test * 0.01)
    assert est.train_s == pytest.approx(want)
    assert est.runs_left == 3 and "3 of 4 runs" in est.describe()
    assert est.cache_s > 0 and est.total_s == pytest.approx(est.train_s + est.cache_s)
    assert estimate_mod.REORDER_SAMPLE == 64
