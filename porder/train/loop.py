"""Adam + softmax cross-entropy training on a porder HDF5 file: one loop.

The whole file is loaded once (uint8, on the GPU when training there); each
step takes a batch by index, converts it to normalised float on the device and
runs one Adam step. Batches are prepared one step ahead on a background thread,
so the loop only waits for data when preparing a batch (``--reorder`` on the
fly) is slower than a training step; the share of step time spent waiting is
reported as ``data_wait``.

Determinism: the model is initialised from ``seed``; the batch of step s is a
pure function of (seed, s) (epoch-wise shuffles from a fixed generator); dropout
uses torch's global RNG, whose state is checkpointed. With deterministic kernels
the same seed on the same device and thread count gives the same metrics, and a
run resumed from a checkpoint gives the same metrics as one never interrupted.

Several processes (``torchrun --nproc-per-node N -m porder train ...``): the
environment variables torchrun sets (WORLD_SIZE > 1, RANK, LOCAL_RANK,
MASTER_ADDR/PORT) switch on DistributedDataParallel, over gloo on the CPU and
NCCL on CUDA (rank r on ``cuda:LOCAL_RANK``). ``batch_size`` stays the global
batch: step s uses the same images as a single process, and rank r trains on
the r-th of N equal contiguous slices of them (:func:`batch_indices`), so the
averaged gradient is that of the mean loss over the global batch. Batch norm:
SyncBatchNorm on CUDA (statistics of the global batch, as one process); on the
CPU torch has no SyncBatchNorm, so each rank normalises with the statistics of
its own B/N images, and the running statistics evaluated and checkpointed are
rank 0's (DDP's buffer broadcast). Each rank evaluates a contiguous share of
the test split and the sums of loss and correct answers are all-reduced, so a
row's test metrics are those of one evaluation of the whole split; train
metrics and images/s count the global batch. Rank 0 alone writes the run
folder and reports progress; every rank reads the checkpoint on resume.

Evidence (this repository's CPU, 2 cores, shared): see benchmarks/bench_train.py.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..store import read_meta, read_split
from .models import MODELS, build_model

DEVICES = ("cpu", "cuda", "auto")
# Metrics fields that measure time, not learning: they differ between runs.
TIMING_FIELDS = ("images_per_s", "wall_s", "data_wait", "eval_s")
# Config fields that must match to resume a run (the rest may change: steps, device, ...).
IDENTITY = ("arch", "width", "lr", "batch_size", "eval_every", "seed", "reorder", "patch",
            "bins", "order_seed", "amp")
CHECKPOINT, METRICS, CONFIG, RESULT, CURVES = (
    "checkpoint.pt", "metrics.jsonl", "config.json", "result.json", "curves.png")

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


@dataclass(frozen=True)
class DistEnv:
    """This process's place among the processes training together (rank 0 of 1 alone)."""

    rank: int = 0
    local_rank: int = 0          # index on this machine: the GPU it trains on
    world_size: int = 1
    local_world_size: int = 1    # processes on this machine (they share its CPU cores)

    @property
    def active(self) -> bool:
        return self.world_size > 1


def dist_env(environ=None) -> DistEnv:
    """Rank and world size from torchrun's environment (or an initialised process group).

    WORLD_SIZE unset or 1 means a single process. With WORLD_SIZE > 1, RANK,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT must be set too, as torchrun does;
    ValueError otherwise.
    """
    env = os.environ if environ is None else environ
    if environ is None and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return DistEnv(dist.get_rank(), int(env.get("LOCAL_RANK", 0)), world,
                       int(env.get("LOCAL_WORLD_SIZE", world)))
    world = _env_int(env, "WORLD_SIZE", "1")
    if world <= 1:
        return DistEnv()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} is set but not {', '.join(missing)}; launch "
                         "several processes with torchrun --nproc-per-node N -m porder train")
    rank, local = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK")
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", str(world))
    if not (0 <= rank < world and 0 <= local < local_world):
        raise ValueError(f"RANK={rank}, LOCAL_RANK={local} out of range for WORLD_SIZE={world}, "
                         f"LOCAL_WORLD_SIZE={local_world}")
    return DistEnv(rank, local, world, local_world)


