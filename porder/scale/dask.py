"""Running the shards of ``porder reorder`` as tasks on a Dask ``distributed`` cluster.

Each shard is ``build_cache(spec)`` of the run's :class:`porder.pipeline.CacheSpec`
with ``shard=(i, n)``, in a task that resumes its own ``.part`` file when a
worker died; the shards are then merged with :func:`porder.scale.merge.merge`
(``copy=True``). ``distributed`` is imported only inside the functions that
need it (``pip install "patch-order[scale]"``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..messages import one_line
from ..output import check_not_inside_source, lock_output, lock_path
from ..sources.base import stored_name
from ..store import SPLITS, StoreError, check_output, partial_path
from .merge import Progress, merge_locked

if TYPE_CHECKING:
    from ..pipeline import CacheSpec


class ScaleError(ValueError):
    """A Dask run cannot start or a shard failed for good (one-line message)."""


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ScaleError('--dask needs Dask distributed: pip install "patch-order[scale]"') from None
    return distributed


def parse_scheduler(scheduler: str) -> tuple[str, int]:
    """``'local:N'`` -> ('local', N); an address -> (address, 0). ValueError otherwise."""
    text = str(scheduler).strip()
    if text == "local" or text.startswith("local:"):
        count = text.partition(":")[2] or str(os.cpu_count() or 1)
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n < 1:
            raise ScaleError(f"--dask {text!r}: local:N needs a worker count N >= 1 "
                             f"(e.g. local:4)")
        return "local", n
    if not text or ("://" not in text and ":" not in text):
        raise ScaleError(f"--dask {text!r} is neither local:N nor a scheduler address like "
                         f"tcp://host:8786")
    return text, 0


def _shard_path(folder: Path, out: Path, i: int, n: int) -> Path:
    return folder / f"{out.stem}.shard-{i}-of-{n}.h5"


def _build_shard(spec: CacheSpec, topic: str) -> dict:
    """The Dask task: build the shard ``spec`` describes, resuming its .part file.

    Runs on a worker. Progress goes back to the client as worker events on
    ``topic``: {"shard", "split", "done", "total"}.
    """
    from ..pipeline import build_cache

    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        worker = None
    index = spec.shard[0]

    def report(split, done, total):
        if worker is not None:
            worker.log_event(topic, {"shard": index, "split": split, "done": int(done),
                                     "total": int(total)})

    part = partial_path(spec.out)
    had_part = part.exists()
    try:
        result = build_cache(spec, progress=report)
    except StoreError:
        # A .part that cannot be resumed (options changed, or cut off mid-write
        # beyond repair) is still there: start this shard afresh, once.
        if not (had_part and part.exists()):
            raise
        part.unlink()
        result = build_cache(replace(spec, resume=False), progress=report)
    return {"path": str(result.path), "rows": dict(result.rows),
            "seconds": dict(result.seconds)}


def _count_samples(spec: CacheSpec) -> dict:
    """Samples per split, opening the source here (also validates it early)."""
    from ..sources import open_source

    src = open_source(spec.source, size=spec.size, label=spec.label,
                      test_fraction=spec.test_fraction, seed=spec.seed, on_error=spec.on_error)
    try:
        return {split: int(src.count(split)) for split in SPLITS}
    finally:
        src.close()


def _local_cluster(n: int, device: str):
    """A loopback cluster of n one-thread worker processes (GPU workers for CUDA)."""
    import dask

    from ..backend import resolve_device

    common = dict(n_workers=n, threads_per_worker=1, host="127.0.0.1",
                  dashboard_address=None, silence_logs=logging.ERROR)
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in workers, which turns off
    # glibc's adaptive mmap threshold: every large NumPy temporary is then mmap'd
    # and faulted in afresh, slowing scoring by up to ~1.5x here. Memory use is
    # bounded by the batch anyway, so leave malloc at its default.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        if resolve_device(device) == "cuda":
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                pass
            else:
                return LocalCUDACluster(**common)
        from distributed import LocalCluster

        return LocalCluster(processes=True, **common)


@contextmanager
def _children_reaped():
    """Reap the processes a local cluster started, before returning.

    The nannies' worker processes are joined by ``cluster.close()``; the ones
    still exiting are joined here. multiprocessing's resource tracker, which
    the first spawned worker starts, would otherwise outlive this process and
    linger as a defunct child of its new parent: it is stopped (and joined)
    when this run started it.
    """
    import multiprocessing
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    tracker_was_running = getattr(tracker, "_fd", None) is not None
    before = set(multiprocessing.active_children())
    try:
        yield
    finally:
        for p in set(multiprocessing.active_children()) - before:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if not tracker_was_running and getattr(tracker, "_fd", None) is not None:
            try:
                tracker._stop()
            except Exception:  # a stdlib without it: the tracker ends with this process
                pass


@contextmanager
def _environ_kept():
    """Undo the variables Dask's nannies put into this process's os.environ."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def run_dask(scheduler: str, spec: CacheSpec, *, shards: Optional[int] = None,
             progress: Optional[Progress] = None) -> Path:
    """Reorder ``spec.source`` into ``spec.out`` as shards on a Dask distributed cluster.

    Parameters
    ----------
    scheduler : str
        ``'local:N'`` starts a cluster of N one-thread worker processes on this
        machine (loopback only, no dashboard; dask-cuda's GPU workers when
        ``device`` is CUDA and ``dask_cuda`` is installed); otherwise the
        address of a running scheduler, e.g. ``'tcp://10.0.0.5:8786'``, whose
        workers must have porder installed (``pip install patch-order``; the
        name ``porder`` on the package index is another project) and see
        ``source`` and ``out``'s folder at the same paths (a shared file system).
    spec : porder.pipeline.CacheSpec
        The options of the build, as for a single-process ``build_cache``:
        ``out`` is the merged, standalone output file (``overwrite`` replaces
        it); a local ``source`` path is passed to workers absolute. ``shard``
        must be None; ``resume`` and ``workers`` are not used: every shard
        resumes its own unfinished file, with one CPU thread.
    shards : int, optional
        How many shards (default: twice the cluster's worker threads).
    progress : callable, optional
        ``progress("images", done, total)`` over all splits while shards run,
        then ``progress("merge", done, total)`` while they are copied.

    Returns
    -------
    Path of ``out``, identical in images, labels, perm and names to a
    single-process ``build_cache`` run with the same options.

    Notes
    -----
    Shard i of n is written to ``<out>.shards/<stem>.shard-i-of-n.h5`` by a
    task submitted with ``retries=2``; a task whose worker dies is rescheduled
    by the scheduler and resumes that shard's ``.part`` file. After all shards
    finish they are merged with ``copy=True`` and deleted. A failed or
    interrupted run keeps the shard folder: running it again with the same
    options and shard count resumes the unfinished shards.

    Raises
    ------
    ScaleError (a ValueError) when Dask is missing, the scheduler is bad or
    unreachable, or a shard's worker died too often; the shard's own error
    (StoreError, SourceError, ValueError) when a shard fails.
    """
    distributed = _import_distributed()
    address, n_local = parse_scheduler(scheduler)
    if spec.shard is not None:
        raise ValueError("run_dask sets shard itself, per shard; do not pass it")
    if shards is not None and int(shards) < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    out = spec.out.absolute()
    check_output(out, overwrite=True)  # the folder, before locking in it
    # OUT's lock covers OUT.shards/ too; held until the merged file is in place.
    with lock_output(out):
        check_not_inside_source(out, spec.source)
        check_output(out, overwrite=spec.overwrite)
        return _run_dask_locked(distributed, address, n_local, spec, out, shards=shards,
                                progress=progress)


