"""What a porder file must be: the one check every reader runs before it reads.

:func:`open_hdf5` opens a file only if it is a regular file, and
:func:`check_file` then checks, in time and memory bounded by the file's
header (plus, with ``contents=True``, one bounded pass over labels and
``perm``), everything porder's readers rely on. The first thing wrong becomes a
one-line :class:`StoreError` naming the file. ``porder inspect``, ``show``,
``train``, ``merge`` and ``--resume`` all come through here (via
:func:`porder.store.open_file` and the writer's resume).

Refused, because they make HDF5 read outside the file (or loop):

* external raw storage (a dataset whose bytes live in another file);
* soft and external links where porder's datasets and groups should be;
* virtual datasets other than porder's own merge layout: each source must be
  a relative path inside the merged file's folder (no ``..``, no absolute
  path, no ``%`` pattern), point at the same ``<split>/<name>`` dataset, and
  be itself a complete porder file that passes these checks (virtual sources
  nest at most :data:`MAX_VIRTUAL_DEPTH` deep).
"""
from __future__ import annotations

import operator
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from .messages import one_line

FORMAT = "porder"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
DATASETS = ("images", "labels", "perm", "names")   # required in every split
OPTIONAL = ("skipped",)
# Split attribute of a .part: [rows, consumed, skipped] of the last batch whose rows are
# all on disk (porder.store.Writer); a resume trusts it. Complete files and a .part made
# before it lack it.
COMMITTED = "committed"
MAX_SHARDS = 100_000
MAX_CLASSES = 1_000_000
MAX_ATTRS = 256
MAX_VIRTUAL_DEPTH = 2
MAX_PATCHES = 2**32        # K above this has no perm dtype
CHECK_BYTES = 32 * 2**20   # rows of labels + perm read per step by a contents check


class StoreError(ValueError):
    """A porder HDF5 file is missing, unreadable, incomplete or inconsistent."""


