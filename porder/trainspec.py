"""What a training run may be, without torch: the architectures, their feature-map
points, the limits of the options, the ``--fm-reorder`` spec and comma-separated lists.

One home for what both the library (:mod:`porder.train.config`,
:mod:`porder.train.fm`) and the command line (:mod:`porder.cli.train`) need.
It lives outside :mod:`porder.train`, whose package imports torch, so that
``porder train --help`` and ``porder compare --help`` stay fast and torch-free.
The tests check it against the networks themselves: the names against
:data:`porder.train.models.MODELS`, the points and their map sides against the
sides each model records (:func:`porder.train.fm.fm_points`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .measures import get_measure

#: The CNNs of :mod:`porder.train.models` (``porder train --arch``).
ARCHS = ("vgg", "resnet", "inception")
#: How the networks normalise: BatchNorm (the published networks) or GroupNorm (no batch
#: statistics; ``porder.train.models.to_group_norm``).
NORMS = ("batch", "group")
#: Where the networks train: ``auto`` is CUDA when torch sees a GPU.
DEVICES = ("cpu", "cuda", "auto")
#: Largest ``--width``: 16 x the published channel counts (VGG's last layers: 8,192 channels).
MAX_WIDTH = 16.0
#: Seeds are stored as int64 (config.json, checkpoints).
MAX_SEED = 2**63 - 1

# Where `porder train --fm-reorder POINT:MEASURE:PATCH` may insert a PatchReorder layer:
# arch -> point -> (the part of the network whose output it is, the side of its map at
# 32x32 inputs; every model records its own points and sides for any input size in
# `fm_points`). The last stage of each network is not a point: global average pooling
# follows it, and an average does not depend on the order of the patches, so a layer
# there would change nothing.
FM_POINTS_AT_32 = {
    "vgg": {"stem": ("after the first conv", 32),
            **{f"stage{b}": (f"after conv block {b} of 5", s)
               for b, s in zip(range(1, 5), (32, 16, 8, 4))}},
    "resnet": {"stem": ("after the 3x3 stem conv", 32),
               **{f"stage{i}": (f"after stage {i} of 4, 2 basic blocks each", s)
                  for i, s in zip(range(1, 4), (32, 16, 8))}},
    "inception": {"stem": ("after the 5-conv stem", 32),
                  "stage1": ("after the 3 Inception-A blocks", 32),
                  "stage2": ("after the reduction and the 4 Inception-C blocks", 16)},
}
#: arch -> point -> what it is, with its map side at 32x32 inputs in brackets.
FM_POINTS = {arch: {point: f"{what} ({side})" for point, (what, side) in points.items()}
             for arch, points in FM_POINTS_AT_32.items()}

#: The feature-map points for ``porder train --help`` (its epilog).
FM_POINTS_HELP = "\n".join(
    ["Feature-map points for --fm-reorder POINT:MEASURE:PATCH (map side at 32x32 in "
     "brackets):"]
    + [f"  {arch:<11}" + ", ".join(f"{point} ({side})" for point, (_, side) in points.items())
       for arch, points in FM_POINTS_AT_32.items()]
    + ["stem = after the first conv (vgg), the stem conv (resnet), the 5-conv stem (inception);",
       "stageK = after the K-th of 5 conv blocks (vgg), of 4 stages of 2 basic blocks (resnet),",
       "after the Inception-A blocks (inception stage1) or the reduction and Inception-C blocks",
       "(stage2). The last stage is no point: global average pooling ignores patch order.",
       "PATCH must cut the map into 2x2 or more patches."])


@dataclass(frozen=True)
class FmSpec:
    """One feature-map reordering layer: where, with which measure, which patch side."""

    point: str
    measure: str
    patch: int

    def __str__(self) -> str:
        return f"{self.point}:{self.measure}:{self.patch}"


def parse_fm_spec(text) -> FmSpec:
    """``"POINT:MEASURE:PATCH"`` -> :class:`FmSpec` (an FmSpec is returned unchanged).

    Checks the form, the measure (:data:`porder.measures.MEASURES`) and that
    PATCH is a positive integer; the point and the patch against a network are
    checked by :func:`porder.train.fm.check_fm_reorder`.
    """
    if isinstance(text, FmSpec):
        return text
    parts = str(text).strip().split(":")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ValueError(f"feature-map reordering {text!r} is not POINT:MEASURE:PATCH, "
                         "e.g. stem:mi:4")
    point, name, patch = (p.strip() for p in parts)
    try:
        name = get_measure(name).name
    except ValueError as e:
        raise ValueError(f"feature-map reordering {text!r}: {e}") from None
    try:
        size = int(patch)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"feature-map reordering {text!r}: patch {patch!r} is not a positive "
                         "integer, e.g. stem:mi:4")
    return FmSpec(point, name, size)


def split_items(text, option: str = "") -> list[str]:
    """``'a, b,c'`` -> ``['a', 'b', 'c']``: the stripped items of a comma-separated value.

    ValueError naming ``option`` (when given) and the empty item when an item is
    empty (``vgg,,resnet``, a leading or trailing comma, or nothing at all): an
    item dropped silently would run something other than what was asked.
    """
    parts = [p.strip() for p in str(text).split(",")]
    where = f"{option} " if option else ""
    if parts == [""]:
        raise ValueError(f"{where}is empty; give at least one item")
    empty = [i for i, p in enumerate(parts, 1) if not p]
    if empty:
        raise ValueError(f"{where}{str(text)!r} has an empty item (item {empty[0]} of "
                         f"{len(parts)}); remove the extra comma")
    return parts
