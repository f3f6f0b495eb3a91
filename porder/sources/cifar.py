"""CIFAR-10 / CIFAR-100, python version: the extracted folder or the .tar.gz archive.

Pickles are loaded by a restricted unpickler that only accepts NumPy arrays,
so a malicious archive cannot run code. The whole dataset is held in memory
as the original (N, 3072) channel-planar rows and resized per batch.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from .base import Batch, Source, SourceError, _one_line
from .decode import _resize_images


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
        return Batch(_resize_images(images, self.image_size),
                     self._labels[split][lo:hi].copy(), names)


# --------------------------------------------------------------------------
# CIFAR


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and NumPy arrays; refuses any other class."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_pickle(raw: bytes, where: str) -> dict:
    """Unpickle one CIFAR file; keys are normalised to str ('data', 'labels', ...)."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise SourceError(f"cannot read CIFAR pickle '{where}': {_one_line(exc)}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"CIFAR pickle '{where}' holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_names(meta: dict, key: str, where: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not names:
        raise SourceError(f"CIFAR meta file '{where}' has no {key!r} list")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _cifar_part(obj: dict, key: str, n_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one pickle -> data (N, 3072) uint8, labels (N,) int64."""
    data, labels = obj.get("data"), obj.get(key)
    if data is None or labels is None:
        missing = "data" if data is None else key
        raise SourceError(f"CIFAR pickle '{where}' has no {missing!r} entry")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise SourceError(f"CIFAR pickle '{where}': 'data' has shape {data.shape}, "
                          f"expected (N, 3072)")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise SourceError(f"CIFAR pickle '{where}': 'data' must hold 8-bit values, "
                              f"got dtype {data.dtype}")
        data = data.astype(np.uint8)
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise SourceError(f"CIFAR pickle '{where}': {key!r} is not a list of integers") from None
    if len(labels) != len(data):
        raise SourceError(f"CIFAR pickle '{where}': {len(labels)} {key!r} for "
                          f"{len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise SourceError(f"CIFAR pickle '{where}': {key!r} outside 0..{n_classes - 1}")
    return data, labels


_CIFAR_LAYOUT = {
    # kind: (meta file, train files, test files)
    "cifar10": ("batches.meta", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("meta", ["train"], ["test"]),
}


def _cifar_kind(names: set[str]) -> str | None:
    """Which CIFAR layout a set of file names looks like, if any."""
    if "batches.meta" in names or any(n.startswith("data_batch_") for n in names):
        return "cifar10"
    if "meta" in names and ("train" in names or "test" in names):
        return "cifar100"
    return None


def _open_cifar(kind: str, description: str, where: str, prefix: str, files: dict[str, bytes],
                label: str, size: int) -> _CifarSource:
    """Build a CIFAR source from the raw bytes of its files (name -> bytes).

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
    meta_where = f"{where}/{meta_file}"
    classes = _cifar_names(_cifar_pickle(files[meta_file], meta_where), names_key, meta_where)
    data, labels, parts = {}, {}, {}
    for split, split_files in (("train", train_files), ("test", test_files)):
        arrays, label_arrays, firsts, first = [], [], [], 0
        for name in split_files:
            file_where = f"{where}/{name}"
            d, lab = _cifar_part(_cifar_pickle(files.pop(name), file_where), labels_key,
                                 len(classes), file_where)
            arrays.append(d)
            label_arrays.append(lab)
            firsts.append(first)
            first += len(d)
        data[split] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        labels[split] = np.concatenate(label_arrays)
        part_names = [f"{prefix}/{f}" if prefix else f for f in split_files]
        parts[split] = (part_names, np.asarray(firsts, dtype=np.int64))
    return _CifarSource(kind, description, classes, size, data, labels, parts)


def _open_cifar_folder(kind, description, folder: Path, label, size):
    meta_file, train_files, test_files = _CIFAR_LAYOUT[kind]
    files = {}
    for name in [meta_file, *train_files, *test_files]:
        path = folder / name
        if path.is_file():
            files[name] = path.read_bytes()
    return _open_cifar(kind, description, str(folder), folder.name, files, label, size)


def _open_cifar_archive(description, path: Path, label, size):
    """Read a CIFAR .tar(.gz) in one pass, keeping the members of one folder level."""
    wanted = {f for meta, train, test in _CIFAR_LAYOUT.values() for f in [meta, *train, *test]}
    files: dict[str, bytes] = {}
    prefix = ""
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if not member.isfile() or len(parts) > 2 or parts[-1] not in wanted:
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    files[parts[-1]] = handle.read()
                    prefix = "/".join(parts[:-1])
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"cannot read archive '{path}': {_one_line(exc)}") from None
    kind = _cifar_kind(set(files))
    if kind is None:
        raise SourceError(f"archive '{path}' is not a CIFAR-10/100 python archive: "
                          f"no batches.meta or meta member found")
    return _open_cifar(kind, description, str(path), prefix, files, label, size)
