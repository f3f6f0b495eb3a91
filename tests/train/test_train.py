"""The training loop and `porder train`: learning, determinism, resume, files, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from porder import reorder
from porder.cli.train import train as train_cmd
from porder.store import Writer
from porder.train import TIMING_FIELDS, TrainConfig, batch_indices, get_batch, read_metrics, train
from porder.train.batches import Data
from porder.train.checkpoint import CHECKPOINT


def write_file(path, *, n_train=48, n_test=16, size=16, patch=4, measure="none", seed=0):
    """A tiny learnable porder file: class 1 images are brighter than class 0 ones."""
    rng = np.random.default_rng(seed)
    w = Writer(path, meta={"measure": measure, "patch": patch, "bins": 256, "image_size": size,
                           "source": "test-fixture"}, classes=["dark", "bright"])
    k = (size // patch) ** 2
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 140, (n, size, size, 3)) + 90 * y[:, None, None, None]
        w.append(split, x.astype(np.uint8), y.astype(np.int64),
                 np.tile(np.arange(k, dtype=np.uint16), (n, 1)),
                 [f"{split}#{i}" for i in range(n)], consumed=n)
    return w.finish()


def strip(rows):
    """Metrics rows without their timing fields."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def cfg(**kw):
    base = dict(arch="resnet", width=1 / 16, batch_size=8, steps=12, eval_every=4,
                device="cpu", threads=1)
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_file(tmp_path_factory.mktemp("data") / "tiny.h5")


class Stop(Exception):
    pass


def test_training_lowers_the_loss(tiny, tmp_path):
    res = train(tiny, cfg(arch="vgg", width=0.125, steps=30, eval_every=10, lr=2e-3), tmp_path)
    rows = res.rows
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert rows[-1]["test_acc"] >= 0.75


