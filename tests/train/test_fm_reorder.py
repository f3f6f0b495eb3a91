"""--fm-reorder wiring: feature-map reordering layers at named points of the three CNNs.

The layer itself (porder.nn.PatchReorder) is tested with its own module; here a stand-in
with the same constructor, defined in this file, takes its place in ``sys.modules``, so
the wiring is tested on its own: where the layer goes, what it sees, what it is built
with, and what the run folder records.
"""
from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from porder.cli.train import FM_POINTS_HELP
from porder.cli.train import train as train_cmd
from porder.train import TrainConfig, build_model
from porder.train.config import identity_diff
from porder.train.fm import (
    FM_POINTS,
    check_fm_reorder,
    fm_points,
    insert_fm_reorder,
    parse_fm_spec,
)
from porder.train.models import MODELS

from .test_train import write_file


class StandIn(torch.nn.Module):
    """Same constructor as porder.nn.PatchReorder; reverses the patch order of every map."""

    made: list = []

    def __init__(self, measure="mi", patch=4, *, bins=256, reference=0, descending=None,
                 channels="mean", quantise="minmax", enabled_in_eval=True, backend=None, seed=0,
                 workers=None):
        super().__init__()
        self.measure, self.patch, self.bins, self.seed = measure, patch, bins, seed
        self.shapes = []
        StandIn.made.append(self)

    def forward(self, x):                                    # (N, C, S, S)
        n, c, s, _ = x.shape
        p, g = self.patch, x.shape[2] // self.patch
        self.shapes.append(tuple(x.shape))
        t = x.reshape(n, c, g, p, g, p).permute(0, 1, 2, 4, 3, 5).reshape(n, c, g * g, p, p)
        t = t.flip(2)                                        # patch j <- patch K-1-j
        return t.reshape(n, c, g, g, p, p).permute(0, 1, 2, 4, 3, 5).reshape(n, c, s, s)


@pytest.fixture
def stand_in(monkeypatch):
    mod = types.ModuleType("porder.nn")
    mod.PatchReorder = StandIn
    monkeypatch.setitem(sys.modules, "porder.nn", mod)
    StandIn.made = []
    return StandIn


pytestmark = pytest.mark.usefixtures("one_thread")


def _shape_at(model, path, x):
    """The output shape of submodule ``path`` in a forward pass (an independent hook)."""
    seen = []
    h = model.get_submodule(path).register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    return tuple(seen[0])


@pytest.mark.parametrize("size", [32, 16])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_points_sides_are_the_real_map_sides(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3, in_size=size, width=1 / 16)
    points = fm_points(arch, size)
    assert list(points) == list(FM_POINTS[arch])
    x = torch.randn(1, 3, size, size)
    for name, (path, side) in points.items():
        assert _shape_at(model, path, x)[2:] == (side, side), name


POINTS = [(a, p) for a in sorted(MODELS) for p in FM_POINTS[a]]


