"""Source to reordered HDF5 cache: the job behind ``porder reorder``.

Three stages run at once: batches are decoded on a background thread (the
source itself decodes with all cores), the main thread scores batch k, and a
writer thread appends batch k-1 to the HDF5 file, so decode, measure and write
overlap. Memory is bounded by a few batches whatever the dataset size.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .backend import resolve_device, to_numpy
from .kernels import check_backend
from .measures import _check_bins, get_measure
from .output import DiskFull, check_free_space, check_not_inside_source, lock_output
from .patches import check_patch_size
from .reorder import reorder
from .sources import open_source
from .sources.base import stored_name
from .sources.identity import source_identity
from .store import SPLITS, StoreError, Writer, check_output, estimate_bytes, partial_path

# progress(split, samples_done, samples_total) after each batch
Progress = Callable[[str, int, int], None]


@dataclass
class BuildResult:
    path: Path
    rows: dict = field(default_factory=dict)        # split -> rows written
    skipped: dict = field(default_factory=dict)     # split -> samples skipped
    # decode: the main thread waiting for decoded batches; measure: scoring;
    # write: the writer thread appending (overlapped); write_wait: the main thread
    # held up by the writer; other: the main thread's own work; total: wall clock
    seconds: dict = field(default_factory=dict)
    resumed: bool = False


def shard_range(count: int, shard: Optional[tuple[int, int]]) -> tuple[int, int]:
    """Sample range [lo, hi) of shard (i, n) of a split of ``count`` samples."""
    if shard is None:
        return 0, count
    i, n = shard
    return i * count // n, (i + 1) * count // n


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; ValueError otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except (ValueError, AttributeError):
        raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r} needs 0 <= I < N")
    return i, n


def _prefetch(iterator, depth: int = 2):
    """Run ``iterator`` on a background thread, yielding (item, seconds waited).

    The thread is a daemon that stops at its next item once the consumer is
    gone; leaving (Ctrl-C included) never waits for it, so a slow or stuck
    decode cannot hold up an interrupt.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            t0 = time.perf_counter()
            item = q.get()
            waited = time.perf_counter() - t0
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item, waited
    finally:
        stop.set()  # the producer sees it within 0.1 s of its next item


def _load_kernels_ahead() -> None:
    """Load the compiled CPU kernels on a daemon thread while the source is listed
    and the first batches decode: importing numba and reading its cache take
    about 1 s of the first batch otherwise. The thread only compiles (it may
    outlive a call that fails early); a failure is left to the real call."""
    def load():
        try:
            from .kernels import cpu

            cpu.load()
        except Exception:  # raised again, with its message, by the first batch
            pass

    threading.Thread(target=load, name="porder-kernel-load", daemon=True).start()


