"""CNN training on porder HDF5 files: the paper's three architectures and one loop.

``build_model('vgg' | 'resnet' | 'inception', num_classes=..., in_size=32, width=1.0)``
and ``train(path, TrainConfig(...), out_dir)``; see :mod:`porder.train.loop`.
torch is imported only under this package.
"""
from __future__ import annotations

from .loop import (
    TIMING_FIELDS,
    TrainConfig,
    TrainResult,
    batch_indices,
    evaluate,
    get_batch,
    plot_curves,
    read_metrics,
    read_result,
    resolve_device,
    train,
)
from .models import MODELS, build_model, count_parameters

__all__ = [
    "MODELS", "TIMING_FIELDS", "TrainConfig", "TrainResult", "batch_indices", "build_model",
    "count_parameters", "evaluate", "get_batch", "plot_curves", "read_metrics", "read_result",
    "resolve_device", "train",
]
