"""Adam + softmax cross-entropy training on a porder HDF5 file: one loop.

The file's splits are held in memory (uint8, on the GPU when training there)
when they fit, and read from the file batch by batch otherwise (:mod:`.batches`);
each step takes a batch by index, converts it to normalised float on the device
and runs one Adam step. On CUDA, or when torch's threads leave a CPU core free,
batches are prepared one step ahead on a background thread, so the loop only waits
for data when preparing a batch (``--measure`` on the fly) is slower than a training
step; otherwise between steps (:func:`.batches.background_batches`). The share of
step time spent waiting is reported as ``data_wait``.

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

This module holds the step loop (:func:`run_steps`, one screen, as nanoGPT's)
and the state of a run in one object (:class:`Run`: model, optimizer, step,
RNG, rows and the run folder, with its small named steps); beside it:
:mod:`.config` (TrainConfig), :mod:`.batches` (the data and the batch order),
:mod:`.device`, :mod:`.distributed`, :mod:`.checkpoint` and :mod:`.metrics`
(the run folder).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..output import lock_folder
from ..pipeline import shard_range
from ..store import read_meta
from .batches import Data, Prefetch, background_batches, get_batch
from .checkpoint import (
    CHECKPOINT,
    CheckpointError,
    file_identity,
    file_state,
    load_checkpoint,
    restore,
    resume_rows,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import Progress, TrainConfig, TrainResult, effective_config, eval_indices
from .device import autocast, resolve_device, sync, torch_settings
from .distributed import (
    DistEnv,
    all_reduce_stats,
    barrier,
    dist_env,
    process_group,
    rank_seed,
)
from .fm import run_adam, run_network
from .metrics import CONFIG, METRICS, write_json, write_metrics, write_result


@torch.no_grad()
def evaluate(model, data: Data, cfg: TrainConfig, device: str, *, rank: int = 0,
             world_size: int = 1, full: bool = True) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the test split: the whole split when ``full``
    or ``cfg.eval_images`` is None, else its fixed subset (:func:`.config.eval_indices`).

    With ``world_size`` processes (a process group initialised), each rank
    evaluates its :func:`shard_range` of the images and the sums of loss and
    correct answers are all-reduced: every rank returns the same metrics.
    """
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=data.test_y.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.test_y.device)
    subset = None if full else eval_indices(len(data.test_y), cfg.eval_images)
    pick = None if subset is None else torch.from_numpy(subset).to(data.test_y.device)  # (k,)
    n = len(data.test_y) if pick is None else len(pick)
    start, stop = shard_range(n, (rank, world_size))
    for lo in range(start, stop, cfg.eval_batch):
        # Block by block: a test split streamed from the file is read eval_batch images at a time.
        hi = min(lo + cfg.eval_batch, stop)
        idx = slice(lo, hi) if pick is None else pick[lo:hi]
        x = data.to_input(data.test_x[idx])                    # (b, 3, S, S)
        y = data.test_y[idx]                                   # (b,)
        with autocast(device, cfg):
            logits = model(x)
        loss += F.cross_entropy(loss_input(logits), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train()
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
        without it an existing run in ``out`` is refused. The file must be the
        one the run started on, byte for byte (:func:`.checkpoint.file_state`:
        hashed once when a run starts; a resume compares its stat, and hashes
        it again only when that changed).
    progress : callable, optional
        ``progress(step, steps, stats)``, see :data:`Progress`.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Bad options, an unusable file, a run folder in use, a checkpoint made
        with other options or on another file (or on this one before its bytes
        changed), metrics rows that are not the checkpoint's, or (several
        processes) a batch size they cannot share.

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
    lock, meta, ckpt, state = open_run(path, cfg, out, resume=resume, writer=env.rank == 0)
    threads = cfg.threads
    if env.active and threads is None and device == "cpu":   # the ranks of a machine share it
        threads = max(1, (os.cpu_count() or 1) // env.local_world_size)
    # Joining the group is the barrier after which rank 0 may write: every rank
    # has checked the run folder and read the checkpoint by then. A run that
    # fails before its first checkpoint removes what it wrote (and the folder
    # if it made it), so a refused run leaves nothing behind.
    fresh = env.rank == 0 and ckpt is None
    try:
        with process_group(env, device):
            with torch_settings(device, cfg.deterministic, threads):
                run = Run.start(path, cfg, out, device, meta, ckpt,
                                progress if env.rank == 0 else None, env, state)
                return run_steps(run)
    except BaseException:
        if fresh:
            remove_unstarted_run(out)
        raise
    finally:
        if lock is not None:
            lock.release(remove_folder=True)


def open_run(path, cfg: TrainConfig, out: Path, *, resume: bool, writer: bool = True):
    """Check and lock run folder ``out`` and read what a run needs to start there.

    Returns ``(lock, meta, ckpt, state)``: the folder's lock (None when not
    ``writer``; the caller releases it), the file's :func:`read_meta`, the
    checkpoint to resume (None: a fresh run) and what identifies the file's
    bytes (:func:`.checkpoint.file_state`). ValueError as :func:`train`; a
    refused run leaves no empty folder behind.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"run folder '{out}' is a file; give a folder with --out")
    # The writer (rank 0) holds the run folder's lock from here to the end: a
    # second `train` into the same folder fails at once instead of interleaving.
    lock = lock_folder(out, what=f"run folder '{out}'") if writer else None
    try:
        if not resume and ((out / CHECKPOINT).exists() or (out / METRICS).exists()):
            raise ValueError(f"'{out}' already holds a run; pass --resume to continue it "
                             "or choose another --out")
        meta = read_meta(path)
        n_train = meta["splits"].get("train", 0)
        if 0 < n_train < cfg.batch_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training split "
                             f"of '{path}' ({n_train} images); use at most {n_train}")
        ckpt = load_checkpoint(out, cfg, meta, path) if resume else None
        # What identifies the file's bytes, recorded in every checkpoint (by rank 0): a
        # resume reuses the state it checked; a fresh run hashes the file once here.
        state = ckpt.get("file_state") if ckpt is not None else None
        if state is None and writer:
            state = file_state(path)
    except BaseException:
        if lock is not None:
            lock.release(remove_folder=True)  # a refused run leaves no empty folder
        raise
    return lock, meta, ckpt, state


def run_steps(run: "Run") -> TrainResult:
    """The step loop: a batch, an Adam step; every ``eval_every`` steps a row, a checkpoint, a report."""
    cfg = run.cfg
    if not run.rows:  # the untrained model: the curves start at step 0
        run.record(dict(UNTRAINED))
    run.report(run.rows[-1])
    run.net.train()
    with Prefetch(run.batch, run.step, cfg.steps,
                  background=background_batches(run.device)) as batches:
        interval, run.reported = Interval(run.device), time.perf_counter()
        while run.step < cfg.steps:
            (x, y), waited = batches.get(run.step)          # (B, 3, S, S), (B,)
            interval.waited += waited
            logits, loss = run.train_step(x, y)
            interval.add(logits, loss, y)
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                run.record(interval.stats(run.device, run.env), started=interval.started)
                run.report(run.rows[-1])
                interval = Interval(run.device)
            else:
                run.tick(interval)
    return run.finish()


# The training fields of the row of the untrained model (step 0).
UNTRAINED = {"train_loss": None, "train_acc": None, "images_per_s": None, "wall_s": 0.0,
             "data_wait": None}


@dataclass
class Run:
    """The state of one training run, in one object, and its steps as small methods.

    ``model`` is what is evaluated and checkpointed; ``net`` is what the steps
    run (``model`` itself, or wrapped in DDP under torchrun). torch's global
    RNG (dropout) is the run's RNG: seeded in :meth:`start`, restored in
    :meth:`resume`, saved in :meth:`checkpoint`.
    """

    path: object                       # the porder file, as given
    cfg: TrainConfig
    out: Path                          # the run folder
    device: str                        # 'cpu' or 'cuda'
    meta: dict                         # the file's read_meta
    file_state: Optional[dict]         # what identifies its bytes (checkpoint.file_state)
    env: DistEnv
    progress: Optional[Progress]       # rank 0's; None elsewhere
    data: Data
    model: torch.nn.Module
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0                      # optimizer steps taken
    wall: float = 0.0                  # seconds of training and evaluation so far
    rows: list = field(default_factory=list)     # metrics rows, step 0 first
    resumed_from: int = 0              # step of the checkpoint resumed (0: fresh)
    last_good: Optional[int] = None    # step of the last checkpoint written (None: none yet)
    reported: float = 0.0              # perf_counter of the last running statistics reported

    @classmethod
    def start(cls, path, cfg: TrainConfig, out: Path, device: str, meta: dict,
              ckpt: Optional[dict], progress: Optional[Progress], env: DistEnv,
              state: Optional[dict] = None, *, data: Optional[Data] = None) -> "Run":
        """Load the data (unless given: ``data``, loaded by :func:`load_data`), build the
        model and optimizer, resume ``ckpt`` (if any), write config.json."""
        if data is None:
            data = load_data(path, cfg, device)
        torch.manual_seed(cfg.seed)
        model = _model(cfg, len(data.classes), data.size, device, env)
        opt = run_adam(model.parameters(), cfg.lr)
        use_scaler = device == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
        run = cls(path=path, cfg=cfg, out=out, device=device, meta=meta, file_state=state,
                  env=env,
                  progress=progress, data=data, model=model, net=model, opt=opt,
                  scaler=torch.amp.GradScaler("cuda", enabled=use_scaler))
        if ckpt is not None:
            run.resume(ckpt)
        elif env.rank:
            torch.manual_seed(rank_seed(cfg.seed, env.rank))     # own dropout masks
        if env.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            run.net = DDP(model, device_ids=[env.local_rank] if device == "cuda" else None,
                          find_unused_parameters=False)
        if env.rank == 0:
            run.write_config()
        return run

    def resume(self, ckpt: dict) -> None:
        """Continue from checkpoint ``ckpt``: its states, step, wall time, RNG and rows."""
        ckpt_path = self.out / CHECKPOINT
        restore(ckpt, ckpt_path, self.model, self.opt, self.scaler)
        self.step, self.wall = int(ckpt["step"]), float(ckpt["wall_s"])
        self.resumed_from = self.last_good = self.step
        rank, ranks = self.env.rank, ckpt.get("rng_ranks")
        try:
            if self.env.active and ranks is not None and len(ranks) == self.env.world_size:
                set_rng_state(ranks[rank], self.device)       # the same world size: exact resume
            else:
                set_rng_state(ckpt["rng"], self.device)
                if rank:
                    torch.manual_seed(rank_seed(self.cfg.seed, rank, self.step))
        except (RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint '{ckpt_path}' has a random-number "
                                  f"state this torch cannot use ({' '.join(str(e).split())}); "
                                  f"delete it to start afresh") from None
        self.rows = resume_rows(self.out, self.step)

    def write_config(self) -> None:
        """The run folder and its config.json."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / CONFIG, {
            "config": effective_config(self.cfg, self.device),
            "file": str(Path(self.path).resolve()), "file_meta": file_identity(self.meta),
            "file_state": self.file_state,
            "device": self.device, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "world_size": self.env.world_size})

    def batch(self, step: int):
        """This rank's inputs (B, 3, S, S) and labels (B,) of ``step`` (on a background thread)."""
        return get_batch(self.data, step, self.cfg, rank=self.env.rank,
                         world_size=self.env.world_size)

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """One Adam step on ``x`` (B, 3, S, S), ``y`` (B,): the logits (B, classes) and the loss."""
        cfg = self.cfg
        with memory_hint(f"training the {cfg.arch} model (--batch-size {cfg.batch_size}, "
                          f"--width {cfg.width:g})", "lower --batch-size (or --width)"):
            with autocast(self.device, cfg):
                logits = self.net(x)                     # (B, classes)
                loss = F.cross_entropy(loss_input(logits), y)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        self.step += 1
        return logits, loss

    def record(self, stats: dict, started: Optional[float] = None,
               evaluation: Optional[tuple] = None) -> None:
        """Evaluate, append this step's row and write the checkpoint.

        ``stats``: the row's training fields; ``started``: when the interval
        they cover began (None for the untrained model's row); ``evaluation``:
        ``(test_loss, test_acc, eval_s)`` when already evaluated (lockstep
        groups evaluate their models together), else evaluated here.
        """
        cfg = self.cfg
        self.check_finite(stats)
        with memory_hint(f"evaluating the {cfg.arch} model at --width {cfg.width:g}",
                          "lower --width"):
            row = self.test_row(stats, evaluation)
        self.check_finite(row)
        self.rows.append(row)
        if started is not None:
            self.wall += time.perf_counter() - started     # training + evaluation
            row["wall_s"] = self.wall
        self.checkpoint()
        self.last_good = self.step

    def test_row(self, stats: dict, evaluation: Optional[tuple] = None) -> dict:
        """The metrics row of this step: ``stats`` and the whole test split's loss and
        accuracy (``evaluation``: already measured, see :meth:`record`)."""
        t0 = time.perf_counter()
        env = self.env
        if env.active:  # rank 0's BN running statistics everywhere, as DDP's next forward does
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        if evaluation is None:
            test_loss, test_acc = evaluate(self.model, self.data, self.cfg, self.device,
                                           rank=env.rank, world_size=env.world_size,
                                           full=self.step >= self.cfg.steps)
        else:
            test_loss, test_acc, eval_s = evaluation
            t0 -= eval_s
        row = {"step": self.step, "epoch": self.step * self.cfg.batch_size / len(self.data.train_y),
               **stats, "test_loss": test_loss, "test_acc": test_acc}
        if env.active:
            row["world_size"] = env.world_size
        row["eval_s"] = time.perf_counter() - t0
        return row

    def check_finite(self, row: dict) -> None:
        """Stop before a non-finite loss reaches a checkpoint."""
        for key in ("train_loss", "test_loss"):
            value = row.get(key)
            if value is not None and not math.isfinite(value):
                kept = ("no checkpoint was written" if self.last_good is None else
                        f"the last good checkpoint (step {self.last_good}) is kept in '{self.out}'")
                raise TrainingDiverged(
                    f"training diverged: the {key.replace('_', ' ')} is {value} at step "
                    f"{self.step} (--lr {self.cfg.lr:g}); start a new run with a lower --lr; {kept}")

    def checkpoint(self) -> None:
        """metrics.jsonl, then checkpoint.pt (rank 0 writes; every rank gives its RNG state)."""
        rng = rng_state(self.device)
        rng_ranks = None
        if self.env.active:
            rng_ranks = [None] * self.env.world_size
            dist.all_gather_object(rng_ranks, rng)
        if self.env.rank != 0:
            return
        write_metrics(self.out, self.rows)  # metrics first: rows past the checkpoint are dropped on resume
        state = {"config": asdict(self.cfg), "step": self.step, "wall_s": self.wall,
                 "path": str(self.path), "file": file_identity(self.meta),
                 "file_state": self.file_state,
                 "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": rng,
                 "world_size": self.env.world_size}
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        save_checkpoint(self.out, state)

    def report(self, stats: Optional[dict]) -> None:
        """``progress(step, steps, stats)``, where there is a progress callback."""
        if self.progress:
            self.progress(self.step, self.cfg.steps, stats)

    def tick(self, interval: "Interval") -> None:
        """Progress between rows: the interval's running loss and accuracy every 0.5 s (they
        wait for the device), a cheap tick otherwise."""
        if not self.progress:
            return
        now = time.perf_counter()
        if now - self.reported > 0.5:
            self.reported = now
            self.report(interval.running())
        else:
            self.report(None)

    def finish(self) -> TrainResult:
        """result.json and curves.png (rank 0); under torchrun, wait until they are written."""
        env = self.env
        if env.rank == 0:
            write_result(self.path, self.cfg, self.out, self.rows, self.step, self.wall,
                         self.device, env.world_size, self.meta)
        if env.active:  # files are complete when any rank returns
            barrier(self.device, env)
        return TrainResult(out=self.out, rows=self.rows, resumed_from=self.resumed_from,
                           device=self.device, rank=env.rank, world_size=env.world_size)


