"""Feature-map patch ordering inside the networks: ``porder train --fm-reorder``.

The paper: "Similar procedure can be applied to feature maps deep in the
learning pipeline". :func:`insert_fm_reorder` puts a
:class:`porder.nn.PatchReorder` after a named point of a network built by
:func:`porder.train.models.build_model` (:data:`FM_POINTS`: ``stem`` and
``stage1``..``stageK`` in all three, the last stage excepted: global average
pooling after it ignores the order of the patches; the table lives in the
torch-free :mod:`porder.trainspec`, for the CLI). A forward hook on the
point's submodule passes its output through the layer, so the network's own
parameters, their names and their initial values are unchanged: a run with the
layer and one without start from the same weights for one seed.

Specs are ``"POINT:MEASURE:PATCH"`` strings (:class:`FmSpec`); PATCH must cut
the point's S x S map into 2 x 2 patches or more (:func:`check_fm_reorder`).

:func:`run_network` is the one place a run's network is made (the model with its
layers, for training, step timings and lockstep groups), :func:`run_adam` its optimizer.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from ..trainspec import FM_POINTS, FmSpec, parse_fm_spec
from .models import MODELS, build_model

# FM_POINTS, FmSpec and parse_fm_spec live in porder.trainspec (torch-free, for the CLI);
# they are part of this module's API too.
__all__ = ["FM_POINTS", "FmSpec", "check_fm_reorder", "fm_points", "insert_fm_reorder",
           "parse_fm_spec"]


def fm_points(arch: str, in_size: int = 32) -> dict[str, tuple[str, int]]:
    """The insertion points of ``arch`` at ``in_size``: name -> (submodule path, map side S).

    The map at a point is (N, C, S, S); the sides are recorded by the model's
    constructor as it builds the network (a tiny copy is built to read them,
    with torch's RNG state restored after, so a model built next gets the same
    weights as without this call).
    """
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(MODELS)}")
    if in_size < 8:
        raise ValueError(f"images must be at least 8x8 to train on, got {in_size}x{in_size}")
    with torch.random.fork_rng(devices=[]):
        return dict(MODELS[arch](2, in_size, 1 / 64).fm_points)


def check_fm_reorder(arch: str, in_size: int, specs: Sequence) -> list[FmSpec]:
    """Parse and check feature-map reordering specs for ``arch`` at ``in_size`` inputs.

    Returns
    -------
    list of FmSpec, in the order given.

    Raises
    ------
    ValueError
        A malformed spec, an unknown measure, a point ``arch`` does not have
        (the message lists its points), two layers at one point, or a patch
        that does not cut the point's S x S map into at least 2 x 2 patches
        (the message lists the patch sides that do).
    """
    parsed = [parse_fm_spec(s) for s in specs]
    if not parsed:
        return []
    return _check(arch, fm_points(arch, in_size), parsed)


def _check(arch: str, points: dict, parsed: list) -> list:
    seen = set()
    for sp in parsed:
        if sp.point not in points:
            raise ValueError(f"{arch} has no feature-map point {sp.point!r} (in {sp}); choose "
                             f"one of {', '.join(points)}")
        if sp.point in seen:
            raise ValueError(f"two feature-map reorderings at {arch} point {sp.point!r}; give "
                             "one per point")
        seen.add(sp.point)
        side = points[sp.point][1]
        if side % sp.patch or side // sp.patch < 2:
            ok = [p for p in range(1, side // 2 + 1) if side % p == 0]
            raise ValueError(f"patch {sp.patch} does not cut the {side}x{side} feature map at "
                             f"{arch} point {sp.point!r} into 2x2 or more patches (in {sp}); "
                             f"choose one of {', '.join(map(str, ok)) or 'none: the map is 1x1'}")
    return parsed


def _apply_after(layer: nn.Module, module: nn.Module, args, output):
    return layer(output)


def insert_fm_reorder(model: nn.Module, specs: Sequence, *, bins: int = 256,
                      seed: int = 0) -> nn.Module:
    """Insert a :class:`porder.nn.PatchReorder` after each point of ``specs``, in place.

    Parameters
    ----------
    model : nn.Module
        Built by :func:`porder.train.models.build_model` (it has ``fm_points``).
    specs : sequence of str or FmSpec
        ``"POINT:MEASURE:PATCH"``; checked against the model's own points and
        map sides (ValueError as :func:`check_fm_reorder`).
    bins, seed : int
        Histogram bins of the layers' measures and seed of their ``random`` control.

    Returns
    -------
    The same model. The layers live in ``model.fm_reorder`` (an ``nn.ModuleDict``
    keyed by point, so they show in ``print(model)`` and follow ``model.to``);
    a forward hook on each point's submodule passes its output through its layer.
    """
    if not specs:  # nothing to insert: any nn.Module will do
        return model
    arch = next((a for a, cls in MODELS.items() if type(model) is cls), type(model).__name__)
    parsed = _check(arch, model.fm_points, [parse_fm_spec(s) for s in specs])
    if not parsed:
        return model
    try:
        from ..nn import PatchReorder  # the POR layer (torch), imported when first used
    except ImportError as e:
        raise ValueError(f"--fm-reorder needs porder.nn.PatchReorder, which cannot be imported "
                         f"here ({e}); update porder") from None

    layers = nn.ModuleDict()
    for sp in parsed:
        path = model.fm_points[sp.point][0]
        layer = PatchReorder(sp.measure, sp.patch, bins=bins, seed=seed)
        layers[sp.point] = layer
        model.get_submodule(path).register_forward_hook(partial(_apply_after, layer))
    model.fm_reorder = layers
    return model


def run_network(cfg, *, num_classes: int, size: int) -> nn.Module:
    """The network of a run of ``cfg`` (a :class:`porder.train.TrainConfig`), on the CPU:
    ``cfg.arch`` at ``cfg.width`` with ``cfg.norm``, and its feature-map reordering layers
    (``cfg.fm_reorder``, with ``cfg.bins`` and ``cfg.order_seed``). What a run trains, and
    what its step timings and lockstep groups build."""
    model = build_model(cfg.arch, num_classes=num_classes, in_size=size, width=cfg.width,
                        norm=cfg.norm)
    return insert_fm_reorder(model, cfg.fm_reorder, bins=cfg.bins, seed=cfg.order_seed)


def run_adam(params, lr: float) -> torch.optim.Optimizer:
    """The optimizer of every run: Adam at ``lr`` (torch's betas and eps, no weight decay),
    fused; over a lockstep group's stacked parameters, M Adams elementwise."""
    return torch.optim.Adam(params, lr=lr, fused=True)
