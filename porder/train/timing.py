"""How long a training step and an evaluation take on this device: a short measurement.

:func:`time_steps` builds the model of a run, trains it for a few steps on
random inputs with the loop's own step (Adam, softmax cross-entropy, mixed
precision on CUDA) and times them, then times evaluation forward passes.
``porder compare --dry-run`` multiplies these by the planned steps for its
time estimate. Random inputs cost the same as real ones: the model's work does
not depend on pixel values (a feature-map reordering layer aside, whose cost
depends little on them).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .device import autocast, resolve_device, sync, torch_settings
from .fm import run_adam, run_network


@dataclass(frozen=True)
class StepTiming:
    step_s: float           # median seconds of one training step (batch_size images)
    eval_image_s: float     # seconds of evaluation per test image
    steps_timed: int        # steps measured after the warm-up
    warmup: int             # steps run first and not counted
    eval_images: int        # images of the timed evaluation forward pass
    device: str
    threads: int

    def describe(self, cfg: TrainConfig) -> str:
        """How it was measured, in one line."""
        fm = f", --fm-reorder {','.join(cfg.fm_reorder)}" if cfg.fm_reorder else ""
        n = lambda k, word: f"{k} {word}" + ("" if k == 1 else "s")
        return (f"{1e3 * self.step_s:.1f} ms per training step: median of "
                f"{n(self.steps_timed, 'step')} of {cfg.batch_size} random {cfg.arch} inputs "
                f"(width {cfg.width}{fm}) on {self.device} ({self.threads} threads) after "
                f"{n(self.warmup, 'warm-up step')}; "
                f"evaluation {1e3 * self.eval_image_s:.2f} ms per test image (a forward pass "
                f"of {self.eval_images} images)")


def _step(model, opt, x, y, device: str, cfg: TrainConfig) -> None:
    """One Adam step on inputs ``x`` (B, 3, S, S) and labels ``y`` (B,)."""
    with autocast(device, cfg):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed_steps(step, *, warmup: int, min_time: float, max_steps: int) -> tuple[list, int]:
    """Run ``step()`` (which synchronises the device) ``warmup`` times untimed (fewer when
    one takes more than ``min_time``), then timed until ``min_time`` seconds have passed
    and 3 steps were timed (1 step when it alone takes ``3 * min_time``), or
    ``max_steps`` were timed: (seconds of each timed step, warm-up steps run)."""
    warm = 0
    for _ in range(warmup):          # a step slower than min_time is warm-up enough
        t0 = time.perf_counter()
        step()
        warm += 1
        if time.perf_counter() - t0 > min_time:
            break
    times, t_start = [], time.perf_counter()
    while len(times) < max_steps:    # >= min_time seconds and >= 3 steps, or 1 slow step
        elapsed = time.perf_counter() - t_start
        if times and elapsed >= min_time and (len(times) >= 3 or elapsed >= 3 * min_time):
            break
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times, warm


def time_steps(cfg: TrainConfig, *, num_classes: int, size: int, warmup: int = 2,
               min_time: float = 1.0, max_steps: int = 20,
               eval_images: int = 32) -> StepTiming:
    """Measure one run's training step and evaluation cost on this device.

    Parameters
    ----------
    cfg : TrainConfig
        The run (arch, width, batch size, fm_reorder, device, threads, amp).
    num_classes, size : int
        Classes and image side S of the data.
    warmup : int
        Steps run first and not timed (allocations, kernel selection); fewer
        when one takes more than ``min_time``.
    min_time, max_steps
        Timed steps continue until ``min_time`` seconds have passed and at
        least 3 steps were timed (1 step when it alone takes ``3 * min_time``),
        or ``max_steps`` steps were timed. The median step is returned, so a
        busy machine's outliers count little; a machine kept busy by other
        work gives a longer estimate, as the comparison would take longer.
    eval_images : int
        Images of the timed evaluation forward pass (in eval mode, no
        gradient); 4 when a pass of 4 already shows that ``eval_images`` would
        take more than ``min_time``.

    Returns
    -------
    StepTiming
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    with torch_settings(device, cfg.deterministic, cfg.threads), torch.random.fork_rng(
            devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model = run_network(cfg, num_classes=num_classes, size=size).to(device)
        if device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = run_adam(model.parameters(), cfg.lr)
        x = torch.randn(cfg.batch_size, 3, size, size, device=device)    # (B, 3, S, S)
        y = torch.randint(0, num_classes, (cfg.batch_size,), device=device)
        model.train()

        def step():
            _step(model, opt, x, y, device, cfg)
            sync(device)

        times, warm = timed_steps(step, warmup=warmup, min_time=min_time, max_steps=max_steps)
        model.eval()
        with torch.no_grad(), autocast(device, cfg):
            model(torch.randn(2, 3, size, size, device=device))          # warm-up
            n_eval = 2
            for n_eval in (4, eval_images):     # the larger pass only when the small one is quick
                xe = torch.randn(n_eval, 3, size, size, device=device)
                sync(device)
                t0 = time.perf_counter()
                model(xe)
                sync(device)
                eval_s = (time.perf_counter() - t0) / n_eval
                if eval_s * eval_images > min_time:
                    break
        threads = torch.get_num_threads()
    return StepTiming(step_s=statistics.median(times), eval_image_s=eval_s,
                      steps_timed=len(times), warmup=warm, eval_images=n_eval,
                      device=device, threads=threads)
