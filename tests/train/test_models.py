"""The three CIFAR-sized CNNs: shapes, gradients, sizes, widths and bad options."""
from __future__ import annotations

import pytest
import torch

from porder.train.models import MODELS, build_model, count_parameters

ARCHS = sorted(MODELS)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [32, 16])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5, in_size=size, width=1 / 16)
    x = torch.randn(2, 3, size, size)                      # (N, 3, S, S)
    y = torch.tensor([1, 4])
    logits = model(x)
    assert logits.shape == (2, 5)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_online_batch_of_one_trains(arch):
    """Batch norm must work with one image (feature maps never reach 1x1)."""
    model = build_model(arch, num_classes=2, in_size=8, width=1 / 16).train()
    out = model(torch.randn(1, 3, 8, 8))
    out.sum().backward()
    assert out.shape == (1, 2)


def test_published_sizes():
    # CIFAR VGG-16-BN (bias-free convs, one linear layer) and CIFAR ResNet-18 for
    # 10 classes: the parameter counts of the widely used kuangliu/pytorch-cifar
    # models (14,728,266 for VGG-16 minus its 4,224 conv biases; 11,173,962).
    assert count_parameters(build_model("vgg", num_classes=10)) == 14_724_042
    assert count_parameters(build_model("resnet", num_classes=10)) == 11_173_962


@pytest.mark.parametrize("arch", ARCHS)
def test_width_scales_channels(arch):
    small = count_parameters(build_model(arch, num_classes=10, width=0.125))
    large = count_parameters(build_model(arch, num_classes=10, width=0.25))
    assert 3 < large / small < 4.5  # parameters grow ~ width^2


def test_bad_options():
    with pytest.raises(ValueError, match="unknown architecture 'alexnet'"):
        build_model("alexnet", num_classes=10)
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_model("vgg", num_classes=1)
    with pytest.raises(ValueError, match="at least 8x8"):
        build_model("vgg", num_classes=2, in_size=4)
    with pytest.raises(ValueError, match="width must be positive"):
        build_model("vgg", num_classes=2, width=0)


def test_cli_choices_match_models():
    from porder.cli.train import ARCHS as CLI_ARCHS

    assert sorted(CLI_ARCHS) == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_group_norm_replaces_every_batch_norm(arch):
    from porder.train.models import group_count

    torch.manual_seed(0)
    bn = build_model(arch, num_classes=10, in_size=16, width=0.125)
    torch.manual_seed(0)
    gn = build_model(arch, num_classes=10, in_size=16, width=0.125, norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn.modules())
    norms = [m for m in gn.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    assert all(m.num_groups == group_count(m.num_channels) for m in norms)
    # the same draws: every convolution and linear weight equal, BatchNorm's buffers gone
    gp, bp = dict(gn.named_parameters()), dict(bn.named_parameters())
    assert gp.keys() == bp.keys() and all(torch.equal(gp[k], bp[k]) for k in gp)
    assert not any(k.endswith("running_mean") for k in gn.state_dict())
    # no batch statistics: an image's output does not depend on the rest of its batch
    gn.train()
    for m in gn.modules():
        if isinstance(m, torch.nn.Dropout):     # Inception's head: masks differ by batch
            m.eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(gn(x)[:1], gn(x[:1]))


def test_group_count():
    from porder.train.models import group_count

    assert [group_count(c) for c in (64, 48, 24, 10, 7, 1)] == [32, 16, 8, 2, 1, 1]
    with pytest.raises(ValueError, match="unknown normalisation 'layer'"):
        build_model("vgg", num_classes=2, norm="layer")
