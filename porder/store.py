"""The porder HDF5 cache: schema, atomic writing, resuming (reading: :mod:`porder.reader`).

Layout (format_version 1)::

    /                 attrs: format="porder", format_version, porder_version, measure,
                             patch, bins, reference, direction, image_size, source,
                             created, complete (set last), plus the other options
    /classes          variable-length strings, index = label
    /<split>/images   uint8 (N, S, S, 3), chunked by batch
    /<split>/labels   int64 (N,)
    /<split>/perm     uint8/uint16/uint32 (N, K), the smallest holding 0..K-1:
                      output patch j is source patch perm[:, j]
    /<split>/names    variable-length strings: where each sample came from
    /<split>/skipped  variable-length strings "name: reason" (``--on-error skip``)
    /<split> attrs    consumed (source samples read so far), rows (rows written),
                      first_sample, last_sample (the slice [first, last) of the
                      source's split it holds: all of it, or a shard's),
                      and, in a .part only, committed: int64 [rows, consumed,
                      skipped] of the last batch known to be wholly on disk

A file is written under ``<out>.part`` and renamed to ``<out>`` only when
complete, so a killed run never leaves a file that looks finished. A ``.part``
file can be resumed, whatever point a kill (even SIGKILL) cut an append at:
each batch's rows are written, flushed and synced (fsync) to the disk before its ``committed``
attribute (one attribute write) is, and a resume trusts only ``committed``
(``rows`` in a ``.part`` made before it existed): every dataset is cut back
to it, what its chunks hold beyond it is cleared, and the source is read
again from the committed position. A ``.part`` too damaged to open or cut back
is refused with one line (start afresh without ``--resume``).

Safety (see :mod:`porder.output` and :mod:`porder.validate`): a writer holds
the exclusive lock ``<out>.lock`` from before it touches anything until the
rename, reserves disk space ahead of each batch (a full disk fails before
HDF5 writes, keeping the ``.part`` resumable), and resumes only a ``.part``
made with the same options from the same source (``RESUME_KEYS``). Every
reader opens files through :func:`open_file`, which runs
:func:`porder.validate.check_file`.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from ._version import __version__
from .messages import one_line
from .output import DiskFull, SpaceReserver, durable_replace, is_disk_full, lock_output
from .reader import (
    Split,
    describe,
    iter_split,
    jsonable,
    load,
    missing_virtual_sources,
    open_file,
    partial_path,
    read_labels,
    read_meta,
    read_split,
    to_json,
)
from .validate import (
    COMMITTED,
    DATASETS,
    FORMAT,
    FORMAT_VERSION,
    SPLITS,
    StoreError,
    check_file,
    committed_counts,
    open_hdf5,
    perm_dtype,
    reading,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "IDENTITY_KEYS", "RESUME_KEYS", "SPLITS", "StoreError",
           "Writer", "check_output", "describe", "estimate_bytes", "missing_virtual_sources",
           "open_file", "partial_path", "perm_dtype", "read_meta", "read_split", "to_json",
           "Split", "iter_split", "load", "read_labels"]

_STR = h5py.string_dtype()
# What identifies the source, recorded by build_cache (porder.pipeline): file
# count, total bytes and a digest of names and sizes (or of an archive's bytes);
# source_state adds modification times.
SOURCE_KEYS = ("source_files", "source_bytes", "source_digest")
# Options that must match for merging shards (and for --resume).
IDENTITY_KEYS = ("measure", "patch", "bins", "reference", "direction", "image_size", "source",
                 "seed", "label", "test_fraction", "on_error", *SOURCE_KEYS)
# ... and what must also match for --resume: the same slice of the same files.
RESUME_KEYS = (*IDENTITY_KEYS, "source_state", "shard_index", "shard_count")
META_BYTES = 2**20          # HDF5 metadata headroom in size estimates
CHUNK_BYTES = 4 * 2**20     # the most bytes of one HDF5 chunk (large images, many patches)
# Files of images larger than SMALL_SIDE x SMALL_SIDE keep every chunk within
# LARGE_CHUNK_BYTES, HDF5's default chunk cache (rdcc_nbytes): reading one image
# of a 224x224 file reads 6 rows (0.9 MB), not the 27 (4 MB) of a 4 MiB chunk.
# Files of small images keep the chunks they always had (512 CIFAR rows, 1.5 MiB:
# contiguous reads are faster through chunks past the cache, and such a file
# stays in the page cache), so they stay byte-identical. See docs/hdf5-format.md.
SMALL_SIDE = 32
LARGE_CHUNK_BYTES = 2**20
NAME_BYTES = 64             # a stored name, on average, in size estimates


def check_output(path, *, overwrite: bool = False) -> Path:
    """Refuse an output path that cannot or must not be written; returns it as a Path.

    Call it holding the output's lock (:func:`porder.output.lock_output`), so
    that what it checks stays true.
    """
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"output '{path}' is a directory; give a file name like out.h5")
    if path.exists() and not overwrite:
        raise StoreError(f"output '{path}' exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise StoreError(f"cannot write '{path}': folder '{path.parent}' does not exist")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"cannot write '{path}': folder '{path.parent}' is not writable")
    return path


def _chunk_rows(rows: int, row_bytes: int, size: int = SMALL_SIDE) -> int:
    """Rows per chunk of a file of ``size`` px images: ``rows``, fewer where a chunk
    would pass CHUNK_BYTES (LARGE_CHUNK_BYTES when ``size`` > SMALL_SIDE)."""
    limit = LARGE_CHUNK_BYTES if size > SMALL_SIDE else CHUNK_BYTES
    return max(1, min(int(rows), limit // max(1, int(row_bytes))))


def estimate_bytes(rows: int, size: int, k: int) -> int:
    """Bytes a porder file of ``rows`` images of ``size`` px with ``k`` patches takes
    (images, labels, perm, names, metadata): an upper bound for the free-space check."""
    row = size * size * 3 + 8 + k * perm_dtype(k).itemsize + NAME_BYTES
    return int(rows) * row + META_BYTES


class Writer:
    """Append reordered batches to a new porder file, one batch at a time.

    Parameters
    ----------
    path : path-like
        The final file name; data goes to ``<path>.part`` until :meth:`finish`.
    meta : dict
        Root attributes describing how the file is made (see module docstring);
        must hold at least ``image_size`` and ``patch``.
    classes : list of str
    overwrite : bool
        Replace an existing ``path``; otherwise an existing file is refused.
    resume : bool
        Continue an existing ``<path>.part`` made with the same options
        (``RESUME_KEYS`` of ``meta``) and classes.
    chunk : int
        Images per HDF5 chunk (the batch size is a good choice).
    lock : porder.output.Lock, optional
        The lock of ``path`` if the caller took it already; the writer then
        owns it. Otherwise the writer takes it first thing.

    Raises
    ------
    porder.output.Busy
        Another process is writing ``path``.
    StoreError
        A refused output, or a ``.part`` that cannot be resumed (naming what changed).
    """

    def __init__(self, path, *, meta: dict, classes, overwrite: bool = False,
                 resume: bool = False, chunk: int = 256, lock=None):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.f = None
        self._space = None
        self._broken = False
        self._datasets: dict = {}       # (split, name) -> h5py.Dataset, looked up once
        self._chunk_total: int | None = None
        if lock is None:
            check_output(self.path, overwrite=True)  # the folder, before locking in it
            lock = lock_output(self.path)            # before touching anything else
        self._lock = lock
        created = False
        try:
            check_output(self.path, overwrite=overwrite)
            size, patch = int(meta["image_size"]), int(meta["patch"])
            self.k = (size // patch) ** 2
            self.size = size
            self.perm_dtype = perm_dtype(self.k)
            self.chunk = max(1, min(int(chunk), 4096))
            if resume:
                self._resume(meta, classes)
                return
            created = True
            self._create(meta, classes)
        except BaseException as e:
            self._close_file()
            if created:
                self.tmp.unlink(missing_ok=True)
            self._lock.release()
            if is_disk_full(e) and not isinstance(e, DiskFull):
                raise DiskFull(f"disk full creating '{self.tmp}': {_reason(e)}") from None
            raise

    def _create(self, meta, classes):
        try:
            self.f = h5py.File(self.tmp, "w")  # ours to truncate: we hold the lock
        except OSError as e:
            raise StoreError(f"cannot write '{self.tmp}': {e}") from None
        self._space = SpaceReserver(self.tmp, f"'{self.tmp}'")
        self._space.reserve(META_BYTES)
        attrs = dict(meta, format=FORMAT, format_version=FORMAT_VERSION,
                     porder_version=__version__, complete=False,
                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        for key, val in attrs.items():
            self.f.attrs[key] = val
        self.f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=_STR)
        size, c = self.size, self.chunk
        for split in SPLITS:
            g = self.f.create_group(split)
            g.attrs["consumed"] = 0
            g.attrs["rows"] = 0
            g.attrs[COMMITTED] = np.zeros(3, np.int64)
            g.create_dataset("images", (0, size, size, 3), np.uint8,
                             maxshape=(None, size, size, 3),
                             chunks=(_chunk_rows(min(c, 512), size * size * 3, size), size, size, 3))
            g.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(max(c, 1024),))
            g.create_dataset("perm", (0, self.k), self.perm_dtype, maxshape=(None, self.k),
                             chunks=(_chunk_rows(max(c, 1024), self.k * self.perm_dtype.itemsize,
                                                 size), self.k))
            g.create_dataset("names", (0,), _STR, maxshape=(None,), chunks=(max(c, 1024),))
            g.create_dataset("skipped", (0,), _STR, maxshape=(None,), chunks=(256,))
        self.f.flush()

    def _resume(self, meta, classes):
        if not self.tmp.exists():
            raise StoreError(f"nothing to resume: '{self.tmp}' does not exist")
        try:
            self.f = open_hdf5(self.tmp, "r+")
            # Checked before anything is written: a hostile .part could redirect writes.
            check_file(self.f, self.tmp, require_complete=False, partial=True, contents=True)
        except StoreError as e:
            raise StoreError(f"cannot resume: {e}; run without --resume to start afresh") \
                from None
        self._check_resumable(meta, classes)
        self.perm_dtype = self.f["train/perm"].dtype
        self._space = SpaceReserver(self.tmp, f"'{self.tmp}'")
        try:
            with reading(self.tmp):
                for split in SPLITS:
                    self._roll_back(split)
                self.f.flush()
        except StoreError as e:
            raise StoreError(f"cannot resume: {e}; run without --resume to start afresh") \
                from None

    def _roll_back(self, split: str) -> None:
        """Cut a split back to its last committed batch: whatever a kill cut off is dropped."""
        g = self.f[split]
        if COMMITTED in g.attrs:
            rows, consumed, skipped = committed_counts(self.tmp, split, g.attrs[COMMITTED])
            g.attrs["rows"], g.attrs["consumed"] = rows, consumed
            _cut(g["skipped"], skipped)
        else:  # made by a porder without it: rows and consumed are all there is
            rows = int(g.attrs["rows"])
        for name in DATASETS:
            _cut(g[name], rows)

    def _check_resumable(self, meta, classes):
        old = self.f.attrs
        diff = [k for k in RESUME_KEYS
                if k in meta and jsonable(old.get(k)) != jsonable(meta[k])]
        if diff:
            opts = [_change(k, jsonable(old.get(k)), meta, old) for k in diff
                    if k not in SOURCE_KEYS + ("source_state", "shard_index", "shard_count")]
            src = [_change(k, jsonable(old.get(k)), meta, old) for k in diff
                   if k in SOURCE_KEYS + ("source_state",)]
            parts = ([f"options differ ({'; '.join(opts)})"] if opts else []) + (
                [f"the source changed ({src[0]})"] if src else []) + (
                [_change("shard_index", None, meta, old)]
                if {"shard_index", "shard_count"} & set(diff) else [])
            raise StoreError(f"cannot resume '{self.tmp}': {'; '.join(parts)}; run without "
                             f"--resume to start afresh")
        have = [jsonable(c) for c in self.f["classes"][()]]
        if have != list(classes):
            raise StoreError(f"cannot resume '{self.tmp}': the source's classes changed "
                             f"({len(have)} then, {len(classes)} now)")

    def consumed(self, split: str) -> int:
        """Source samples of ``split`` already processed (where to resume)."""
        return int(self.f[split].attrs["consumed"])

    def rows(self, split: str) -> int:
        """Rows of ``split`` written so far."""
        return int(self.f[split].attrs["rows"])

    def skipped(self, split: str) -> int:
        """Samples of ``split`` skipped so far (``--on-error skip``)."""
        return int(self.f[split]["skipped"].shape[0])

    def set_sample_range(self, split: str, first: int, last: int) -> None:
        """Record that ``split`` holds source samples ``first`` up to (not including) ``last``
        (a shard's slice; the whole split otherwise), as its ``first_sample`` and
        ``last_sample`` attributes."""
        g = self.f[split]
        g.attrs["first_sample"] = first
        g.attrs["last_sample"] = last

    def append(self, split: str, images, labels, perm, names, *, consumed: int, skipped=()):
        """Append one batch and record that ``consumed`` source samples are done.

        images (B, S, S, 3) uint8, labels (B,), perm (B, K) integers in 0..K-1
        (stored as ``perm_dtype``), names list of B str.

        Raises
        ------
        porder.output.DiskFull
            Not enough space for the batch; nothing of it was written, and the
            ``.part`` can be resumed once there is space.
        """
        g = self.f[split]
        b = len(labels)
        perm = np.asarray(perm)
        ds_of = self._dataset
        if images.shape[1:] != (self.size, self.size, 3) or perm.shape != (b, self.k):
            raise StoreError(f"batch shapes {images.shape}, {perm.shape} do not fit the file")
        if b and (perm.min() < 0 or perm.max() >= self.k):
            raise StoreError(f"perm values must lie in 0..{self.k - 1}, got "
                             f"{perm.min()}..{perm.max()}")
        names_bytes = 4 * sum(len(str(n)) for n in names) + 4 * sum(
            len(str(n)) + len(str(w)) for n, w in skipped)
        self._space.reserve(images.nbytes + b * (16 + 16 + self.k * self.perm_dtype.itemsize)
                            + names_bytes + self._chunk_bytes() + META_BYTES)
        r = int(g.attrs["rows"])
        s = int(ds_of(split, "skipped").shape[0]) if "skipped" in g else 0
        try:
            if b:
                for name, data in (("images", images), ("labels", labels),
                                   ("perm", perm.astype(self.perm_dtype, copy=False)),
                                   ("names", np.array(names, dtype=object))):
                    ds = ds_of(split, name)
                    ds.resize(r + b, axis=0)
                    ds[r : r + b] = data
            if skipped:
                ds = ds_of(split, "skipped")
                ds.resize(s + len(skipped), axis=0)
                ds[s:] = np.array([f"{n}: {why}" for n, why in skipped], dtype=object)
            # The batch is wholly on disk before it is committed, in one attribute write:
            # a kill before the second flush leaves the previous commit, which resume trusts.
            # fsync: on the disk itself, so that holds across a power cut too.
            self.f.flush()
            os.fsync(self.f.id.get_vfd_handle())
            g.attrs[COMMITTED] = np.array([r + b, int(consumed), s + len(skipped)], np.int64)
            g.attrs["rows"] = r + b            # what readers use; resume rewrites them
            g.attrs["consumed"] = int(consumed)
            self.f.flush()
        except (OSError, RuntimeError) as e:
            if not is_disk_full(e):
                raise
            self._broken = True
            raise DiskFull(f"disk full writing '{self.tmp}': {_reason(e)}") from None

    def _dataset(self, split: str, name: str):
        """The open dataset ``split/name`` (h5py's lookup costs more than a small write)."""
        ds = self._datasets.get((split, name))
        if ds is None:
            ds = self._datasets[split, name] = self.f[split][name]
        return ds

    def _chunk_bytes(self) -> int:
        """A new HDF5 chunk of every dataset: the most one batch can allocate beyond its rows."""
        if self._chunk_total is None:
            g = self.f["train"]
            self._chunk_total = sum(
                int(np.prod(ds.chunks)) * (16 if ds.dtype.kind == "O" else ds.dtype.itemsize)
                for ds in g.values() if isinstance(ds, h5py.Dataset) and ds.chunks)
        return self._chunk_total

    def finish(self, **extra) -> Path:
        """Mark complete, close and rename to the final name; returns that path.

        The ``committed`` attributes go: a complete file is read by its ``rows``.
        """
        try:
            for key, val in extra.items():
                self.f.attrs[key] = val
            for split in SPLITS:
                if COMMITTED in self.f[split].attrs:
                    del self.f[split].attrs[COMMITTED]
            self.f.attrs["complete"] = True
            self.f.close()
        except (OSError, RuntimeError) as e:
            if not is_disk_full(e):
                raise
            self._broken = True
            raise DiskFull(f"disk full finishing '{self.tmp}': {_reason(e)}") from None
        self._close_file()
        durable_replace(self.tmp, self.path)
        self._lock.release()
        return self.path

    def _close_file(self) -> None:
        self._datasets.clear()
        if self.f is not None and self.f.id.valid:
            try:
                self.f.close()
            except (OSError, RuntimeError):
                if not self._broken:
                    raise
        if self._space is not None:
            self._space.close()
            self._space = None

    def close(self) -> None:
        """Close without finishing (the ``.part`` file stays, resumable); drop the lock."""
        try:
            self._close_file()
        finally:
            self._lock.release()

    def discard(self) -> None:
        """Close and delete the unfinished file, then drop the lock."""
        try:
            self._broken = True  # closing is best effort: the file goes anyway
            self._close_file()
            self.tmp.unlink(missing_ok=True)
        finally:
            self._lock.release()


def _cut(ds: h5py.Dataset, rows: int) -> None:
    """Resize ``ds`` to ``rows`` rows, clearing what its last chunk holds beyond them.

    A killed append can leave rows past the extent in a chunk (HDF5 writes a
    dataset's chunks when it closes, its metadata only when flushed); for
    strings those are references into a heap that may not hold them, which
    HDF5 would follow (and fail, or crash) when the rows are written again.
    Shrinking the extent refills the part of a chunk beyond it.
    """
    if ds.shape[0] <= rows:  # fewer is refused by check_file
        ds.resize(rows + 1, axis=0)
    ds.resize(rows, axis=0)


def _reason(e: BaseException) -> str:
    text = str(e)
    if "No space left" in text or "errno = 28" in text:
        return "no space left on the device"
    return one_line(e, first=True)


def _change(key: str, old, meta: dict, attrs) -> str:
    """One phrase saying how option or source ``key`` differs between a .part and now."""
    new = jsonable(meta[key])
    if key in ("shard_index", "shard_count"):
        def shard(i, n):
            return "none" if int(n) == 1 else f"{i}/{n}"
        then = shard(jsonable(attrs.get("shard_index", 0)), jsonable(attrs.get("shard_count", 1)))
        now = shard(meta.get("shard_index", 0), meta.get("shard_count", 1))
        return f"--shard is {now} now, {then} in the .part"
    if old is None:
        return f"the .part does not record {key} (made by an older porder?)"
    if key == "source_files":
        return f"the source has {new} files now, {old} when the .part was started " \
               f"(files were added or removed)"
    if key == "source_bytes":
        return f"the source's files hold {new} bytes now, {old} then (files changed)"
    if key == "source_digest":
        return "the source's file names or sizes changed since the .part was started"
    if key == "source_state":
        return "the source's files were modified since the .part was started (their " \
               "modification times differ)"
    return f"{key}: the .part has {old!r}, now {new!r}"
