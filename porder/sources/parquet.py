"""Hugging Face datasets as they ship: parquet files, and ``save_to_disk`` folders of Arrow
files, read with pyarrow (the optional extra ``[parquet]``; without it, a one-line error
names the extra).

SOURCE forms
------------
* One ``.parquet`` file.
* A folder of parquet files: ``train-*.parquet`` / ``test-*.parquet`` directly
  inside it, in its ``data/`` sub-folder (the Hub's layout,
  ``data/train-00000-of-00001.parquet``), or in ``train/`` and ``test/``
  sub-folders (the Hub's parquet conversion, ``train/0000.parquet``).
* A ``save_to_disk`` folder: a ``Dataset`` (``data-*.arrow`` files with
  ``state.json`` and ``dataset_info.json``) or a ``DatasetDict`` (its
  ``dataset_dict.json`` and one such folder per split). The Arrow IPC files are
  memory-mapped, as ``datasets`` does; a compressed one may take at most
  :data:`MAX_ARROW_HELD` once read.

Columns
-------
The image column is the one the Hugging Face features (the ``huggingface`` key
of the schema metadata) call ``Image``, else the column ``image`` or ``img``; it
is a struct ``{bytes, path}`` (or plain binary), and each image's bytes are
decoded by porder's one rule (:mod:`porder.sources.pillow`). A row whose image
has no bytes (only a path, or null) is a bad sample: an error, or skipped and
listed under ``on_error="skip"``, like an image Pillow cannot decode. The label
column is ``label`` (else ``labels``, ``fine_label``); ``label='coarse'`` reads
``coarse_label`` (CIFAR-100 on the Hub). Class names come from its
``ClassLabel`` names in the schema metadata, else from a ``dataset_info.json``
beside the files, else they are the distinct labels, sorted.

Splits
------
Files whose path names ``train`` or ``test`` (:func:`~porder.sources.base.split_of`)
form those splits (other splits, ``validation``, are left out); otherwise all
rows are one pool and porder holds out a seeded ``test_fraction``, as for
folders. A ``DatasetDict``'s split folders are named the same way.

Reading is per batch: the image column of one parquet row group at a time
(at most :data:`MAX_ROW_GROUP_BYTES` uncompressed, checked before it is read),
so memory stays bounded whatever the dataset size; the labels are read whole
when the source is opened.
"""
from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import numpy as np

from ..messages import one_line
from .base import SourceError, holdout, label_classes, natural_key, printable, split_files
from .decode import ContainerSource
from .pillow import Missing

#: The install command named when pyarrow is missing.
INSTALL_HINT = 'pip install "patch-order[parquet]"'
#: The image column of one parquet row group, uncompressed (the Hub writes 100 images a group).
MAX_ROW_GROUP_BYTES = 2**30
#: Memory an Arrow file may take once read (an uncompressed one is mapped, and takes none).
MAX_ARROW_HELD = 2**30
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = {"fine": ("label", "labels", "fine_label"), "coarse": ("coarse_label",)}
_PARQUET_FOLDERS = (".", "data", "train", "test")


def pyarrow_modules():
    """(pyarrow, pyarrow.parquet), or a one-line SourceError naming the extra."""
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"reading Hugging Face parquet/arrow datasets needs pyarrow, "
                          f"porder's optional extra [parquet]: {INSTALL_HINT}") from None
    return pa, pq


# --------------------------------------------------------------------------
# Layouts (no pyarrow needed)


def _listed(folder: Path, suffix: str) -> list[str]:
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if not e.name.startswith(".")
                     and e.name.lower().endswith(suffix) and e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(names, key=natural_key)


def _saved_dataset(folder: Path, prefix: str) -> list[tuple[str, str]]:
    """A ``save_to_disk`` Dataset folder's Arrow files as (path, name under the source)."""
    names = []
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
        if not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                   for n in names):
            names = []
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    if not names:
        names = [n for n in _listed(folder, ".arrow") if not n.startswith("cache-")]
    return [(str(folder / n), prefix + n) for n in names]


