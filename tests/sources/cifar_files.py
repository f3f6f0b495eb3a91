"""CIFAR python files made the way the official archives were made, and forged ones.

The official ``cifar-10-python.tar.gz`` and ``cifar-100-python.tar.gz`` were
written by Python 2's cPickle, protocol 2, with NumPy 1: keys and strings are
Python 2 ``str`` (``SHORT_BINSTRING``/``BINSTRING``, read back as ``bytes``),
the pixels an ``ndarray`` of ``uint8`` (N, 3072) rebuilt by
``numpy.core.multiarray._reconstruct`` with its bytes in a ``BINSTRING``, the
dtype ``numpy.dtype('u1', 0, 1)`` with state ``(3, '|', None, None, None, -1,
-1, 0)``, labels a list of ``int``, and every string, list and tuple memoised
(``BINPUT``, ``LONG_BINPUT`` past 255). :func:`py2_pickle` writes exactly those
opcodes, so the tests read files shaped like the real ones without the 160 MB
download.
"""
from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import numpy as np


class _Py2Pickler:
    """A protocol-2 writer for dict / list / bytes / int / ndarray, as cPickle did it."""

    def __init__(self):
        self.out = io.BytesIO()
        self.memo = 0

    def w(self, data: bytes) -> None:
        self.out.write(data)

    def put(self) -> None:
        self.w(b"q" + bytes([self.memo]) if self.memo < 256
               else b"r" + struct.pack("<I", self.memo))
        self.memo += 1

    def string(self, s: bytes) -> None:  # a Python 2 str
        self.w((b"U" + bytes([len(s)])) if len(s) < 256 else b"T" + struct.pack("<i", len(s)))
        self.w(s)
        self.put()

    def integer(self, v: int) -> None:
        if 0 <= v < 256:
            self.w(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.w(b"M" + struct.pack("<H", v))
        else:
            self.w(b"J" + struct.pack("<i", v))

    def array(self, a: np.ndarray) -> None:
        assert a.dtype.kind in "iu" and a.flags.c_contiguous
        self.w(b"cnumpy.core.multiarray\n_reconstruct\n")
        self.put()
        self.w(b"cnumpy\nndarray\n")
        self.put()
        self.w(b"K\x00\x85")
        self.put()
        self.string(b"b")
        self.w(b"\x87")
        self.put()
        self.w(b"R")
        self.put()
        self.w(b"(K\x01")
        for d in a.shape:
            self.integer(d)
        self.w({1: b"\x85", 2: b"\x86", 3: b"\x87"}[a.ndim])
        self.put()
        self.w(b"cnumpy\ndtype\n")
        self.put()
        self.string(a.dtype.str[1:].encode())  # 'u1'
        self.w(b"K\x00K\x01\x87")
        self.put()
        self.w(b"R")
        self.put()
        self.w(b"(K\x03")
        self.string(a.dtype.str[:1].encode())  # '|' or '<'
        self.w(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t")
        self.put()
        self.w(b"b\x89")
        self.string(a.tobytes())
        self.w(b"t")
        self.put()
        self.w(b"b")

    def value(self, v) -> None:
        if isinstance(v, dict):
            self.w(b"}")
            self.put()
            items = list(v.items())
            for lo in range(0, len(items), 1000):  # cPickle's batches of 1000
                self.w(b"(")
                for k, x in items[lo:lo + 1000]:
                    self.value(k)
                    self.value(x)
                self.w(b"u")
        elif isinstance(v, list):
            self.w(b"]")
            self.put()
            for lo in range(0, len(v), 1000):
                self.w(b"(")
                for x in v[lo:lo + 1000]:
                    self.value(x)
                self.w(b"e")
        elif isinstance(v, bytes):
            self.string(v)
        elif isinstance(v, int):
            self.integer(v)
        elif isinstance(v, np.ndarray):
            self.array(v)
        else:
            raise TypeError(type(v))


def py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) wrote the official CIFAR files."""
    p = _Py2Pickler()
    p.w(b"\x80\x02")
    p.value(obj)
    p.w(b".")
    return p.out.getvalue()


def _rows(rng, n: int) -> np.ndarray:
    """(n, 3072) uint8 pixel rows in runs of 8 equal bytes: random, yet quick to gzip."""
    return np.repeat(rng.integers(0, 256, (n, 384), dtype=np.uint8), 8, axis=1)


def official_cifar10(root: Path, per_batch: int = 20, test_rows: int = 30, seed: int = 0):
    """``root/cifar-10-batches-py`` as distributed; returns (folder, {file: (rows, labels)})."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(py2_pickle(
        {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}))
    content = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = test_rows if name == "test_batch" else per_batch
        rows = _rows(rng, n)
        labels = rng.integers(0, 10, n).tolist()
        label = (f"training batch {i + 1} of 5" if name != "test_batch"
                 else "testing batch 1 of 1").encode()
        (folder / name).write_bytes(py2_pickle({
            b"batch_label": label, b"labels": labels, b"data": rows,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)]}))
        content[name] = (rows, np.array(labels))
    (folder / "readme.html").write_text("<html></html>")
    return folder, content


def official_cifar100(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 1):
    """``root/cifar-100-python`` as distributed; returns (folder, {split: (rows, fine, coarse)})."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "meta").write_bytes(py2_pickle(
        {b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
         b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}))
    content = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = _rows(rng, n)
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        (folder / split).write_bytes(py2_pickle({
            b"filenames": [f"{split}_{j}.png".encode() for j in range(n)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(), b"fine_labels": fine,
            b"coarse_labels": coarse, b"data": rows}))
        content[split] = (rows, np.array(fine), np.array(coarse))
    return folder, content


def tar_gz(folder: Path, out: Path) -> Path:
    """The folder as a .tar.gz with one top folder, like the official archives."""
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=folder.name)
    return out


def rows_to_images(rows: np.ndarray) -> np.ndarray:
    """CIFAR rows (N, 3072), channel-planar R, G, B -> (N, 32, 32, 3)."""
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def forged_array_pickle(dtype_name: bytes, shape: tuple, raw: bytes, labels=()) -> bytes:
    """{b'data': <array>, b'labels': [...]} whose array claims ``dtype_name`` and ``shape``
    over ``raw``, its dtype state carrying the object flags (0x3f): what a hostile
    file does to make NumPy read bytes as pointers."""
    p = _Py2Pickler()
    p.w(b"\x80\x02}(")
    p.string(b"labels")
    p.value(list(labels))
    p.string(b"data")
    p.w(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R")
    p.w(b"(K\x01(")  # the state: (1, shape, dtype, fortran, raw)
    for d in shape:
        p.w(b"\x8a\x08" + struct.pack("<q", d))  # LONG1: any size
    p.w(b"t")
    p.w(b"cnumpy\ndtype\n")
    p.string(dtype_name)
    p.w(b"K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ftb\x89")
    p.w(b"T" + struct.pack("<i", len(raw)) + raw)
    p.w(b"tbu.")
    return p.out.getvalue()
