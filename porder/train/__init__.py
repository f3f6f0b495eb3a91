"""CNN training on porder HDF5 files: the paper's three architectures and one loop.

``build_model('vgg' | 'resnet' | 'inception', num_classes=..., in_size=32, width=1.0)``
and ``train(path, TrainConfig(...), out_dir)``; see :mod:`porder.train.loop`.
torch is imported only under this package.

Modules: ``models`` (the CNNs), ``fm`` (``--fm-reorder``: feature-map reordering
layers at named points), ``config`` (TrainConfig, TrainResult), ``batches``
(the file on the device, the batch order, on-the-fly reordering through
``porder.reorder``, batches prepared ahead), ``device``, ``distributed``
(torchrun / DDP), ``checkpoint``, ``metrics`` (the run folder's files and
curves), ``loop`` (the step loop and the run's state, ``Run``) and ``timing`` (a
few steps timed, for estimates). The channel statistics, the epoch order and
torch's reading of device names are :mod:`porder.data`'s, shared with its loaders.
"""
from __future__ import annotations

from .batches import batch_indices, get_batch
from .config import TIMING_FIELDS, TrainConfig, TrainResult
from .device import resolve_device
from .loop import evaluate, train
from .metrics import plot_curves, read_metrics, read_result
from .models import MODELS, build_model, count_parameters

__all__ = [
    "MODELS", "TIMING_FIELDS", "TrainConfig", "TrainResult", "batch_indices", "build_model",
    "count_parameters", "evaluate", "get_batch", "plot_curves", "read_metrics", "read_result",
    "resolve_device", "train",
]