def test_files_written(tiny, tmp_path):
    train(tiny, cfg(steps=4, eval_every=2), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert set(rows[1]) == {"step", "epoch", "train_loss", "train_acc", "test_loss", "test_acc",
                            "images_per_s", "wall_s", "data_wait", "eval_s", "train_loss_steps"}
    assert rows[1]["images_per_s"] > 0 and 0 <= rows[1]["data_wait"] < 1
    assert rows[2]["wall_s"] > rows[1]["wall_s"] > 0
    assert rows[2]["epoch"] == pytest.approx(4 * 8 / 48)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["complete"] and result["steps"] == 4
    assert result["final_test_acc"] == rows[-1]["test_acc"]
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert {"config", "step", "model", "optimizer", "rng"} <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["config"]["arch"] == "resnet"
    # Mixed precision acts only on CUDA: the files of a CPU run do not claim it.
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["device"] == "cpu" and config["config"]["amp"] is False
    assert result["config"]["amp"] is False
    assert ckpt["config"]["amp"] is True      # the options as given: they decide resuming


def test_the_loss_of_every_step_is_logged(tiny, tmp_path):
    from porder.train.metrics import loss_window, running_mean, step_losses

    rows = train(tiny, cfg(steps=10, eval_every=4), tmp_path).rows
    assert [r["step"] for r in rows] == [0, 4, 8, 10]
    assert "train_loss_steps" not in rows[0]
    assert [len(r["train_loss_steps"]) for r in rows[1:]] == [4, 4, 2]
    for r in rows[1:]:  # constant batch: the row's mean loss is the mean of its steps' losses
        assert sum(r["train_loss_steps"]) / len(r["train_loss_steps"]) == pytest.approx(
            r["train_loss"], rel=1e-5)
    steps, losses = step_losses(rows)
    assert steps == list(range(1, 11)) and losses == sum((r["train_loss_steps"] for r in rows[1:]), [])
    # rows from before per-step logging give one point per evaluation
    old = [{k: v for k, v in r.items() if k != "train_loss_steps"} for r in rows]
    assert step_losses(old) == ([4, 8, 10], [r["train_loss"] for r in rows[1:]])
    assert running_mean([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert loss_window(10) == 1 and loss_window(1000) == 20 and loss_window(10 ** 6) == 100


def test_figure_title_names_the_run(tiny):
    from porder.store import read_meta
    from porder.train.metrics import run_title

    meta = read_meta(tiny)
    assert run_title(cfg(width=0.25), tiny, meta) == \
        "resnet, width 0.25, on tiny.h5: unmodified (measure none)"
    assert run_title(cfg(reorder="mi", patch=4), tiny, meta).endswith(
        ": mi, patch 4 (reordered on the fly)")
    assert run_title(cfg(arch="vgg"), "c.h5", {"measure": "ssim", "patch": 8}) == \
        "vgg, width 0.0625, on c.h5: ssim, patch 8"


def test_batch_larger_than_the_split_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"--batch-size 49 is larger than the training split "
                                         r".* \(48 images\); use at most 48"):
        train(tiny, cfg(batch_size=49), tmp_path / "r")
    assert not (tmp_path / "r").exists()
    train(tiny, cfg(batch_size=48, steps=1, eval_every=1), tmp_path / "ok")   # the whole split


def test_batch_indices_cover_each_epoch():
    n, b = 10, 4
    idx = torch.cat([batch_indices(s, n, b, seed=3) for s in range(5)])  # 2 epochs
    assert sorted(idx[:10].tolist()) == list(range(10))
    assert sorted(idx[10:20].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, n, b, 3), batch_indices(2, n, b, 3))
    assert not torch.equal(idx[:10], idx[10:20])          # each epoch is reshuffled
    assert not torch.equal(batch_indices(0, n, b, 3), batch_indices(0, n, b, 4))
    assert len(batch_indices(0, 3, 8, 0)) == 8              # batch larger than the data set


def test_same_seed_same_metrics(tiny, tmp_path):
    a = train(tiny, cfg(steps=8), tmp_path / "a").rows
    b = train(tiny, cfg(steps=8), tmp_path / "b").rows
    c = train(tiny, cfg(steps=8, seed=1), tmp_path / "c").rows
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_resume_gives_the_uninterrupted_result(tiny, tmp_path):
    # Inception has dropout: this also checks that the RNG state is restored.
    c = cfg(arch="inception", width=1 / 16, steps=12, eval_every=4)
    full = train(tiny, c, tmp_path / "full").rows

    def kill(step, total, stats):
        if step == 7:
            raise Stop

    with pytest.raises(Stop):
        train(tiny, c, tmp_path / "cut", progress=kill)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [0, 4]
    resumed = train(tiny, c, tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 4
    assert strip(read_metrics(tmp_path / "cut")) == strip(full)
    # Resuming a finished run with more steps continues it.
    more = train(tiny, TrainConfig(**{**c.__dict__, "steps": 16}), tmp_path / "cut", resume=True)
    assert [r["step"] for r in more.rows] == [0, 4, 8, 12, 16]


def test_run_folder_rules(tiny, tmp_path):
    train(tiny, cfg(steps=2, eval_every=2), tmp_path)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(tiny, cfg(steps=2, eval_every=2), tmp_path)
    with pytest.raises(ValueError, match=r"options differ \(lr: 0.001 -> 0.01\)"):
        train(tiny, cfg(steps=2, eval_every=2, lr=0.01), tmp_path, resume=True)
    with pytest.raises(ValueError, match="beyond --steps 1"):
        train(tiny, cfg(steps=1, eval_every=2), tmp_path, resume=True)


def test_online_training_batch_of_one(tiny, tmp_path):
    rows = train(tiny, cfg(arch="vgg", batch_size=1, steps=3, eval_every=3), tmp_path).rows
    assert rows[-1]["step"] == 3 and rows[-1]["epoch"] == pytest.approx(3 / 48)


def test_reorder_on_the_fly_matches_porder_reorder(tiny, tmp_path):
    from porder.store import read_split

    c = cfg(reorder="random", patch=4, order_seed=5)
    data = Data(tiny, device="cpu", reorder="random", patch=4, order_seed=5)
    x, y = get_batch(data, 3, c)
    idx = batch_indices(3, 48, 8, c.seed).numpy()
    images = read_split(tiny, "train")["images"]
    want = np.concatenate([reorder(images[i:i + 1], "random", 4, seed=5, start=int(i))[0]
                           for i in idx])
    assert torch.equal(x, data.to_input(torch.from_numpy(want)))
    test = read_split(tiny, "test")["images"]
    assert torch.equal(data.test_x, torch.from_numpy(reorder(test, "random", 4, seed=5)[0]))
    # A deterministic measure: the whole batch at once.
    c = cfg(reorder="entropy", patch=8)
    data = Data(tiny, device="cpu", reorder="entropy", patch=8)
    x, _ = get_batch(data, 0, c)
    idx = batch_indices(0, 48, 8, c.seed).numpy()
    assert torch.equal(x, data.to_input(torch.from_numpy(reorder(images[idx], "entropy", 8)[0])))
    rows = train(tiny, cfg(reorder="mi", patch=8, steps=2, eval_every=2), tmp_path).rows
    assert rows[-1]["step"] == 2


def test_bad_inputs(tiny, tmp_path):
    mi = write_file(tmp_path / "mi.h5", measure="mi")
    with pytest.raises(ValueError, match="needs an unmodified file"):
        train(mi, cfg(reorder="mi"), tmp_path / "r")
    with pytest.raises(ValueError, match="unknown measure"):
        train(tiny, cfg(reorder="nope"), tmp_path / "r")
    with pytest.raises(ValueError, match="unknown architecture"):
        train(tiny, cfg(arch="lenet"), tmp_path / "r")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        train(tiny, cfg(batch_size=0), tmp_path / "r")
    with pytest.raises(ValueError, match="does not exist"):
        train(tmp_path / "missing.h5", cfg(), tmp_path / "r")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            train(tiny, cfg(device="cuda"), tmp_path / "r")


# ------------------------------------------------------------------ CLI
def test_cli_train_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    args = [str(tiny), "--arch", "vgg", "--width", "0.0625", "--steps", "4", "--eval-every", "2",
            "-b", "4", "--device", "cpu", "-j", "1", "--out", str(out), "--no-progress"]
    r = CliRunner().invoke(train_cmd, args)
    assert r.exit_code == 0, r.output
    assert "step 2/4" in r.output and "test loss" in r.output and "img/s" in r.output
    assert (out / "metrics.jsonl").exists() and (out / "curves.png").exists()
    # Again without --resume: a one-line error, exit 1, no traceback.
    r = CliRunner().invoke(train_cmd, args)
    assert r.exit_code == 1
    assert "already holds a run" in r.output and "Traceback" not in r.output
    # --resume with more steps continues the run.
    more = list(args)
    more[more.index("--steps") + 1] = "6"
    r = CliRunner().invoke(train_cmd, more + ["--resume"])
    assert r.exit_code == 0, r.output
    assert [row["step"] for row in read_metrics(out)] == [0, 2, 4, 6]


def test_cli_train_errors(tmp_path):
    r = CliRunner().invoke(train_cmd, [str(tmp_path / "nope.h5")])
    assert r.exit_code == 2 and "does not exist" in r.output
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    r = CliRunner().invoke(train_cmd, [str(bad), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "cannot read" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(train_cmd, [str(bad), "--arch", "lenet"])
    assert r.exit_code == 2
    r = CliRunner().invoke(train_cmd, ["--help"])
    assert r.exit_code == 0 and "porder train c100-mi8.h5" in r.output


def test_train_progress_estimates_the_whole_run(monkeypatch, capsys):
    from porder.cli import train as cli_train

    times = iter([0.0, 1.0, 3.0, 4.5, 8.5])
    monkeypatch.setattr(cli_train.time, "perf_counter", lambda: next(times))
    p = cli_train.TrainProgress(False, desc="d", eval_every=10, batch_size=32, first=3.0)
    row0 = {"step": 0, "train_loss": None, "test_loss": 2.3, "test_acc": 0.1, "eval_s": 2.0}
    p(0, 100, row0)                        # t=0: the step-0 evaluation
    p(1, 100, None)                        # t=1: the first step (warm-up), timing starts
    p(5, 100, None)                        # t=3: 2 s timed, not enough for an estimate
    p(7, 100, None)                        # t=4.5: 6 steps in 3.5 s
    row = {"step": 10, "train_loss": 1.0, "train_acc": 0.5, "images_per_s": 55.0,
           "data_wait": 0.0, "test_loss": 1.1, "test_acc": 0.6, "eval_s": 2.0}
    p(10, 100, row)                        # t=8.5: an evaluation of 2 s
    err = capsys.readouterr().err.splitlines()
    # 93 steps left at 3.5/6 s each, plus 10 evaluations of 2 s: 74.25 s; 77.75 s in all
    assert err[1] == "d: 1.71 steps/s, 55 img/s: the 100 steps will take about 78 s in all, " \
                     "74 s from now"
    # at step 10: (8.5 - 1 - 2) s for 9 steps; 90 steps and 9 evaluations left: 73 s
    assert err[2].startswith("d: step 10/100  train loss 1.0000") and err[2].endswith("ETA 73 s")


def test_train_progress_after_resume_counts_only_new_steps(monkeypatch, capsys):
    from porder.cli import train as cli_train

    times = iter([0.0, 1.0, 10.0])
    monkeypatch.setattr(cli_train.time, "perf_counter", lambda: next(times))
    p = cli_train.TrainProgress(False, desc="d", eval_every=1000, batch_size=10, first=3.0,
                                slow_hint=" (hint)")
    p(500, 2000, {"step": 500, "train_loss": None, "test_loss": 1.0, "test_acc": 0.5,
                  "eval_s": 0.0})          # resumed at step 500
    p(501, 2000, None)
    p(510, 2000, None)                     # 9 steps in 9 s: 1 step/s, not 510 steps in 10 s
    err = capsys.readouterr().err.splitlines()
    assert err[1] == "d: 1.00 steps/s, 10 img/s: the 2000 steps will take about 25.0 min in " \
                     "all, 24.8 min from now (hint)"


def test_norm_option(tmp_path):
    """--norm group trains, is recorded, and decides whether a run resumes; an older run's
    config without the field counts as BatchNorm."""
    from porder.train.config import identity_diff

    with pytest.raises(ValueError, match=r"unknown normalisation \(--norm\) 'layer'"):
        cfg(norm="layer").validate()
    from dataclasses import asdict

    old = {k: v for k, v in asdict(cfg()).items() if k != "norm"}      # a run saved before
    assert identity_diff(old, cfg()) == [] and identity_diff(old, cfg(norm="group")) == ["norm"]
    path = write_file(tmp_path / "d.h5")
    out = tmp_path / "run"
    r = CliRunner().invoke(train_cmd, [str(path), "-o", str(out), "--norm", "group", "--width",
                                       "0.0625", "--steps", "2", "--eval-every", "1", "-b", "4",
                                       "--device", "cpu", "-j", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["config"]["norm"] == "group"
    model = torch.load(out / CHECKPOINT, weights_only=True)["model"]
    assert not any(k.endswith("running_var") for k in model)
    r = CliRunner().invoke(train_cmd, [str(path), "-o", str(out), "--resume", "--steps", "3",
                                       "--width", "0.0625", "-b", "4", "--eval-every", "1",
                                       "--device", "cpu", "-j", "1", "--no-progress"])
    assert r.exit_code != 0 and "norm" in r.output
