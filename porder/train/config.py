"""What defines a training run (:class:`TrainConfig`) and what it returns (:class:`TrainResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .fm import FM_POINTS, parse_fm_spec
from .models import MODELS

DEVICES = ("cpu", "cuda", "auto")
# Metrics fields that measure time, not learning: they differ between runs.
TIMING_FIELDS = ("images_per_s", "wall_s", "data_wait", "eval_s")
# Config fields that must match to resume a run (the rest may change: steps, device, ...).
IDENTITY = ("arch", "width", "lr", "batch_size", "eval_every", "seed", "reorder", "patch",
            "bins", "order_seed", "amp", "fm_reorder")
# The value an IDENTITY field had before it existed (runs saved by an older porder).
IDENTITY_DEFAULTS = {"fm_reorder": []}

# progress(step, total_steps, stats): stats is None (cheap tick), or a dict with the
# running "loss"/"acc" of the current interval, or an evaluation row ("test_acc" in it).
Progress = Callable[[int, int, Optional[dict]], None]


@dataclass
class TrainConfig:
    """Everything that defines a training run (units in comments)."""

    arch: str = "vgg"               # one of models.MODELS: vgg | resnet | inception
    width: float = 1.0              # channel multiplier (1.0 = the published widths)
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
    amp: bool = True                # mixed precision on CUDA (bfloat16, or float16 + scaling)
    deterministic: bool = True      # deterministic kernels (same seed -> same metrics)
    threads: Optional[int] = None   # CPU threads for torch (None: all cores)
    # feature-map reordering layers, "POINT:MEASURE:PATCH" (fm.FM_POINTS); they use
    # `bins` and the `order_seed` of the random control
    fm_reorder: list = field(default_factory=list)

    def validate(self) -> "TrainConfig":
        if self.arch not in MODELS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of "
                             f"{', '.join(MODELS)}")
        for name in ("batch_size", "steps", "eval_every", "eval_batch", "patch", "bins"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.seed < 0 or self.order_seed < 0:
            raise ValueError(f"seeds must be non-negative, got {self.seed}, {self.order_seed}")
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


def identity_diff(saved: dict, cfg: TrainConfig) -> list[str]:
    """The :data:`IDENTITY` fields on which a saved config dict and ``cfg`` differ.

    A field missing from ``saved`` (written by a porder without it) counts as
    its :data:`IDENTITY_DEFAULTS` value; tuples and lists compare equal.
    """
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    return [k for k in IDENTITY
            if norm(saved.get(k, IDENTITY_DEFAULTS.get(k))) != norm(getattr(cfg, k))]


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