def hf_layout(path: Path, files: set[str]) -> tuple[str, list[tuple[str, str]]] | None:
    """('parquet' or 'arrow', [(file, name under the source)]) when ``path`` is one of
    this module's forms, else None. ``files``: the names of the files directly in a folder."""
    if not path.is_dir():
        return ("parquet", [(str(path), path.name)]) if path.suffix.lower() == ".parquet" else None
    if "dataset_dict.json" in files:
        parts = []
        with os.scandir(path) as it:
            splits = sorted((e.name for e in it if e.is_dir() and not e.name.startswith(".")),
                            key=natural_key)
        for split in splits:
            parts += _saved_dataset(path / split, f"{split}/")
        return "arrow", parts
    if "state.json" in files or ("dataset_info.json" in files
                                 and any(n.endswith(".arrow") for n in files)):
        return "arrow", _saved_dataset(path, "")
    parts = []
    for sub in _PARQUET_FOLDERS:
        prefix = "" if sub == "." else f"{sub}/"
        parts += [(str(path / sub / n), prefix + n) for n in _listed(path / sub, ".parquet")]
    return ("parquet", parts) if parts else None


# --------------------------------------------------------------------------
# One file


def _check_regular(path: str) -> None:
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError("not a regular file")


class _Part:
    """One parquet or Arrow file: its schema, rows, labels, and image entries by row."""

    def __init__(self, pa, pq, path: str, name: str, kind: str):
        self.pa, self.pq, self.path, self.name, self.kind = pa, pq, path, name, kind
        _check_regular(path)
        self.table = None
        if kind == "parquet":
            with pq.ParquetFile(path) as pf:
                self.schema = pf.schema_arrow
                self.meta = pf.metadata
            self.rows = self.meta.num_rows
            self.group_starts = np.cumsum(
                [0] + [self.meta.row_group(g).num_rows for g in range(self.meta.num_row_groups)])
        else:
            mapped = pa.memory_map(path)
            magic = mapped.read(6)
            mapped.seek(0)
            # Its own pool counts what this read allocates (decompressed buffers; an
            # uncompressed file's buffers are the mapped pages): the process-wide total
            # moves with every other Arrow buffer freed or made meanwhile. Kept with the table.
            self._pool = pa.proxy_memory_pool(pa.default_memory_pool())
            open_ipc = pa.ipc.open_file if magic == b"ARROW1" else pa.ipc.open_stream
            reader = open_ipc(mapped, memory_pool=self._pool)
            self.table = reader.read_all()
            if self._pool.bytes_allocated() > MAX_ARROW_HELD:
                raise SourceError(f"Arrow file '{printable(path)}' is compressed and takes over "
                                  f"{MAX_ARROW_HELD // 2**20} MiB once read; save it as "
                                  f"parquet (Dataset.to_parquet) and give that")
            self.schema = self.table.schema
            self.rows = self.table.num_rows

    def column(self, column: str):
        """A whole column (the labels) as one pyarrow array."""
        if self.table is not None:
            return self.table.column(column).combine_chunks()
        with self.pq.ParquetFile(self.path) as pf:
            return pf.read(columns=[column]).column(0).combine_chunks()

    def group_bytes(self, column: str, g: int) -> int:
        """Uncompressed bytes of ``column`` in parquet row group ``g``."""
        group = self.meta.row_group(g)
        return sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
                   if group.column(i).path_in_schema.split(".")[0] == column)


