"""Source to reordered HDF5 cache: the job behind ``porder reorder``.

Three stages run at once: batches are decoded on a background thread (the
source itself decodes with all cores), the main thread scores batch k, and a
writer thread appends batch k-1 to the HDF5 file, so decode, measure and write
overlap. Memory is bounded by a few batches whatever the dataset size.

A build's options are one :class:`CacheSpec`, checked once when it is made and
shared by the CLI, :mod:`porder.scale.dask` and :mod:`porder.experiment`; the
file is written only through :class:`porder.store.Writer`'s methods.
"""
from __future__ import annotations

import operator
import queue
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .backend import DEVICES, resolve_device, to_numpy
from .kernels import check_backend
from .measures import as_builtin, get_measure
from .output import DiskFull, check_free_space, check_not_inside_source, lock_output
from .reorder import reorder, resolve_options
from .sources import open_source
from .sources.base import stored_name
from .sources.identity import source_identity
from .store import SPLITS, StoreError, Writer, check_output, estimate_bytes, partial_path

# progress(split, samples_done, samples_total) after each batch
Progress = Callable[[str, int, int], None]


@dataclass
class BuildResult:
    """What :func:`build_cache` wrote, and where its time went.

    Attributes
    ----------
    path : Path
        The finished file.
    rows : dict
        Split -> rows written.
    skipped : dict
        Split -> samples skipped (``on_error='skip'``).
    seconds : dict
        ``decode`` (the main thread waiting for decoded batches), ``measure``
        (scoring), ``write`` (the writer thread appending, overlapped),
        ``write_wait`` (the main thread held up by the writer), ``other`` and
        ``total`` (wall clock).
    resumed : bool
        Whether the build continued an earlier ``.part``.
    """

    path: Path
    rows: dict = field(default_factory=dict)        # split -> rows written
    skipped: dict = field(default_factory=dict)     # split -> samples skipped
    # decode: the main thread waiting for decoded batches; measure: scoring;
    # write: the writer thread appending (overlapped); write_wait: the main thread
    # held up by the writer; other: the main thread's own work; total: wall clock
    seconds: dict = field(default_factory=dict)
    resumed: bool = False


