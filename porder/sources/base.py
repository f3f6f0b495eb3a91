"""What every source is: :class:`Source` (class names, two splits, batches), :class:`Batch`,
:class:`SourceError`, and the seeded held-out split shared by the source kinds.

Subclasses (one module per kind) implement ``_count`` and ``_read``; a source
that decodes files overrides ``_batches`` to decode the next batch while the
caller works on the current one (see :mod:`porder.sources.decode`).
"""
from __future__ import annotations

import os
import queue
import re
import stat
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..messages import printable, stored_name

__all__ = [
    "SPLITS", "Batch", "NotRegularFile", "Source", "SourceError", "check_int", "holdout",
    "label_classes", "natural_key", "open_regular", "printable", "split_files", "split_of",
    "stored_name",
]

SPLITS = ("train", "test")


class SourceError(ValueError):
    """A source that cannot be opened or read; the message is one line naming the file."""


@dataclass
class Batch:
    """One batch of samples read from a :class:`Source`.

    Attributes
    ----------
    images : numpy.ndarray
        uint8 array of shape (B, S, S, 3); a CuPy array on the GPU when the
        source decodes with ``decoder='nvjpeg'``.
    labels : numpy.ndarray
        int64 array of shape (B,); index into :attr:`Source.classes`.
    names : list of str
        Where each image came from, e.g. ``"cat.12.jpg"``, ``"train/cat/x.png"``,
        ``"cifar-100-python/train#17"``, ``"synthetic#5"``.
    skipped : list of (str, str)
        ``(name, reason)`` of each sample of this batch left out under
        ``on_error="skip"``; ``len(names) + len(skipped)`` is the number of
        samples the batch covers. The batch that covers sample 0 of a split
        also lists the folders of that split that could not be listed
        (their name ends in ``/``; their images are not counted in the split).
    """

    images: np.ndarray  # (B, S, S, 3) uint8
    labels: np.ndarray  # (B,) int64
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------
# Small shared helpers


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int when it is an integer in [minimum, maximum], else SourceError naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
            or (maximum is not None and value > maximum)):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise SourceError(f"{name} must be an integer >= {minimum}{upper}, got {value!r}")
    return int(value)


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class NotRegularFile(OSError):
    """A path that names a FIFO, socket, device or folder where a file was expected."""


def open_regular(path):
    """Open ``path`` for binary reading if it is a regular file (after symbolic links).

    Opened without blocking and checked on the open descriptor, so a FIFO or a
    device named like an image is refused at once (never waited on) and a file
    swapped after a listing is still checked.

    Raises
    ------
    NotRegularFile
        ``path`` is a FIFO, socket, device or folder.
    OSError
        It cannot be opened (missing, dangling link, permission).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _FILE_KINDS if test(mode)), "not a file")
            raise NotRegularFile(f"not a regular file ({kind})")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def natural_key(text: str) -> tuple:
    """Sort key putting 'cat.2.jpg' before 'cat.10.jpg'; ties broken by the text itself."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


def holdout(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, test) indices, both increasing.

    The test split is the samples whose rank in
    ``np.random.default_rng(seed).permutation(n)`` is below ``round(test_fraction * n)``.
    """
    k = round(test_fraction * n)
    is_test = np.zeros(n, dtype=bool)  # (n,)
    is_test[np.random.default_rng(seed).permutation(n)[:k]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


_SPLIT_WORD = re.compile(r"(?<![a-z])(train|test)(?![a-z])")


def split_of(name: str) -> str | None:
    """The split a data file's relative path names: ``'train'`` or ``'test'``, or None.

    The word ``train`` or ``test`` not touching another letter, anywhere in the
    path, in any case: ``train-00000-of-00002.parquet``, ``data/test-0.parquet``,
    ``train/0000.parquet``, ``imagenet-train-000012.tar``; not ``training.tar``,
    ``contest.tar`` or ``validation-0.parquet``. A name with both words is an error.
    """
    found = set(_SPLIT_WORD.findall(name.lower()))
    if len(found) > 1:
        raise SourceError(f"'{printable(name)}' names both train and test; rename it so "
                          f"that its split is clear")
    return found.pop() if found else None


def split_files(files: list, names: list[str], where: str):
    """The data files of each split, by :func:`split_of` of their ``names``.

    Returns
    -------
    (dict, bool)
        ``{'train': [...], 'test': [...]}`` and whether the files bring their own
        test split. Files named for no split are left out when some name train
        or test (``validation-*``); when none does, they all go to ``train`` (the
        caller holds out a test split), as does a single file, whatever its
        name. Files named test without any named train are an error.
    """
    if len(files) == 1:  # one file given alone: its name decides nothing
        return {"train": list(files), "test": []}, False
    by = {"train": [], "test": [], None: []}
    for f, name in zip(files, names):
        by[split_of(name)].append(f)
    if not by["train"] and not by["test"]:
        return {"train": by[None], "test": []}, False
    if not by["train"]:
        raise SourceError(f"'{where}' has test files but no train files; name the training "
                          f"files train-... (or give them alone, and porder holds out a test "
                          f"split)")
    return {"train": by["train"], "test": by["test"]}, bool(by["test"])


def label_classes(values, names: list[str] | None, samples: list[str],
                  where: str) -> tuple[list[str], np.ndarray]:
    """Class names and labels (N,) int64 from a dataset's label values.

    Parameters
    ----------
    values : numpy.ndarray
        (N,) integer labels, or (N,) object array of strings.
    names : list of str or None
        The dataset's class names (a ClassLabel's names, ``classes.txt``): label
        ``i`` is ``names[i]``, and every value must be an integer in
        ``0..len(names) - 1``. None: the classes are the distinct values, sorted
        (numbers as numbers), named by their text.
    samples : list of str
        The samples' names, for the message about a bad value.
    where : str
        The source, for messages.
    """
    values = np.asarray(values)
    if names is not None:
        if values.dtype.kind not in "iu":
            raise SourceError(f"'{where}': labels are {values.dtype} but the dataset names "
                              f"{len(names)} classes; expected integers 0..{len(names) - 1}")
        bad = np.flatnonzero((values < 0) | (values >= len(names)))
        if len(bad):
            i = int(bad[0])
            raise SourceError(f"'{where}': sample '{printable(samples[i])}' has label "
                              f"{values[i]}, outside 0..{len(names) - 1} of its {len(names)} "
                              f"class names ({len(bad)} such samples; an unlabelled split?)")
        return [stored_name(n) for n in names], values.astype(np.int64)
    distinct, labels = np.unique(values, return_inverse=True)  # sorted
    return [stored_name(str(v)) for v in distinct.tolist()], labels.astype(np.int64).reshape(-1)


class _WorkerThreads:
    """Decoding threads that never hold up an interrupt or the end of the process.

    Like a ``ThreadPoolExecutor`` (``submit``, ``map``), but the threads are
    daemons and :meth:`shutdown` does not wait for the work in progress: Ctrl-C
    during a slow decode ends the run at once, and the interrupted decode is
    abandoned (its result is never used).
    """

    def __init__(self, workers: int, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def map(self, fn, items):
        futures = [self.submit(fn, item) for item in items]
        return (f.result() for f in futures)

    def shutdown(self) -> None:
        """Cancel the work not started and let the threads end; waits for nothing."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)


