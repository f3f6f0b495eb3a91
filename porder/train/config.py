"""What defines a training run (:class:`TrainConfig`) and what it returns (:class:`TrainResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .models import MODELS

DEVICES = ("cpu", "cuda", "auto")
# Metrics fields that measure time, not learning: they differ between runs.
TIMING_FIELDS = ("images_per_s", "wall_s", "data_wait", "eval_s")
# Config fields that must match to resume a run (the rest may change: steps, device, ...).
IDENTITY = ("arch", "width", "lr", "batch_size", "eval_every", "seed", "reorder", "patch",
            "bins", "order_seed", "amp")

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
        return self


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
        old, new = recorded.get(k), getattr(cfg, k)
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