@dataclass(frozen=True)
class CacheSpec:
    """Every option of one cache build (``porder reorder``), checked when it is made.

    Made once where the options enter (the CLI, :mod:`porder.experiment`, a
    script) and handed to :func:`build_cache` or :func:`porder.scale.run_dask`
    as it is: a made spec is a valid one (:func:`check_cache_spec`). Frozen and
    picklable (it travels to Dask workers); :meth:`to_dict` gives it as JSON-able
    values and ``CacheSpec(**spec.to_dict())`` makes it again.

    Raises
    ------
    ValueError
        An unknown measure, backend or device; ``bins`` outside 1..256; a patch
        size that does not divide ``size``; a ``reference`` outside the patch
        grid; ``batch_size`` or ``size`` below 1; ``decoder='nvjpeg'`` off CUDA;
        a bad ``shard``. CUDA asked for but missing is refused here too.
        Options of the source (``label``, ``test_fraction``, ``on_error``,
        ``workers``, ``decoder``'s name) are checked when it is opened.
    """

    source: str                      # any SOURCE of `porder reorder`
    out: Path                        # the file to write (a str is made a Path)
    measure: str = "mi"              # a name in porder.MEASURES (or a porder.Measure)
    patch: int = 8                   # patch side, px; divides size
    bins: int = 256                  # intensity bins of histogram measures, 1..256
    size: int = 32                   # images are resized to size x size RGB, px
    label: str = "fine"              # CIFAR-100 labels: 'fine' or 'coarse'
    test_fraction: float = 0.1       # held-out share, for sources without a test split
    seed: int = 0                    # of the `random` control and of the held-out split
    reference: int = 0               # row-major index of the patch the chain starts from
    descending: Optional[bool] = None  # None: the measure's own direction
    batch_size: int = 256            # images per batch (memory is a few batches)
    device: str = "cpu"              # 'cpu', 'cuda' or 'auto' (resolved where it runs)
    backend: str = "compiled"        # 'compiled' kernels or the 'generic' reference path
    workers: Optional[int] = None    # CPU workers for decoding and scoring; None: all cores
    on_error: str = "fail"           # a corrupt image: 'fail' or 'skip' (listed in the file)
    decoder: str = "auto"            # 'auto', 'threads', 'processes' or 'nvjpeg'
    overwrite: bool = False          # replace an existing out
    resume: bool = False             # continue <out>.part when it exists
    shard: Optional[tuple[int, int]] = None  # (i, n): slice i of n of every split

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        check_cache_spec(self)
        if self.shard is not None:
            object.__setattr__(self, "shard", (int(self.shard[0]), int(self.shard[1])))

    def stored_options(self) -> dict:
        """The options the file records as root attributes, as HDF5 stores them.

        What ``--resume`` and ``porder merge`` compare (``porder.store.RESUME_KEYS``
        and ``IDENTITY_KEYS``, with the source's files, which the build adds).
        """
        m = get_measure(self.measure)
        desc = m.descending if self.descending is None else bool(self.descending)
        index, count = self.shard or (0, 1)
        return dict(measure=m.name, patch=self.patch, bins=int(self.bins),
                    reference=self.reference, direction="descending" if desc else "ascending",
                    image_size=self.size, seed=self.seed, label=self.label,
                    test_fraction=self.test_fraction, on_error=self.on_error,
                    source=stored_name(self.source), shard_index=index, shard_count=count)

    def to_dict(self) -> dict:
        """Every option as JSON-able values (``out`` a str, ``shard`` a list or None)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["out"] = str(self.out)
        d["measure"] = get_measure(self.measure).name
        d["shard"] = list(self.shard) if self.shard is not None else None
        return d


def check_cache_spec(spec: CacheSpec) -> None:
    """Every check of a cache build's options (ValueError naming the value and the fix).

    Run once, when a :class:`CacheSpec` is made; the source's own options are
    checked when it is opened.
    """
    check_backend(spec.backend)
    resolve_options(spec.measure, spec.patch, spec.size, bins=spec.bins,
                    reference=spec.reference, backend=spec.backend)
    # The device's name only: whether a GPU is there is decided where the build runs
    # (a Dask client without a GPU may send --device cuda work to workers with one).
    if spec.device not in DEVICES:
        raise ValueError(f"device={spec.device!r} is not one of {', '.join(DEVICES)}")
    if spec.device == "cpu":
        _check_decoder_device(spec.decoder, spec.device)
    if spec.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {spec.batch_size}")
    _check_shard(spec.shard)


def _check_decoder_device(decoder: str, device: str) -> None:
    if decoder == "nvjpeg" and device != "cuda":
        raise ValueError(f"decoder='nvjpeg' decodes on the GPU and needs device='cuda' "
                         f"(--decoder nvjpeg needs --device cuda), got device={device!r}; "
                         f"on the CPU use decoder='threads' (--decoder threads)")


def _check_shard(shard) -> None:
    if shard is None:
        return
    try:
        index, count = (operator.index(x) for x in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard must be a pair (I, N) of integers, e.g. (0, 4), "
                         f"got {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} needs 0 <= I < N")


def shard_range(count: int, shard: Optional[tuple[int, int]]) -> tuple[int, int]:
    """Sample range [lo, hi) of shard (i, n) of a split of ``count`` samples."""
    if shard is None:
        return 0, count
    i, n = shard
    return i * count // n, (i + 1) * count // n


#: The most image bytes one batch holds: a few batches are in flight (decoding,
#: prefetched, scored, queued for the writer), about 10 of them at once, so
#: ``--batch-size`` counts fewer images of a large size (32x32: never capped below
#: 10,922; 224x224: 222 images; 256x256: 170).
BATCH_BYTES = 32 * 2**20


def batch_rows(batch_size: int, size: int) -> int:
    """Images per batch: ``batch_size``, fewer where a batch of ``size`` x ``size`` RGB
    images would pass :data:`BATCH_BYTES` (the images are the same; only memory changes)."""
    return max(1, min(int(batch_size), BATCH_BYTES // (3 * int(size) ** 2)))


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


class WriteBehind:
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


def build_cache(spec: CacheSpec, *, progress: Optional[Progress] = None) -> BuildResult:
    """Read ``spec.source``, reorder every image, and write the porder HDF5 file ``spec.out``.

    ``spec`` (:class:`CacheSpec`, checked when it was made) holds every option,
    as ``porder reorder`` takes them; ``decoder='nvjpeg'`` needs ``device='cuda'``
    (the batches stay on the GPU up to the writer). ``resume`` continues
    ``<out>.part`` when it exists (and starts afresh otherwise) if it was made
    with the same options, slice and source files (:func:`source_identity`).
    ``shard=(i, n)`` processes the i-th of n equal, contiguous slices of every
    split; a slice that receives no sample is written with 0 rows.

    ``out`` is locked (``<out>.lock``) before anything is read or written, and
    the free space of its folder is checked before the ``.part`` is made.

    Returns
    -------
    BuildResult
        The final path, rows and skips per split, and where the seconds went
        (:attr:`BuildResult.seconds`).

    Raises
    ------
    ValueError
        (``SourceError``, ``StoreError``) Bad input or output: an ``out`` that
        is or lies inside the source, a ``.part`` that does not match (naming
        what changed).
    porder.output.Busy
        Another process writes ``out``.
    porder.output.DiskFull
        The file does not fit (the ``.part`` is kept for ``resume`` when the
        disk fills up mid-run).
    """
    device = resolve_device(spec.device)
    _check_decoder_device(spec.decoder, device)
    m = get_measure(spec.measure)
    if device == "cpu" and spec.backend == "compiled" and as_builtin(m) is not None:
        _load_kernels_ahead()
    src, writer, resumed = _open(spec)
    result = BuildResult(path=spec.out, resumed=resumed)
    run = _Run(spec, m, device, src, writer, resumed, progress)
    t_start = time.perf_counter()
    try:
        for split in SPLITS:
            run.write_split(split)
            result.rows[split] = writer.rows(split)
            result.skipped[split] = writer.skipped(split)
        run.behind.stop()
        # An empty shard is a valid shard (more shards than samples); a whole run is not.
        if sum(result.rows.values()) == 0 and (spec.shard is None or spec.shard[1] == 1):
            raise StoreError(f"source '{spec.source}' gave no images to write")
        result.seconds = run.seconds(time.perf_counter() - t_start)
        writer.finish()
    except DiskFull as e:
        run.behind.stop(drop=True)
        writer.close()  # what was written stays: resume once there is space
        raise DiskFull(f"{e}; the partial output '{writer.tmp}' is kept: free some space and "
                       f"run the same command with --resume") from None
    except KeyboardInterrupt:
        run.behind.stop(drop=True)  # the batch being appended completes; queued ones are dropped
        writer.close()  # keep the .part file: it can be resumed
        raise
    except BaseException:
        run.behind.stop(drop=True)
        writer.discard()
        raise
    finally:
        src.close()
    return result


class _Run:
    """One :func:`build_cache` run: its open source and writer, and where the time goes."""

    def __init__(self, spec: CacheSpec, measure, device: str, src, writer: Writer,
                 resumed: bool, progress: Optional[Progress]):
        self.spec, self.measure, self.device = spec, measure, device
        self.src, self.writer, self.resumed, self.progress = src, writer, resumed, progress
        self.behind = WriteBehind()  # appends batch k-1 while batch k is scored
        self.secs = dict(decode=0.0, measure=0.0)

    def write_split(self, split: str) -> None:
        """Score every batch of ``split``'s slice; returns once all of it is on disk."""
        spec, writer, progress = self.spec, self.writer, self.progress
        lo, hi = shard_range(self.src.count(split), spec.shard)
        writer.set_sample_range(split, lo, hi)
        pos = max(lo, writer.consumed(split)) if self.resumed else lo
        written = [pos - lo]  # samples done, as the writer confirms them

        def append(*args, consumed, skipped):
            writer.append(split, *args, consumed=consumed, skipped=skipped)
            written[0] = consumed - lo

        if progress:
            progress(split, pos - lo, hi - lo)
        step = batch_rows(spec.batch_size, spec.size)
        batches = self.src.iter_batches(split, step, start=pos, stop=hi)
        for batch, waited in _prefetch(batches):
            self.secs["decode"] += waited
            take = min(step, hi - pos)  # samples this batch covers
            t0 = time.perf_counter()
            imgs, perm = reorder(batch.images, self.measure, spec.patch, bins=spec.bins,
                                 device=self.device, reference=spec.reference,
                                 descending=spec.descending, seed=spec.seed, start=pos,
                                 workers=spec.workers, backend=spec.backend)
            if not isinstance(imgs, np.ndarray):  # CuPy, from decoder='nvjpeg'
                imgs, perm = to_numpy(imgs), to_numpy(perm)  # the writer needs NumPy
            self.secs["measure"] += time.perf_counter() - t0
            pos += take
            self.behind.submit(append, imgs, batch.labels, perm, batch.names,
                               consumed=pos, skipped=batch.skipped)
            if progress:
                progress(split, written[0], hi - lo)
        self.behind.drain()  # the split is complete on disk before its counts are read
        if progress:
            progress(split, hi - lo, hi - lo)

    def seconds(self, total: float) -> dict:
        """:attr:`BuildResult.seconds` of a run that took ``total`` seconds."""
        secs = dict(self.secs)
        secs["write"] = self.behind.busy          # on the writer thread, overlapped
        secs["write_wait"] = self.behind.waited   # the main thread held up by the writer
        secs["total"] = total
        # the main thread's own work: splitting batches, progress, hand-offs
        secs["other"] = max(0.0, total - secs["decode"] - secs["measure"] - secs["write_wait"])
        return secs


