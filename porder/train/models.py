"""CIFAR-sized versions of the paper's three CNNs, in plain torch.

Every builder takes ``num_classes``, ``in_size`` (the side S of the S x S RGB
inputs, 32 in the paper) and a ``width`` multiplier applied to every channel
count (1.0 = the published widths; 0.125 or 0.25 make CPU runs practical).
Inputs are float tensors (N, 3, S, S); outputs are logits (N, num_classes).

* ``vgg``: VGG-16 with batch norm (13 3x3 convs in 5 blocks, 64-512 channels),
  the CIFAR variant with one linear classifier after global average pooling.
* ``resnet``: ResNet-18 (4 stages x 2 basic blocks, 64-512 channels) with the
  CIFAR stem: one 3x3 stride-1 conv, no max-pool.
* ``inception``: Inception-v3 blocks (Szegedy et al. 2015) adapted to 32x32;
  see :class:`Inception`.

Every model works for any ``in_size`` >= 8; the spatial size of feature maps
never drops below 2x2 before global pooling, so batch norm also trains with a
batch of one image (the paper's online training).

Larger inputs get a strided stem (:func:`stem_stride`): the first conv takes
stride 2 from ``in_size`` 96, and a 3x3 stride-2 max-pool follows the stem from
192, as ImageNet's ResNet does, so the body works on maps of 48-95 px (224 ->
56, 256 -> 64) instead of the whole image. At 32x32 (and below 96) nothing
changes; the parameters (names, shapes) are the same at every size. Measured on
the CPU (docs/large-images.md, batch 8, width 0.125): a step at 224 takes 10.6x
(ResNet), 7.4x (VGG) and 16x (Inception) as long without it.

Every model records in ``fm_points`` where a feature-map reordering layer may
go (name -> submodule path and map side); :mod:`porder.train.fm` inserts them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..trainspec import NORMS

#: GroupNorm's groups where the channels allow (:func:`group_count`).
GROUPS = 32


def _ch(n: int, width: float) -> int:
    """Channel count ``n`` scaled by ``width`` (at least 1)."""
    return max(1, int(round(n * width)))


#: ``in_size`` from which the stem's first conv has stride 2, and from which a
#: 3x3 stride-2 max-pool follows the stem (:func:`stem_stride`).
STRIDE2_FROM, POOL_FROM = 96, 192


def stem_stride(in_size: int) -> int:
    """How much the stem shrinks an ``in_size`` input: 1 below 96, 2 below 192, else 4."""
    return 1 if in_size < STRIDE2_FROM else 2 if in_size < POOL_FROM else 4


def _half(s: int) -> int:
    """Side after a padded stride-2 3x3 conv or max-pool (``padding=1``)."""
    return (s - 1) // 2 + 1


def _stem_conv(cin: int, cout: int, in_size: int) -> tuple[nn.Sequential, int]:
    """The first conv of a network (3x3, stride 2 from :data:`STRIDE2_FROM`) -> (module,
    output side); the stem's max-pool is appended to the conv of the stem that ends it."""
    if stem_stride(in_size) == 1:
        return conv_bn(cin, cout), in_size
    return conv_bn(cin, cout, 3, 2), _half(in_size)


def _pooled(block: nn.Sequential, side: int, in_size: int) -> tuple[nn.Sequential, int]:
    """``block`` with the stem's 3x3 stride-2 max-pool appended when ``in_size`` needs it
    (from :data:`POOL_FROM`; a parameter-free module, so the state dict's names stay)."""
    if stem_stride(in_size) < 4:
        return block, side
    block.append(nn.MaxPool2d(3, 2, 1))
    return block, _half(side)