def _env_int(env, key: str, default: Optional[str] = None) -> int:
    value = env.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)``: rank's contiguous share of ``n`` items (sizes differ by at most one)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ValueError if CUDA is missing."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device 'cuda' asked for, but this torch ({torch.__version__}) sees no "
                         "CUDA GPU; use --device cpu")
    return device


# ------------------------------------------------------------------ data
class Data:
    """A porder file's train and test splits as uint8 tensors on the device.

    ``train_x`` (N, S, S, 3) holds the images as stored; with ``reorder`` set,
    :func:`get_batch` reorders each batch and ``test_x`` is reordered once here,
    so test images are ordered exactly like training images.
    """

    def __init__(self, path, *, device: str, reorder: Optional[str] = None, patch: int = 8,
                 bins: int = 256, order_seed: int = 0):
        self.path = Path(path)
        self.meta = read_meta(path)
        self.classes = list(self.meta["classes"])
        self.size = int(self.meta["image_size"])
        if self.meta["splits"].get("train", 0) < 1 or self.meta["splits"].get("test", 0) < 1:
            raise ValueError(f"'{path}' needs images in both train and test splits, has "
                             f"{self.meta['splits']}")
        if len(self.classes) < 2:
            raise ValueError(f"'{path}' has {len(self.classes)} class; need at least 2 to train")
        if reorder is not None and self.meta.get("measure") != "none":
            raise ValueError(f"--reorder needs an unmodified file (measure 'none'); '{path}' "
                             f"was reordered with {self.meta.get('measure')!r}")
        self.device = device
        self.reorder_opts = None if reorder is None else dict(
            measure=reorder, patch=patch, bins=bins, seed=order_seed)
        train, test = read_split(path, "train"), read_split(path, "test")
        for split in (train, test):
            bad = (split["labels"] < 0) | (split["labels"] >= len(self.classes))
            if bad.any():
                raise ValueError(f"'{path}' has labels outside 0..{len(self.classes) - 1}")
        if reorder is not None:
            test["images"] = _reorder_numpy(test["images"], np.arange(len(test["labels"])),
                                            **self.reorder_opts)
        # Per-channel statistics of the training images; reordering only moves
        # patches, so every ordering of a dataset is normalised identically.
        x = train["images"]
        s1 = np.zeros(3)
        s2 = np.zeros(3)
        for lo in range(0, len(x), 4096):
            c = x[lo:lo + 4096].reshape(-1, 3).astype(np.float64)
            s1 += c.sum(0)
            s2 += (c * c).sum(0)
        n = x.shape[0] * x.shape[1] * x.shape[2]
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean ** 2, 1e-6))
        dev = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        self.train_x = torch.from_numpy(train["images"]).to(dev)   # (N, S, S, 3) uint8
        self.train_y = torch.from_numpy(train["labels"]).to(dev)   # (N,) int64
        self.test_x = torch.from_numpy(test["images"]).to(dev)     # (M, S, S, 3) uint8
        self.test_y = torch.from_numpy(test["labels"]).to(dev)     # (M,) int64

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S) (channels-last on CUDA)."""
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        if x.is_cuda:  # NHWC memory is what tensor cores want; the permute already is
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()


def _reorder_numpy(images: np.ndarray, index: np.ndarray, *, measure, patch, bins, seed):
    """porder.reorder on NumPy images whose dataset indices are ``index``.

    Orderings of every measure depend only on the image, except ``random``, which
    is keyed by the dataset index: those images are reordered one at a time so
    that each keeps its own shuffle, whatever batch it lands in.
    """
    from ..reorder import reorder

    if measure != "random":
        return reorder(images, measure, patch, bins=bins)[0]
    out = np.empty_like(images)
    for i, j in enumerate(index.tolist()):
        out[i:i + 1] = reorder(images[i:i + 1], measure, patch, seed=seed, start=j)[0]
    return out


def _reorder_tensor(images: torch.Tensor, index: torch.Tensor, opts: dict) -> torch.Tensor:
    """Reorder a uint8 tensor batch; CuPy (via DLPack) on CUDA when present, else NumPy."""
    if images.is_cuda:
        from ..backend import cuda_available

        if cuda_available() and opts["measure"] != "random":
            import cupy

            from ..reorder import reorder

            out = reorder(cupy.from_dlpack(images.contiguous()), opts["measure"],
                          opts["patch"], bins=opts["bins"], device="cuda")[0]
            return torch.from_dlpack(out)
        host = _reorder_numpy(images.cpu().numpy(), index.cpu().numpy(), **opts)
        return torch.from_numpy(host).to(images.device, non_blocking=True)
    return torch.from_numpy(_reorder_numpy(images.numpy(), index.numpy(), **opts))


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(step: int, n: int, batch_size: int, seed: int, *, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """Training-set indices of the batch of (0-based) ``step``: (batch_size / world_size,) int64.

    Epoch e visits all n images in the order ``randperm(n)`` of a generator
    seeded with (seed, e); batches run through epochs back to back. A pure
    function of its arguments, so a resumed run sees the same batches.

    ``batch_size`` is the global batch; with ``world_size`` processes, ``rank``
    gets its slice ``[rank * b, (rank + 1) * b)`` of it, ``b = batch_size /
    world_size``: the slices of all ranks are disjoint and, concatenated in rank
    order, are the single-process batch. ValueError unless ``world_size``
    divides ``batch_size``.
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} "
                         f"processes; use a multiple of {world_size}")
    if world_size > 1:
        b = batch_size // world_size
        return batch_indices(step, n, batch_size, seed)[rank * b:(rank + 1) * b]
    pos = step * batch_size
    parts = []
    while batch_size > 0:
        epoch, off = divmod(pos, n)
        take = min(batch_size, n - off)
        parts.append(_epoch_order(n, seed, epoch)[off:off + take])
        pos += take
        batch_size -= take
    return torch.cat(parts)