def _run_dask_locked(distributed, address, n_local, spec: CacheSpec, out: Path, *, shards,
                     progress) -> Path:
    source = spec.source
    named = source == "digits" or str(source).startswith("synthetic:")  # win over paths
    task_source = source if named or not Path(source).exists() else str(Path(source).resolve())
    # Every shard resumes its own .part, one CPU thread per task.
    task_spec = replace(spec, source=task_source, overwrite=True, resume=True, workers=1)
    counts = _count_samples(task_spec)
    total = sum(counts.values())

    # A local cluster's nannies set OMP_NUM_THREADS=1 etc. in os.environ: undo it after;
    # and its processes are all reaped before this returns.
    local = address == "local"
    with _environ_kept() if local else nullcontext(), \
            _children_reaped() if local else nullcontext():
        cluster = client = None
        try:
            if address == "local":
                cluster = _local_cluster(n_local, spec.device)
                client = distributed.Client(cluster)
            else:
                try:
                    client = distributed.Client(address, timeout="20s")
                    client.wait_for_workers(1, timeout=60)
                except (OSError, TimeoutError, ValueError) as e:
                    msg = one_line(e, first=True)
                    raise ScaleError(f"cannot use the Dask scheduler at {address}: {msg}") from None
            n = int(shards) if shards else max(1, 2 * sum(client.nthreads().values()))
            folder = out.with_name(out.name + ".shards")
            folder.mkdir(exist_ok=True)
            paths = [_shard_path(folder, out, i, n) for i in range(n)]
            specs = [replace(task_spec, out=p, shard=(i, n)) for i, p in enumerate(paths)]
            try:
                _run_shards(distributed, client, specs, counts, total, progress)
            except BaseException:
                _remove_if_empty(folder)  # unfinished shards stay, to be resumed
                raise
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
    merge_locked(paths, out, copy=True, overwrite=spec.overwrite, progress=progress,
                 extra_attrs={"source": stored_name(source)})
    for p in paths:  # only what this run made; keep anything else a user put there
        for q in (p, partial_path(p), lock_path(p)):  # a lock file a killed worker left
            q.unlink(missing_ok=True)
    _remove_if_empty(folder)
    return out


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _run_shards(distributed, client, specs, counts, total, progress):
    """Submit one task per shard (``specs``), relay progress, and wait for all of them."""
    n = len(specs)
    topic = f"porder-progress-{uuid.uuid4().hex}"
    latest: dict = {}  # (shard, split) -> (time, done)
    lock = threading.Lock()

    def on_event(event):
        stamp, msg = event
        key = (msg["shard"], msg["split"])
        with lock:
            if key not in latest or latest[key][0] <= stamp:
                latest[key] = (stamp, msg["done"])

    client.subscribe_topic(topic, on_event)
    futures = [client.submit(_build_shard, spec, topic,
                             key=f"porder-shard-{i}-of-{n}-{topic[-8:]}", retries=2, pure=False)
               for i, spec in enumerate(specs)]
    shown = -1
    try:
        while True:
            states = [f.status for f in futures]
            for i, (f, state) in enumerate(zip(futures, states, strict=True)):
                if state in ("error", "cancelled"):
                    _raise_shard_error(distributed, f, i, n)
            if progress:
                with lock:
                    per = {}
                    for (i, _split), (_t, d) in latest.items():
                        per[i] = per.get(i, 0) + d
                # A finished shard is complete even if its last event is still in flight.
                done = sum(_shard_total(counts, i, n) if s == "finished" else per.get(i, 0)
                           for i, s in enumerate(states))
                done = min(done, total)
                if done != shown:
                    shown = done
                    progress("images", done, total)
            if all(s == "finished" for s in states):
                break
            time.sleep(0.2)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        try:
            client.unsubscribe_topic(topic)
        except Exception:  # the client may be closing already
            pass
    return [f.result() for f in futures]


def _shard_total(counts: dict, i: int, n: int) -> int:
    from ..pipeline import shard_range

    return sum(hi - lo for lo, hi in (shard_range(c, (i, n)) for c in counts.values()))


def _raise_shard_error(distributed, future, i: int, n: int):
    try:
        future.result()
    except distributed.KilledWorker as e:
        why = one_line(e, first=True)
        raise ScaleError(f"shard {i}/{n}: its workers died too often, giving up ({why})") from None
    except distributed.client.FutureCancelledError:
        raise ScaleError(f"shard {i}/{n} was cancelled (the cluster shut down?)") from None
    raise ScaleError(f"shard {i}/{n} failed")