class _Rows:
    """The image entries of rows across the files of a source, one row group held at a time."""

    def __init__(self, parts: list[_Part], column: str):
        self.parts, self.column = parts, column
        self.starts = np.cumsum([0] + [p.rows for p in parts])  # first row of each file
        self._held = (None, None, None)  # (file index, row group, its image column)
        self._open = (None, None)  # (file index, open ParquetFile)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._open[1] is not None:
                self._open[1].close()
            self._open, self._held = (None, None), (None, None, None)

    def _group(self, k: int, g: int):
        if self._held[:2] != (k, g):
            part = self.parts[k]
            size = part.group_bytes(self.column, g)
            if size > MAX_ROW_GROUP_BYTES:
                raise SourceError(f"row group {g} of '{printable(part.path)}' holds {size:,} "
                                  f"bytes of images; porder reads at most "
                                  f"{MAX_ROW_GROUP_BYTES // 2**20} MiB at once: write it with "
                                  f"smaller row groups (pyarrow.parquet.write_table(..., "
                                  f"row_group_size=100))")
            if self._open[0] != k:
                if self._open[1] is not None:
                    self._open[1].close()
                self._open = (k, part.pq.ParquetFile(part.path))
            table = self._open[1].read_row_group(g, columns=[self.column])
            self._held = (k, g, table.column(0).combine_chunks())
        return self._held[2]

    def _entries(self, k: int, rows: np.ndarray) -> list:
        part = self.parts[k]
        if part.table is not None:
            return part.table.column(self.column).take(part.pa.array(rows)).to_pylist()
        out = []
        groups = np.searchsorted(part.group_starts, rows, side="right") - 1
        for g in dict.fromkeys(groups.tolist()):
            local = rows[groups == g] - part.group_starts[g]
            out += self._group(k, g).take(part.pa.array(local)).to_pylist()
        return out

    def items(self, rows: np.ndarray) -> list:
        """Rows (increasing, over all files) -> their items for the decoders."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = []
        with self._lock:
            for k in dict.fromkeys(which.tolist()):
                part = self.parts[k]
                try:
                    entries = self._entries(k, rows[which == k] - self.starts[k])
                except (part.pa.ArrowException, OSError) as exc:
                    raise SourceError(f"cannot read '{printable(part.path)}': "
                                      f"{one_line(exc)}") from None
                out += [_item(e) for e in entries]
        return out


def _item(entry):
    """One cell of the image column -> the image's bytes, or Missing with the reason."""
    if isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path")
        if data is None:
            return Missing(f"the row holds no image bytes, only the path "
                           f"'{printable(path)}', which porder does not open" if path
                           else "the row holds no image bytes")
        return data
    return Missing("the row's image is empty (null)") if entry is None else entry


class _TableSource(ContainerSource):
    """Rows of parquet or Arrow files; ``files[split][0]`` holds row numbers over all files."""

    def __init__(self, rows: _Rows, *args):
        super().__init__(*args)
        self._rows = rows

    def _items(self, split, lo, hi):
        return self._rows.items(self._files[split][0][lo:hi])

    def close(self) -> None:
        super().close()
        self._rows.close()


# --------------------------------------------------------------------------
# Columns and class names


