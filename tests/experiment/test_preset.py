"""`porder compare --preset paper`, and its --dry-run (one plan, one time estimate)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from porder.cli.train import compare as compare_cmd
from porder.experiment.preset import PAPER, PAPER_FIXED, Setting, describe_preset, preset_values
from porder.measures import MEASURES

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
    assert "6 runs to train" in r.output and "median of" in r.output
    assert r.output.count("total: ~") == 1 and not out.exists()


def test_cli_preset_alone_is_the_papers_plan(tmp_path):
    r = CliRunner().invoke(compare_cmd, ["synthetic:40:2", "-o", str(tmp_path / "p"),
                                         "--preset", "paper", "--width", "0.0625", "--device",
                                         "cpu", "-j", "1", "--dry-run"])
    assert r.exit_code == 0, r.output
    # 9 orderings x 3 patch sizes + none = 28 arms, x 3 seeds
    assert "84 runs: arch inception; measures none, entropy, psnr, mi, je, kl, l1, l2, ssim, " \
           "random; patch 4, 8, 16; seeds 0, 1, 2" in r.output
    assert "each: 10000 steps, batch 1, Adam lr 0.0001, width 0.0625, eval every 200" in r.output
    assert r.output.count("  build   ") == 28 and r.output.count("  new     ") == 84
    # one estimate: every cache and run listed with its time, then one total of them
    assert r.output.count("~") == 28 + 84 + 3 and r.output.count("total: ~") == 1
    assert "= 28 caches to build (~" in r.output and " + 84 runs to train (~" in r.output