def conv_bn(cin: int, cout: int, kernel=3, stride=1, padding=None) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU; 'same' padding by default."""
    if padding is None:
        padding = (kernel // 2) if isinstance(kernel, int) else tuple(k // 2 for k in kernel)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


# ---------------------------------------------------------------- VGG-16-BN
VGG16 = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


class VGG(nn.Module):
    """VGG-16 with batch norm for small images.

    The 2x2 max-pool between blocks is skipped when it would shrink the map
    below 2x2 (so at 32x32 all four pools run: 32-16-8-4-2, and block 5 works
    on 2x2 maps; at 16x16 the last one is skipped). From 96 px the first conv
    is strided, from 192 a max-pool follows it (:func:`stem_stride`: 224 ->
    56-28-14-7-4). Global average pooling and
    one linear layer replace the 3 fully connected layers of the ImageNet model,
    as in the usual CIFAR variant.
    """

    def __init__(self, num_classes: int, in_size: int = 32, width: float = 1.0):
        super().__init__()
        layers, cin, s = [], 3, in_size
        points = {}
        for b, block in enumerate(VGG16):
            if b and s >= 4:
                layers.append(nn.MaxPool2d(2))
                s //= 2
            for c in block:
                if layers:
                    layers.append(conv_bn(cin, _ch(c, width)))
                else:                                      # the stem: strided for large inputs
                    conv, s = _stem_conv(cin, _ch(c, width), in_size)
                    conv, s = _pooled(conv, s, in_size)
                    layers.append(conv)
                cin = _ch(c, width)
                if not points:
                    points["stem"] = ("features.0", s)
            if b + 1 < len(VGG16):                       # see trainspec.FM_POINTS: not the last
                points[f"stage{b + 1}"] = (f"features.{len(layers) - 1}", s)
        self.fm_points = points
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):                              # (N, 3, S, S)
        x = self.features(x)                           # (N, C, s, s)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + self.short(x))


class ResNet(nn.Module):
    """ResNet-18: 3x3 stride-1 stem, no max-pool, stages of 2 basic blocks.

    Stages 2-4 halve the map (32-32-16-8-4 at 32x32); a stride is dropped when
    it would shrink the map below 2x2. From 96 px the stem conv has stride 2,
    from 192 a 3x3 stride-2 max-pool follows it (:func:`stem_stride`: 224 ->
    56-56-28-14-7, ImageNet ResNet-18's maps).
    """

    def __init__(self, num_classes: int, in_size: int = 32, width: float = 1.0):
        super().__init__()
        c0 = _ch(64, width)
        stem, s = _stem_conv(3, c0, in_size)
        self.stem, s = _pooled(stem, s, in_size)
        blocks, cin = [], c0
        self.fm_points = {"stem": ("stem", s)}         # see trainspec.FM_POINTS: not the last stage
        for i, c in enumerate((64, 128, 256, 512)):
            stride = 2 if i and s >= 4 else 1
            s = _half(s) if stride == 2 else s         # a padded 3x3 stride-2 conv: odd sides round up
            cout = _ch(c, width)
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
            if i < 3:
                self.fm_points[f"stage{i + 1}"] = (f"layers.{len(blocks) - 1}", s)
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):                              # (N, 3, S, S)
        x = self.layers(self.stem(x))                  # (N, C, S/8, S/8)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------- Inception-v3
class _Cat(nn.Module):
    """Parallel branches concatenated along channels."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


def _pool_proj(cin, cout):
    return nn.Sequential(nn.AvgPool2d(3, 1, 1), conv_bn(cin, cout, 1))


def inception_a(cin, pool, w):
    """Fig. 5 of Szegedy et al.: 1x1 | 5x5 | double 3x3 | pool branches."""
    c = lambda n: _ch(n, w)
    return _Cat(conv_bn(cin, c(64), 1),
                nn.Sequential(conv_bn(cin, c(48), 1), conv_bn(c(48), c(64), 5)),
                nn.Sequential(conv_bn(cin, c(64), 1), conv_bn(c(64), c(96), 3),
                              conv_bn(c(96), c(96), 3)),
                _pool_proj(cin, c(pool))), c(64) + c(64) + c(96) + c(pool)


def reduction_b(cin, w):
    """Grid reduction 'B': stride-2 3x3 | double 3x3 | max-pool (padded: S -> S/2)."""
    c = lambda n: _ch(n, w)
    return _Cat(conv_bn(cin, c(384), 3, 2, 1),
                nn.Sequential(conv_bn(cin, c(64), 1), conv_bn(c(64), c(96), 3),
                              conv_bn(c(96), c(96), 3, 2, 1)),
                nn.MaxPool2d(3, 2, 1)), c(384) + c(96) + cin


def inception_c(cin, c7, w, n=7):
    """Fig. 6: 1xn / nx1 factorised n x n convolutions."""
    c = lambda k: _ch(k, w)
    a, b = (1, n), (n, 1)
    return _Cat(conv_bn(cin, c(192), 1),
                nn.Sequential(conv_bn(cin, c(c7), 1), conv_bn(c(c7), c(c7), a),
                              conv_bn(c(c7), c(192), b)),
                nn.Sequential(conv_bn(cin, c(c7), 1), conv_bn(c(c7), c(c7), b),
                              conv_bn(c(c7), c(c7), a), conv_bn(c(c7), c(c7), b),
                              conv_bn(c(c7), c(192), a)),
                _pool_proj(cin, c(192))), 4 * c(192)


def reduction_d(cin, w):
    """Grid reduction 'D': 3x3 stride 2 | 1x7, 7x1, 3x3 stride 2 | max-pool."""
    c = lambda n: _ch(n, w)
    return _Cat(nn.Sequential(conv_bn(cin, c(192), 1), conv_bn(c(192), c(320), 3, 2, 1)),
                nn.Sequential(conv_bn(cin, c(192), 1), conv_bn(c(192), c(192), (1, 7)),
                              conv_bn(c(192), c(192), (7, 1)), conv_bn(c(192), c(192), 3, 2, 1)),
                nn.MaxPool2d(3, 2, 1)), c(320) + c(192) + cin


class _Split(nn.Module):
    """conv then two parallel branches (1x3 and 3x1) concatenated (Fig. 7)."""

    def __init__(self, head, cmid, cout):
        super().__init__()
        self.head = head
        self.a = conv_bn(cmid, cout, (1, 3))
        self.b = conv_bn(cmid, cout, (3, 1))

    def forward(self, x):
        x = self.head(x)
        return torch.cat([self.a(x), self.b(x)], 1)


def inception_e(cin, w):
    """Fig. 7: expanded filter bank for the coarsest grid."""
    c = lambda n: _ch(n, w)
    return _Cat(conv_bn(cin, c(320), 1),
                _Split(conv_bn(cin, c(384), 1), c(384), c(384)),
                _Split(nn.Sequential(conv_bn(cin, c(448), 1), conv_bn(c(448), c(384), 3)),
                       c(384), c(384)),
                _pool_proj(cin, c(192))), c(320) + 4 * c(384) + c(192)


class Inception(nn.Module):
    """Inception-v3 (Szegedy et al. 2015, torchvision's channel counts) for small images.

    Adaptation to 32x32 inputs (the ImageNet model expects 299x299 and shrinks
    them 8x in its stem before the first Inception block):

    * stem: three 3x3 stride-1 convs (32, 32, 64 channels) then a 1x1 (80) and
      a 3x3 (192) conv, all stride 1 with padding and no max-pools, so the
      Inception-A blocks see 32x32 maps, as the 35x35 grid of the original;
    * 3 x Inception-A (32x32) -> grid reduction -> 4 x Inception-C with 1x7/7x1
      factorisation (16x16) -> grid reduction -> 2 x Inception-E (8x8), the
      published block sequence; reductions use padding=1 so S halves exactly;
    * no auxiliary classifier; global average pooling, dropout 0.5 and one
      linear layer, as in v3's head;
    * larger inputs: from 96 px the first stem conv has stride 2, from 192 a
      3x3 stride-2 max-pool follows the third (ImageNet's v3 pools there too),
      so the Inception-A blocks see 48-95 px maps (:func:`stem_stride`).
    """

    def __init__(self, num_classes: int, in_size: int = 32, width: float = 1.0):
        super().__init__()
        c = lambda n: _ch(n, width)
        first, s = _stem_conv(3, c(32), in_size)
        third, s = _pooled(conv_bn(c(32), c(64)), s, in_size)
        self.stem = nn.Sequential(first, conv_bn(c(32), c(32)), third,
                                  conv_bn(c(64), c(80), 1), conv_bn(c(80), c(192)))
        blocks, cin = [], c(192)
        for pool in (32, 64, 64):
            b, cin = inception_a(cin, pool, width)
            blocks.append(b)
        b, cin = reduction_b(cin, width)
        blocks.append(b)
        for c7 in (128, 160, 160, 192):
            b, cin = inception_c(cin, c7, width)
            blocks.append(b)
        b, cin = reduction_d(cin, width)
        blocks.append(b)
        for _ in range(2):
            b, cin = inception_e(cin, width)
            blocks.append(b)
        self.blocks = nn.Sequential(*blocks)
        self.fm_points = {"stem": ("stem", s), "stage1": ("blocks.2", s),  # the padded stride-2
                          "stage2": ("blocks.7", _half(s))}   # reductions; trainspec.FM_POINTS
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):                              # (N, 3, S, S)
        x = self.blocks(self.stem(x))                  # (N, C, S/4, S/4)
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


