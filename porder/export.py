"""Export a porder cache for other stacks: an image folder of PNGs, or NumPy ``.npz``.

``imagefolder``: ``OUT/<split>/<class>/<index>.png``, the layout read by
torchvision's ``ImageFolder``, Keras' ``image_dataset_from_directory``,
Hugging Face ``datasets``' ``imagefolder`` loader and FFCV's writers (through
any of those). ``<index>`` is the row of the image in the split, zero-padded so
that names sort in row order; class folders are the class names made safe for
any file system. ``npz``: ``OUT/<split>.npz`` with ``images`` uint8 (N, S, S,
3), ``labels`` int64 (N,), ``perm`` int64 (N, K), ``names`` (N,), ``classes``
and ``restored``, readable with ``numpy.load`` (no pickle).

Both write ``OUT/porder-export.json``, the export's record: what was exported,
from which file (its path, size and digest), the class folders, the file's
options, and every folder and file the export wrote (with its size). The whole
folder is built under a temporary name beside ``OUT`` and renamed at the end, so
``OUT`` is either absent or complete. ``restore=True`` exports the original
images (recovered through ``perm``) instead of the reordered ones.

``overwrite=True`` replaces an earlier export and removes only what porder
wrote: ``OUT`` must hold a valid record and exactly the files it lists, at
their recorded sizes. Anything else in ``OUT`` (a file of the user's, in the
folder or inside a class folder, a changed file, a link) makes it refuse, with
a line naming those entries; it is checked again just before the earlier
export is removed, and that removal unlinks the listed names only. An ``OUT``
that is a symbolic link is written where the link points (the link is kept).
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import numpy as np

from ._version import __version__
from .patches import restore_images
from .sources.base import SPLITS, printable
from .sources.identity import source_identity

# porder.store (h5py) is imported where a cache is read, so that `porder --help`
# and `porder export --help` load neither h5py nor the cache reader.

FORMATS = ("imagefolder", "npz")
MANIFEST = "porder-export.json"
RECORD = "porder-export"    # the record's "record" key: what marks porder's own exports
RECORD_VERSION = 1
MAX_RECORD_BYTES = 2**28    # a record lists every file: ~50 bytes each, 5 million files
SHOWN = 3                   # names a refusal lists (then a count)
_PNG = re.compile(r"[0-9]+\.png")
CHUNK_ROWS = 4096           # images read (and held) at once
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')   # not allowed in a name on some system
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
             *(f"lpt{i}" for i in range(1, 10))}     # Windows device names


class ExportError(ValueError):
    """An export that cannot or must not be written."""


def folder_name(name) -> str:
    """A class name made safe as a folder name on Linux, macOS and Windows.

    Path separators, control characters and ``<>:"|?*`` become ``_``; leading
    and trailing spaces and trailing dots are dropped; ``''``, ``.`` and
    ``..`` become ``_``; Windows device names (``con``, ``nul``, ...) get a
    trailing ``_``; at most 200 bytes of UTF-8.
    """
    s = _UNSAFE.sub("_", str(name)).strip().rstrip(". ")
    s = s.encode()[:200].decode(errors="ignore").rstrip(". ")
    if s in ("", ".", ".."):
        s = "_"
    if s.split(".")[0].lower() in _RESERVED:
        s += "_"
    return s


def folder_names(classes) -> list[str]:
    """Folder name of each class (index = label), unique even on case-insensitive
    file systems: names that collide get ``_<label>`` appended."""
    names = [folder_name(c) for c in classes]
    seen: dict[str, int] = {}
    for n in names:
        seen[n.casefold()] = seen.get(n.casefold(), 0) + 1
    return [f"{n}_{i}" if seen[n.casefold()] > 1 else n for i, n in enumerate(names)]


def _show(path) -> str:
    """A path or name as a refusal prints it: one line, control characters escaped."""
    return printable(str(path))


def _some(names: list[str], total: int | None = None) -> str:
    """The first :data:`SHOWN` names, quoted, and how many more."""
    total = len(names) if total is None else total
    shown = ", ".join(f"'{_show(n)}'" for n in names[:SHOWN])
    return shown + (f" and {total - SHOWN} more" if total > SHOWN else "")


def _holds(folder: Path) -> str:
    """What a folder holds at its top, besides a record: for a refusal."""
    with os.scandir(folder) as it:
        names = sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "")
                       for e in it if e.name != MANIFEST)
    return f"it holds {_some(names)}" if names else f"it holds only a {MANIFEST}"


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _safe_folder(f) -> bool:
    """A class folder name a record may list: one path component, nothing special."""
    return isinstance(f, str) and f not in ("", ".", "..") and not _UNSAFE.search(f)


def _record_problem(rec) -> str | None:
    """Why ``rec`` (a parsed record) is not one porder writes, or None.

    Beyond the types, what it lists must be what an export of its format,
    splits and class folders writes (``split/folder/123.png`` or ``split.npz``,
    as many images as each split's count): a record that lists anything else
    never makes porder remove it.
    """
    if not isinstance(rec, dict):
        return "not a JSON object"
    if rec.get("record") != RECORD:
        return f'no "record": "{RECORD}"'
    version = rec.get("record_version")
    if not _count(version) or version < 1:
        return "no valid record_version"
    if version > RECORD_VERSION:
        return (f"record_version {version}, newer than this porder's {RECORD_VERSION}: "
                f"replace it with the porder that wrote it")
    fmt, splits, cache = rec.get("format"), rec.get("splits"), rec.get("cache")
    files, dirs = rec.get("files"), rec.get("dirs")
    if fmt not in FORMATS:
        return f"format {fmt!r} is not one of {', '.join(FORMATS)}"
    if not (isinstance(splits, dict) and splits
            and all(k in SPLITS and _count(v) for k, v in splits.items())):
        return "no valid splits"
    if not (isinstance(cache, dict) and isinstance(cache.get("path"), str)
            and _count(cache.get("bytes")) and isinstance(cache.get("digest"), str)):
        return "no valid identity of the cache it was exported from"
    if not (isinstance(files, dict) and all(_count(v) for v in files.values())):
        return "no valid list of the files it wrote"
    if not (isinstance(dirs, list) and all(isinstance(d, str) for d in dirs)):
        return "no valid list of the folders it wrote"
    if fmt == "imagefolder":
        folders = rec.get("folders")
        if not (isinstance(folders, list) and all(_safe_folder(f) for f in folders)
                and len({f.casefold() for f in folders}) == len(folders)):
            return "no valid class folders"
        allowed = set(splits) | {f"{s}/{f}" for s in splits for f in folders}
        known = set(folders)
        per = dict.fromkeys(splits, 0)
        for name in files:
            parts = name.split("/")
            if not (len(parts) == 3 and parts[0] in per and parts[1] in known
                    and _PNG.fullmatch(parts[2])):
                return f"it lists '{_show(name)}', which an export never writes"
            per[parts[0]] += 1
        if per != splits:
            return f"it lists {per} images per split, not {splits}"
    else:
        allowed = set()
        if set(files) != {f"{s}.npz" for s in splits}:
            return f"it lists {_some(sorted(files))}, not one .npz per split"
    odd = [d for d in dirs if d not in allowed]
    if odd:
        return f"it lists folder '{_show(odd[0])}', which an export never writes"
    return None


def _read_record(folder: Path) -> tuple[dict | None, str]:
    """(record, "") of the earlier export in ``folder``, or (None, why not)."""
    path = folder / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, ""
    if not stat.S_ISREG(st.st_mode):
        return None, f"its {MANIFEST} is not a regular file"
    if st.st_size > MAX_RECORD_BYTES:
        return None, f"its {MANIFEST} is larger than any record porder writes"
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):   # swapped since the lstat
            return None, f"its {MANIFEST} is not a regular file"
        data = fh.read(MAX_RECORD_BYTES + 1)
    try:
        rec = json.loads(data)
    except (ValueError, RecursionError):     # not UTF-8, not JSON, nested too deep
        return None, f"its {MANIFEST} is not JSON"
    why = _record_problem(rec)
    return (None, f"its {MANIFEST} is not an export record: {why}") if why else (rec, "")


def _unexpected(folder: Path, files: dict, dirs: set) -> list[str]:
    """Entries under ``folder`` that the record does not list as written by porder
    (sorted; an unlisted folder is one entry, not descended): unlisted names,
    links, anything not a regular file, and listed files whose size changed."""
    odd: list[str] = []

    def walk(d: str, prefix: str) -> None:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = prefix + e.name
            if e.is_dir(follow_symlinks=False):
                if rel in dirs:
                    walk(e.path, rel + "/")
                else:
                    odd.append(rel + "/")
            elif rel == MANIFEST:
                continue
            elif not e.is_file(follow_symlinks=False) or rel not in files:
                odd.append(rel)
            elif e.stat(follow_symlinks=False).st_size != files[rel]:
                odd.append(f"{rel} (changed since it was exported)")

    walk(str(folder), "")
    return odd


def _earlier_export(folder: Path, out) -> tuple[dict, set]:
    """(files, folders) that the earlier export in ``folder`` wrote, after checking
    that ``folder`` holds nothing else; ``ExportError`` naming what is not porder's
    otherwise. ``out`` is the name the user gave (for the message)."""
    rec, why = _read_record(folder)
    if rec is None:
        if not why:
            raise ExportError(f"output folder '{_show(out)}' is not empty and holds no "
                              f"{MANIFEST}, so it is not a porder export; refusing to replace "
                              f"it ({_holds(folder)}): choose a new or empty folder")
        raise ExportError(f"output folder '{_show(out)}' is not a porder export ({why}); "
                          f"refusing to replace it ({_holds(folder)}): choose a new or empty "
                          f"folder")
    files, dirs = rec["files"], set(rec["dirs"])
    odd = _unexpected(folder, files, dirs)
    if odd:
        n = len(odd)
        raise ExportError(f"output folder '{_show(out)}' holds {n} "
                          f"{'entry' if n == 1 else 'entries'} that the earlier export did not "
                          f"write ({_some(odd)}); refusing to replace it, which would delete "
                          f"{'it' if n == 1 else 'them'}: move {'it' if n == 1 else 'them'} "
                          f"out, or choose a new folder")
    return files, dirs


def _target(out: Path) -> Path:
    """Where ``out`` is written: where it points, if it is a symbolic link."""
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that cannot or must not be written."""
    target = _target(out)
    if target.exists() and not target.is_dir():
        raise ExportError(f"output '{_show(out)}' is a file; give a folder name")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ExportError(f"output folder '{_show(out)}' exists and is not empty; pass "
                              "--overwrite (overwrite=True) to replace it, or choose a new "
                              "folder")
        _earlier_export(target, out)
    parent = target.absolute().parent
    if not parent.is_dir():
        raise ExportError(f"cannot write '{_show(out)}': folder '{_show(parent)}' does not "
                          "exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write '{_show(out)}': folder '{_show(parent)}' is not "
                          "writable")


def _sibling(out: Path, tag: str) -> Path:
    """A fresh hidden name beside ``out`` (same file system, so renames are atomic)."""
    return out.absolute().parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.{tag}"


def _listing(root: Path) -> tuple[list[str], dict[str, int]]:
    """(folders, {file: size}) under ``root``, as '/'-separated relative names (the
    record left out): what an export wrote, for its record."""
    dirs: list[str] = []
    files: dict[str, int] = {}

    def walk(d: str, prefix: str) -> None:
        with os.scandir(d) as it:
            for e in it:
                rel = prefix + e.name
                if e.is_dir(follow_symlinks=False):
                    dirs.append(rel)
                    walk(e.path, rel + "/")
                elif rel != MANIFEST:
                    files[rel] = e.stat(follow_symlinks=False).st_size

    walk(str(root), "")
    return sorted(dirs), dict(sorted(files.items()))


def _remove_listed(folder: Path, files: dict, dirs: set) -> None:
    """Remove the files and folders an earlier export's record lists, then ``folder``.

    Nothing else: every entry is opened relative to its folder's descriptor and
    never through a symbolic link, so nothing outside ``folder`` is reached, and
    a folder that holds anything unlisted is kept (``OSError`` at the end).
    """
    def clear(fd: int, prefix: str) -> None:
        for name in os.listdir(fd):
            rel = prefix + name
            if rel in dirs:
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError:      # not a folder (any more): kept
                    continue
                try:
                    clear(sub, rel + "/")
                finally:
                    os.close(sub)
                with suppress(OSError):   # it holds something unlisted: kept
                    os.rmdir(name, dir_fd=fd)
            elif rel in files or rel == MANIFEST:
                with suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                    os.unlink(name, dir_fd=fd)

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        clear(fd, "")
    finally:
        os.close(fd)
    os.rmdir(folder)


def _drop_earlier(old: Path, files: dict, dirs: set, out) -> None:
    """Remove the earlier export moved aside to ``old``; an interrupt waits for the end."""
    try:
        try:
            _remove_listed(old, files, dirs)
        except KeyboardInterrupt:
            _remove_listed(old, files, dirs)     # never leave it half removed
            raise
    except OSError as e:
        raise ExportError(f"wrote '{_show(out)}', but the earlier export, moved aside to "
                          f"'{_show(old)}', could not be removed entirely ({e.strerror or e}): "
                          f"entries were added to it while it was replaced; look at them and "
                          f"remove that folder yourself") from None


def _publish(tmp: Path, target: Path, out, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``target`` (absent, an empty folder, or,
    with ``overwrite``, an earlier export, checked again and removed by its record)."""
    try:
        os.rename(tmp, target)     # absent, or an empty folder: replaced in one step
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not overwrite:              # filled while the export was written
        raise ExportError(f"output folder '{_show(out)}' exists and is not empty; pass "
                          "--overwrite (overwrite=True) to replace it, or choose a new folder")
    old = _sibling(target, "old")
    os.rename(target, old)         # the earlier export steps aside, under a name no one uses
    files: dict = {}
    dirs: set = set()
    try:
        files, dirs = _earlier_export(old, out)   # again: nothing was added meanwhile
        os.rename(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):   # the new export did not take the name: the old one does
            os.rename(old, target)
            raise
        _drop_earlier(old, files, dirs, out)    # interrupted just after the rename
        raise
    _drop_earlier(old, files, dirs, out)


def _rows(cache, split: str, restore: bool, patch: int):
    """(lo, images, labels, perm, names) chunks of a split; images restored when asked."""
    from .store import iter_split

    for lo, c in iter_split(cache, split, rows=CHUNK_ROWS, names=True):
        imgs = restore_images(c["images"], c["perm"], patch) if restore else c["images"]
        yield lo, imgs, c["labels"], c["perm"], c["names"]


def _write_imagefolder(cache, split, n, root: Path, folders, *, restore, patch, workers,
                       progress) -> None:
    from PIL import Image

    width = len(str(max(n - 1, 0)))
    root.mkdir()
    made: set[int] = set()

    def save(item):
        path, img = item
        Image.fromarray(img).save(path, format="PNG")

    pool = ThreadPoolExecutor(workers or os.cpu_count() or 1)
    try:
        for lo, imgs, labels, _, _ in _rows(cache, split, restore, patch):
            jobs = []
            for j, y in enumerate(labels.tolist()):
                if not 0 <= y < len(folders):
                    raise ExportError(f"'{_show(cache)}' {split} row {lo + j} has label {y}, outside "
                                      f"0..{len(folders) - 1}; the file is inconsistent")
                if y not in made:
                    (root / folders[y]).mkdir()
                    made.add(y)
                jobs.append((root / folders[y] / f"{lo + j:0{width}d}.png", imgs[j]))
            list(pool.map(save, jobs))   # PNG encoding releases the GIL: all cores
            if progress:
                progress(split, lo + len(labels), n)
    finally:
        # On an error or an interrupt, queued images are dropped and those being
        # saved finish, so that nothing is written into the folder once it is removed.
        pool.shutdown(wait=True, cancel_futures=True)


def _npy_into(z: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with z.open(name, "w", force_zip64=True) as fp:
        np.lib.format.write_array(fp, np.asarray(arr), allow_pickle=False)


def _write_npz(cache, split, n, path: Path, classes, *, restore, patch, size, progress) -> None:
    """Stream a split into ``path`` (.npz): memory is bounded by one chunk of images."""
    labels, perms, names = [], [], []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("images.npy", "w", force_zip64=True) as fp:
            np.lib.format.write_array_header_1_0(fp, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False, "shape": (n, size, size, 3)})
            for lo, imgs, y, perm, nm in _rows(cache, split, restore, patch):
                fp.write(np.ascontiguousarray(imgs, dtype=np.uint8).data)
                labels.append(y)
                perms.append(perm)
                names.extend(nm)
                if progress:
                    progress(split, lo + len(y), n)
        k = (size // patch) ** 2
        _npy_into(z, "labels.npy", np.concatenate(labels) if labels else np.zeros(0, np.int64))
        _npy_into(z, "perm.npy", np.concatenate(perms) if perms else np.zeros((0, k), np.int64))
        _npy_into(z, "names.npy", np.asarray(names, dtype=str))
        _npy_into(z, "classes.npy", np.asarray(classes, dtype=str))
        _npy_into(z, "restored.npy", np.bool_(restore))


def export(cache_path, out_dir, *, format: str = "imagefolder", split: str | None = None,
           restore: bool = False, overwrite: bool = False, workers: int | None = None,
           progress=None) -> Path:
    """Write a porder cache as an image folder of PNGs or as NumPy ``.npz`` files.

    Parameters
    ----------
    cache_path : path-like
        A complete porder HDF5 file.
    out_dir : path-like
        The folder to create. Its parent must exist. An existing empty folder is
        used; a non-empty one is refused unless ``overwrite`` and it is an
        earlier porder export: a valid ``porder-export.json`` record and exactly
        the files it lists. A symbolic link is written where it points.
    format : {'imagefolder', 'npz'}
        'imagefolder': ``out_dir/<split>/<class>/<index>.png``; 'npz':
        ``out_dir/<split>.npz`` with images, labels, perm, names, classes and
        restored (see the module docstring).
    split : {'train', 'test'}, optional
        One split; default every split of the file.
    restore : bool
        Export the original images (recovered through ``perm``), not the
        reordered ones.
    overwrite : bool
        Replace an earlier export at ``out_dir``. Only the files and folders its
        record lists are removed; anything else there makes it refuse, naming it.
    workers : int, optional
        Threads encoding PNGs (default: all cores).
    progress : callable, optional
        ``progress(split, done, total)`` after each chunk of images.

    Returns
    -------
    Path
        ``out_dir``, complete.

    Raises
    ------
    ValueError
        (``ExportError`` or ``StoreError``) A bad format or split, a missing or
        incomplete cache, an output that exists or cannot be written, an output
        folder that holds anything an earlier export did not write.
    OSError
        The output cannot be written (disk full, permissions).
    """
    from .store import read_meta, to_json

    if format not in FORMATS:
        raise ExportError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise ExportError(f"split={split!r} is not one of {', '.join(SPLITS)} (or None for all)")
    meta = read_meta(cache_path)
    if split is not None and split not in meta["splits"]:
        raise ExportError(f"'{cache_path}' has no split {split!r}")
    splits = [split] if split is not None else [s for s in SPLITS if s in meta["splits"]]
    out = Path(out_dir)
    _check_target(out, overwrite)
    target = _target(out)
    classes = list(meta["classes"])
    folders = folder_names(classes)
    patch, size = int(meta["patch"]), int(meta["image_size"])
    source = Path(cache_path).absolute()
    identity = source_identity(str(source))
    cache = {"path": str(source), "bytes": identity["source_bytes"],
             "digest": identity["source_digest"]}
    tmp = _sibling(target, "part")
    try:
        tmp.mkdir()
        for s in splits:
            n = int(meta["splits"][s])
            if progress:
                progress(s, 0, n)
            if format == "imagefolder":
                _write_imagefolder(cache_path, s, n, tmp / s, folders, restore=restore,
                                   patch=patch, workers=workers, progress=progress)
            else:
                _write_npz(cache_path, s, n, tmp / f"{s}.npz", classes, restore=restore,
                           patch=patch, size=size, progress=progress)
        options = {k: v for k, v in meta.items() if k not in ("classes", "splits", "skipped")}
        dirs, files = _listing(tmp)
        manifest = {"record": RECORD, "record_version": RECORD_VERSION, "format": format,
                    "source": str(cache_path), "cache": cache, "restored": bool(restore),
                    "splits": {s: int(meta["splits"][s]) for s in splits}, "classes": classes,
                    "porder_version": __version__, "options": options,
                    "dirs": dirs, "files": files}
        if format == "imagefolder":
            manifest["folders"] = folders
        (tmp / MANIFEST).write_text(to_json(manifest) + "\n")
        _publish(tmp, target, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(out_dir) -> dict:
    """The ``porder-export.json`` of an export folder."""
    return json.loads((Path(out_dir) / MANIFEST).read_text())
