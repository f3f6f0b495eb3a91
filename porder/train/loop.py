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

This module holds the step loop only; beside it: :mod:`.config` (TrainConfig),
:mod:`.batches` (the data and the batch order), :mod:`.device`,
:mod:`.distributed`, :mod:`.checkpoint` and :mod:`.metrics` (the run folder).
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..output import lock_folder
from ..store import read_meta
from .batches import Data, get_batch
from .checkpoint import (
    CHECKPOINT,
    CheckpointError,
    _file_identity,
    _rng_state,
    _set_rng_state,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from .config import Progress, TrainConfig, TrainResult, effective_config
from .device import _autocast, _torch_settings, resolve_device
from .distributed import (
    DistEnv,
    _all_reduce_stats,
    _barrier,
    _process_group,
    _rank_seed,
    dist_env,
    shard_range,
)
from .fm import insert_fm_reorder
from .metrics import CONFIG, METRICS, _atomic_json, _finish, _write_metrics, read_metrics
from .models import build_model


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
        the previous row), train_loss_steps (the loss of each of those steps),
        test_loss/test_acc, images_per_s, wall_s, data_wait, eval_s),
        ``checkpoint.pt`` (at every evaluation), ``curves.png`` and
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
    # The writer (rank 0) holds the run folder's lock from here to the end: a
    # second `train` into the same folder fails at once instead of interleaving.
    lock = lock_folder(out, what=f"run folder '{out}'") if env.rank == 0 else None
    try:
        if not resume and ((out / CHECKPOINT).exists() or (out / METRICS).exists()):
            raise ValueError(f"'{out}' already holds a run; pass --resume to continue it "
                             "or choose another --out")
        meta = read_meta(path)
        n_train = meta["splits"].get("train", 0)
        if 0 < n_train < cfg.batch_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training split "
                             f"of '{path}' ({n_train} images); use at most {n_train}")
        ckpt = load_checkpoint(out, cfg, meta) if resume else None
    except BaseException:
        if lock is not None:
            lock.release(remove_folder=True)  # a refused run leaves no empty folder
        raise
    threads = cfg.threads
    if env.active and threads is None and device == "cpu":   # the ranks of a machine share it
        threads = max(1, (os.cpu_count() or 1) // env.local_world_size)
    # Joining the group is the barrier after which rank 0 may write: every rank
    # has checked the run folder and read the checkpoint by then. A run that
    # fails before its first checkpoint removes what it wrote (and the folder
    # if it made it), so a refused run leaves nothing behind.
    fresh = env.rank == 0 and ckpt is None
    try:
        with _process_group(env, device):
            with _torch_settings(device, cfg.deterministic, threads):
                return _run(path, cfg, out, device, meta, ckpt,
                            progress if env.rank == 0 else None, env)
    except BaseException:
        if fresh:
            _remove_unstarted_run(out)
        raise
    finally:
        if lock is not None:
            lock.release(remove_folder=True)


def _remove_unstarted_run(out: Path) -> None:
    """Remove a run folder this run made, if nothing resumable was written to it."""
    if not out.is_dir() or (out / CHECKPOINT).exists():
        return
    for name in (CONFIG, CONFIG + ".tmp", METRICS, METRICS + ".tmp", CHECKPOINT + ".tmp"):
        (out / name).unlink(missing_ok=True)
    try:
        out.rmdir()  # only when empty: never removes what someone else put there
    except OSError:
        pass


class TrainingDiverged(ValueError):
    """The loss became non-finite; the run stops, keeping its last good checkpoint."""


_OOM_TEXTS = ("can't allocate memory", "not enough memory", "out of memory")  # CPU, CUDA


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXTS))