def get_batch(data: Data, step: int, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1):
    """The inputs (B, 3, S, S) float and labels (B,) int64 of (0-based) ``step``.

    With ``world_size`` processes, B = batch_size / world_size: rank's slice of the step's batch.
    """
    idx = batch_indices(step, len(data.train_y), cfg.batch_size, cfg.seed, rank=rank,
                        world_size=world_size)
    dev_idx = idx.to(data.train_x.device)
    images = data.train_x[dev_idx]                             # (B, S, S, 3) uint8
    if data.reorder_opts is not None:
        images = _reorder_tensor(images, idx, data.reorder_opts)
    return data.to_input(images), data.train_y[dev_idx]


def _autocast(device: str, cfg: TrainConfig):
    if device == "cuda" and cfg.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


@torch.no_grad()
def evaluate(model, data: Data, cfg: TrainConfig, device: str, *, rank: int = 0,
             world_size: int = 1) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the whole test split.

    With ``world_size`` processes (a process group initialised), each rank
    evaluates its :func:`shard_range` of the split and the sums of loss and
    correct answers are all-reduced: every rank returns the whole split's metrics.
    """
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=data.test_x.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.test_x.device)
    start, stop = shard_range(len(data.test_y), rank, world_size)
    for lo in range(start, stop, cfg.eval_batch):
        hi = min(lo + cfg.eval_batch, stop)
        x = data.to_input(data.test_x[lo:hi])
        y = data.test_y[lo:hi]
        with _autocast(device, cfg):
            logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train()
    n = len(data.test_y)
    if world_size > 1:
        sums = torch.stack([loss, correct.double()])   # counts < 2**53: exact in float64
        dist.all_reduce(sums)
        return sums[0].item() / n, sums[1].item() / n
    return loss.item() / n, correct.item() / n


# ------------------------------------------------------------------ files
def read_metrics(out) -> list[dict]:
    """The rows of ``out/metrics.jsonl`` (an empty list when absent)."""
    p = Path(out) / METRICS
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _write_metrics(out: Path, rows: list[dict]) -> None:
    tmp = out / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / METRICS)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_result(out) -> Optional[dict]:
    """``out/result.json`` of a finished run, or None."""
    p = Path(out) / RESULT
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def plot_curves(rows: list[dict], path, *, title: str = "") -> None:
    """Loss and accuracy (train and test) against steps, written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_l, ax_a = fig.subplots(1, 2)
    tr = [r for r in rows if r.get("train_loss") is not None]
    steps = [r["step"] for r in rows]
    ax_l.plot([r["step"] for r in tr], [r["train_loss"] for r in tr], label="train")
    ax_l.plot(steps, [r["test_loss"] for r in rows], label="test")
    ax_a.plot([r["step"] for r in tr], [r["train_acc"] for r in tr], label="train")
    ax_a.plot(steps, [r["test_acc"] for r in rows], label="test")
    ax_l.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_a.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)