# In the order of porder.trainspec.ARCHS, the names the CLI offers without importing torch.
MODELS = {"vgg": VGG, "resnet": ResNet, "inception": Inception}


def build_model(arch: str, *, num_classes: int, in_size: int = 32,
                width: float = 1.0, norm: str = "batch") -> nn.Module:
    """Build one of :data:`MODELS` for ``in_size`` x ``in_size`` RGB inputs.

    The model records its feature-map points in ``fm_points`` (see
    :mod:`porder.train.fm`). ``norm``: ``batch`` (BatchNorm, the published
    networks) or ``group`` (every BatchNorm made a GroupNorm: :func:`to_group_norm`).

    Raises
    ------
    ValueError
        Unknown ``arch`` or ``norm``, fewer than 2 classes, ``in_size`` < 8 or
        ``width`` <= 0.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes to train a classifier, got {num_classes}")
    if in_size < 8:
        raise ValueError(f"images must be at least 8x8 to train on, got {in_size}x{in_size}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    if norm not in NORMS:
        raise ValueError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMS)}")
    model = MODELS[arch](num_classes, in_size, width)
    return to_group_norm(model) if norm == "group" else model


def group_count(channels: int) -> int:
    """GroupNorm's groups for ``channels``: 32 (Wu & He's default), or the largest power of
    two below 32 that divides ``channels`` (1 for an odd count: a LayerNorm of the map)."""
    return math.gcd(channels, GROUPS)


def to_group_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a ``GroupNorm`` over the same channels
    (:func:`group_count` groups, BatchNorm's eps, weight 1, bias 0), in place; returns it.

    Why: BatchNorm normalises with the statistics of the batch. At batch 1 (the paper's
    online training) that is each image's own statistics per channel, and a channel's
    mean over its map, which global pooling passes to the classifier, is normalised
    away. On `digits` (width 0.125, lr 1e-4, batch 1, seed 0) Inception with BatchNorm
    stayed at chance for 4,000 steps (test accuracy 7%) and learnt with GroupNorm (57%
    at step 4,000, still rising); VGG likewise (16% and 85%). GroupNorm uses no batch
    statistics, so a step does the same at any batch size and evaluation normalises as
    training does. Parameters are drawn as with BatchNorm: the same seed gives the same
    convolution and linear weights.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            gn = nn.GroupNorm(group_count(child.num_features), child.num_features,
                              eps=child.eps)
            setattr(module, name, gn)
        else:
            to_group_norm(child)
    return module


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
