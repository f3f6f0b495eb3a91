"""Reading porder files: every reader opens them through :func:`open_file`.

:func:`open_file` refuses anything :func:`porder.validate.check_file` refuses
(one line naming the file); :func:`read_split` also checks the labels and
``perm`` rows it loads. Re-exported by :mod:`porder.store`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np

from .validate import SPLITS, StoreError, check_file, check_rows, open_hdf5, reading, whole

SKIPPED_SHOWN = 10_000  # skipped names describe() lists per split


def partial_path(path) -> Path:
    """Where an unfinished output is kept: ``<path>.part``."""
    path = Path(path)
    return path.with_name(path.name + ".part")


def jsonable(v):
    """An HDF5 attribute or string value as plain Python (str, int, float, list)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def missing_virtual_sources(f: h5py.File, path) -> list[str]:
    """Shard files that the virtual datasets of an open porder file point at
    and that cannot be found (relative names are relative to ``path``'s folder)."""
    missing: set[str] = set()
    for split in SPLITS:
        g = f.get(split)
        if not isinstance(g, h5py.Group):
            continue
        for ds in g.values():
            if not isinstance(ds, h5py.Dataset) or not ds.is_virtual:
                continue
            for m in ds.virtual_sources():
                src = Path(m.file_name)
                if m.file_name != "." and not (src if src.is_absolute()
                                               else Path(path).parent / src).exists():
                    missing.add(m.file_name)
    return sorted(missing)