# --------------------------------------------------------------------------
# Sources


class Source:
    """A dataset opened by :func:`open_source`: class names and two splits of samples.

    Attributes
    ----------
    kind : str
        One of ``"cifar10", "cifar100", "folder", "kaggle", "parquet", "arrow",
        "webdataset", "synthetic", "digits"``.
    description : str
        The SOURCE string as given to :func:`open_source`.
    classes : list of str
        Class names; index = label.
    image_size : int
        Side S of every image yielded, (S, S, 3).
    held_out : float or None
        The ``test_fraction`` held out as the test split, or None when the
        source brings its own test split.
    """

    def __init__(self, kind: str, description: str, classes: list[str], image_size: int,
                 held_out: float | None, workers: int = 1):
        self.kind = kind
        self.description = description
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.held_out = held_out
        self._workers = workers
        self._pool: _WorkerThreads | None = None
        self._closed = False

    # -- public API -------------------------------------------------------

    def splits(self) -> list[str]:
        """The split names, ``["train", "test"]``."""
        return list(SPLITS)

    def count(self, split: str) -> int:
        """Number of samples of ``split``, counted before any is skipped.

        Parameters
        ----------
        split : {'train', 'test'}

        Returns
        -------
        int
        """
        return self._count(self._check_split(split))

    def iter_batches(self, split: str, batch_size: int, start: int = 0,
                     stop: int | None = None) -> Iterator[Batch]:
        """Yield samples ``[start, stop)`` of a split, in order, in batches.

        Parameters
        ----------
        split : {'train', 'test'}
        batch_size : int
            Samples covered by each batch (>= 1); the last batch may cover fewer.
            A batch holds fewer images than it covers when some were skipped.
        start : int, optional
            First sample index, 0 <= start <= count(split). The batches from
            ``start`` are identical to the tail of a run from 0 when ``start``
            is a multiple of ``batch_size`` (and sample-for-sample identical
            in any case).
        stop : int, optional
            One past the last sample index, start <= stop <= count(split);
            default count(split). Shards of a dataset read ``[lo, hi)``.

        Returns
        -------
        iterator of Batch
            Arguments are checked at once; images are read as it is consumed,
            the next batch of image files being decoded in the background.

        Raises
        ------
        SourceError
            A bad argument; under ``on_error="fail"``, an image that cannot be decoded.
        """
        split = self._check_split(split)
        if self._closed:
            raise SourceError(f"source {self.description!r} is closed")
        batch_size = check_int("batch_size", batch_size, 1)
        n = self._count(split)
        start = check_int("start", start, 0)
        if start > n:
            raise SourceError(f"start {start} is past the end of split {split!r} ({n} samples)")
        if stop is not None:
            stop = check_int("stop", stop, start)
            if stop > n:
                raise SourceError(f"stop {stop} is past the end of split {split!r} ({n} samples)")
            n = stop
        return self._batches(split, batch_size, start, n)

    def close(self) -> None:
        """Release what the source holds (worker threads); it cannot be read afterwards.

        Returns at once: decoding not yet started is cancelled, and a decode in
        progress is abandoned (its thread ends when it finishes).
        """
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self._count(s)}" for s in SPLITS)
        return (f"<Source {self.kind} {self.description!r}: {len(self.classes)} classes, "
                f"{counts}, size {self.image_size}>")

    # -- for subclasses -----------------------------------------------------

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise SourceError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        return split

    def _count(self, split: str) -> int:
        raise NotImplementedError

    def _executor(self) -> _WorkerThreads:
        """The worker threads, started on first use."""
        if self._closed:
            raise SourceError(f"source {self.description!r} is closed")
        if self._pool is None:
            self._pool = _WorkerThreads(self._workers, "porder-source")
        return self._pool

    def _read(self, split: str, lo: int, hi: int) -> Batch:
        """The batch covering samples [lo, hi) of ``split``."""
        raise NotImplementedError

    def _batches(self, split: str, batch_size: int, start: int, n: int) -> Iterator[Batch]:
        for lo in range(start, n, batch_size):
            yield self._read(split, lo, min(lo + batch_size, n))
