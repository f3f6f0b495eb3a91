"""Stitching the shard files of one sharded run into a single porder file.

See :mod:`porder.scale` for how shards are made and what the merged file holds:
virtual datasets that map rows onto the shard files (the default), or a
standalone copy made a bounded number of rows at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import h5py
import numpy as np

from ..messages import one_line
from ..output import DiskFull, SpaceReserver, check_free_space, durable_replace, is_disk_full, lock_output
from ..reader import jsonable, open_checked
from ..store import (
    IDENTITY_KEYS,
    SPLITS,
    StoreError,
    check_output,
    missing_virtual_sources,
    open_file,
    partial_path,
)
from ..validate import open_hdf5, reading

# progress(stage, done, total): stage "images" while shards run, "merge" while copying
Progress = Callable[[str, int, int], None]

# Rows copied per step by merge(copy=True) are capped by this many bytes.
COPY_BYTES = 64 * 2**20
DATASETS = ("images", "labels", "perm", "names", "skipped")


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
    f, _ = open_checked(path, contents=True)  # every label and perm row, in bounded chunks
    with f, reading(path):
        attrs = {k: jsonable(v) for k, v in f.attrs.items()}
        classes = [jsonable(c) for c in f["classes"][()]]
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
        have = ", ".join(f"{i}/{ref.count}" for i in sorted(seen)[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise StoreError("missing shard slices " + ", ".join(f"{i}/{ref.count}"
                                                             for i in missing[:20])
                         + f"{more} (given: {have}{' ...' if len(seen) > 20 else ''})")
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
    """``path`` relative to folder ``start`` (a VDS source name); refused outside it.

    Readers accept virtual datasets only when their sources lie inside the
    merged file's folder (:mod:`porder.validate`), so merge never writes others.
    """
    try:
        rel = os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive on Windows
        rel = str(path.resolve())
    if rel.startswith("..") or os.path.isabs(rel):
        raise StoreError(f"shard '{path}' is outside the folder '{start}' of the merged file; "
                         f"a virtual merge must sit in the shards' folder or above it: write "
                         f"the output there, or merge with --copy")
    return rel.replace(os.sep, "/")


def _write_split(f: h5py.File, split: str, shards: list[_Shard], out_dir: Path, *, copy: bool,
                 progress: Optional[Progress], done: list[int], total: int,
                 space: Optional[SpaceReserver]) -> None:
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
        dtypes = {s.splits[split]["datasets"][name][1] for s in parts}
        if len(dtypes) > 1:  # e.g. perm uint16 from an older porder beside uint8
            if not copy:
                raise StoreError(f"the shards store {split}/{name} as different types "
                                 f"({', '.join(sorted(map(str, dtypes)))}; made by different "
                                 f"porder versions?): merge them with --copy")
            dtype = np.result_type(*dtypes)
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
            with open_file(s.path) as sf, reading(s.path):  # checked by _read_shard
                src = sf[split][name]
                for lo in range(0, size, step):
                    hi = min(size, lo + step)
                    rows = src[lo:hi]
                    if space is not None:
                        space.reserve(rows.nbytes + (16 * len(rows) if name != "images" else 0)
                                      + 2**20)
                    ds[o + lo : o + hi] = rows
                    if progress and name == "images":
                        done[0] += hi - lo
                        progress("merge", done[0], total)
            o += size


def merge(shards: Sequence, out, *, copy: bool = False, overwrite: bool = False,
          progress: Optional[Progress] = None) -> Path:
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
    slices that do not join up (the source changed between runs); without
    ``copy``, a shard outside ``out``'s folder (readers refuse virtual
    datasets that read outside it), or shards whose datasets differ in type.
    porder.output.Busy when another process writes ``out``;
    porder.output.DiskFull when the copy does not fit (nothing is left behind).
    """
    out = Path(out)
    check_output(out, overwrite=True)  # the folder, before locking in it
    with lock_output(out):             # before touching anything else
        return merge_locked(shards, out, copy=copy, overwrite=overwrite, progress=progress)


def merge_locked(shards: Sequence, out: Path, *, copy: bool, overwrite: bool,
                 progress: Optional[Progress], extra_attrs: Optional[dict] = None) -> Path:
    """:func:`merge`, for a caller that holds the lock of ``out``
    (:func:`porder.output.lock_output`); ``extra_attrs`` replace root attributes of the shards."""
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
    attrs = dict(ref.attrs, shard_index=0, shard_count=1, complete=False, **(extra_attrs or {}))
    created = sorted(str(s.attrs["created"]) for s in ordered if "created" in s.attrs)
    if created:
        attrs["created"] = created[0]
    if not copy:
        for s in ordered:  # refused before anything is written
            _relative(s.path, out.parent)
    tmp = partial_path(out)
    total = sum(s.splits[sp]["rows"] for s in ordered for sp in SPLITS)
    if copy:
        need = sum(int(np.prod(info[0], dtype=np.int64)) * info[1].itemsize
                   for s in ordered for sp in SPLITS for info in s.splits[sp]["datasets"].values())
        check_free_space(out.absolute().parent, need + 2**20, what=f"'{out}' ({total} images)")
    done = [0]
    space = None
    if copy and progress:
        progress("merge", 0, total)   # the start: rates count from here
    try:
        with h5py.File(tmp, "w") as f:  # ours to truncate: we hold the lock of out
            space = SpaceReserver(tmp, f"'{tmp}'") if copy else None
            for key, val in attrs.items():
                try:
                    f.attrs[key] = val
                except (TypeError, ValueError) as e:  # e.g. text that is not valid UTF-8
                    raise StoreError(f"cannot copy attribute {key!r} of '{ref.path}' into "
                                     f"'{tmp}': {one_line(e, first=True)}") from None
            f.create_dataset("classes", data=np.array(ref.classes, dtype=object),
                             dtype=h5py.string_dtype())
            for split in SPLITS:
                _write_split(f, split, ordered, out.parent, copy=copy, progress=progress,
                             done=done, total=total, space=space)
            f.attrs["complete"] = True  # last: a cut-off merge never looks finished
        durable_replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, DiskFull):
            raise DiskFull(f"{e}; the unfinished '{tmp}' was removed") from None
        if is_disk_full(e):
            raise DiskFull(f"disk full writing '{tmp}' (removed); the merge needs about "
                           f"{total} images' worth of space in '{out.parent}'") from None
        raise
    finally:
        if space is not None:
            space.close()
    return out


def missing_sources(path) -> list[str]:
    """Shard files a virtual (merged) porder file points at that cannot be found.

    An empty list for a standalone file or one whose shards are all in place.
    """
    with open_hdf5(path) as f, reading(path):
        return missing_virtual_sources(f, path)