def open_checked(path, *, require_complete: bool = True, contents: bool = False):
    """Open a porder file and check it (:func:`porder.validate.check_file`).

    Returns
    -------
    (h5py.File, porder.validate.Layout); the caller closes the file.
    ``contents=True`` also checks every label and ``perm`` row (bounded memory).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        hint = f" (an unfinished '{partial_path(path)}' exists: resume it with --resume)" \
            if partial_path(path).exists() else ""
        raise StoreError(f"file '{path}' does not exist{hint}")
    f = open_hdf5(path)
    try:
        layout = check_file(f, path, require_complete=require_complete, contents=contents)
    except BaseException:
        f.close()
        raise
    return f, layout


def open_file(path, *, require_complete: bool = True) -> h5py.File:
    """Open a porder file for reading, with one-line errors for anything wrong.

    The file is checked by :func:`porder.validate.check_file` (its structure,
    not every row): anything that would make HDF5 read outside the file, or
    make a reader fail later, is refused here.
    """
    return open_checked(path, require_complete=require_complete)[0]


def read_meta(path) -> dict:
    """Root attributes, classes and per-split counts of a porder file."""
    f, layout = open_checked(path)
    with f, reading(path):
        meta = {k: jsonable(v) for k, v in f.attrs.items()}
        meta["classes"] = [jsonable(c) for c in f["classes"][()]]
        meta["splits"] = dict(layout.rows)
        meta["skipped"] = {s: int(f[s]["skipped"].shape[0]) for s in SPLITS
                           if "skipped" in f[s]}
    return meta


def read_split(path, split: str = "train", *, start: int = 0, stop: int | None = None) -> dict:
    """Load rows [start, stop) of a split into memory.

    Labels and ``perm`` rows are checked as they are loaded
    (:func:`porder.validate.check_rows`).

    Returns
    -------
    dict
        ``images`` uint8 (N, S, S, 3), ``labels`` int64 (N,), ``perm`` int64
        (N, K) and ``names`` (list of str).
    """
    if split not in SPLITS:
        raise StoreError(f"'{path}' has no split {split!r}; choose one of {list(SPLITS)}")
    start = whole("start", start)
    stop = None if stop is None else whole("stop", stop)
    f, layout = open_checked(path)
    with f, reading(path):
        g = f[split]
        sl = slice(start, stop)
        lo = sl.indices(layout.rows[split])[0]
        out = {
            "images": g["images"][sl],
            "labels": g["labels"][sl].astype(np.int64),
            "perm": g["perm"][sl].astype(np.int64),
            "names": [jsonable(n) for n in g["names"][sl]],
        }
    check_rows(path, split, lo, out["labels"], out["perm"], classes=layout.classes, k=layout.k)
    return out


def iter_split(path, split: str = "train", *, rows: int = 4096, start: int = 0,
               stop: int | None = None, perm: bool = True, names: bool = False):
    """Read rows [start, stop) of a split in consecutive chunks, one file handle.

    Yields ``(lo, chunk)`` for chunks of at most ``rows`` rows starting at row
    ``lo``; ``chunk`` is a dict like :func:`read_split`'s, with ``perm`` only
    when ``perm`` and ``names`` only when ``names``. Memory is bounded by one
    chunk.
    """
    rows = whole("rows", rows, lo=1)
    start = whole("start", start, lo=0)
    stop = None if stop is None else whole("stop", stop, lo=0)
    if split not in SPLITS:
        raise StoreError(f"'{path}' has no split {split!r}; choose one of {list(SPLITS)}")
    f, layout = open_checked(path)
    with f:
        g = f[split]
        n = layout.rows[split]
        stop = n if stop is None else min(stop, n)
        for lo in range(start, stop, rows):
            hi = min(lo + rows, stop)
            with reading(path):
                chunk = {"images": g["images"][lo:hi],                       # (m, S, S, 3) uint8
                         "labels": g["labels"][lo:hi].astype(np.int64)}      # (m,)
                p = g["perm"][lo:hi].astype(np.int64)                         # (m, K)
                if names:
                    chunk["names"] = [jsonable(x) for x in g["names"][lo:hi]]
            check_rows(path, split, lo, chunk["labels"], p, classes=layout.classes, k=layout.k)
            if perm:
                chunk["perm"] = p
            yield lo, chunk


@dataclass
class Split:
    """One split of a porder file in memory, as returned by :func:`load`.

    Attributes
    ----------
    images : uint8 array (N, S, S, 3)
        As stored: the reordered images (the originals for measure 'none').
    labels : int64 array (N,)
        Indices into ``classes``.
    perm : int64 array (N, K)
        Output patch j of image i is source patch ``perm[i, j]``.
    names : str array (N,)
        Where each sample came from.
    classes : list of str
    options : dict
        The file's root attributes: measure, patch, bins, reference, direction,
        image_size, source, seed, ... (``porder inspect`` shows them).
    split : str
    path : Path
    """

    images: np.ndarray
    labels: np.ndarray
    perm: np.ndarray
    names: np.ndarray
    classes: list
    options: dict
    split: str
    path: Path

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: str):
        """Dict-style access: ``data["images"]`` is ``data.images``."""
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def originals(self) -> np.ndarray:
        """The images before reordering (N, S, S, 3), recovered through ``perm``."""
        from .patches import restore_images

        return restore_images(self.images, self.perm, int(self.options["patch"]))


def load(path, split: str = "train") -> Split:
    """Load one split of a porder file into memory, with its classes and options.

    Parameters
    ----------
    path : path-like
        A complete porder HDF5 file (``porder reorder`` writes them).
    split : {'train', 'test'}

    Returns
    -------
    Split
        ``images`` uint8 (N, S, S, 3), ``labels`` int64 (N,), ``perm`` int64
        (N, K), ``names`` str (N,), ``classes``, ``options`` (the file's root
        attributes) and ``originals()``.

    Raises
    ------
    StoreError (a ValueError)
        A missing, incomplete or non-porder file, or a split it does not have.

    Examples
    --------
    >>> d = porder.load("c100-mi8.h5", "test")             # doctest: +SKIP
    >>> d.images.shape, d.options["measure"], d.classes[d.labels[0]]  # doctest: +SKIP
    """
    if split not in SPLITS:
        raise StoreError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    meta = read_meta(path)
    data = read_split(path, split)
    options = {k: v for k, v in meta.items() if k not in ("classes", "splits", "skipped")}
    return Split(images=data["images"], labels=data["labels"], perm=data["perm"],
                 names=np.asarray(data["names"], dtype=str), classes=meta["classes"],
                 options=options, split=split, path=Path(path))


def read_labels(path, split: str = "train") -> np.ndarray:
    """The labels of a split, int64 (N,), without reading its images (checked rows)."""
    if split not in SPLITS:
        raise StoreError(f"'{path}' has no split {split!r}; choose one of {list(SPLITS)}")
    f, layout = open_checked(path)
    with f, reading(path):
        labels = f[split]["labels"][()].astype(np.int64)
    check_rows(path, split, 0, labels, None, classes=layout.classes, k=layout.k)
    return labels


def _encodable(v):
    """Text that can be printed: bytes a file held that are not UTF-8 (surrogate escapes
    from h5py) are shown as ``\\xNN``; containers are converted item by item."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
            return v
        except UnicodeEncodeError:
            try:
                return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # lone surrogates that are not escapes
                return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, dict):
        return {_encodable(k): _encodable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_encodable(x) for x in v]
    return v


def describe(path) -> dict:
    """What a file holds and how it was made, as JSON-ready data (``porder inspect``).

    Reads every label and ``perm`` row once (bounded memory) to check them.
    """
    meta = read_meta(path)
    meta["path"] = str(path)
    meta["bytes"] = Path(path).stat().st_size
    f, layout = open_checked(path, contents=True)
    with f, reading(path):
        meta["skipped_names"] = {s: [jsonable(n) for n in f[s]["skipped"][:SKIPPED_SHOWN]]
                                 for s in SPLITS if "skipped" in f[s]}
        meta["virtual_sources"] = list(layout.virtual_sources)
    return _encodable(meta)


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=jsonable)