@contextmanager
def _torch_settings(device: str, deterministic: bool, threads: Optional[int]):
    """Threads and determinism for one run; the previous settings come back after."""
    old = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
           torch.backends.cudnn.benchmark)
    try:
        if device == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        else:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = not deterministic
        # warn_only: a few CUDA backward kernels have no deterministic version.
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        yield
    finally:
        torch.set_num_threads(old[0])
        torch.use_deterministic_algorithms(old[1])
        torch.backends.cudnn.benchmark = old[2]


def _file_identity(meta: dict) -> dict:
    keys = ("measure", "patch", "bins", "image_size", "source", "seed", "created")
    return {k: meta.get(k) for k in keys} | {"splits": meta.get("splits"),
                                             "classes": len(meta.get("classes", []))}


def _rng_state(device: str) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, device: str) -> None:
    torch.set_rng_state(st["torch"])
    if device == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Dropout seed of rank > 0 from step ``step`` (rank 0 goes on with the single-process stream)."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % 2 ** 63


@contextmanager
def _process_group(env: DistEnv, device: str):
    """Join the process group of a torchrun job (gloo on CPU, NCCL on CUDA) for one run.

    A group the caller initialised is used as it is; one made here is destroyed
    after. Ends with a barrier, so no rank writes before every rank has read the
    run folder.
    """
    if not env.active:
        yield
        return
    if device == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {env.local_rank} needs GPU {env.local_rank}, but torch "
                             f"sees {torch.cuda.device_count()}; start at most that many "
                             "processes per machine")
        torch.cuda.set_device(env.local_rank)   # "cuda" now means cuda:LOCAL_RANK
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        _barrier(device, env)
        yield
    finally:
        if own:
            dist.destroy_process_group()


def _barrier(device: str, env: DistEnv) -> None:
    dist.barrier(device_ids=[env.local_rank] if device == "cuda" else None)


