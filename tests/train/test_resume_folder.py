"""`train --resume` keeps the metrics rows of its checkpoint only when they are the run's:
in order, and ending at the checkpoint's step (found by tests/fuzz_resume.py: an edited
metrics.jsonl, or a checkpoint whose step was edited, gave a finished run whose rows were
out of order, or whose result claimed a step it has no row for)."""
from __future__ import annotations

import json

import pytest
import torch

from porder.train import read_metrics
from porder.train.checkpoint import CHECKPOINT

from .test_train import write_file
from .test_train_faults import assert_error, train_cli


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A tiny file and a run on it stopped at step 2 of 4 (rows at steps 0, 1, 2)."""
    d = tmp_path_factory.mktemp("stopped")
    data = write_file(d / "tiny.h5")
    res = train_cli(data, d / "run", "--steps", "2", "--eval-every", "1")
    assert res.exit_code == 0, res.output
    return data, d / "run"


@pytest.fixture
def run(stopped, tmp_path):
    data, out = stopped
    copy = tmp_path / "run"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    return data, copy


def _lines(run):
    return (run / "metrics.jsonl").read_text().splitlines(keepends=True)


@pytest.mark.parametrize("edit, message", [
    (lambda ls: ls[::-1], "lists step 1 after step 2"),
    (lambda ls: ls[:2] + ls[1:], "lists step 1 after step 1"),
    (lambda ls: ls[:2], "has no row for step 2, the step of the checkpoint beside it"),
    (lambda ls: [], "has no row for step 2"),
])
def test_metrics_that_are_not_the_checkpoints_are_refused(run, edit, message):
    data, out = run
    (out / "metrics.jsonl").write_text("".join(edit(_lines(out))))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_error(train_cli(data, out, "--resume", "--eval-every", "1"),
                 f"'{out / 'metrics.jsonl'}' {message}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_checkpoint_step_without_its_row_is_refused(run):
    data, out = run
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    ckpt["step"] = 4
    torch.save(ckpt, out / CHECKPOINT)
    assert_error(train_cli(data, out, "--resume", "--eval-every", "1"),
                 "has no row for step 4")
    assert not (out / "result.json").exists() or \
        json.loads((out / "result.json").read_text())["steps"] == 2


def test_rows_before_the_checkpoints_may_be_missing(run):
    """A user who removed early rows still resumes: what is left is in order."""
    data, out = run
    (out / "metrics.jsonl").write_text("".join(_lines(out)[1:]))
    res = train_cli(data, out, "--resume", "--eval-every", "1")
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