def _features(schema) -> dict:
    """The Hugging Face features of a file's schema metadata, or {}."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def _is_images(pa, t) -> bool:
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and any(f(t.field(i).type) for f in binary)
    return any(f(t) for f in binary)


def _image_column(pa, part: _Part, features: dict) -> str:
    names = part.schema.names
    tagged = [c for c in names if isinstance(features.get(c), dict)
              and features[c].get("_type") == "Image"]
    column = (tagged[0] if len(tagged) == 1
              else next((c for c in IMAGE_COLUMNS if c in names), None))
    if column is None:
        raise SourceError(f"'{printable(part.path)}' has no image column (columns: "
                          f"{', '.join(names)}); porder reads a column 'image' or 'img' of "
                          f"Hugging Face Image structs {{bytes, path}}")
    return column


def _label_column(part: _Part, label: str) -> str:
    names = part.schema.names
    column = next((c for c in LABEL_COLUMNS[label] if c in names), None)
    if column is None:
        wanted = " or ".join(f"'{c}'" for c in LABEL_COLUMNS[label])
        raise SourceError(f"'{printable(part.path)}' has no label column {wanted} (columns: "
                          f"{', '.join(names)})")
    return column


def _check_columns(pa, part: _Part, image: str, label: str) -> None:
    for column in (image, label):
        if column not in part.schema.names:
            raise SourceError(f"'{printable(part.path)}' has no column '{column}', which "
                              f"the other files have")
    t = part.schema.field(image).type
    if not _is_images(pa, t):
        raise SourceError(f"column '{image}' of '{printable(part.path)}' is {t}, not images: "
                          f"porder reads Hugging Face Image structs {{bytes, path}} or binary")


def _labels(pa, part: _Part, column: str) -> np.ndarray:
    """(rows,) int64 or object array of str; nulls and other types are errors."""
    values = part.column(column)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    where = f"column '{column}' of '{printable(part.path)}'"
    if values.null_count:
        first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise SourceError(f"{where} has {values.null_count} empty labels (the first at row "
                          f"{first})")
    t = values.type
    if pa.types.is_integer(t):
        return values.to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.asarray(values.to_pylist(), dtype=object)
    raise SourceError(f"{where} holds {t} values; class labels are integers (a ClassLabel) "
                      f"or strings")


def _names_of(features: dict, column: str) -> list[str] | None:
    """The ClassLabel names of ``column`` in Hugging Face features, or None."""
    feature = features.get(column)
    if isinstance(feature, dict) and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None


def _class_names(part: _Part, features: dict, column: str, root: Path) -> list[str] | None:
    names = _names_of(features, column)
    if names is not None:
        return names
    for folder in dict.fromkeys([Path(part.path).parent, root]):
        try:
            info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
            names = info["features"][column]["names"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(names, list) and names:
            return [str(n) for n in names]
    return None


# --------------------------------------------------------------------------
# The source


def _open_parts(pa, pq, kind: str, files: list[tuple[str, str]]) -> list[_Part]:
    parts = []
    for path, name in files:
        try:
            parts.append(_Part(pa, pq, path, name, kind))
        except (pa.ArrowException, OSError, ValueError) as exc:
            if isinstance(exc, SourceError):
                raise
            what = "parquet" if kind == "parquet" else "Arrow"
            raise SourceError(f"cannot read {what} file '{printable(path)}': "
                              f"{one_line(exc)}") from None
    return parts


def open_table(description: str, root: Path, kind: str, files: list[tuple[str, str]], size,
               label, test_fraction, seed, on_error, workers, decoder) -> ContainerSource:
    """A source of parquet (``kind='parquet'``) or Arrow (``'arrow'``) files.

    ``files``: (path, name under ``root``) in order, as :func:`hf_layout` gives them.
    """
    pa, pq = pyarrow_modules()
    by_split, own_test = split_files(files, [n for _, n in files], printable(description))
    if not by_split["train"]:
        raise SourceError(f"source '{printable(description)}' holds no data files")
    ordered = by_split["train"] + by_split["test"]
    parts = _open_parts(pa, pq, kind, ordered)
    features = _features(parts[0].schema)
    image, label_col = _image_column(pa, parts[0], features), _label_column(parts[0], label)
    for part in parts:
        _check_columns(pa, part, image, label_col)
        if _names_of(_features(part.schema), label_col) != _names_of(features, label_col):
            raise SourceError(f"the class names of '{printable(part.path)}' differ from those "
                              f"of '{printable(parts[0].path)}' (ClassLabel of '{label_col}')")
    values = [_labels(pa, part, label_col) for part in parts]
    names = [f"{part.name}#{r}" for part in parts for r in range(part.rows)]
    all_values = (np.concatenate(values) if all(v.dtype != object for v in values)
                  else np.concatenate([v.astype(object) for v in values]))
    if all_values.dtype == object and not all(isinstance(v, str) for v in all_values):
        raise SourceError(f"column '{label_col}' of '{printable(description)}' mixes "
                          f"integers and strings across files")
    classes, labels = label_classes(
        all_values, _class_names(parts[0], features, label_col, root), names,
        printable(description))
    rows = np.arange(len(names), dtype=np.int64)
    n_train = sum(p.rows for p in parts[:len(by_split["train"])])
    if own_test:
        idx = {"train": rows[:n_train], "test": rows[n_train:]}
    else:
        train, test = holdout(len(rows), test_fraction, seed)
        idx = {"train": train, "test": test}
    split_files_ = {split: (rows[i], labels[i], [names[j] for j in i]) for split, i in idx.items()}
    return _TableSource(_Rows(parts, image), kind, description, classes, size,
                        None if own_test else test_fraction, split_files_, on_error, workers,
                        decoder, root)
