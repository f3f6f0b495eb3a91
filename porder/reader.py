"""Reading porder files: every reader opens them through :func:`open_file`.

:func:`open_file` refuses anything :func:`porder.validate.check_file` refuses
(one line naming the file); :func:`read_split` also checks the labels and
``perm`` rows it loads. Re-exported by :mod:`porder.store`.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .validate import SPLITS, StoreError, check_file, check_rows, open_hdf5, reading

SKIPPED_SHOWN = 10_000  # skipped names describe() lists per split


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
        meta = {k: _jsonable(v) for k, v in f.attrs.items()}
        meta["classes"] = [_jsonable(c) for c in f["classes"][()]]
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
    dict with ``images`` uint8 (N, S, S, 3), ``labels`` int64 (N,),
    ``perm`` int64 (N, K) and ``names`` (list of str).
    """
    if split not in SPLITS:
        raise StoreError(f"'{path}' has no split {split!r}; choose one of {list(SPLITS)}")
    f, layout = open_checked(path)
    with f, reading(path):
        g = f[split]
        sl = slice(start, stop)
        lo = sl.indices(layout.rows[split])[0]
        out = {
            "images": g["images"][sl],
            "labels": g["labels"][sl].astype(np.int64),
            "perm": g["perm"][sl].astype(np.int64),
            "names": [_jsonable(n) for n in g["names"][sl]],
        }
    check_rows(path, split, lo, out["labels"], out["perm"], classes=layout.classes, k=layout.k)
    return out


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
        meta["skipped_names"] = {s: [_jsonable(n) for n in f[s]["skipped"][:SKIPPED_SHOWN]]
                                 for s in SPLITS if "skipped" in f[s]}
        meta["virtual_sources"] = list(layout.virtual_sources)
    return _encodable(meta)


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
