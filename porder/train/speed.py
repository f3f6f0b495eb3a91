"""How fast a network trains and evaluates on this device: a few measured steps on random
data, for time estimates (``porder compare --dry-run``) before anything is trained."""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .device import _autocast, _torch_settings, resolve_device
from .models import build_model


def measure_speed(arch: str, *, width: float, size: int, num_classes: int, batch_size: int,
                  device: str = "auto", threads: Optional[int] = None,
                  min_seconds: float = 0.5, max_steps: int = 20,
                  max_seconds: float = 15.0) -> dict:
    """Images per second of training steps and of evaluation for ``arch`` on this device.

    A fresh model takes two warm-up steps (the first few steps of a process are
    several times slower: allocation, kernel selection), then Adam steps on
    random inputs (B, 3, size, size) until at least 3 steps and ``min_seconds``
    have passed (at most ``max_steps``; one step once ``max_seconds`` have gone
    by, for networks that are slow on this device), as ``porder train`` runs
    them (mixed precision and channels-last on CUDA); evaluation is timed the
    same way on forward passes. The median step counts, so a burst of load from
    other processes does not decide the estimate. The global RNG state is left
    as it was.

    Returns
    -------
    dict with ``train_images_per_s``, ``eval_images_per_s`` and ``device`` (resolved).
    """
    device = resolve_device(device)
    cfg = TrainConfig(arch=arch, width=width, batch_size=batch_size, device=device).validate()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn) -> float:
        start = time.perf_counter()
        for _ in range(2):                                     # warm-up (allocation, autotune)
            fn()
            sync()
        times: list[float] = []
        t0 = time.perf_counter()
        while not times or (len(times) < 3 and t0 - start + sum(times) < max_seconds) \
                or (time.perf_counter() - t0 < min_seconds and len(times) < max_steps):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return 1 / max(statistics.median(times), 1e-9)         # calls per second

    with torch.random.fork_rng(devices=[]), _torch_settings(device, cfg.deterministic, threads):
        torch.manual_seed(0)
        model = build_model(arch, num_classes=num_classes, in_size=size, width=width).to(device)
        fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)   # as train
        x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, num_classes, (batch_size,), device=device)

        def step():
            with _autocast(device, cfg):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        model.train()
        train_ips = timed(step) * batch_size
        xe = torch.randn(min(cfg.eval_batch, max(batch_size, 64)), 3, size, size,
                         device=device).contiguous(memory_format=fmt)

        @torch.no_grad()
        def forward():
            with _autocast(device, cfg):
                model(xe)

        model.eval()
        eval_ips = timed(forward) * len(xe)
    return {"train_images_per_s": train_ips, "eval_images_per_s": eval_ips, "device": device}