class _WriteBehind:
    """Run writer calls in order on one background thread, at most ``depth`` waiting.

    :meth:`submit` queues a call and returns at once (it blocks only while
    ``depth`` calls are waiting); the first error a call raises is raised again
    by the next :meth:`submit` or by :meth:`drain`, and the calls queued after
    it are dropped. Only this thread touches the file between two :meth:`drain` calls.
    ``busy`` is the seconds spent in the calls, ``waited`` the seconds the
    submitter was held up (a full queue, or :meth:`drain`).
    """

    def __init__(self, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._drop = False
        self.busy = 0.0
        self.waited = 0.0
        self._thread = threading.Thread(target=self._work, name="porder-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None and not self._drop:
                    fn, args, kwargs = item
                    t0 = time.perf_counter()
                    try:
                        fn(*args, **kwargs)
                    except BaseException as e:  # raised again in the submitter
                        self._error = e
                    self.busy += time.perf_counter() - t0
            finally:
                self._q.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._drop = True  # nothing more is written after a failed call
            raise error

    def submit(self, fn, *args, **kwargs) -> None:
        self._raise()
        t0 = time.perf_counter()
        self._q.put((fn, args, kwargs))
        self.waited += time.perf_counter() - t0

    def drain(self) -> None:
        """Wait until every queued call has run; raise the first error."""
        t0 = time.perf_counter()
        self._q.join()
        self.waited += time.perf_counter() - t0
        self._raise()

    def stop(self, *, drop: bool = False) -> None:
        """End the thread after the call it is running (and, unless ``drop``, the queued ones).

        Errors of the calls are not raised here: this is the way out after a failure.
        """
        if not self._thread.is_alive():
            return
        self._drop = self._drop or drop
        self._q.put(None)
        self._thread.join()


def build_cache(source: str, out, *, measure: str = "mi", patch: int = 8, bins: int = 256,
                size: int = 32, label: str = "fine", test_fraction: float = 0.1, seed: int = 0,
                reference: int = 0, descending: Optional[bool] = None, batch_size: int = 256,
                device: str = "cpu", backend: str = "compiled", workers: Optional[int] = None,
                on_error: str = "fail", decoder: str = "auto",
                overwrite: bool = False, resume: bool = False,
                shard: Optional[tuple[int, int]] = None,
                progress: Optional[Progress] = None) -> BuildResult:
    """Read ``source``, reorder every image, and write the porder HDF5 file ``out``.

    Parameters mirror ``porder reorder``; ``decoder='nvjpeg'`` needs
    ``device='cuda'`` (the batches stay on the GPU up to the writer). ``resume`` continues ``<out>.part``
    when it exists (and starts afresh otherwise) if it was made with the same
    options, slice and source files (:func:`source_identity`). ``shard=(i, n)``
    processes the i-th of n equal, contiguous slices of every split; a slice
    that receives no sample is written with 0 rows.

    ``out`` is locked (``<out>.lock``) before anything is read or written, and
    the free space of its folder is checked before the ``.part`` is made.

    Returns
    -------
    BuildResult with the final path, rows and skips per split and where the
    seconds went (:attr:`BuildResult.seconds`).

    Raises
    ------
    ValueError (SourceError, StoreError) for bad options, input or output: an
    ``out`` that is or lies inside the source, a ``.part`` that does not match
    (naming what changed); porder.output.Busy when another process writes
    ``out``; porder.output.DiskFull when the file does not fit (the ``.part``
    is kept for ``resume`` when the disk fills up mid-run).
    """
    m = get_measure(measure)
    bins = _check_bins(bins)
    check_backend(backend)
    device = resolve_device(device)
    if decoder == "nvjpeg" and device != "cuda":
        raise ValueError(f"decoder='nvjpeg' decodes on the GPU and needs device='cuda' "
                         f"(--decoder nvjpeg needs --device cuda), got device={device!r}; "
                         f"on the CPU use decoder='threads' (--decoder threads)")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    g = check_patch_size(size, patch)
    if not 0 <= reference < g * g:
        raise ValueError(f"reference patch {reference} is out of range 0..{g * g - 1} "
                         f"for patch {patch} on {size}x{size} images")
    desc = m.descending if descending is None else bool(descending)
    if device == "cpu" and backend == "compiled" and m.kind != "control":
        _load_kernels_ahead()
    out = Path(out)
    check_output(out, overwrite=True)  # the folder, before locking in it
    lock = lock_output(out)            # before touching anything else
    try:
        check_not_inside_source(out, source)
        check_output(out, overwrite=overwrite)
        resumed = bool(resume and partial_path(out).exists())
        src = open_source(source, size=size, label=label, test_fraction=test_fraction,
                          seed=seed, on_error=on_error, workers=workers, decoder=decoder)
    except BaseException:
        lock.release()
        raise
    try:
        writer = _open_writer(src, source, out, lock, shard, resumed, overwrite, batch_size,
                              dict(measure=m.name, patch=patch, bins=bins, reference=reference,
                                   direction="descending" if desc else "ascending",
                                   image_size=size, seed=seed, label=label,
                                   test_fraction=test_fraction, on_error=on_error))
    except BaseException:
        lock.release()
        src.close()
        raise
    result = BuildResult(path=out, resumed=resumed)
    secs = dict(decode=0.0, measure=0.0)
    t_start = time.perf_counter()
    behind = _WriteBehind()  # appends batch k-1 while batch k is scored
    written = {split: 0 for split in SPLITS}  # samples done, as the writer confirms them

    def append(split, lo, *args, consumed, skipped):
        writer.append(split, *args, consumed=consumed, skipped=skipped)
        written[split] = consumed - lo

    try:
        for split in SPLITS:
            lo, hi = shard_range(src.count(split), shard)
            writer.f[split].attrs["first_sample"] = lo
            writer.f[split].attrs["last_sample"] = hi
            pos = max(lo, writer.consumed(split)) if resumed else lo
            written[split] = pos - lo
            if progress:
                progress(split, pos - lo, hi - lo)
            batches = src.iter_batches(split, batch_size, start=pos, stop=hi)
            for batch, waited in _prefetch(batches):
                secs["decode"] += waited
                take = min(batch_size, hi - pos)  # samples this batch covers
                t0 = time.perf_counter()
                imgs, perm = reorder(batch.images, m, patch, bins=bins, device=device,
                                     reference=reference, descending=descending, seed=seed,
                                     start=pos, workers=workers, backend=backend)
                if not isinstance(imgs, np.ndarray):  # CuPy, from decoder='nvjpeg'
                    imgs, perm = to_numpy(imgs), to_numpy(perm)  # the writer needs NumPy
                secs["measure"] += time.perf_counter() - t0
                pos += take
                behind.submit(append, split, lo, imgs, batch.labels, perm, batch.names,
                              consumed=pos, skipped=batch.skipped)
                if progress:
                    progress(split, written[split], hi - lo)
            behind.drain()  # the split is complete on disk before its counts are read
            if progress:
                progress(split, hi - lo, hi - lo)
            result.rows[split] = writer.rows(split)
            result.skipped[split] = int(writer.f[split]["skipped"].shape[0])
        behind.stop()
        # An empty shard is a valid shard (more shards than samples); a whole run is not.
        if sum(result.rows.values()) == 0 and (shard is None or shard[1] == 1):
            raise StoreError(f"source '{source}' gave no images to write")
        secs["write"] = behind.busy          # on the writer thread, overlapped
        secs["write_wait"] = behind.waited   # the main thread held up by the writer
        secs["total"] = time.perf_counter() - t_start
        # the main thread's own work: splitting batches, progress, hand-offs
        secs["other"] = max(0.0, secs["total"] - secs["decode"] - secs["measure"]
                            - secs["write_wait"])
        result.seconds = secs
        writer.finish()
    except DiskFull as e:
        behind.stop(drop=True)
        writer.close()  # what was written stays: resume once there is space
        raise DiskFull(f"{e}; the partial output '{writer.tmp}' is kept: free some space and "
                       f"run the same command with --resume") from None
    except KeyboardInterrupt:
        behind.stop(drop=True)  # the batch being appended completes; queued ones are dropped
        writer.close()  # keep the .part file: it can be resumed
        raise
    except BaseException:
        behind.stop(drop=True)
        writer.discard()
        raise
    finally:
        src.close()
    return result


def _open_writer(src, source, out, lock, shard, resumed, overwrite, batch_size, options):
    """The Writer of ``out`` (owning ``lock``), after the free-space check."""
    identity = source_identity(source)
    meta = {
        **options, "source": stored_name(source), "source_kind": src.kind, **identity,
        "shard_index": shard[0] if shard else 0, "shard_count": shard[1] if shard else 1,
    }
    rows = sum(hi - lo for lo, hi in (shard_range(src.count(sp), shard) for sp in SPLITS))
    need = estimate_bytes(rows, options["image_size"],
                          (options["image_size"] // options["patch"]) ** 2)
    if resumed:
        need -= partial_path(out).stat().st_size
    check_free_space(out.absolute().parent, need, what=f"'{out}' ({rows} images)")
    return Writer(out, meta=meta, classes=src.classes, overwrite=overwrite, resume=resumed,
                  chunk=batch_size, lock=lock)