def perm_dtype(k: int) -> np.dtype:
    """The smallest unsigned dtype holding patch indices 0..k-1 (uint8/16/32);
    StoreError above 2**32 patches (no image is that large in practice)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if k - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise StoreError(f"{k} patches per image is more than porder stores (at most {MAX_PATCHES});"
                     f" use a larger --patch")


@dataclass
class Layout:
    """What :func:`check_file` found: the numbers every reader needs."""

    path: Path
    image_size: int
    patch: int
    k: int                  # patches per image
    classes: int
    complete: bool
    rows: dict = field(default_factory=dict)            # split -> rows readable
    virtual_sources: list = field(default_factory=list)  # relative shard file names


def _why(exc: BaseException) -> str:
    return one_line(exc, first=True, limit=200)


@contextmanager
def reading(path):
    """Turn what h5py and NumPy raise on a damaged file into one StoreError naming it."""
    try:
        yield
    except StoreError:
        raise
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, IndexError,
            AttributeError, OverflowError) as e:
        raise StoreError(f"cannot read '{path}': {_why(e)} (the file is damaged or "
                         f"not a porder file)") from None


def open_hdf5(path, mode: str = "r") -> h5py.File:
    """Open a regular file as HDF5 (``mode`` 'r' or 'r+'), one-line errors otherwise."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise StoreError(f"cannot read '{path}': {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise StoreError(f"'{path}' is {kind}; give a porder .h5 file")
    try:
        return h5py.File(path, mode)
    except (OSError, RuntimeError, ValueError) as e:
        raise StoreError(f"cannot read '{path}' as HDF5: {_why(e)}") from None


# Attributes


def _text(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.shape == () and v.dtype.kind in "SUO":
        return _text(v[()])
    return v


def _int(path, what: str, v, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise StoreError(f"'{path}': attribute {what} is {_text(v)!r}; expected an integer "
                         f"(the file was edited or damaged)")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise StoreError(f"'{path}': attribute {what} is {v}; expected {rng}")
    return v


def _flag(path, what: str, v) -> bool:
    """A boolean attribute: True/False (or 0/1); a string such as 'false' is refused."""
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
        return bool(v)
    raise StoreError(f"'{path}': attribute {what} is {_text(v)!r}; expected a boolean "
                     f"(the file was edited or damaged)")


def _attrs(obj, path, where: str) -> dict:
    """An object's attributes, refusing absurd counts."""
    if len(obj.attrs) > MAX_ATTRS:
        raise StoreError(f"'{path}': {where} has {len(obj.attrs)} attributes; a porder file "
                         f"has a few dozen")
    return {k: obj.attrs[k] for k in obj.attrs}


# Objects and storage


def _child(path, group, name: str, kind: type, where: str):
    """``group[name]`` if it is a hard-linked object of ``kind``; never follows other links."""
    try:
        link = group.get(name, getlink=True)
    except (KeyError, RuntimeError, OSError) as e:
        raise StoreError(f"'{path}': cannot read {where} ({_why(e)})") from None
    if link is None:
        raise StoreError(f"'{path}' has no {where}; it is not a complete porder file")
    if isinstance(link, h5py.SoftLink):
        raise StoreError(f"'{path}': {where} is a soft link (to {link.path!r}); porder files "
                         f"hold no links")
    if isinstance(link, h5py.ExternalLink):
        raise StoreError(f"'{path}': {where} is an external link to '{link.filename}'; porder "
                         f"refuses files that point outside themselves")
    obj = group[name]
    if not isinstance(obj, kind):
        want = "a dataset" if kind is h5py.Dataset else "a group"
        raise StoreError(f"'{path}': {where} is not {want}")
    return obj


def _check_storage(path, ds: h5py.Dataset, where: str, *, allow_virtual: bool) -> list:
    """Refuse external raw storage; return a virtual dataset's sources (else [])."""
    dcpl = ds.id.get_create_plist()
    if dcpl.get_external_count() > 0:
        name = _text(dcpl.get_external(0)[0])
        raise StoreError(f"'{path}': {where} keeps its data in external file {name!r}; porder "
                         f"refuses files that point outside themselves")
    if dcpl.get_layout() != h5py.h5d.VIRTUAL:
        return []
    if not allow_virtual:
        raise StoreError(f"'{path}': {where} is a virtual dataset, which this file may not hold")
    return list(ds.virtual_sources())


def _check_virtual(path: Path, sources, split: str, name: str) -> set[str]:
    """Porder's own merge layout only: relative files inside the folder, same dataset."""
    files = set()
    for m in sources:
        fname, dname = m.file_name, m.dset_name
        p = PurePosixPath(fname.replace("\\", "/"))
        if (fname in ("", ".") or p.is_absolute() or ".." in p.parts or "%" in fname
                or Path(fname).is_absolute()):
            raise StoreError(f"'{path}': {split}/{name} maps rows onto {fname!r}, which is not "
                             f"a file inside the folder of '{path.name}'; porder refuses virtual "
                             f"datasets that read outside that folder")
        if dname.lstrip("/") != f"{split}/{name}":
            raise StoreError(f"'{path}': {split}/{name} maps rows onto dataset {dname!r} of "
                             f"{fname!r}; porder's merged files map {split}/{name} onto the same "
                             f"dataset of each shard")
        files.add(fname)
    return files


# The check


def check_file(f: h5py.File, path, *, require_complete: bool = True, partial: bool = False,
               contents: bool = False, _depth: int = 0) -> Layout:
    """Check an open porder file; return its :class:`Layout`.

    Parameters
    ----------
    f : h5py.File
    path : path-like
        How messages name the file.
    require_complete : bool
        Refuse a file whose ``complete`` attribute is not True.
    partial : bool
        The file is an unfinished ``.part`` being resumed: datasets may hold
        rows beyond the committed count (the ``committed`` attribute of a
        split, else its ``rows``: a batch cut off mid-write), which are not
        checked.
    contents : bool
        Also read every label and ``perm`` row (in bounded chunks) and check
        that labels index the classes and each row is a permutation.

    Raises
    ------
    StoreError
        One line naming ``path`` and the first thing wrong.
    """
    path = Path(path)
    with reading(path):
        attrs = _attrs(f, path, "the root")
        if _text(attrs.get("format")) != FORMAT:
            raise StoreError(f"'{path}' is not a porder file (no format='porder' attribute)")
        version = _int(path, "format_version", attrs.get("format_version"), lo=1)
        if version > FORMAT_VERSION:
            raise StoreError(f"'{path}' has format_version {version}; this porder reads up to "
                             f"{FORMAT_VERSION}: upgrade porder")
        complete = _flag(path, "complete", attrs.get("complete", False))
        if require_complete and not complete:
            raise StoreError(f"'{path}' is incomplete (the run that wrote it did not finish)")
        for key in ("image_size", "patch", "measure"):
            if key not in attrs:
                raise StoreError(f"'{path}' has no {key} attribute; it is not a complete "
                                 f"porder file")
        size = _int(path, "image_size", attrs["image_size"], lo=1, hi=2**20)
        patch = _int(path, "patch", attrs["patch"], lo=1, hi=size)
        if size % patch:
            raise StoreError(f"'{path}': patch {patch} does not divide image_size {size}")
        if not isinstance(_text(attrs["measure"]), str):
            raise StoreError(f"'{path}': attribute measure is not a string")
        k = (size // patch) ** 2
        count = _int(path, "shard_count", attrs.get("shard_count", 1), lo=1, hi=MAX_SHARDS)
        _int(path, "shard_index", attrs.get("shard_index", 0), lo=0, hi=count - 1)

        classes = _child(path, f, "classes", h5py.Dataset, "/classes")
        _check_storage(path, classes, "/classes", allow_virtual=False)
        if classes.ndim != 1 or h5py.check_string_dtype(classes.dtype) is None:
            raise StoreError(f"'{path}': /classes is not a list of strings")
        n_classes = int(classes.shape[0])
        if not 1 <= n_classes <= MAX_CLASSES:
            raise StoreError(f"'{path}': /classes holds {n_classes} names; expected 1.."
                             f"{MAX_CLASSES}")
        layout = Layout(path, size, patch, k, n_classes, complete)
        shards: set[str] = set()
        for split in SPLITS:
            layout.rows[split] = _check_split(f, path, split, layout, partial, shards)
        layout.virtual_sources = sorted(shards)
        if shards:
            _check_shard_files(path, shards, _depth)
        if contents:
            for split in SPLITS:
                check_contents(f, layout, split)
    return layout


def _check_split(f, path, split: str, layout: Layout, partial: bool, shards: set) -> int:
    g = _child(path, f, split, h5py.Group, f"/{split}")
    gattrs = _attrs(g, path, f"/{split}")
    ds = {}
    for name in DATASETS + OPTIONAL:
        if name in OPTIONAL and g.get(name, getlink=True) is None:
            continue
        d = _child(path, g, name, h5py.Dataset, f"/{split}/{name}")
        sources = _check_storage(path, d, f"/{split}/{name}", allow_virtual=not partial)
        shards |= _check_virtual(path, sources, split, name)
        ds[name] = d
    images, labels, perm, names = (ds[n] for n in DATASETS)
    s, k = layout.image_size, layout.k
    where = f"'{path}': /{split}"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise StoreError(f"{where}/images is {images.dtype} {images.shape}; expected uint8 "
                         f"(N, {s}, {s}, 3) for image_size {s}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise StoreError(f"{where}/labels is {labels.dtype} {labels.shape}; expected integers (N,)")
    if perm.ndim != 2 or perm.dtype.kind not in "iu" or perm.shape[1] != k:
        raise StoreError(f"{where}/perm is {perm.dtype} {perm.shape}; expected integers (N, {k}) "
                         f"for patch {layout.patch} on {s}x{s} images")
    if np.iinfo(perm.dtype).max < k - 1:
        raise StoreError(f"{where}/perm is {perm.dtype}, too small for {k} patches per image "
                         f"(its values wrapped around): remake the file with this porder")
    for name in ("names",) + tuple(n for n in OPTIONAL if n in ds):
        if ds[name].ndim != 1 or h5py.check_string_dtype(ds[name].dtype) is None:
            raise StoreError(f"{where}/{name} is not a list of strings")
    n = int(labels.shape[0])
    if "rows" in gattrs:
        rows = _int(path, f"rows of /{split}", gattrs["rows"], lo=0)
    else:
        rows = n
    if COMMITTED in gattrs:
        done, _, skipped = committed_counts(path, split, gattrs[COMMITTED])
        if partial:  # what a resume keeps: `rows` may be ahead of it
            rows = done
            have = int(ds["skipped"].shape[0]) if "skipped" in ds else 0
            if have < skipped:
                raise StoreError(f"{where} has {have} skipped names but {skipped} recorded: "
                                 f"the file is damaged")
        elif done != rows:
            raise StoreError(f"{where} records {rows} rows but {done} committed: the file is "
                             f"damaged")
    for key in ("consumed", "first_sample", "last_sample"):
        if key in gattrs:
            _int(path, f"{key} of /{split}", gattrs[key], lo=0)
    if "first_sample" in gattrs and "last_sample" in gattrs \
            and int(gattrs["last_sample"]) < int(gattrs["first_sample"]):
        raise StoreError(f"'{path}': /{split} ends before it starts (last_sample < first_sample)")
    for name in DATASETS:
        have = int(ds[name].shape[0])
        if (have < rows) if partial else (have != rows):
            raise StoreError(f"{where} has {have} rows of {name} but {rows} "
                             f"{'rows recorded' if name == 'labels' else 'labels'}: the file "
                             f"is damaged")
    return rows


def committed_counts(path, split: str, value) -> tuple[int, int, int]:
    """A split's ``committed`` attribute as (rows, consumed, skipped), each >= 0."""
    v = np.asarray(value)
    if v.shape != (3,) or v.dtype.kind not in "iu" or (v < 0).any():
        raise StoreError(f"'{path}': attribute {COMMITTED} of /{split} is {_text(value)!r}; "
                         f"expected 3 counts (the file was edited or damaged)")
    return int(v[0]), int(v[1]), int(v[2])


def _check_shard_files(path: Path, shards: set, depth: int) -> None:
    if depth >= MAX_VIRTUAL_DEPTH:
        raise StoreError(f"'{path}': virtual datasets nest deeper than {MAX_VIRTUAL_DEPTH} "
                         f"files (a loop?); merge with --copy")
    missing = [s for s in sorted(shards) if not (path.parent / s).exists()]
    if missing:
        raise StoreError(f"'{path}' is a merged file whose shard files are missing: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (keep the"
                         f" shards beside it, or merge with --copy)")
    for s in sorted(shards):
        src = path.parent / s
        try:
            same = os.path.samefile(src, path)
        except OSError:
            same = False
        if same:
            raise StoreError(f"'{path}': its virtual datasets read from the file itself")
        try:
            with open_hdf5(src) as sf:
                check_file(sf, src, _depth=depth + 1)
        except StoreError as e:
            raise StoreError(f"'{path}' reads rows from shard file {s!r}, which is refused: "
                             f"{e}") from None


# Rows


def check_rows(path, split: str, start: int, labels=None, perm=None, *, classes: int,
               k: int) -> None:
    """Check rows ``start, start+1, ...`` read from a split: labels index the
    classes, and each ``perm`` row (B, K) is a permutation of 0..K-1.

    Raises
    ------
    StoreError
        Naming the file, the split and the first bad row.
    """
    if labels is not None and len(labels):
        labels = np.asarray(labels)
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if bad.size:
            i = int(bad[0])
            raise StoreError(f"'{path}': label {int(labels[i])} of /{split} row {start + i} is "
                             f"outside 0..{classes - 1} (the file has {classes} classes)")
    if perm is not None and len(perm):
        step = max(1, (16 * 2**20) // max(1, 8 * k))  # bounded temporaries
        for lo in range(0, len(perm), step):
            rows = np.asarray(perm[lo:lo + step])                         # (b, K)
            out_of_range = (rows < 0) | (rows >= k)
            if out_of_range.any():
                bad = np.flatnonzero(out_of_range.any(axis=1))
            else:  # K values in 0..K-1 are a permutation iff every one occurs
                seen = np.zeros(rows.shape, dtype=bool)                   # (b, K)
                seen[np.arange(len(rows))[:, None], rows] = True
                bad = np.flatnonzero(~seen.all(axis=1))
            if bad.size:
                raise StoreError(f"'{path}': /{split}/perm row {start + lo + int(bad[0])} is "
                                 f"not a permutation of 0..{k - 1} (the file is damaged)")


def check_perm_row(path, split: str, row: int, perm, *, k: int) -> None:
    """:func:`check_rows` for one ``perm`` row (K,), about 4x faster: the per-item
    check of lazy readers (:class:`porder.data.PorderDataset`).

    K values whose sorted order starts at 0, ends at K-1 and never repeats are
    exactly a permutation of 0..K-1.

    Raises
    ------
    StoreError
        The message of :func:`check_rows`, naming the file, the split and ``row``.
    """
    s = np.sort(perm)                                                     # (K,)
    if s.shape != (k,) or s[0] != 0 or s[-1] != k - 1 or (s[1:] == s[:-1]).any():
        raise StoreError(f"'{path}': /{split}/perm row {row} is not a permutation of "
                         f"0..{k - 1} (the file is damaged)")


def whole(name: str, value, *, lo: int | None = None, hint: str = "") -> int:
    """An integer argument of a reader, as an int; ValueError (one line) for a bool,
    a float such as 1.5 or anything else that is not an integer, or a value below ``lo``.

    ``hint`` ends the message for a value below ``lo``.
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be at least {lo}{hint}, got {v}")
    return v


def check_contents(f: h5py.File, layout: Layout, split: str) -> None:
    """Read a split's labels and ``perm`` in bounded chunks and :func:`check_rows` them."""
    g = f[split]
    n = layout.rows[split]
    step = max(1, CHECK_BYTES // (8 * (layout.k + 1)))
    with reading(layout.path):
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            check_rows(layout.path, split, lo, g["labels"][lo:hi], g["perm"][lo:hi],
                       classes=layout.classes, k=layout.k)