@pytest.mark.parametrize("arch, point", POINTS)
def test_each_point_trains_with_the_layer(stand_in, arch, point):
    size = 16
    side = fm_points(arch, size)[point][1]
    patch = max(1, side // 2)                                # 2x2 patches
    torch.manual_seed(0)
    plain = build_model(arch, num_classes=3, in_size=size, width=1 / 16)
    torch.manual_seed(0)
    model = insert_fm_reorder(build_model(arch, num_classes=3, in_size=size, width=1 / 16),
                              [f"{point}:mi:{patch}"], bins=64, seed=5)
    # The network's own weights and their names are those of the model without the layer.
    a, b = plain.state_dict(), model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    (layer,) = stand_in.made
    assert (layer.measure, layer.patch, layer.bins, layer.seed) == ("mi", patch, 64, 5)
    assert model.fm_reorder[point] is layer and "StandIn" in repr(model)

    x = torch.randn(2, 3, size, size)
    y = torch.tensor([0, 2])
    plain.train()
    model.train()
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    ref = plain(x)
    assert layer.shapes and layer.shapes[0][0] == 2 and layer.shapes[0][2:] == (side, side)
    assert not torch.allclose(out, ref)                      # the layer is in the path
    torch.nn.functional.cross_entropy(out, y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # Parameters before the point get a gradient through the reordered maps.
    first = next(model.parameters())
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("arch, last", [("vgg", "features.16"), ("resnet", "layers.7"),
                                        ("inception", "blocks.10")])
def test_last_stage_is_no_point_because_pooling_ignores_order(arch, last):
    """Why the last stage is not offered: reordering there leaves the logits unchanged."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3, in_size=32, width=1 / 16).eval()
    assert last not in {path for path, _ in fm_points(arch, 32).values()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        layer = StandIn("mi", 1)                             # 1x1 patches: every map reversed
        h = model.get_submodule(last).register_forward_hook(lambda m, a, o: layer(o))
        got = model(x)
        h.remove()
    assert layer.shapes and layer.shapes[0][2] >= 2
    assert torch.allclose(got, ref, atol=1e-6)


def test_two_points_and_identity_layer_equivalence(stand_in):
    """Reversing the patches twice at one map is the identity: a direct check of the hook."""
    torch.manual_seed(0)
    plain = build_model("resnet", num_classes=2, in_size=16, width=1 / 16).eval()
    torch.manual_seed(0)
    model = insert_fm_reorder(build_model("resnet", num_classes=2, in_size=16, width=1 / 16),
                              ["stem:mi:4", "stage1:l2:8"]).eval()
    assert [m.measure for m in stand_in.made] == ["mi", "l2"]
    x = torch.randn(3, 3, 16, 16)
    # Reorder the input of stage 1 back by hand: apply the stand-in to the stem's output
    # again before stage 1 -> the model without the stem layer.
    undo = StandIn("mi", 4)
    h = model.stem.register_forward_hook(lambda m, a, o: undo(o))  # runs before the layer's
    with torch.no_grad():
        only_stage1 = model(x)
    h.remove()
    torch.manual_seed(0)
    ref = insert_fm_reorder(build_model("resnet", num_classes=2, in_size=16, width=1 / 16),
                            ["stage1:l2:8"]).eval()
    with torch.no_grad():
        assert torch.allclose(only_stage1, ref(x), atol=1e-6)
        assert not torch.allclose(ref(x), plain(x))


def test_bad_specs_are_clear():
    with pytest.raises(ValueError, match=r"'stem-mi-4' is not POINT:MEASURE:PATCH"):
        parse_fm_spec("stem-mi-4")
    with pytest.raises(ValueError, match="unknown measure 'nope'"):
        parse_fm_spec("stem:nope:4")
    with pytest.raises(ValueError, match="patch 'x' is not a positive integer"):
        parse_fm_spec("stem:mi:x")
    with pytest.raises(ValueError, match="patch '0' is not a positive integer"):
        parse_fm_spec("stem:mi:0")
    with pytest.raises(ValueError, match="resnet has no feature-map point 'stage4'.*stem, "
                                         "stage1, stage2, stage3$"):
        check_fm_reorder("resnet", 32, ["stage4:mi:2"])
    with pytest.raises(ValueError, match=r"patch 3 does not cut the 32x32 feature map.*"
                                         r"choose one of 1, 2, 4, 8, 16"):
        check_fm_reorder("vgg", 32, ["stem:mi:3"])
    with pytest.raises(ValueError, match="patch 8 does not cut the 8x8 .*'stage3'.*1, 2, 4$"):
        check_fm_reorder("vgg", 32, ["stage3:mi:8"])                # one patch: nothing to order
    with pytest.raises(ValueError, match="two feature-map reorderings at vgg point 'stem'"):
        check_fm_reorder("vgg", 32, ["stem:mi:4", "stem:l1:8"])
    assert check_fm_reorder("vgg", 32, [" stem : mi : 4 "]) == [parse_fm_spec("stem:mi:4")]
    with pytest.raises(ValueError, match="inception has no feature-map point 'stage3'"):
        TrainConfig(arch="inception", fm_reorder=["stage3:mi:2"]).validate()


def test_insert_checks_the_models_own_sides(stand_in):
    model = build_model("vgg", num_classes=2, in_size=16, width=1 / 16)
    with pytest.raises(ValueError, match="patch 4 does not cut the 4x4 feature map at vgg "
                                         "point 'stage3'"):
        insert_fm_reorder(model, ["stage3:mi:4"])
    assert not stand_in.made and not hasattr(model, "fm_reorder")
    assert insert_fm_reorder(model, []) is model and not hasattr(model, "fm_reorder")


def test_missing_layer_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "porder.nn", None)          # import fails
    model = build_model("vgg", num_classes=2, in_size=16, width=1 / 16)
    with pytest.raises(ValueError, match="--fm-reorder needs porder.nn.PatchReorder"):
        insert_fm_reorder(model, ["stem:mi:4"])


def test_help_lists_every_point():
    lines = {ln.split()[0]: ln for ln in FM_POINTS_HELP.splitlines()[1:4]}
    for arch in MODELS:
        want = ", ".join(f"{p} ({side})" for p, (_, side) in fm_points(arch, 32).items())
        assert lines[arch].split(None, 1)[1] == want
    r = CliRunner().invoke(train_cmd, ["--help"])
    assert r.exit_code == 0 and "--fm-reorder POINT:MEASURE:PATCH" in r.output
    assert "inception  stem (32), stage1 (32), stage2 (16)\n" in r.output


def test_identity_of_old_runs():
    cfg = TrainConfig().validate()
    old = {k: v for k, v in vars(cfg).items() if k != "fm_reorder"}   # before --fm-reorder
    assert identity_diff(old, cfg) == []
    assert identity_diff(old | {"fm_reorder": ("stem:mi:4",)}, cfg) == ["fm_reorder"]
    cfg.fm_reorder = ["stem:mi:4"]
    assert identity_diff(old | {"fm_reorder": ("stem:mi:4",)}, cfg) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_file(tmp_path_factory.mktemp("data") / "tiny.h5")


BASE = ["--arch", "resnet", "--width", "0.0625", "-b", "8", "--steps", "4", "--eval-every", "2",
        "--device", "cpu", "-j", "1", "--no-progress"]


def test_cli_records_and_checks_the_layers(stand_in, tiny, tmp_path):
    out = tmp_path / "run"
    args = [str(tiny), *BASE, "-o", str(out)]
    r = CliRunner().invoke(train_cmd, args + ["--fm-reorder", "stem:mi:4,stage2:random:2",
                                              "--fm-reorder", "stage3:entropy:2"])
    assert r.exit_code == 0, r.output
    want = ["stem:mi:4", "stage2:random:2", "stage3:entropy:2"]
    assert json.loads((out / "config.json").read_text())["config"]["fm_reorder"] == want
    assert json.loads((out / "result.json").read_text())["config"]["fm_reorder"] == want
    assert [(m.measure, m.patch) for m in stand_in.made] == [("mi", 4), ("random", 2),
                                                              ("entropy", 2)]
    # The layers ran in training and evaluation on maps of the recorded sides.
    assert {m.shapes[0][2:] for m in stand_in.made} == {(16, 16), (8, 8), (4, 4)}
    # Resuming with other layers (or none) is refused; the same ones are accepted.
    r = CliRunner().invoke(train_cmd, args + ["--resume", "--steps", "6"])
    assert r.exit_code == 1 and "fm_reorder" in r.output and "options differ" in r.output
    r = CliRunner().invoke(train_cmd, args + ["--resume", "--steps", "6", "--fm-reorder",
                                              "stem:mi:4,stage2:random:2,stage3:entropy:2"])
    assert r.exit_code == 0, r.output


def test_cli_default_folder_names_the_layers(stand_in, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(train_cmd, [str(tiny), *BASE, "--fm-reorder", "stem:mi:4"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "runs" / "tiny-resnet-fm-stem-mi-4-seed0" / "result.json").exists()


@pytest.mark.parametrize("spec, message", [
    ("stage9:mi:4", r"resnet has no feature-map point 'stage9'"),
    ("stem:mi:5", r"patch 5 does not cut the 16x16 feature map at resnet point 'stem'"),
    ("stem:mi", r"'stem:mi' is not POINT:MEASURE:PATCH"),
    ("stem:mutual:4", r"unknown measure 'mutual'"),
])
def test_cli_bad_spec_exits_2(stand_in, tiny, tmp_path, spec, message):
    r = CliRunner().invoke(train_cmd, [str(tiny), *BASE, "-o", str(tmp_path / "r"),
                                       "--fm-reorder", spec])
    assert r.exit_code == 2, r.output
    assert "Invalid value for '--fm-reorder'" in r.output and re.search(message, r.output)
    assert "Traceback" not in r.output and not (tmp_path / "r").exists()
    assert not stand_in.made


def test_real_layer_when_present():
    """With porder.nn present (after the merge), the real layer trains at a point."""
    nn_mod = pytest.importorskip("porder.nn")
    torch.manual_seed(0)
    model = insert_fm_reorder(build_model("vgg", num_classes=2, in_size=16, width=1 / 16),
                              ["stage2:mi:4"])
    assert isinstance(model.fm_reorder["stage2"], nn_mod.PatchReorder)
    out = model(torch.randn(2, 3, 16, 16))
    out.sum().backward()
    assert torch.isfinite(next(model.parameters()).grad).all()
