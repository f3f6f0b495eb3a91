"""train.loop.evaluate scores the test split, with accuracy and loss worked out by hand
(issue 20: the mutant reading the train split in evaluate() survived every training
test; test_ddp.py checks logged metrics against evaluate() itself)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from porder.store import Writer
from porder.train.batches import Data
from porder.train.config import TrainConfig
from porder.train.loop import evaluate

SIZE, PATCH = 8, 4
C = math.log(3) / 2   # logits (-C, C) give softmax (1/4, 3/4): e^{2C} = 3


def write(path, splits):
    """A porder file whose split s holds images of the given constant values and labels."""
    k = (SIZE // PATCH) ** 2
    w = Writer(path, meta={"measure": "none", "patch": PATCH, "bins": 256, "image_size": SIZE,
                           "source": "test-fixture", "seed": 0}, classes=["a", "b"])
    for split, (values, labels) in splits.items():
        n = len(values)
        images = np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None],
                                 (n, SIZE, SIZE, 3)).copy()
        w.append(split, images, np.asarray(labels, np.int64),
                 np.tile(np.arange(k, dtype=np.uint8), (n, 1)),
                 [f"{split}/{i}" for i in range(n)], consumed=n)
    return w.finish()


class SignOfMean(torch.nn.Module):
    """Logits (-C * m, C * m), m the mean of the (normalised) input image: an image
    of mean +1 gets P(b) = 3/4, one of mean -1 gets P(a) = 3/4."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(C))

    def forward(self, x):                       # (B, 3, S, S) -> (B, 2)
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-self.scale * m, self.scale * m], dim=1)


@pytest.mark.parametrize("eval_batch", [1, 2, 500])
def test_evaluate_scores_the_test_split(tmp_path, eval_batch):
    # train: pixels 0 and 200 in equal numbers -> per-channel mean 100 and std 100, so a
    # 0 image normalises to -1 (predicted a) and a 200 image to +1 (predicted b); the
    # model is right on all four train images (accuracy 1, loss ln(4/3)).
    # test: 200 labelled a (wrong: loss ln 4), 200 labelled b (right: ln 4/3), 0 labelled
    # b (wrong: ln 4): accuracy 1/3, loss (2 ln 4 + ln 4/3) / 3 = ln 4 - ln(3) / 3.
    path = write(tmp_path / "c.h5", {"train": ([0, 200, 0, 200], [0, 1, 0, 1]),
                                     "test": ([200, 200, 0], [0, 1, 1])})
    data = Data(path, device="cpu")
    model = SignOfMean()
    loss, acc = evaluate(model, data, TrainConfig(eval_batch=eval_batch), "cpu")
    assert acc == pytest.approx(1 / 3, rel=1e-12)
    assert loss == pytest.approx(math.log(4) - math.log(3) / 3, rel=1e-6)
    assert model.training     # evaluate() puts the model back in training mode
    # the same model on a file whose test split is its train split: the train metrics
    same = write(tmp_path / "same.h5", {"train": ([0, 200, 0, 200], [0, 1, 0, 1]),
                                        "test": ([0, 200, 0, 200], [0, 1, 0, 1])})
    loss, acc = evaluate(model, Data(same, device="cpu"), TrainConfig(eval_batch=eval_batch),
                         "cpu")
    assert acc == 1.0 and loss == pytest.approx(math.log(4 / 3), rel=1e-6)
