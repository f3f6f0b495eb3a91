"""CIFAR-10 / CIFAR-100, python version: the extracted folder or the archive.

Hostile files are expected. Pickles are read by :mod:`.pickles`, which
interprets the opcodes itself and builds only plain data and integer NumPy
arrays: no class is imported and no code runs. Sizes are checked before
anything is read: a pickle file may hold at most :data:`MAX_FILE_BYTES`, an
archive is read as one stream that may expand to at most
:data:`MAX_ARCHIVE_BYTES` and hold at most :data:`MAX_ARCHIVE_MEMBERS` entries,
and a member's declared size is checked before it is read. The whole dataset
is held in memory as the original (N, 3072) channel-planar rows and resized
per batch.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zlib
from pathlib import Path

import numpy as np

from ..messages import one_line
from .base import Batch, Source, SourceError, open_regular, printable, stored_name
from .pickles import PickleError, load_cifar_pickle
from .pillow import resize_images

# One CIFAR pickle: CIFAR-100's `train`, the largest, is 150 MiB (50,000 x 3,072 bytes
# plus labels and file names).
MAX_FILE_BYTES = 192 * 2**20
# An archive once decompressed: both official archives expand to about 180 MiB.
MAX_ARCHIVE_BYTES = 384 * 2**20
# Entries of an archive: the official ones hold 8 (CIFAR-10) and 5 (CIFAR-100).
MAX_ARCHIVE_MEMBERS = 1000


class _CifarSource(Source):
    """CIFAR-10/100 held in memory as the original (N, 3072) channel-planar rows."""

    def __init__(self, kind, description, classes, size, data, labels, parts):
        super().__init__(kind, description, classes, size, None)
        self._data = data  # split -> (N, 3072) uint8
        self._labels = labels  # split -> (N,) int64
        self._parts = parts  # split -> (names of the pickle files, their first rows)

    def _count(self, split):
        return len(self._labels[split])

    def _read(self, split, lo, hi):
        rows = self._data[split][lo:hi]  # (B, 3072)
        images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        files, firsts = self._parts[split]
        part = np.searchsorted(firsts, np.arange(lo, hi), side="right") - 1  # (B,)
        names = [f"{files[p]}#{i - firsts[p]}" for i, p in zip(range(lo, hi), part, strict=True)]
        return Batch(resize_images(images, self.image_size),
                     self._labels[split][lo:hi].copy(), names)


# --------------------------------------------------------------------------
# CIFAR


def _cifar_pickle(raw: bytes, where: str) -> dict:
    """Read one CIFAR pickle; keys are normalised to str ('data', 'labels', ...)."""
    try:
        obj = load_cifar_pickle(raw)
    except PickleError as exc:
        raise SourceError(f"cannot read CIFAR pickle '{where}': {one_line(exc)}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"CIFAR pickle '{where}' holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_names(meta: dict, key: str, where: str) -> list[str]:
    """Class names; bytes that are not UTF-8 are stored as ``\\xNN`` (see ``stored_name``)."""
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not names:
        raise SourceError(f"CIFAR meta file '{where}' has no {key!r} list")
    if not all(isinstance(n, (bytes, str)) for n in names):
        raise SourceError(f"CIFAR meta file '{where}': {key!r} must be a list of strings")
    return [stored_name(n) for n in names]


def _cifar_labels(labels, n_classes: int, key: str, where: str) -> np.ndarray:
    """A list of ints (or an integer array) in 0..n_classes-1 -> (N,) int64."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise SourceError(f"CIFAR pickle '{where}': {key!r} has shape {labels.shape}, "
                              f"expected (N,)")
        values = labels
        low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    else:
        if not isinstance(labels, (list, tuple)) or not all(type(v) is int for v in labels):
            raise SourceError(f"CIFAR pickle '{where}': {key!r} is not a list of integers")
        values = labels
        low, high = (min(labels), max(labels)) if labels else (0, 0)
    if low < 0 or high >= n_classes:
        raise SourceError(f"CIFAR pickle '{where}': {key!r} outside 0..{n_classes - 1}")
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _cifar_part(obj: dict, key: str, n_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one pickle -> data (N, 3072) uint8, labels (N,) int64."""
    data, labels = obj.get("data"), obj.get(key)
    if data is None or labels is None:
        missing = "data" if data is None else key
        raise SourceError(f"CIFAR pickle '{where}' has no {missing!r} entry")
    if not isinstance(data, np.ndarray):
        raise SourceError(f"CIFAR pickle '{where}': 'data' is a {type(data).__name__}, "
                          f"not a NumPy array")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise SourceError(f"CIFAR pickle '{where}': 'data' has shape {data.shape}, "
                          f"expected (N, 3072)")
    if data.dtype != np.uint8:  # the reader builds integer arrays only
        if data.size and (data.min() < 0 or data.max() > 255):
            raise SourceError(f"CIFAR pickle '{where}': 'data' must hold 8-bit values, "
                              f"got dtype {data.dtype}")
        data = data.astype(np.uint8)
    labels = _cifar_labels(labels, n_classes, key, where)
    if len(labels) != len(data):
        raise SourceError(f"CIFAR pickle '{where}': {len(labels)} {key!r} for "
                          f"{len(data)} images")
    return data, labels


_CIFAR_LAYOUT = {
    # kind: (meta file, train files, test files)
    "cifar10": ("batches.meta", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("meta", ["train"], ["test"]),
}


def cifar_kind(names: set[str]) -> str | None:
    """Which CIFAR layout a set of file names looks like, if any."""
    if "batches.meta" in names or any(n.startswith("data_batch_") for n in names):
        return "cifar10"
    if "meta" in names and ("train" in names or "test" in names):
        return "cifar100"
    return None


def _open_cifar(kind: str, description: str, where: str, prefix: str, files: dict[str, dict],
                label: str, size: int) -> _CifarSource:
    """Build a CIFAR source from its files, each already read (name -> :func:`_cifar_pickle`).

    ``where`` names the folder or archive in messages; ``prefix`` is the folder
    part of sample names (``cifar-10-batches-py``).
    """
    meta_file, train_files, test_files = _CIFAR_LAYOUT[kind]
    missing = [f for f in [meta_file, *train_files, *test_files] if f not in files]
    if missing:
        raise SourceError(f"{kind.upper().replace('CIFAR', 'CIFAR-')} source '{where}' is "
                          f"missing {', '.join(missing)}")
    if label == "coarse" and kind == "cifar10":
        raise SourceError(f"label='coarse' needs CIFAR-100, but '{where}' is CIFAR-10; "
                          f"use label='fine'")
    if kind == "cifar10":
        names_key, labels_key = "label_names", "labels"
    else:
        names_key, labels_key = f"{label}_label_names", f"{label}_labels"
    classes = _cifar_names(files[meta_file], names_key, f"{where}/{meta_file}")
    data, labels, parts = {}, {}, {}
    for split, split_files in (("train", train_files), ("test", test_files)):
        arrays, label_arrays, firsts, first = [], [], [], 0
        for name in split_files:
            d, lab = _cifar_part(files.pop(name), labels_key, len(classes), f"{where}/{name}")
            arrays.append(d)
            label_arrays.append(lab)
            firsts.append(first)
            first += len(d)
        data[split] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        labels[split] = np.concatenate(label_arrays)
        part_names = [f"{prefix}/{f}" if prefix else f for f in split_files]
        parts[split] = (part_names, np.asarray(firsts, dtype=np.int64))
    return _CifarSource(kind, description, classes, size, data, labels, parts)


def _read_capped(handle, size: int, where: str) -> bytes:
    """``size`` bytes of a pickle file or member, refused above :data:`MAX_FILE_BYTES`."""
    if size > MAX_FILE_BYTES:
        raise SourceError(f"'{where}' is {size:,} bytes; a CIFAR python batch is at most "
                          f"{MAX_FILE_BYTES // 2**20} MiB, so this is not one")
    raw = handle.read(size + 1)
    if len(raw) != size:
        raise SourceError(f"'{where}' changed size while being read ({size:,} bytes "
                          f"expected, {len(raw):,} read)")
    return raw


def open_cifar_folder(kind, description, folder: Path, label, size):
    meta_file, train_files, test_files = _CIFAR_LAYOUT[kind]
    where = printable(folder)
    files = {}
    for name in [meta_file, *train_files, *test_files]:
        path = folder / name
        if not path.exists():
            continue
        file_where = f"{where}/{name}"
        try:
            with open_regular(path) as handle:
                raw = _read_capped(handle, path.stat().st_size, file_where)
        except OSError as exc:
            raise SourceError(f"cannot read CIFAR file '{file_where}': {one_line(exc)}") from None
        files[name] = _cifar_pickle(raw, file_where)
    return _open_cifar(kind, description, where, stored_name(folder.name), files, label, size)


class _Capped(io.RawIOBase):
    """A read-only stream that fails once more than ``limit`` bytes have been read from it."""

    def __init__(self, raw, limit: int, where: str):
        self.raw, self.limit, self.where, self.count = raw, limit, where, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = len(buffer)
        if self.count + want > self.limit:
            want = self.limit - self.count + 1  # one byte over the limit proves it
        data = self.raw.read(want)
        self.count += len(data)
        if self.count > self.limit:
            raise SourceError(f"archive '{self.where}' expands to more than "
                              f"{self.limit // 2**20} MiB; the CIFAR archives hold about "
                              f"180 MiB, so this is not one")
        buffer[:len(data)] = data
        return len(data)


# (magic bytes, reader of the decompressed stream)
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
               (b"BZh", lambda f: bz2.BZ2File(f, "rb")),
               (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f, "rb")))


def is_archive(path: Path) -> bool:
    """Whether a regular file starts like a tar archive, compressed (gzip, bzip2, xz) or not."""
    with open_regular(path) as handle:
        head = handle.read(512)
    return (any(head.startswith(magic) for magic, _ in _COMPRESSED)
            or head[257:262] == b"ustar")


def open_cifar_archive(description, path: Path, label, size):
    """Read a CIFAR .tar(.gz, .bz2, .xz) in one pass, keeping the members of one folder level.

    The decompressed stream is capped at :data:`MAX_ARCHIVE_BYTES`, each
    member's declared size at :data:`MAX_FILE_BYTES` (checked before it is
    read), the entries at :data:`MAX_ARCHIVE_MEMBERS`, and the stream is read to
    its end, so a truncated or corrupt archive is an error even when the CIFAR
    files come first.
    """
    wanted = {f for meta, train, test in _CIFAR_LAYOUT.values() for f in [meta, *train, *test]}
    where = printable(path)
    files: dict[str, dict] = {}
    prefix = ""
    try:
        with open_regular(path) as handle:
            head = handle.read(6)
            handle.seek(0)
            opener = next((o for magic, o in _COMPRESSED if head.startswith(magic)), None)
            stream = handle if opener is None else opener(handle)
            capped = io.BufferedReader(_Capped(stream, MAX_ARCHIVE_BYTES, where), 2**16)
            with tarfile.open(fileobj=capped, mode="r|") as tar:
                for count, member in enumerate(tar, 1):
                    if count > MAX_ARCHIVE_MEMBERS:
                        raise SourceError(f"archive '{where}' holds more than "
                                          f"{MAX_ARCHIVE_MEMBERS} entries; a CIFAR archive "
                                          f"holds fewer than 10")
                    parts = member.name.strip("/").split("/")
                    if not member.isfile() or len(parts) > 2 or parts[-1] not in wanted:
                        continue
                    member_where = f"{where}/{printable(member.name.strip('/'))}"
                    raw = _read_capped(tar.extractfile(member), member.size, member_where)
                    files[parts[-1]] = _cifar_pickle(raw, member_where)
                    del raw
                    prefix = stored_name("/".join(parts[:-1]))
            while capped.read(2**20):  # to the end: the compressed stream's checksum
                pass
    except (tarfile.TarError, OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as exc:
        if isinstance(exc, SourceError):
            raise
        reason = one_line(exc)
        if isinstance(exc, EOFError):
            reason = f"it ends early, truncated? ({reason})"
        raise SourceError(f"cannot read archive '{where}': {reason}") from None
    kind = cifar_kind(set(files))
    if kind is None:
        raise SourceError(f"archive '{where}' is not a CIFAR-10/100 python archive: "
                          f"no batches.meta or meta member found")
    return _open_cifar(kind, description, where, prefix, files, label, size)