@contextmanager
def _memory_hint(what: str, advice: str):
    """Out of memory while doing ``what`` -> one-line ValueError: ``"out of memory {what}; {advice}"``."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise ValueError(f"out of memory {what}; {advice}") from None


def _run(path, cfg, out, device, meta, ckpt, progress, env: DistEnv) -> TrainResult:
    with _memory_hint(f"loading '{path}' onto {device}",
                      "the file does not fit; use a smaller file or another --device"):
        data = Data(path, device=device, reorder=cfg.reorder, patch=cfg.patch, bins=cfg.bins,
                    order_seed=cfg.order_seed)
    rank, world = env.rank, env.world_size
    main = rank == 0
    torch.manual_seed(cfg.seed)
    with _memory_hint(f"building the {cfg.arch} model at --width {cfg.width:g}",
                      "lower --width"):
        model = build_model(cfg.arch, num_classes=len(data.classes), in_size=data.size,
                            width=cfg.width)
        insert_fm_reorder(model, cfg.fm_reorder, bins=cfg.bins, seed=cfg.order_seed)
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
        restore(ckpt, out / CHECKPOINT, model, opt, scaler)
        step, wall = int(ckpt["step"]), float(ckpt["wall_s"])
        ranks = ckpt.get("rng_ranks")
        try:
            if env.active and ranks is not None and len(ranks) == world:
                _set_rng_state(ranks[rank], device)       # the same world size: exact resume
            else:
                _set_rng_state(ckpt["rng"], device)
                if rank:
                    torch.manual_seed(_rank_seed(cfg.seed, rank, step))
        except (RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint '{out / CHECKPOINT}' has a random-number "
                                  f"state this torch cannot use ({' '.join(str(e).split())}); "
                                  f"delete it to start afresh") from None
        rows = [r for r in read_metrics(out) if r["step"] <= step]
    elif rank:
        torch.manual_seed(_rank_seed(cfg.seed, rank))     # own dropout masks
    net = model
    if env.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[env.local_rank] if device == "cuda" else None,
                  find_unused_parameters=False)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(out / CONFIG, {
            "config": effective_config(cfg, device), "file": str(Path(path).resolve()),
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
        save_checkpoint(out, state)

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

    def check_finite(row: dict, since: Optional[int]) -> None:
        """Stop before a non-finite loss reaches a checkpoint (``since``: the last one kept)."""
        for key in ("train_loss", "test_loss"):
            value = row.get(key)
            if value is not None and not math.isfinite(value):
                kept = ("no checkpoint was written" if since is None else
                        f"the last good checkpoint (step {since}) is kept in '{out}'")
                raise TrainingDiverged(
                    f"training diverged: the {key.replace('_', ' ')} is {value} at step "
                    f"{step} (--lr {cfg.lr:g}); start a new run with a lower --lr; {kept}")

    def evaluated(stats: dict, since: Optional[int]) -> dict:
        with _memory_hint(f"evaluating the {cfg.arch} model at --width {cfg.width:g}",
                          "lower --width"):
            row = eval_row(stats)
        check_finite(row, since)
        return row

    if not rows:  # the untrained model: the curves start at step 0
        rows.append(evaluated({"train_loss": None, "train_acc": None, "images_per_s": None,
                               "wall_s": 0.0, "data_wait": None}, None))
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
        last_good = step
        step_what = (f"training the {cfg.arch} model (--batch-size {cfg.batch_size}, "
                     f"--width {cfg.width:g})")
        step_losses: list = []   # this interval's per-step losses, on the device: no sync per step
        while step < cfg.steps:
            t0 = time.perf_counter()
            x, y = nxt.result()                         # (B, 3, S, S), (B,)
            waited += time.perf_counter() - t0
            nxt = pool.submit(fetch, step + 1) if step + 1 < cfg.steps else None
            with _memory_hint(step_what, "lower --batch-size (or --width)"):
                with _autocast(device, cfg):
                    logits = net(x)                     # (B, classes)
                    loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            step += 1
            seen += len(y)
            loss_sum += loss.detach().double() * len(y)
            step_losses.append(loss.detach())
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
                per_step = torch.stack(step_losses).double()      # (steps since the last row,)
                if env.active:  # each rank's loss is over its equal slice: the mean is global
                    dist.all_reduce(per_step)
                    per_step /= world
                stats["train_loss_steps"] = [float(f"{v:.6g}") for v in per_step.tolist()]
                step_losses.clear()
                check_finite(stats, last_good)
                rows.append(evaluated(stats, last_good))
                wall += time.perf_counter() - t_int     # training + evaluation
                rows[-1]["wall_s"] = wall
                checkpoint()
                last_good = step
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
        _finish(path, cfg, out, rows, step, wall, device, world, meta)
    if env.active:  # files are complete when any rank returns
        _barrier(device, env)
    return result
