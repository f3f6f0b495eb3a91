"""Scaling out ``porder reorder``: merging shards, and running shards on Dask.

Two ways to spread one dataset over many processes or machines, both built on
``build_cache(..., shard=(i, n))``, which reorders the i-th of n contiguous
slices of every split:

* **Batch jobs** (SLURM arrays, CI matrices, Kubernetes indexed jobs): each job
  runs ``porder reorder --shard I/N``; :func:`merge` (``porder merge``) then
  stitches the shard files into one file that readers cannot tell from an
  unsharded run.
* **Dask** (:func:`run_dask`, ``porder reorder --dask SCHEDULER``): the shards
  run as tasks on a ``distributed`` cluster (``local:N`` starts one on this
  machine); a worker that dies has its shard re-run (resuming its ``.part``
  file), and the shards are merged into one standalone file.

The merged file holds the same root attributes (``shard_index`` 0,
``shard_count`` 1), the same ``/classes`` and the same ``/<split>`` datasets in
sample order as a single-process run, so ``read_split``, ``porder inspect`` and
training read it unchanged.

By default :func:`merge` writes HDF5 *virtual* datasets: the merged file is a
few kilobytes and maps its rows onto the shard files, which must stay where
they are (the paths are stored relative to the merged file, so the folder
holding both may be moved or copied as a whole). If a shard file goes missing,
HDF5 reads its rows as fill values (labels read as -1; :func:`missing_sources`
finds such files). ``copy=True`` copies the rows into a standalone file, a
bounded number of rows at a time.

Dask is an optional extra (``pip install porder[scale]``); ``distributed`` is
imported only inside the functions that need it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import h5py
import numpy as np

from .store import (
    IDENTITY_KEYS,
    SPLITS,
    StoreError,
    _jsonable,
    check_output,
    missing_virtual_sources,
    open_file,
    partial_path,
)

# progress(stage, done, total): stage "images" while shards run, "merge" while copying
Progress = Callable[[str, int, int], None]

# Rows copied per step by merge(copy=True) are capped by this many bytes.
COPY_BYTES = 64 * 2**20
DATASETS = ("images", "labels", "perm", "names", "skipped")
# Test hook, "I" or "I:MARKER": the first attempt of shard I kills its worker
# process mid-way (after its first batch), so tests can check that it is re-run;
# the MARKER file (default: next to the shard) records that it happened.
KILL_SHARD_ENV = "PORDER_TEST_KILL_SHARD"
# Build options a Dask run sets itself, per shard.
_DASK_OWNED = ("shard", "resume", "workers", "out", "overwrite", "progress")


class ScaleError(ValueError):
    """A Dask run cannot start or a shard failed for good (one-line message)."""


# ----------------------------------------------------------------------------- merge


@dataclass
class _Shard:
    """What merge needs to know about one shard file."""

    path: Path
    index: int
    count: int
    attrs: dict
    classes: list
    splits: dict = field(default_factory=dict)  # split -> {rows, consumed, first, last, ...}


def _read_shard(path: Path) -> _Shard:
    """Open one shard, refusing .part, missing, unreadable and incomplete files."""
    if path.name.endswith(".part"):
        raise StoreError(f"'{path}' is an unfinished shard (.part); finish it by running the "
                         f"same `porder reorder --shard I/N` command with --resume")
    with open_file(path) as f:
        attrs = {k: _jsonable(v) for k, v in f.attrs.items()}
        classes = [_jsonable(c) for c in f["classes"][()]]
        splits = {}
        for split in SPLITS:
            if split not in f:
                raise StoreError(f"'{path}' has no split {split!r}; it is not a porder shard")
            g = f[split]
            info = {name: (g[name].shape, g[name].dtype, g[name].chunks) for name in DATASETS
                    if name in g}
            rows = int(g["labels"].shape[0])
            splits[split] = {
                "rows": rows,
                "consumed": int(g.attrs.get("consumed", rows)),
                "first": int(g.attrs.get("first_sample", 0)),
                "last": int(g.attrs.get("last_sample", rows)),
                "datasets": info,
            }
    index, count = int(attrs.get("shard_index", 0)), int(attrs.get("shard_count", 1))
    return _Shard(path, index, count, attrs, classes, splits)


def _check_shards(shards: list[_Shard]) -> list[_Shard]:
    """Refuse shards that do not make one run; return them in slice order."""
    ref = shards[0]
    for s in shards[1:]:
        diff = [k for k in (*IDENTITY_KEYS, "format_version")
                if s.attrs.get(k) != ref.attrs.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {s.attrs.get(k)!r} vs {ref.attrs.get(k)!r}" for k in diff)
            raise StoreError(f"shard '{s.path}' was made with different options than "
                             f"'{ref.path}' ({detail})")
        if s.classes != ref.classes:
            raise StoreError(f"shard '{s.path}' has different classes than '{ref.path}' "
                             f"(the source changed between shard runs?)")
        if s.count != ref.count:
            raise StoreError(f"shard '{s.path}' is slice {s.index}/{s.count} but "
                             f"'{ref.path}' is slice {ref.index}/{ref.count}: shards must come "
                             f"from the same --shard I/N split")
    seen: dict[int, _Shard] = {}
    for s in shards:
        if s.index in seen:
            raise StoreError(f"shards '{seen[s.index].path}' and '{s.path}' are both slice "
                             f"{s.index}/{s.count} (overlapping shards)")
        seen[s.index] = s
    missing = [i for i in range(ref.count) if i not in seen]
    if missing:
        have = ", ".join(f"{i}/{ref.count}" for i in sorted(seen))
        raise StoreError("missing shard slices " + ", ".join(f"{i}/{ref.count}" for i in missing)
                         + f" (given: {have})")
    ordered = [seen[i] for i in range(ref.count)]
    for split in SPLITS:
        end = 0
        for s in ordered:
            first, last = s.splits[split]["first"], s.splits[split]["last"]
            if first != end:
                what = "overlaps the previous slice" if first < end else "leaves a gap after it"
                raise StoreError(f"shard '{s.path}' starts at sample {first} of split {split!r} "
                                 f"but the previous slice ends at {end}: it {what} "
                                 f"(did the source change between shard runs?)")
            end = last
    return ordered


def _relative(path: Path, start: Path) -> str:
    """``path`` relative to folder ``start`` where possible (VDS source names)."""
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def _write_split(f: h5py.File, split: str, shards: list[_Shard], out_dir: Path, *, copy: bool,
                 progress: Optional[Progress], done: list[int], total: int) -> None:
    g = f.create_group(split)
    last = shards[-1].splits[split]
    g.attrs["consumed"] = last["consumed"]
    g.attrs["rows"] = sum(s.splits[split]["rows"] for s in shards)
    g.attrs["first_sample"] = 0
    g.attrs["last_sample"] = last["last"]
    for name in DATASETS:
        parts = [s for s in shards if name in s.splits[split]["datasets"]]
        if not parts:
            continue
        shape, dtype, chunks = parts[0].splits[split]["datasets"][name]
        sizes = [s.splits[split]["datasets"][name][0][0] for s in parts]
        n = int(sum(sizes))
        full = (n, *shape[1:])
        if n and not copy:  # rows map onto the shard files
            layout = h5py.VirtualLayout(shape=full, dtype=dtype)
            o = 0
            for s, size in zip(parts, sizes, strict=True):
                if size:
                    src = h5py.VirtualSource(_relative(s.path, out_dir), f"{split}/{name}",
                                             shape=(size, *shape[1:]), dtype=dtype)
                    layout[o : o + size] = src
                    o += size
            f.create_virtual_dataset(f"{split}/{name}", layout,
                                     fillvalue=-1 if name == "labels" else None)
            continue
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
        if not chunks:  # a virtual source (merging a merged file): whole rows, ~1 MiB
            chunks = (max(1, min(1024, 2**20 // row_bytes)), *shape[1:])
        ds = g.create_dataset(name, full, dtype, maxshape=(None, *shape[1:]), chunks=chunks)
        step = max(1, COPY_BYTES // row_bytes)
        o = 0
        for s, size in zip(parts, sizes, strict=True):
            if not size:
                continue
            with h5py.File(s.path, "r") as sf:
                src = sf[split][name]
                for lo in range(0, size, step):
                    hi = min(size, lo + step)
                    ds[o + lo : o + hi] = src[lo:hi]
                    if progress and name == "images":
                        done[0] += hi - lo
                        progress("merge", done[0], total)
            o += size


def merge(shards: Sequence, out, *, copy: bool = False, overwrite: bool = False,
          progress: Optional[Progress] = None, _attrs: Optional[dict] = None) -> Path:
    """Stitch the shard files of one sharded run into a single porder file.

    Parameters
    ----------
    shards : list of path-like
        Files written by ``porder reorder --shard I/N`` (``build_cache(...,
        shard=(i, n))``), every I of one N, in any order.
    out : path-like
        The merged file; written as ``<out>.part`` and renamed when complete.
    copy : bool
        False (default): HDF5 virtual datasets that point at the shard files
        (paths relative to ``out``'s folder), so the shards must stay in place.
        True: copy the rows into a standalone file, at most ``COPY_BYTES`` at a
        time.
    overwrite : bool
        Replace an existing ``out``.
    progress : callable, optional
        ``progress("merge", images_copied, images_total)`` while copying.

    Returns
    -------
    Path of the merged file: root attributes as in an unsharded run
    (``shard_index`` 0, ``shard_count`` 1, ``created`` of the earliest shard),
    the same ``/classes``, and every split's datasets in sample order.

    Raises
    ------
    StoreError (a ValueError), naming the offending file: no shards; a shard
    given twice or equal to ``out``; a ``.part``, missing, unreadable or
    incomplete file; shards made with different options or classes, or from
    different ``--shard I/N`` splits; two shards of one slice; missing slices;
    slices that do not join up (the source changed between runs).
    """
    out = Path(out)
    paths = [Path(p) for p in shards]
    if not paths:
        raise StoreError("no shards to merge: give the files written by `porder reorder --shard`")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise StoreError(f"shard '{p}' is given twice")
        seen[key] = p
    if out.resolve() in seen:
        raise StoreError(f"output '{out}' is one of the shards; choose another output name")
    check_output(out, overwrite=overwrite)
    ordered = _check_shards([_read_shard(p) for p in paths])
    ref = ordered[0]
    attrs = dict(ref.attrs, shard_index=0, shard_count=1, complete=False, **(_attrs or {}))
    created = sorted(str(s.attrs["created"]) for s in ordered if "created" in s.attrs)
    if created:
        attrs["created"] = created[0]
    tmp = partial_path(out)
    total = sum(s.splits[sp]["rows"] for s in ordered for sp in SPLITS)
    done = [0]
    try:
        with h5py.File(tmp, "w") as f:
            for key, val in attrs.items():
                f.attrs[key] = val
            f.create_dataset("classes", data=np.array(ref.classes, dtype=object),
                             dtype=h5py.string_dtype())
            for split in SPLITS:
                _write_split(f, split, ordered, out.parent, copy=copy, progress=progress,
                             done=done, total=total)
            f.attrs["complete"] = True  # last: a cut-off merge never looks finished
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def missing_sources(path) -> list[str]:
    """Shard files a virtual (merged) porder file points at that cannot be found.

    An empty list for a standalone file or one whose shards are all in place.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(f"cannot read '{path}' as HDF5: {e}") from None
    with f:
        return missing_virtual_sources(f, path)


# ------------------------------------------------------------------------------ Dask


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ScaleError("--dask needs Dask distributed: pip install porder[scale]") from None
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


def _build_shard(source: str, path: str, index: int, count: int, options: dict,
                 topic: str) -> dict:
    """The Dask task: build shard ``index`` of ``count``, resuming its .part file.

    Runs on a worker. Progress goes back to the client as worker events on
    ``topic``: {"shard", "split", "done", "total"}.
    """
    from .pipeline import build_cache

    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        worker = None
    path = Path(path)
    kill_index, _, kill_marker = os.environ.get(KILL_SHARD_ENV, "").partition(":")
    kill = kill_index == str(index)
    marker = Path(kill_marker) if kill_marker else path.with_name(path.name + ".killed")

    def report(split, done, total):
        if worker is not None:
            worker.log_event(topic, {"shard": index, "split": split, "done": int(done),
                                     "total": int(total)})
        if kill and 0 < done < total and not marker.exists():
            marker.touch()
            os._exit(1)  # test hook: die like an OOM-killed worker, mid-shard

    def build(resume: bool):
        return build_cache(source, path, shard=(index, count), resume=resume, overwrite=True,
                           workers=1, progress=report, **options)

    part = partial_path(path)
    had_part = part.exists()
    try:
        result = build(True)
    except StoreError:
        # A .part that cannot be resumed (options changed, or cut off mid-write
        # beyond repair) is still there: start this shard afresh, once.
        if not (had_part and part.exists()):
            raise
        part.unlink()
        result = build(False)
    return {"path": str(result.path), "rows": dict(result.rows),
            "seconds": dict(result.seconds)}


def _count_samples(source: str, options: dict) -> dict:
    """Samples per split, opening the source here (also validates it early)."""
    from .sources import open_source

    keys = ("size", "label", "test_fraction", "seed", "on_error")
    src = open_source(source, **{k: options[k] for k in keys if k in options})
    try:
        return {split: int(src.count(split)) for split in SPLITS}
    finally:
        src.close()


def _local_cluster(n: int, device: str):
    """A loopback cluster of n one-thread worker processes (GPU workers for CUDA)."""
    import dask

    from .backend import resolve_device

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
def _environ_kept():
    """Undo the variables Dask's nannies put into this process's os.environ."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def run_dask(scheduler: str, source: str, out, *, shards: Optional[int] = None,
             overwrite: bool = False, progress: Optional[Progress] = None,
             **build_options) -> Path:
    """Reorder ``source`` into ``out`` as shards on a Dask distributed cluster.

    Parameters
    ----------
    scheduler : str
        ``'local:N'`` starts a cluster of N one-thread worker processes on this
        machine (loopback only, no dashboard; dask-cuda's GPU workers when
        ``device`` is CUDA and ``dask_cuda`` is installed); otherwise the
        address of a running scheduler, e.g. ``'tcp://10.0.0.5:8786'``, whose
        workers must have porder installed and see ``source`` and ``out``'s
        folder at the same paths (a shared file system).
    source : str
        As for ``porder reorder``; a local path is passed to workers absolute.
    out : path-like
        The merged, standalone output file.
    shards : int, optional
        How many shards (default: twice the cluster's worker threads).
    overwrite : bool
        Replace an existing ``out``.
    progress : callable, optional
        ``progress("images", done, total)`` over all splits while shards run,
        then ``progress("merge", done, total)`` while they are copied.
    **build_options
        The other options of :func:`porder.pipeline.build_cache` (measure,
        patch, bins, size, label, test_fraction, seed, reference, descending,
        batch_size, device, on_error). Each shard uses one CPU thread.

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
    bad = sorted(set(build_options) & set(_DASK_OWNED))
    if bad:
        raise ValueError(f"run_dask sets {', '.join(bad)} itself, per shard; do not pass it")
    if shards is not None and int(shards) < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    out = Path(out).absolute()
    check_output(out, overwrite=overwrite)
    named = source == "digits" or str(source).startswith("synthetic:")  # win over paths
    task_source = source if named or not Path(source).exists() else str(Path(source).resolve())
    counts = _count_samples(task_source, build_options)
    total = sum(counts.values())

    # A local cluster's nannies set OMP_NUM_THREADS=1 etc. in os.environ: undo it after.
    with _environ_kept() if address == "local" else nullcontext():
        cluster = client = None
        try:
            if address == "local":
                cluster = _local_cluster(n_local, build_options.get("device", "cpu"))
                client = distributed.Client(cluster)
            else:
                try:
                    client = distributed.Client(address, timeout="20s")
                    client.wait_for_workers(1, timeout=60)
                except (OSError, TimeoutError, ValueError) as e:
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise ScaleError(f"cannot use the Dask scheduler at {address}: {msg}") from None
            n = int(shards) if shards else max(1, 2 * sum(client.nthreads().values()))
            folder = out.with_name(out.name + ".shards")
            folder.mkdir(exist_ok=True)
            paths = [_shard_path(folder, out, i, n) for i in range(n)]
            try:
                _run_shards(distributed, client, task_source, paths, build_options, counts, total,
                            progress)
            except BaseException:
                _remove_if_empty(folder)  # unfinished shards stay, to be resumed
                raise
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
    merge(paths, out, copy=True, overwrite=overwrite, progress=progress,
          _attrs={"source": source})
    for p in paths:  # only what this run made; keep anything else a user put there
        for q in (p, partial_path(p), p.with_name(p.name + ".killed")):
            q.unlink(missing_ok=True)
    _remove_if_empty(folder)
    return out


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _run_shards(distributed, client, source, paths, options, counts, total, progress):
    """Submit one task per shard, relay progress, and wait for all of them."""
    n = len(paths)
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
    futures = [client.submit(_build_shard, source, str(p), i, n, options, topic,
                             key=f"porder-shard-{i}-of-{n}-{topic[-8:]}", retries=2, pure=False)
               for i, p in enumerate(paths)]
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
    from .pipeline import shard_range

    return sum(hi - lo for lo, hi in (shard_range(c, (i, n)) for c in counts.values()))


def _raise_shard_error(distributed, future, i: int, n: int):
    try:
        future.result()
    except distributed.KilledWorker as e:
        why = str(e).splitlines()[0] if str(e) else "KilledWorker"
        raise ScaleError(f"shard {i}/{n}: its workers died too often, giving up ({why})") from None
    except distributed.client.FutureCancelledError:
        raise ScaleError(f"shard {i}/{n} was cancelled (the cluster shut down?)") from None
    raise ScaleError(f"shard {i}/{n} failed")
