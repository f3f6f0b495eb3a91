"""Export a porder cache for other stacks: an image folder of PNGs, or NumPy ``.npz``.

``imagefolder``: ``OUT/<split>/<class>/<index>.png``, the layout read by
torchvision's ``ImageFolder``, Keras' ``image_dataset_from_directory``,
Hugging Face ``datasets``' ``imagefolder`` loader and FFCV's writers (through
any of those). ``<index>`` is the row of the image in the split, zero-padded so
that names sort in row order; class folders are the class names made safe for
any file system. ``npz``: ``OUT/<split>.npz`` with ``images`` uint8 (N, S, S,
3), ``labels`` int64 (N,), ``perm`` int64 (N, K), ``names`` (N,), ``classes``
and ``restored``, readable with ``numpy.load`` (no pickle).

Both write ``OUT/porder-export.json`` (what was exported, from which file, the
class folders, the file's options). The whole folder is built under a temporary
name beside ``OUT`` and renamed at the end, so ``OUT`` is either absent or
complete. ``restore=True`` exports the original images (recovered through
``perm``) instead of the reordered ones.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import __version__
from .patches import restore_images
from .store import SPLITS, iter_split, read_meta, to_json

FORMATS = ("imagefolder", "npz")
MANIFEST = "porder-export.json"
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


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that cannot or must not be written."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output '{out}' is a file; give a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"output folder '{out}' exists and is not empty; pass --overwrite "
                              "(overwrite=True) to replace it, or choose a new folder")
        if not (out / MANIFEST).is_file():
            raise ExportError(f"output folder '{out}' is not empty and holds no {MANIFEST}, so it "
                              "is not a porder export; refusing to replace it: choose a new or "
                              "empty folder")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ExportError(f"cannot write '{out}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write '{out}': folder '{parent}' is not writable")


def _sibling(out: Path, tag: str) -> Path:
    """A fresh hidden name beside ``out`` (same file system, so renames are atomic)."""
    return out.absolute().parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.{tag}"


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out`` (replacing an empty folder or an
    earlier export)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    old = _sibling(out, "old")
    os.rename(out, old)     # the earlier export steps aside, the new one takes its name
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _rows(cache, split: str, restore: bool, patch: int):
    """(lo, images, labels, perm, names) chunks of a split; images restored when asked."""
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

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for lo, imgs, labels, _, _ in _rows(cache, split, restore, patch):
            jobs = []
            for j, y in enumerate(labels.tolist()):
                if not 0 <= y < len(folders):
                    raise ExportError(f"'{cache}' {split} row {lo + j} has label {y}, outside "
                                      f"0..{len(folders) - 1}; the file is inconsistent")
                if y not in made:
                    (root / folders[y]).mkdir()
                    made.add(y)
                jobs.append((root / folders[y] / f"{lo + j:0{width}d}.png", imgs[j]))
            list(pool.map(save, jobs))   # PNG encoding releases the GIL: all cores
            if progress:
                progress(split, lo + len(labels), n)


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
        earlier porder export (it holds ``porder-export.json``).
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
        Replace an earlier export at ``out_dir``.
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
        incomplete cache, an output that exists or cannot be written.
    """
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
    classes = list(meta["classes"])
    folders = folder_names(classes)
    patch, size = int(meta["patch"]), int(meta["image_size"])
    tmp = _sibling(out, "part")
    tmp.mkdir()
    try:
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
        manifest = {"format": format, "source": str(cache_path), "restored": bool(restore),
                    "splits": {s: int(meta["splits"][s]) for s in splits}, "classes": classes,
                    "porder_version": __version__, "options": options}
        if format == "imagefolder":
            manifest["folders"] = folders
        (tmp / MANIFEST).write_text(to_json(manifest) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(out_dir) -> dict:
    """The ``porder-export.json`` of an export folder."""
    return json.loads((Path(out_dir) / MANIFEST).read_text())
