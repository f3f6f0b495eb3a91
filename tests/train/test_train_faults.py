"""`porder train` when things go wrong: damaged checkpoints, a diverging loss, running
out of memory, and refused files. Each ends with one ``Error:`` line naming the
checkpoint, option or file (exit 1), no traceback, and no empty run folder.
"""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from porder.cli.train import train as train_cmd
from porder.train import read_metrics
from porder.train.checkpoint import CHECKPOINT

from .test_train import write_file

ARGS = ["--arch", "resnet", "--width", "0.0625", "--steps", "4", "--eval-every", "2", "-b", "8",
        "--device", "cpu", "-j", "1", "--no-progress"]


def train_cli(file, out, *extra):
    return CliRunner().invoke(train_cmd, [str(file), *ARGS, "--out", str(out),
                                          *map(str, extra)])


def assert_error(res, *fragments):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and len(last) < 400, res.output
    for frag in fragments:
        assert frag in last, res.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_file(tmp_path_factory.mktemp("data") / "tiny.h5")


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A run interrupted at step 2 of 4 (trained with --steps 2), and its checkpoint."""
    out = tmp_path_factory.mktemp("runs") / "run"
    res = CliRunner().invoke(train_cmd, [str(tiny), *ARGS[:4], "--steps", "2",
                                         *ARGS[6:], "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, torch.load(out / CHECKPOINT, weights_only=True)


def damaged(ckpt: dict, **changes) -> dict:
    new = dict(ckpt)
    for key, value in changes.items():
        if value is None:
            new.pop(key)
        else:
            new[key] = value
    return new


def _bad_model(ckpt):
    model = dict(ckpt["model"])
    key = next(k for k, v in model.items() if v.ndim == 4)
    model[key] = torch.zeros(3, 3)
    return model


def _bad_optimizer(ckpt):
    opt = {"state": {i: dict(s) for i, s in ckpt["optimizer"]["state"].items()},
           "param_groups": ckpt["optimizer"]["param_groups"]}
    opt["state"][0]["exp_avg"] = torch.zeros(2)
    return opt


CASES = {
    "empty dict": (lambda c: {}, "has no 'config', 'step', 'wall_s'"),
    "a list": (lambda c: [1, 2], "holds a list, not a porder checkpoint"),
    "no model": (lambda c: damaged(c, model=None), "has no 'model'"),
    "model not a dict": (lambda c: damaged(c, model=[1]), "has a list as 'model'"),
    "wrong shapes": (lambda c: damaged(c, model=_bad_model(c)), "does not fit the model"),
    "optimizer shapes": (lambda c: damaged(c, optimizer=_bad_optimizer(c)),
                         "has an optimizer state that does not fit the model"),
    "bad rng": (lambda c: damaged(c, rng={"torch": torch.zeros(3, dtype=torch.uint8)}),
                "malformed random-number state"),
    "rng not a tensor": (lambda c: damaged(c, rng={"torch": "abc"}),
                         "malformed random-number state"),
    "negative step": (lambda c: damaged(c, step=-5), "has step -5; expected an integer >= 0"),
    "float step": (lambda c: damaged(c, step=2.5), "has step 2.5"),
    "nan wall time": (lambda c: damaged(c, wall_s=float("nan")), "has wall_s nan"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoint_is_one_line_naming_it(tiny, finished, tmp_path, case):
    out, ckpt = finished
    run = tmp_path / "run"
    run.mkdir()
    for f in out.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    make, message = CASES[case]
    torch.save(make(ckpt), run / CHECKPOINT)
    before = (run / CHECKPOINT).read_bytes()
    res = train_cli(tiny, run, "--resume")
    assert_error(res, f"checkpoint '{run / CHECKPOINT}'", message)
    assert (run / CHECKPOINT).read_bytes() == before  # left for the user to look at


def test_unreadable_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(b"\x80\x02junk")
    assert_error(train_cli(tiny, run, "--resume"), f"checkpoint '{run / CHECKPOINT}' cannot "
                                                   f"be read", "delete it")


def test_the_intact_checkpoint_still_resumes(tiny, finished, tmp_path):
    out, _ = finished
    run = tmp_path / "run"
    run.mkdir()
    for f in out.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    res = train_cli(tiny, run, "--resume")
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_metrics(run)] == [0, 2, 4]


def test_a_diverging_loss_stops_the_run_keeping_the_last_good_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    res = train_cli(tiny, run, "--lr", "1e30")
    assert_error(res, "training diverged: the train loss is nan at step 2", "--lr",
                 f"the last good checkpoint (step 0) is kept in '{run}'")
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 0
    assert [r["step"] for r in read_metrics(run)] == [0]
    assert not (run / "result.json").exists()


def test_out_of_memory_building_the_model_names_width(tiny, tmp_path, monkeypatch):
    import porder.train.loop as loop

    def run_network(*args, **kwargs):
        return torch.empty(2**50)  # the CPU allocator's own error

    monkeypatch.setattr(loop, "run_network", run_network)
    run = tmp_path / "run"
    assert_error(train_cli(tiny, run), "out of memory building the resnet model at --width "
                                       "0.0625; lower --width")
    assert not run.exists()


def test_out_of_memory_in_a_step_names_batch_size(tiny, tmp_path, monkeypatch):
    import porder.train.loop as loop

    real = loop.run_network

    class Hungry(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if self.training:
                torch.empty(2**50)
            return self.inner(x)

    monkeypatch.setattr(loop, "run_network", lambda *a, **k: Hungry(real(*a, **k)))
    run = tmp_path / "run"
    assert_error(train_cli(tiny, run), "out of memory training the resnet model "
                                       "(--batch-size 8, --width 0.0625); lower --batch-size")
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 0  # resumable


def test_a_refused_file_leaves_no_run_folder(tiny, tmp_path):
    mi = write_file(tmp_path / "mi.h5", measure="mi")
    run = tmp_path / "run"
    assert_error(train_cli(mi, run, "--reorder", "mi"), "needs an unmodified file")
    assert not run.exists()
    one_split = write_file(tmp_path / "one.h5", n_test=0)
    assert_error(train_cli(one_split, run), "needs images in both train and test splits")
    assert not run.exists()
    # A folder the user made is never removed.
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert_error(train_cli(one_split, run), "needs images in both")
    assert (run / "notes.txt").read_text() == "mine"


def test_library_refuses_non_finite_options(tiny, tmp_path):
    from porder.train import TrainConfig, train

    for kw, message in (({"lr": float("inf")}, "--lr"), ({"lr": float("nan")}, "--lr"),
                        ({"width": float("inf")}, "--width"), ({"width": 0.0}, "--width"),
                        ({"width": 17.0}, "--width"), ({"seed": 2**63}, "seed"),
                        ({"seed": -1}, "seed"), ({"steps": 2.5}, "steps")):
        with pytest.raises(ValueError, match=message):
            train(tiny, TrainConfig(device="cpu", **kw), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_config_json_of_a_good_run_is_unchanged(finished):
    out, _ = finished
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["width"] == 0.0625 and cfg["lr"] == 1e-3


@pytest.mark.parametrize("text", ["not json\n", '{"test_loss": 1, "test_acc": 0.5}\n', "[1]\n",
                                  '{"step": "2", "test_loss": 1, "test_acc": 0.5}\n'])
def test_damaged_metrics_file_on_resume(tiny, finished, tmp_path, text):
    out, _ = finished
    run = tmp_path / "run"
    run.mkdir()
    for f in out.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    (run / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + text)
    assert_error(train_cli(tiny, run, "--resume"), f"'{run / 'metrics.jsonl'}' line 3 is not "
                                                   f"a metrics row")


def test_hdf5_read_errors_name_the_file(tiny, tmp_path, monkeypatch):
    import porder.train.batches as batches

    def read_split(path, split):
        raise OSError("Can't synchronously read data (wrong B-tree signature)")

    monkeypatch.setattr(batches, "read_split", read_split)
    run = tmp_path / "run"
    assert_error(train_cli(tiny, run), f"cannot read the train split of '{tiny}' (a damaged "
                                       f"file?): Can't synchronously read data")
    assert not run.exists()