def _open(spec: CacheSpec) -> tuple:
    """Lock and check ``spec.out``, open the source and the Writer: (source, writer, resumed).

    The writer owns the lock; when this fails, nothing stays open or locked.
    """
    out = spec.out
    check_output(out, overwrite=True)  # the folder, before locking in it
    lock = lock_output(out)            # before touching anything else
    try:
        check_not_inside_source(out, spec.source)
        check_output(out, overwrite=spec.overwrite)
        resumed = bool(spec.resume and partial_path(out).exists())
        src = open_source(spec.source, size=spec.size, label=spec.label,
                          test_fraction=spec.test_fraction, seed=spec.seed,
                          on_error=spec.on_error, workers=spec.workers, decoder=spec.decoder)
    except BaseException:
        lock.release()
        raise
    try:
        return src, _open_writer(spec, src, lock, resumed), resumed
    except BaseException:
        lock.release()
        src.close()
        raise


def _open_writer(spec: CacheSpec, src, lock, resumed: bool) -> Writer:
    """The Writer of ``spec.out`` (owning ``lock``), after the free-space check."""
    identity = source_identity(spec.source)
    meta = {**spec.stored_options(), "source_kind": src.kind, **identity}
    rows = sum(hi - lo for lo, hi in (shard_range(src.count(sp), spec.shard) for sp in SPLITS))
    need = estimate_bytes(rows, spec.size, (spec.size // spec.patch) ** 2)
    if resumed:
        need -= partial_path(spec.out).stat().st_size
    check_free_space(spec.out.absolute().parent, need, what=f"'{spec.out}' ({rows} images)")
    return Writer(spec.out, meta=meta, classes=src.classes, overwrite=spec.overwrite,
                  resume=resumed, chunk=spec.batch_size, lock=lock)
