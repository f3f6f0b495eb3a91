"""Comma-separated options of `train` and `compare` refuse an empty item, and `train --resume`
says when there is nothing to resume.

The library halves (porder.trainspec.split_items, porder.experiment.plan.parse_list and
make_plan, porder.train.checkpoint.resume_note) are tested directly, and through the CLI.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from porder.cli.train import compare as compare_cmd
from porder.cli.train import train as train_cmd
from porder.experiment.plan import make_plan, parse_list
from porder.train.checkpoint import CHECKPOINT, resume_note
from porder.trainspec import split_items

from .test_train import write_file


def test_split_items():
    assert split_items("vgg, resnet ,inception") == ["vgg", "resnet", "inception"]
    assert split_items(" 8 ") == ["8"]
    for text, item in (("vgg,,resnet", "item 2 of 3"), (",vgg", "item 1 of 2"),
                       ("vgg,", "item 2 of 2"), ("a, ,b", "item 2 of 3")):
        with pytest.raises(ValueError, match=f"--arch '{text}' has an empty item \\({item}\\)"):
            split_items(text, "--arch")
    with pytest.raises(ValueError, match="^-m is empty; give at least one item"):
        split_items("  ", "-m")


def test_parse_list_refuses_an_empty_item():
    assert parse_list("4, 8,4", int) == [4, 8]
    with pytest.raises(ValueError, match="has an empty item"):
        parse_list("4,,8", int)


def test_make_plan_refuses_an_empty_measure(tmp_path):
    with pytest.raises(ValueError, match=r"measures \['none', '', 'mi'\] has an empty item "
                                         r"\(item 2 of 3\)"):
        make_plan("synthetic:20", tmp_path / "cmp", measures=["none", "", "mi"])
    assert not (tmp_path / "cmp").exists()


def test_resume_note(tmp_path):
    assert resume_note(tmp_path / "run") == (f"Nothing to resume in {tmp_path / 'run'}: it "
                                             f"holds no {CHECKPOINT}; starting a new run.")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"")
    assert resume_note(tmp_path / "run") is None


def _usage_error(res, option, fragment):
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: Invalid value for ") and option in last, res.output
    assert fragment in last, res.output


@pytest.mark.parametrize("args, option, fragment", [
    (["-a", "vgg,,resnet"], "'--arch'", "'vgg,,resnet' has an empty item (item 2 of 3)"),
    (["-m", "none,mi,"], "'--measures'", "'none,mi,' has an empty item (item 3 of 3)"),
    (["-p", ",4,8"], "'--patch'", "',4,8' has an empty item (item 1 of 3)"),
])
def test_compare_refuses_an_empty_list_item(tmp_path, args, option, fragment):
    # --steps 0 after the list: an error of its own where the list is taken (quick either way)
    res = CliRunner().invoke(compare_cmd, ["synthetic:20", "-o", str(tmp_path / "cmp"), *args,
                                           "--steps", "0"])
    _usage_error(res, option, fragment)
    assert not (tmp_path / "cmp").exists()


def test_train_refuses_an_empty_fm_reorder_item(tmp_path):
    data = write_file(tmp_path / "tiny.h5")
    res = CliRunner().invoke(train_cmd, [str(data), "--fm-reorder", "stem:mi:4,,stage1:mi:4",
                                         "-a", "resnet", "--width", "0.0625", "--steps", "1",
                                         "-b", "8", "--device", "cpu", "-j", "1",
                                         "-o", str(tmp_path / "run")])
    _usage_error(res, "'--fm-reorder'", "has an empty item (item 2 of 3)")
    assert not (tmp_path / "run").exists()


def test_train_resume_with_nothing_to_resume_says_so(tmp_path):
    data = write_file(tmp_path / "tiny.h5")
    out = tmp_path / "run"
    args = [str(data), "--arch", "resnet", "--width", "0.0625", "--steps", "2",
            "--eval-every", "2", "-b", "8", "--device", "cpu", "-j", "1", "--no-progress",
            "-o", str(out), "--resume"]
    res = CliRunner().invoke(train_cmd, args)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == (f"Nothing to resume in {out}: it holds no "
                                          f"{CHECKPOINT}; starting a new run.")
    res = CliRunner().invoke(train_cmd, args)       # now there is: said no more
    assert res.exit_code == 0, res.output
    assert "Nothing to resume" not in res.output