def load_data(path, cfg: TrainConfig, device: str) -> Data:
    """The file's splits on ``device`` (held in memory or streamed from the file, as
    :class:`.batches.Data` decides), reordered on the fly as ``cfg`` says."""
    with memory_hint(f"loading '{path}' onto {device}",
                      "the file does not fit; use a smaller file or another --device"):
        return Data(path, device=device, reorder=cfg.reorder, patch=cfg.patch, bins=cfg.bins,
                    order_seed=cfg.order_seed)


def loss_input(logits: torch.Tensor) -> torch.Tensor:
    """The logits the loss is computed on: float32 from mixed precision, float64 kept
    (models built in float64, as the equivalence tests do)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _model(cfg: TrainConfig, num_classes: int, size: int, device: str, env: DistEnv):
    """The network of a run, on its device, with its feature-map reordering layers."""
    with memory_hint(f"building the {cfg.arch} model at --width {cfg.width:g}",
                      "lower --width"):
        model = run_network(cfg, num_classes=num_classes, size=size)
        if env.active and device == "cuda":   # batch statistics of the global batch
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device)
        if device == "cuda":
            model = model.to(memory_format=torch.channels_last)
    return model


class Interval:
    """The training statistics of the steps since the last row, summed on the device
    (no wait for the device per step)."""

    def __init__(self, device: str):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.losses: list = []           # each step's loss, on the device
        self.seen = 0                    # images trained on
        self.waited = 0.0                # seconds the loop waited for batches
        self.started = time.perf_counter()

    def add(self, logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> None:
        self.seen += len(y)
        self.loss_sum += loss.detach().double() * len(y)
        self.losses.append(loss.detach())
        self.correct += (logits.detach().argmax(1) == y).sum()

    def running(self) -> dict:
        """The running ``loss`` and ``acc`` of the interval (progress between rows)."""
        return {"loss": self.loss_sum.item() / self.seen, "acc": self.correct.item() / self.seen}

    def stats(self, device: str, env: DistEnv) -> dict:
        """A row's training fields: the interval's means and each step's loss (over the global
        batch under torchrun), and its speed."""
        sync(device)
        dt = time.perf_counter() - self.started
        if env.active:  # global batch: sums over the ranks (waits: their mean)
            stats = all_reduce_stats(self.loss_sum, self.correct, self.seen, self.waited, dt,
                                     env.world_size)
        else:
            stats = interval_stats(self.loss_sum.item(), self.correct.item(), self.seen,
                                   self.waited, dt)
        per_step = torch.stack(self.losses).double()      # (steps since the last row,)
        if env.active:  # each rank's loss is over its equal slice: the mean is global
            dist.all_reduce(per_step)
            per_step /= env.world_size
        stats["train_loss_steps"] = step_loss_field(per_step.tolist())
        return stats


def interval_stats(loss_sum: float, correct: int, seen: int, waited: float, dt: float) -> dict:
    """A row's training fields from an interval's sums: ``seen`` images in ``dt`` seconds,
    ``waited`` of them waiting for batches."""
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
            "images_per_s": seen / dt, "wall_s": None, "data_wait": waited / dt}


def step_loss_field(losses: list) -> list:
    """``train_loss_steps``: each step's loss, to 6 significant digits."""
    return [float(f"{v:.6g}") for v in losses]


def remove_unstarted_run(out: Path) -> None:
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
def memory_hint(what: str, advice: str):
    """Out of memory while doing ``what`` -> one-line ValueError: ``"out of memory {what}; {advice}"``."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise ValueError(f"out of memory {what}; {advice}") from None
