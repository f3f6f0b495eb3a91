"""The three networks at sizes above 32 (issue 21): training, the strided stem,
the feature-map sides they record, and the one-line error of a size that cannot work."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from porder.cli.train import train as train_cmd
from porder.train import TrainConfig, train
from porder.train.fm import check_fm_reorder, fm_points
from porder.train.models import MODELS, build_model, count_parameters, stem_stride

from .test_train import write_file

ARCHS = sorted(MODELS)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large")
    return {s: write_file(folder / f"s{s}.h5", n_train=8, n_test=4, size=s, patch=16)
            for s in (64, 128)}


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_trains_two_steps(files, tmp_path, arch, size):
    cfg = TrainConfig(arch=arch, width=1 / 16, batch_size=4, steps=2, eval_every=2,
                      device="cpu", threads=1)
    res = train(files[size], cfg, tmp_path)
    assert [r["step"] for r in res.rows] == [0, 2]
    assert all(r["test_loss"] == r["test_loss"] for r in res.rows)   # finite, not NaN


def test_stem_stride_by_size():
    assert [stem_stride(s) for s in (8, 32, 64, 95, 96, 128, 191, 192, 224, 256, 512)] == \
        [1, 1, 1, 1, 2, 2, 2, 4, 4, 4, 4]


@pytest.mark.parametrize("arch, size, stem", [("resnet", 224, 56), ("resnet", 128, 64),
                                              ("resnet", 64, 64), ("resnet", 32, 32),
                                              ("vgg", 224, 56), ("vgg", 256, 64),
                                              ("inception", 224, 56), ("inception", 96, 48)])
def test_large_inputs_get_a_strided_stem(arch, size, stem):
    assert fm_points(arch, size)["stem"][1] == stem


@pytest.mark.parametrize("arch", ARCHS)
def test_parameters_are_the_same_at_every_size(arch):
    """The stem's stride and max-pool hold no parameters: names and shapes never change."""
    def shapes(size):
        torch.manual_seed(0)
        return {k: v.shape for k, v in build_model(arch, num_classes=10, in_size=size,
                                                   width=1 / 16).state_dict().items()}
    assert shapes(32) == shapes(96) == shapes(224)
    assert count_parameters(build_model(arch, num_classes=10, in_size=224, width=1 / 16)) == \
        count_parameters(build_model(arch, num_classes=10, in_size=32, width=1 / 16))


@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_map_sides_are_the_real_ones(arch):
    """Every fm point's side is the side of the map the network really makes there,
    odd sizes included (ResNet recorded floor(S/2) where its convs give ceil)."""
    for size in (9, 13, 17, 23, 33, 50, 63, 97, 129, 193, 225):
        model = build_model(arch, num_classes=2, in_size=size, width=1 / 64).eval()
        seen = {}
        for name, (path, _) in model.fm_points.items():
            model.get_submodule(path).register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(name, tuple(out.shape[2:])))
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        assert seen == {name: (side, side) for name, (_, side) in model.fm_points.items()}, size


def test_fm_reorder_at_224_checks_the_strided_maps():
    assert check_fm_reorder("resnet", 224, ["stem:mi:8", "stage1:mi:14"])
    with pytest.raises(ValueError, match="patch 16 does not cut the 56x56 feature map"):
        check_fm_reorder("resnet", 224, ["stem:mi:16"])


def test_a_size_that_cannot_train_is_one_line(tmp_path):
    small = write_file(tmp_path / "s4.h5", n_train=8, n_test=4, size=4, patch=2)
    r = CliRunner().invoke(train_cmd, [str(small), "--arch", "resnet", "--steps", "1",
                                       "--batch-size", "4", "--device", "cpu",
                                       "--out", str(tmp_path / "run")])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "at least 8x8" in lines[0], r.output
