"""porder.train.timing: what the --dry-run estimate measures (no assertion on speed)."""
from __future__ import annotations

import torch

from porder.train import TrainConfig
from porder.train.timing import time_steps


def test_time_steps_measures_and_leaves_the_rng_alone():
    cfg = TrainConfig(arch="vgg", width=1 / 16, batch_size=4, device="cpu", threads=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    t = time_steps(cfg, num_classes=3, size=16, warmup=2, min_time=0.05, max_steps=5,
                   eval_images=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert t.step_s > 0 and t.eval_image_s > 0 and t.device == "cpu" and t.threads == 1
    assert 1 <= t.steps_timed <= 5 and 1 <= t.warmup <= 2 and t.eval_images in (4, 8)
    text = t.describe(cfg)
    steps = "1 step" if t.steps_timed == 1 else f"{t.steps_timed} steps"
    assert f"median of {steps} of 4 random vgg inputs (width 0.0625) on cpu (1 threads)" in text