# ------------------------------------------------------------------ the loop
def train(path, cfg: TrainConfig, out, *, resume: bool = False,
          progress: Optional[Progress] = None) -> TrainResult:
    """Train ``cfg.arch`` on the porder file ``path`` with Adam and cross-entropy.

    Parameters
    ----------
    path : path-like
        A complete porder HDF5 file with ``train`` and ``test`` splits.
    cfg : TrainConfig
    out : path-like
        Run folder (created): ``config.json``, ``metrics.jsonl`` (one row per
        evaluation: step, epoch, train_loss/train_acc (means over the steps since
        the previous row), test_loss/test_acc, images_per_s, wall_s, data_wait,
        eval_s), ``checkpoint.pt`` (at every evaluation), ``curves.png`` and
        ``result.json`` when finished.
    resume : bool
        Continue from ``out/checkpoint.pt`` (start afresh if there is none);
        without it an existing run in ``out`` is refused.
    progress : callable, optional
        ``progress(step, steps, stats)``, see :data:`Progress`.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Bad options, an unusable file, a run folder in use, a checkpoint made
        with other options, or (several processes) a batch size they cannot share.

    Notes
    -----
    Under torchrun (WORLD_SIZE > 1 in the environment) every process calls
    this function; it joins the process group (or uses one already initialised)
    and trains with DistributedDataParallel as the module docstring describes.
    Only rank 0 writes to ``out`` and calls ``progress``; every rank returns the
    same rows (timings aside). A run resumes exactly with the same number of
    processes; it may resume with another number (each rank's dropout stream
    then restarts from the seed and the step).
    """
    cfg.validate()
    env = dist_env()
    if cfg.batch_size % env.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch and must split "
                         f"evenly over the {env.world_size} processes; use a multiple of "
                         f"{env.world_size}")
    device = resolve_device(cfg.device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run folder '{out}' is a file; give a folder with --out")
    ckpt_path = out / CHECKPOINT
    if not resume and (ckpt_path.exists() or (out / METRICS).exists()):
        raise ValueError(f"'{out}' already holds a run; pass --resume to continue it "
                         "or choose another --out")
    meta = read_meta(path)
    ckpt = None
    if resume and ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds for a damaged file
            raise ValueError(f"cannot read checkpoint '{ckpt_path}' ({e}); delete it to "
                             "start afresh") from None
        old = ckpt["config"]
        diff = [k for k in IDENTITY if old.get(k) != getattr(cfg, k)]
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in diff)
            raise ValueError(f"cannot resume '{out}': options differ ({detail})")
        if ckpt["file"] != _file_identity(meta):
            raise ValueError(f"cannot resume '{out}': it was trained on another file "
                             f"({ckpt['path']})")
        if ckpt["step"] > cfg.steps:
            raise ValueError(f"cannot resume '{out}': its checkpoint is at step {ckpt['step']}, "
                             f"beyond --steps {cfg.steps}")
    threads = cfg.threads
    if env.active and threads is None and device == "cpu":   # the ranks of a machine share it
        threads = max(1, (os.cpu_count() or 1) // env.local_world_size)
    # Joining the group is the barrier after which rank 0 may write: every rank
    # has checked the run folder and read the checkpoint by then.
    with _process_group(env, device):
        if env.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        with _torch_settings(device, cfg.deterministic, threads):
            return _run(path, cfg, out, device, meta, ckpt, progress if env.rank == 0 else None,
                        env)


def _run(path, cfg, out, device, meta, ckpt, progress, env: DistEnv) -> TrainResult:
    data = Data(path, device=device, reorder=cfg.reorder, patch=cfg.patch, bins=cfg.bins,
                order_seed=cfg.order_seed)
    rank, world = env.rank, env.world_size
    main = rank == 0
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes=len(data.classes), in_size=data.size,
                        width=cfg.width)
    if env.active and device == "cuda":   # batch statistics of the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    use_scaler = device == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    n_train = len(data.train_y)

    step, wall = 0, 0.0
    rows: list[dict] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, wall = int(ckpt["step"]), float(ckpt["wall_s"])
        ranks = ckpt.get("rng_ranks")
        if env.active and ranks is not None and len(ranks) == world:
            _set_rng_state(ranks[rank], device)           # the same world size: exact resume
        else:
            _set_rng_state(ckpt["rng"], device)
            if rank:
                torch.manual_seed(_rank_seed(cfg.seed, rank, step))
        rows = [r for r in read_metrics(out) if r["step"] <= step]
    elif rank:
        torch.manual_seed(_rank_seed(cfg.seed, rank))     # own dropout masks
    net = model
    if env.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[env.local_rank] if device == "cuda" else None,
                  find_unused_parameters=False)
    if main:
        _atomic_json(out / CONFIG, {
            "config": asdict(cfg), "file": str(Path(path).resolve()),
            "file_meta": _file_identity(meta), "device": device, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "world_size": world})
    result = TrainResult(out=out, rows=rows, resumed_from=step, device=device, rank=rank,
                         world_size=world)

    def checkpoint():
        rng = _rng_state(device)
        rng_ranks = None
        if env.active:
            rng_ranks = [None] * world
            dist.all_gather_object(rng_ranks, rng)
        if not main:
            return
        _write_metrics(out, rows)  # metrics first: rows past the checkpoint are dropped on resume
        state = {"config": asdict(cfg), "step": step, "wall_s": wall, "path": str(path),
                 "file": _file_identity(meta), "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng, "world_size": world}
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        tmp = out / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, out / CHECKPOINT)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def eval_row(train_stats: dict) -> dict:
        t0 = time.perf_counter()
        if env.active:  # rank 0's BN running statistics everywhere, as DDP's next forward does
            for b in model.buffers():
                dist.broadcast(b, 0)
        test_loss, test_acc = evaluate(model, data, cfg, device, rank=rank, world_size=world)
        row = {"step": step, "epoch": step * cfg.batch_size / n_train, **train_stats,
               "test_loss": test_loss, "test_acc": test_acc}
        if env.active:
            row["world_size"] = world
        row["eval_s"] = time.perf_counter() - t0
        return row

    if not rows:  # the untrained model: the curves start at step 0
        rows.append(eval_row({"train_loss": None, "train_acc": None, "images_per_s": None,
                              "wall_s": 0.0, "data_wait": None}))
        checkpoint()
    if progress:
        progress(step, cfg.steps, rows[-1])

    net.train()
    pool = ThreadPoolExecutor(1, thread_name_prefix="porder-batch")
    fetch = lambda s: get_batch(data, s, cfg, rank=rank, world_size=world)
    try:
        nxt = pool.submit(fetch, step) if step < cfg.steps else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, waited, t_int, t_report = 0, 0.0, time.perf_counter(), time.perf_counter()
        while step < cfg.steps:
            t0 = time.perf_counter()
            x, y = nxt.result()                         # (B, 3, S, S), (B,)
            waited += time.perf_counter() - t0
            nxt = pool.submit(fetch, step + 1) if step + 1 < cfg.steps else None
            with _autocast(device, cfg):
                logits = net(x)                         # (B, classes)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            seen += len(y)
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                sync()
                dt = time.perf_counter() - t_int
                if env.active:  # global batch: sums over the ranks (waits: their mean)
                    stats = _all_reduce_stats(loss_sum, correct, seen, waited, dt, world)
                else:
                    stats = {"train_loss": loss_sum.item() / seen,
                             "train_acc": correct.item() / seen, "images_per_s": seen / dt,
                             "wall_s": None, "data_wait": waited / dt}
                rows.append(eval_row(stats))
                wall += time.perf_counter() - t_int     # training + evaluation
                rows[-1]["wall_s"] = wall
                checkpoint()
                if progress:
                    progress(step, cfg.steps, rows[-1])
                loss_sum.zero_()
                correct.zero_()
                seen, waited, t_int = 0, 0.0, time.perf_counter()
            elif progress:
                now = time.perf_counter()
                if now - t_report > 0.5:
                    t_report = now
                    progress(step, cfg.steps, {"loss": loss_sum.item() / seen,
                                               "acc": correct.item() / seen})
                else:
                    progress(step, cfg.steps, None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    if main:
        _finish(path, cfg, out, rows, step, wall, device, world)
    if env.active:  # files are complete when any rank returns
        _barrier(device, env)
    return result


def _all_reduce_stats(loss_sum, correct, seen, waited, dt, world) -> dict:
    sums = torch.stack([loss_sum, correct.double(),
                        torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device),
                        torch.tensor(waited, dtype=torch.float64, device=loss_sum.device)])
    dist.all_reduce(sums)
    loss, right, n, wait = sums.tolist()
    return {"train_loss": loss / n, "train_acc": right / n, "images_per_s": n / dt,
            "wall_s": None, "data_wait": wait / world / dt}


def _finish(path, cfg, out, rows, step, wall, device, world) -> None:
    """curves.png and result.json of a finished run."""
    try:
        plot_curves(rows, out / CURVES, title=f"{cfg.arch} on {Path(path).name}"
                    + (f" (reordered on the fly: {cfg.reorder}, patch {cfg.patch})"
                       if cfg.reorder else ""))
    except Exception as e:  # a figure must never lose a finished run
        import warnings

        warnings.warn(f"could not draw {out / CURVES}: {e}", stacklevel=2)
    final = rows[-1]
    _atomic_json(out / RESULT, {
        "complete": True, "steps": step, "config": asdict(cfg), "device": device,
        "world_size": world,
        "final_test_acc": final["test_acc"], "final_test_loss": final["test_loss"],
        "best_test_acc": max(r["test_acc"] for r in rows), "wall_s": wall,
        "mean_images_per_s": _mean([r["images_per_s"] for r in rows[1:]]),
        "mean_data_wait": _mean([r["data_wait"] for r in rows[1:]])})


def _mean(values) -> Optional[float]:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None

