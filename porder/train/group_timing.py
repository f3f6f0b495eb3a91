"""How long one step of a lockstep group takes on this device: a short measurement.

:func:`time_group_steps` builds M models of a run's network, stacks them as
:func:`porder.train.lockstep.train_group` does (:class:`~porder.train.lockstep.StackedNet`:
channel-stacked activations, grouped convolutions, one Adam over the stacked
parameters) and times a few steps on random inputs, as
:func:`porder.train.timing.time_steps` times one model's step; ``compare --dry-run``
multiplies it by the steps of each lockstep group. Measured rather than derived from
one model's step at the group's batch (M x batch size images): on this CPU that
proxy came out 0.6-0.9x the real group step (VGG width 0.125, batch 1, M = 2..16).
"""
from __future__ import annotations

import statistics

import torch

from .config import TrainConfig
from .device import resolve_device, sync, torch_settings
from .fm import run_network
from .lockstep import StackedNet, group_adam, group_step
from .timing import StepTiming, timed_steps


def time_group_steps(cfg: TrainConfig, m: int, *, num_classes: int, size: int,
                     warmup: int = 1, min_time: float = 1.0, max_steps: int = 10) -> StepTiming:
    """Median seconds of one lockstep step of ``m`` models of ``cfg``'s network.

    Parameters
    ----------
    cfg : TrainConfig
        The runs' options (arch, width, batch size, fm_reorder, device, threads, amp).
    m : int
        Models in the group.
    num_classes, size : int
        Classes and image side S of the data.
    warmup, min_time, max_steps
        As :func:`porder.train.timing.time_steps` (steps run first and not timed;
        timed steps until ``min_time`` seconds and 3 steps, or ``max_steps``).

    Returns
    -------
    StepTiming
        ``step_s`` is the group's step (M models, ``batch_size`` images each);
        ``eval_image_s`` is not measured here (NaN).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    with torch_settings(device, cfg.deterministic, cfg.threads), torch.random.fork_rng(
            devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(cfg.seed)
        models = [run_network(cfg, num_classes=num_classes, size=size).to(device)
                  for _ in range(m)]
        net = StackedNet(models, [torch.Generator(device=device).manual_seed(i)
                                  for i in range(m)])
        opt = group_adam(net, cfg.lr)
        x = torch.randn(cfg.batch_size, m * 3, size, size, device=device)   # (B, M*3, S, S)
        y = torch.randint(0, num_classes, (m, cfg.batch_size), device=device)  # (M, B)

        scaler = torch.amp.GradScaler("cuda", enabled=False)

        def step():
            group_step(net, opt, scaler, x, y, cfg, device)
            sync(device)

        times, warm = timed_steps(step, warmup=warmup, min_time=min_time, max_steps=max_steps)
        threads = torch.get_num_threads()
    return StepTiming(step_s=statistics.median(times), eval_image_s=float("nan"),
                      steps_timed=len(times), warmup=warm, eval_images=0, device=device,
                      threads=threads)
