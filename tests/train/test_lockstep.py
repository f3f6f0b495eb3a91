"""Lockstep training (porder.train.lockstep): runs trained together equal runs trained alone.

Reference values come from ``train()`` itself: each group's runs are trained alone too,
in float64 on the CPU, and the per-step losses (written at full precision here: the
6-digit rounding of ``train_loss_steps`` is switched off), test losses and final weights
must agree to 1e-9 relative.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from porder.train import TrainConfig, loop, metrics, read_metrics, train
from porder.train import lockstep as ls
from porder.train.checkpoint import CHECKPOINT
from porder.train.loop import TrainingDiverged

from .test_train import write_file

RTOL = 1e-9


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two files per image side (8: quick; 16 for Inception, whose float64 losses at
    8x8, with 2x2 maps and single-channel layers at width 1/32, drift apart to 1e-7
    by step 50 from rounding alone)."""
    d = tmp_path_factory.mktemp("data")
    return {size: [write_file(d / f"a{size}.h5", n_train=40, n_test=12, size=size, seed=0),
                   write_file(d / f"b{size}.h5", n_train=40, n_test=12, size=size, seed=1)]
            for size in (8, 16)}


@pytest.fixture
def float64(monkeypatch):
    """float64 models and inputs, and per-step losses written at full precision."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    monkeypatch.setattr(loop, "step_loss_field", list)
    monkeypatch.setattr(ls, "step_loss_field", list)
    monkeypatch.setattr(metrics, "plot_curves", no_plot)   # 0.5 s a figure: drawn once, below
    yield
    torch.set_default_dtype(old)


def no_plot(rows, path, title=""):
    path.write_bytes(b"")


WIDTH = {"vgg": 1 / 16, "resnet": 1 / 16, "inception": 1 / 32}
SIZE = {"vgg": 8, "resnet": 8, "inception": 16}


def cfg(arch="vgg", **kw):
    base = dict(arch=arch, width=WIDTH[arch], batch_size=4, steps=50, eval_every=25,
                device="cpu", threads=1, lr=2e-3)
    return TrainConfig(**(base | kw))


def jobs_of(files, arch, root, fm=True, **kw):
    """4 runs: two files, four seeds; with ``fm``, two of them with a feature-map layer."""
    specs = [[], ["stem:mi:4"], [], ["stem:random:4"]] if fm else [[]] * 4
    files = files[SIZE[arch]]
    return [(files[i % 2], cfg(arch, seed=i, fm_reorder=specs[i], **kw), root / f"run{i}")
            for i in range(4)]


def losses(out):
    rows = read_metrics(out)
    return [v for r in rows for v in r.get("train_loss_steps") or []], \
        [r["test_loss"] for r in rows]


def close(a, b, rtol=RTOL):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rtol, abs_tol=1e-300)
                                    for x, y in zip(a, b))


def assert_same_runs(out_a, out_b, rtol=RTOL):
    (tr_a, te_a), (tr_b, te_b) = losses(out_a), losses(out_b)
    assert len(tr_a) == 50
    assert close(tr_a, tr_b, rtol), max(abs(x / y - 1) for x, y in zip(tr_a, tr_b))
    assert close(te_a, te_b, rtol)
    ca = torch.load(out_a / CHECKPOINT, weights_only=True)
    cb = torch.load(out_b / CHECKPOINT, weights_only=True)
    assert ca["step"] == cb["step"] and ca["model"].keys() == cb["model"].keys()
    # The weights, relative to each tensor's scale, more loosely: Adam's m / sqrt(v) turns
    # rounding in the tiny gradients of a few parameters into relative differences of
    # ~1e-9 (one BatchNorm weight of Inception at width 1/32: 1.4e-9), which the losses
    # (the criterion) do not show.
    for k, v in ca["model"].items():
        scale = float(cb["model"][k].double().abs().max()) if v.is_floating_point() else 0
        torch.testing.assert_close(v, cb["model"][k], rtol=0, atol=1e-7 * scale)
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])   # the dropout streams


@pytest.mark.parametrize("arch", ["vgg", "resnet", "inception"])
@pytest.mark.parametrize("fm", [False, True], ids=["plain", "fm"])
def test_lockstep_equals_alone_float64(files, tmp_path, float64, arch, fm):
    jobs = jobs_of(files, arch, tmp_path / "group", fm=fm)
    results = ls.train_group(jobs)
    for (path, c, out), res in zip(jobs, results):
        assert not isinstance(res, BaseException), res
        alone = tmp_path / "alone" / out.name
        train(path, c, alone)
        assert_same_runs(out, alone)
        assert [r["step"] for r in res.rows] == [0, 25, 50]
        assert json.loads((out / "result.json").read_text())["complete"]
        assert (out / "curves.png").exists() and (out / "config.json").exists()


def test_group_resumes_and_checkpoints_cross(files, tmp_path, float64):
    """A group stopped at step 25 resumes (one run already at 50, one at 0), and a run
    started in lockstep finishes alone: every run equals the one trained alone."""
    jobs = jobs_of(files, "inception", tmp_path / "group")
    short = [(p, cfg("inception", seed=c.seed, fm_reorder=c.fm_reorder, steps=25), o)
             for p, c, o in jobs]
    ls.train_group(short[:3])                            # runs 0-2 stop at step 25
    train(jobs[1][0], jobs[1][1], jobs[1][2], resume=True)   # run 1 goes on alone to 50
    results = ls.train_group(jobs)                       # run 0, 2 at 25; 1 at 50; 3 fresh
    assert [r.resumed_from for r in results] == [25, 50, 25, 0]
    for path, c, out in jobs:
        alone = tmp_path / "alone" / out.name
        train(path, c, alone)
        assert_same_runs(out, alone)


def test_a_diverging_run_stops_and_the_others_go_on(files, tmp_path, float64, monkeypatch):
    jobs = jobs_of(files, "vgg", tmp_path / "group", fm=False)
    orig = ls.StackedNet.forward

    def poisoned(self, x, training):
        logits = orig(self, x, training)
        if training and self.m == 4:                      # model 2 of the full group: NaN loss
            logits = logits.clone()
            logits[2] = float("nan")
        return logits

    monkeypatch.setattr(ls.StackedNet, "forward", poisoned)
    results = ls.train_group(jobs)
    monkeypatch.setattr(ls.StackedNet, "forward", orig)
    assert isinstance(results[2], TrainingDiverged)
    assert "train loss is nan at step 25" in str(results[2])
    out = jobs[2][2]
    assert [r["step"] for r in read_metrics(out)] == [0]
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 0
    assert not (out / "result.json").exists()
    for i in (0, 1, 3):
        assert [r["step"] for r in results[i].rows] == [0, 25, 50]
        alone = tmp_path / "alone" / f"run{i}"
        train(*jobs[i][:2], alone)
        assert_same_runs(jobs[i][2], alone)


def test_group_checks(files, tmp_path):
    jobs = jobs_of(files, "vgg", tmp_path, fm=False)
    with pytest.raises(ValueError, match="must share"):
        ls.train_group([jobs[0], (files[8][0], cfg("vgg", lr=0.1), tmp_path / "x")])
    assert ls.lockstep_key(cfg(seed=1, fm_reorder=["stem:mi:4"]), "cpu") == \
        ls.lockstep_key(cfg(seed=2), "cpu")
    one = ls.group_bytes(cfg(), 1, size=32, num_classes=10)
    assert 0 < one < ls.group_bytes(cfg(), 16, size=32, num_classes=10) < 20 * one
    # a refused run folder is that job's error; the others train
    (tmp_path / "run0").write_text("a file")
    results = ls.train_group([(p, cfg("vgg", seed=c.seed, steps=2, eval_every=1), o)
                              for p, c, o in jobs])
    assert isinstance(results[0], ValueError) and "is a file" in str(results[0])
    assert all(r.rows[-1]["step"] == 2 for r in results[1:])
    assert (tmp_path / "run1" / "curves.png").stat().st_size > 1000


def test_stacked_memory_layouts_agree(float64):
    """Channels-last maps (large batches, CUDA) give the NCHW result: Inception's
    concatenations and a feature-map layer included."""
    from porder.train.fm import insert_fm_reorder
    from porder.train.models import build_model

    torch.manual_seed(0)
    models = [insert_fm_reorder(build_model("inception", num_classes=3, in_size=8, width=1 / 32),
                                specs) for specs in ([], ["stem:mi:4"])]
    x = torch.randn(5, 6, 8, 8)
    outs = []
    for cl in (False, True):
        net = ls.StackedNet(models, [torch.Generator().manual_seed(1) for _ in models])
        outs.append(net.forward(x, True, channels_last=cl))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["vgg", "resnet", "inception"])
def test_lockstep_equals_alone_float64_group_norm(files, tmp_path, float64, arch):
    """--norm group: GroupNorm stacked as one group_norm with M times the groups.

    10 steps, not 50: the first step's losses are equal to the bit, but grouped and
    single GroupNorm backward passes round differently (1e-16), and at these widths
    (groups of 1-2 channels on 2x2 maps) training amplifies that about 10x every 3-5
    steps: VGG and ResNet reach 1e-11 relative by step 10 and 1e-8 to 1e-6 by step 50
    (Inception: 1e-13 at step 50). BatchNorm's stacked steps round exactly as alone.
    """
    jobs = [(p, TrainConfig(**(c.__dict__ | dict(steps=10, eval_every=5))), out)
            for p, c, out in jobs_of(files, arch, tmp_path / "group", fm=arch == "resnet",
                                     norm="group")]
    results = ls.train_group(jobs)
    for (path, c, out), res in zip(jobs, results):
        assert not isinstance(res, BaseException), res
        alone = tmp_path / "alone" / out.name
        train(path, c, alone)
        (tr_a, te_a), (tr_b, te_b) = losses(out), losses(alone)
        assert len(tr_a) == 10 and close(tr_a, tr_b) and close(te_a, te_b)
        state = torch.load(out / CHECKPOINT, weights_only=True)["model"]
        assert state.keys() == torch.load(alone / CHECKPOINT, weights_only=True)["model"].keys()
        assert not any(k.endswith("running_mean") for k in state)     # no BatchNorm left


def test_runs_of_other_norms_train_in_other_groups():
    assert ls.lockstep_key(cfg(), "cpu") != ls.lockstep_key(cfg(norm="group"), "cpu")
