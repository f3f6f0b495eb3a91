"""The porder HDF5 cache: schema, atomic writing, resuming, reading, inspecting.

Layout (format_version 1)::

    /                 attrs: format="porder", format_version, porder_version, measure,
                             patch, bins, reference, direction, image_size, source,
                             created, complete (set last), plus the other options
    /classes          variable-length strings, index = label
    /<split>/images   uint8 (N, S, S, 3), chunked by batch
    /<split>/labels   int64 (N,)
    /<split>/perm     uint16 (N, K): output patch j is source patch perm[:, j]
    /<split>/names    variable-length strings: where each sample came from
    /<split>/skipped  variable-length strings "name: reason" (``--on-error skip``)
    /<split> attrs    consumed (source samples read so far), rows (rows written)

A file is written under ``<out>.part`` and renamed to ``<out>`` only when
complete, so a killed run never leaves a file that looks finished. A ``.part``
file can be resumed: rows beyond the last completed batch are dropped and the
source is read again from the recorded position.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from . import __version__

FORMAT = "porder"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
_STR = h5py.string_dtype()
# Options that must match for --resume (and for merging shards).
IDENTITY_KEYS = ("measure", "patch", "bins", "reference", "direction", "image_size", "source",
                 "seed", "label", "test_fraction", "on_error")


class StoreError(ValueError):
    """A porder HDF5 file is missing, unreadable, incomplete or inconsistent."""


def partial_path(path) -> Path:
    """Where an unfinished output is kept: ``<path>.part``."""
    path = Path(path)
    return path.with_name(path.name + ".part")


def _jsonable(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def check_output(path, *, overwrite: bool = False) -> Path:
    """Refuse an output path that cannot or must not be written; returns it as a Path."""
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
        Continue an existing ``<path>.part`` made with the same options.
    chunk : int
        Images per HDF5 chunk (the batch size is a good choice).
    """

    def __init__(self, path, *, meta: dict, classes, overwrite: bool = False,
                 resume: bool = False, chunk: int = 256):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        check_output(self.path, overwrite=overwrite)
        size, patch = int(meta["image_size"]), int(meta["patch"])
        self.k = (size // patch) ** 2
        self.size = size
        self.chunk = max(1, min(int(chunk), 4096))
        if resume:
            if not self.tmp.exists():
                raise StoreError(f"nothing to resume: '{self.tmp}' does not exist")
            try:
                self.f = h5py.File(self.tmp, "r+")
            except OSError as e:
                raise StoreError(f"cannot resume from '{self.tmp}' ({e}); "
                                 "delete it and start again") from None
            self._check_resumable(meta, classes)
            for split in SPLITS:  # drop rows of a batch that was cut off mid-write
                g = self.f[split]
                for name in ("images", "labels", "perm", "names"):
                    g[name].resize(int(g.attrs["rows"]), axis=0)
            return
        try:
            self.f = h5py.File(self.tmp, "w")
        except OSError as e:
            raise StoreError(f"cannot write '{self.tmp}': {e}") from None
        attrs = dict(meta, format=FORMAT, format_version=FORMAT_VERSION,
                     porder_version=__version__, complete=False,
                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        for key, val in attrs.items():
            self.f.attrs[key] = val
        self.f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=_STR)
        for split in SPLITS:
            g = self.f.create_group(split)
            g.attrs["consumed"] = 0
            g.attrs["rows"] = 0
            c = self.chunk
            g.create_dataset("images", (0, size, size, 3), np.uint8,
                             maxshape=(None, size, size, 3), chunks=(min(c, 512), size, size, 3))
            g.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(max(c, 1024),))
            g.create_dataset("perm", (0, self.k), np.uint16, maxshape=(None, self.k),
                             chunks=(max(c, 1024), self.k))
            g.create_dataset("names", (0,), _STR, maxshape=(None,), chunks=(max(c, 1024),))
            g.create_dataset("skipped", (0,), _STR, maxshape=(None,), chunks=(256,))
        self.f.flush()

    def _check_resumable(self, meta, classes):
        old = self.f.attrs
        if old.get("format") != FORMAT:
            raise StoreError(f"'{self.tmp}' is not a porder file; delete it and start again")
        diff = [k for k in IDENTITY_KEYS
                if k in meta and _jsonable(old.get(k)) != _jsonable(meta[k])]
        if diff:
            detail = ", ".join(f"{k}: file has {_jsonable(old.get(k))!r}, now {meta[k]!r}" for k in diff)
            raise StoreError(f"cannot resume '{self.tmp}': options differ ({detail})")
        have = [_jsonable(c) for c in self.f["classes"][()]]
        if have != list(classes):
            raise StoreError(f"cannot resume '{self.tmp}': the source's classes changed")

    def consumed(self, split: str) -> int:
        """Source samples of ``split`` already processed (where to resume)."""
        return int(self.f[split].attrs["consumed"])

    def rows(self, split: str) -> int:
        """Rows of ``split`` written so far."""
        return int(self.f[split].attrs["rows"])

    def append(self, split: str, images, labels, perm, names, *, consumed: int, skipped=()):
        """Append one batch and record that ``consumed`` source samples are done.

        images (B, S, S, 3) uint8, labels (B,), perm (B, K), names list of B str.
        """
        g = self.f[split]
        b = len(labels)
        if images.shape[1:] != (self.size, self.size, 3) or perm.shape != (b, self.k):
            raise StoreError(f"batch shapes {images.shape}, {perm.shape} do not fit the file")
        r = int(g.attrs["rows"])
        if b:
            for name, data in (("images", images), ("labels", labels), ("perm", perm),
                               ("names", np.array(names, dtype=object))):
                ds = g[name]
                ds.resize(r + b, axis=0)
                ds[r : r + b] = data
        if skipped:
            ds = g["skipped"]
            s = ds.shape[0]
            ds.resize(s + len(skipped), axis=0)
            ds[s:] = np.array([f"{n}: {why}" for n, why in skipped], dtype=object)
        # Counters last: a batch cut off before here is dropped on resume.
        g.attrs["rows"] = r + b
        g.attrs["consumed"] = int(consumed)
        self.f.flush()

    def finish(self, **extra) -> Path:
        """Mark complete, close and rename to the final name; returns that path."""
        for key, val in extra.items():
            self.f.attrs[key] = val
        self.f.attrs["complete"] = True
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing (the ``.part`` file stays, resumable)."""
        if self.f.id.valid:
            self.f.close()

    def discard(self) -> None:
        """Close and delete the unfinished file."""
        self.close()
        self.tmp.unlink(missing_ok=True)


def missing_virtual_sources(f: h5py.File, path) -> list[str]:
    """Shard files that the virtual datasets of an open porder file point at
    and that cannot be found (relative names are relative to ``path``'s folder)."""
    missing: set[str] = set()
    for split in SPLITS:
        if split not in f:
            continue
        for ds in f[split].values():
            if not isinstance(ds, h5py.Dataset) or not ds.is_virtual:
                continue
            for m in ds.virtual_sources():
                src = Path(m.file_name)
                if m.file_name != "." and not (src if src.is_absolute()
                                               else Path(path).parent / src).exists():
                    missing.add(m.file_name)
    return sorted(missing)


def open_file(path, *, require_complete: bool = True) -> h5py.File:
    """Open a porder file for reading, with one-line errors for anything wrong."""
    path = Path(path)
    if not path.exists():
        hint = f" (an unfinished '{partial_path(path)}' exists: resume it with --resume)" \
            if partial_path(path).exists() else ""
        raise StoreError(f"file '{path}' does not exist{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StoreError(f"cannot read '{path}' as HDF5: {e}") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise StoreError(f"'{path}' is not a porder file (no format='porder' attribute)")
    if int(f.attrs.get("format_version", -1)) > FORMAT_VERSION:
        v = f.attrs.get("format_version")
        f.close()
        raise StoreError(f"'{path}' has format_version {v}; this porder reads up to {FORMAT_VERSION}")
    if require_complete and not bool(f.attrs.get("complete", False)):
        f.close()
        raise StoreError(f"'{path}' is incomplete (the run that wrote it did not finish)")
    missing = missing_virtual_sources(f, path)
    if missing:
        f.close()
        raise StoreError(f"'{path}' is a merged file whose shard files are missing: "
                         f"{', '.join(missing)} (keep the shards beside it, or merge with --copy)")
    return f


def read_meta(path) -> dict:
    """Root attributes, classes and per-split counts of a porder file."""
    with open_file(path) as f:
        meta = {k: _jsonable(v) for k, v in f.attrs.items()}
        meta["classes"] = [_jsonable(c) for c in f["classes"][()]]
        meta["splits"] = {s: int(f[s]["labels"].shape[0]) for s in SPLITS if s in f}
        meta["skipped"] = {s: int(f[s]["skipped"].shape[0]) for s in SPLITS
                           if s in f and "skipped" in f[s]}
    return meta


def read_split(path, split: str = "train", *, start: int = 0, stop: int | None = None) -> dict:
    """Load rows [start, stop) of a split into memory.

    Returns
    -------
    dict with ``images`` uint8 (N, S, S, 3), ``labels`` int64 (N,),
    ``perm`` int64 (N, K) and ``names`` (list of str).
    """
    with open_file(path) as f:
        if split not in f:
            raise StoreError(f"'{path}' has no split {split!r}")
        g = f[split]
        sl = slice(start, stop)
        return {
            "images": g["images"][sl],
            "labels": g["labels"][sl].astype(np.int64),
            "perm": g["perm"][sl].astype(np.int64),
            "names": [_jsonable(n) for n in g["names"][sl]],
        }


def read_labels(path, split: str = "train") -> np.ndarray:
    """The labels of a split, int64 (N,), without reading its images."""
    with open_file(path) as f:
        if split not in f:
            raise StoreError(f"'{path}' has no split {split!r}")
        return f[split]["labels"][()].astype(np.int64)


def describe(path) -> dict:
    """What a file holds and how it was made, as JSON-ready data (``porder inspect``)."""
    meta = read_meta(path)
    meta["path"] = str(path)
    meta["bytes"] = Path(path).stat().st_size
    with open_file(path) as f:
        meta["skipped_names"] = {s: [_jsonable(n) for n in f[s]["skipped"][()]]
                                 for s in SPLITS if s in f and "skipped" in f[s]}
        meta["virtual_sources"] = sorted({m.file_name for s in SPLITS if s in f
                                          for ds in f[s].values() if ds.is_virtual
                                          for m in ds.virtual_sources()})
    return meta


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
