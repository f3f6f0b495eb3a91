"""What defines a training run (:class:`TrainConfig`) and what it returns (:class:`TrainResult`).

This module imports no torch (its limits and names come from :mod:`porder.trainspec`),
though the :mod:`porder.train` package that holds it does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..trainspec import ARCHS, DEVICES, FM_POINTS, MAX_SEED, MAX_WIDTH, NORMS, parse_fm_spec

# Metrics fields that measure time, not learning: they differ between runs.
TIMING_FIELDS = ("images_per_s", "wall_s", "data_wait", "eval_s")
# Config fields that must match to resume a run (the rest may change: steps, device, ...).
IDENTITY = ("arch", "width", "lr", "batch_size", "eval_every", "seed", "reorder", "patch",
            "bins", "order_seed", "amp", "fm_reorder", "eval_images", "norm")
# The value an IDENTITY field had before it existed (runs saved by an older porder).
IDENTITY_DEFAULTS = {"fm_reorder": [], "eval_images": None, "norm": "batch"}
# Seed of the held-out evaluation subset (eval_images): one subset for every run of a file,
# whatever the run's seed, so that runs compared seed by seed are scored on the same images.
EVAL_SUBSET_SEED = 0

# progress(step, total_steps, stats): stats is None (cheap tick), or a dict with the
# running "loss"/"acc" of the current interval, or an evaluation row ("test_acc" in it).
Progress = Callable[[int, int, Optional[dict]], None]


@dataclass
class TrainConfig:
    """Everything that defines a training run (units in comments)."""

    arch: str = "vgg"               # one of ARCHS (models.MODELS): vgg | resnet | inception
    width: float = 1.0              # channel multiplier (1.0 = the published widths)
    norm: str = "batch"             # batch (BatchNorm) | group (GroupNorm: models.to_group_norm)
    lr: float = 1e-3                # Adam learning rate (betas 0.9/0.999, no weight decay)
    batch_size: int = 32            # images per step; 1 = online training, as in the paper
    steps: int = 1000               # optimizer steps (one batch each)
    eval_every: int = 100           # steps between test evaluations and checkpoints
    seed: int = 0                   # model init, batch order and dropout
    device: str = "auto"            # cpu | cuda | auto (cuda when torch sees a GPU)
    reorder: Optional[str] = None   # measure applied to every batch on the fly (None: as stored)
    patch: int = 8                  # patch side for `reorder` (pixels)
    bins: int = 256                 # histogram bins for `reorder`
    order_seed: int = 0             # seed of the `random` control for `reorder`
    eval_batch: int = 500           # images per forward pass when evaluating
    # test images of the curve points (a fixed, seeded subset: eval_indices); the last
    # step is always evaluated on the whole test split (None: the whole split every time)
    eval_images: Optional[int] = None
    amp: bool = True                # mixed precision on CUDA (bfloat16, or float16 + scaling)
    deterministic: bool = True      # deterministic kernels (same seed -> same metrics)
    threads: Optional[int] = None   # CPU threads for torch (None: all cores)
    # feature-map reordering layers, "POINT:MEASURE:PATCH" (trainspec.FM_POINTS); they use
    # `bins` and the `order_seed` of the random control
    fm_reorder: list = field(default_factory=list)

    def validate(self) -> "TrainConfig":
        """Check every field; ValueError naming the option and what it must be."""
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of "
                             f"{', '.join(ARCHS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown normalisation (--norm) {self.norm!r}; choose one of "
                             f"{', '.join(NORMS)}")
        for name in ("batch_size", "steps", "eval_every", "eval_batch", "patch", "bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be at least 1 (a whole number), got {value!r}")
        if not _finite(self.lr) or not self.lr > 0:
            raise ValueError(f"learning rate (--lr) must be a finite number > 0, got {self.lr!r}")
        if not _finite(self.width) or not 0 < self.width <= MAX_WIDTH:
            raise ValueError(f"width (--width) must be a finite number with 0 < width <= "
                             f"{MAX_WIDTH:g}, got {self.width!r}")
        if self.eval_images is not None and (isinstance(self.eval_images, bool) or not isinstance(
                self.eval_images, int) or self.eval_images < 1):
            raise ValueError(f"eval_images must be None (the whole test split) or at least 1, "
                             f"got {self.eval_images!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be at least 1, got {self.threads!r}")
        for name in ("seed", "order_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value <= MAX_SEED:
                raise ValueError(f"{name} must be an integer with 0 <= {name} <= 2**63 - 1, "
                                 f"got {value!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} is not one of {', '.join(DEVICES)}")
        if self.reorder is not None:
            from ..measures import get_measure

            get_measure(self.reorder)
        if isinstance(self.fm_reorder, str):
            self.fm_reorder = [self.fm_reorder]
        specs = [parse_fm_spec(s) for s in self.fm_reorder]
        points = [sp.point for sp in specs]
        for sp in specs:
            if sp.point not in FM_POINTS[self.arch]:
                raise ValueError(f"{self.arch} has no feature-map point {sp.point!r} (in {sp}); "
                                 f"choose one of {', '.join(FM_POINTS[self.arch])}")
            if points.count(sp.point) > 1:
                raise ValueError(f"two feature-map reorderings at {self.arch} point "
                                 f"{sp.point!r}; give one per point")
        self.fm_reorder = [str(sp) for sp in specs]
        return self


def eval_indices(n_test: int, eval_images: Optional[int]):
    """The test images a curve point is evaluated on: None for all ``n_test`` of them, else
    the sorted indices (k,) of a fixed random subset of ``k = eval_images`` of them.

    The subset depends only on ``n_test`` and ``k`` (seeded with :data:`EVAL_SUBSET_SEED`),
    so every run on a file of that size, and every run of a comparison, sees the same
    images; the last step of a run is evaluated on the whole split (:func:`evaluate`
    in :mod:`.loop`).
    """
    if eval_images is None or eval_images >= n_test:
        return None
    import numpy as np

    rng = np.random.default_rng(EVAL_SUBSET_SEED)
    return np.sort(rng.permutation(n_test)[:eval_images])                  # (k,)


def identity_diff(saved: dict, cfg: TrainConfig) -> list[str]:
    """The :data:`IDENTITY` fields on which a saved config dict and ``cfg`` differ.

    A field missing from ``saved`` (written by a porder without it) counts as
    its :data:`IDENTITY_DEFAULTS` value; tuples and lists compare equal.
    """
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    return [k for k in IDENTITY
            if norm(saved.get(k, IDENTITY_DEFAULTS.get(k))) != norm(getattr(cfg, k))]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def effective_config(cfg: TrainConfig, device: str) -> dict:
    """``cfg`` as a dict, as it acts on the resolved ``device``: mixed precision
    (``amp``) is only ever used on CUDA, so on the CPU it reads False.

    What ``config.json`` and ``result.json`` record; the checkpoint keeps the
    options as given (they decide whether a run can resume).
    """
    from dataclasses import asdict

    return asdict(cfg) | {"amp": bool(cfg.amp and device == "cuda")}


def config_diff(recorded: dict, cfg: TrainConfig, device: str) -> list[str]:
    """How a run's recorded options (its ``config.json``/``result.json`` ``config``,
    trained on ``device``) differ from ``cfg`` in the :data:`IDENTITY` fields that
    decide whether it can resume: ``['lr: 0.001 -> 0.01', ...]``. ``amp`` counts
    only on CUDA, the one device where it acts.
    """
    diff = []
    for k in IDENTITY:
        old, new = recorded.get(k, IDENTITY_DEFAULTS.get(k)), getattr(cfg, k)
        if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
            old, new = list(old or []), list(new or [])
        if k == "amp":
            old, new = bool(old) and device == "cuda", bool(new) and device == "cuda"
        if old != new:
            diff.append(f"{k}: {old!r} -> {new!r}")
    return diff


@dataclass
class TrainResult:
    out: Path
    rows: list = field(default_factory=list)     # metrics rows, step 0 first
    resumed_from: int = 0                        # step of the checkpoint resumed (0: fresh)
    device: str = "cpu"
    rank: int = 0                                # this process (0: the one that writes files)
    world_size: int = 1                          # processes training together

    @property
    def final(self) -> dict:
        return self.rows[-1]
