"""Tiny datasets in the formats datasets ship in, written here with pyarrow and tarfile.

Every writer takes the same samples, ``[(class name, file name, encoded image bytes)]``
in the order porder scans a class folder (classes sorted, files in natural order),
so a parquet file, a ``save_to_disk`` folder, WebDataset shards and a class folder
of the same samples must give the same cache. The parquet and Arrow files carry the
``huggingface`` schema metadata exactly as ``datasets`` writes it (checked against
``datasets`` 5.2: ``{"info": {"features": {"image": {"_type": "Image"}, "label":
{"names": [...], "_type": "ClassLabel"}}}}``).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from porder.pipeline import CacheSpec, build_cache

#: The options of the caches compared: MI, small images, threads, a held-out split.
OPTS = dict(measure="mi", patch=4, size=16, batch_size=4, workers=2, test_fraction=0.25)


def cache(tmp_path, source, name, **kw):
    return build_cache(CacheSpec(str(source), tmp_path / f"{name}.h5", **{**OPTS, **kw})).path


def assert_same_cache(a, b, *, names=False):
    """Equal HDF5 contents except the sample names (unless ``names``) and the source's record."""
    import h5py

    source_keys = {"source", "source_kind", "source_files", "source_bytes", "source_digest",
                   "source_state", "created", "test_fraction"}
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert list(fa["classes"].asstr()) == list(fb["classes"].asstr())
        for split in ("train", "test"):
            for key in ("images", "labels", "perm"):
                np.testing.assert_array_equal(fa[split][key][()], fb[split][key][()])
            assert fa[split]["images"].shape[0] > 0
            assert list(fa[split]["skipped"]) == list(fb[split]["skipped"])
            if names:
                assert list(fa[split]["names"]) == list(fb[split]["names"])
        attrs_a = {k: v for k, v in fa.attrs.items() if k not in source_keys}
        attrs_b = {k: v for k, v in fb.attrs.items() if k not in source_keys}
        assert attrs_a.keys() == attrs_b.keys()
        assert all(np.array_equal(attrs_a[k], attrs_b[k]) for k in attrs_a)


def encoded(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kw)
    return buffer.getvalue()


def make_samples(counts: dict[str, int], seed: int = 0, size=(12, 10)) -> list:
    """[(class, file name, bytes)]: PNGs and JPEGs of random pixels, class by class."""
    rng = np.random.default_rng(seed)
    samples = []
    for cls in sorted(counts):
        for i in range(counts[cls]):
            a = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            if i % 3 == 2:
                samples.append((cls, f"img{i}.jpg", encoded(a, "JPEG", quality=90)))
            else:
                samples.append((cls, f"img{i}.png", encoded(a)))
    return samples


def write_class_folder(root: Path, samples) -> Path:
    for cls, name, data in samples:
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / name).write_bytes(data)
    return root


def _classes(samples) -> list[str]:
    return sorted({cls for cls, _, _ in samples})


def hf_metadata(classes: list[str] | None, image: str = "image", label: str = "label") -> dict:
    features = {image: {"_type": "Image"}}
    features[label] = ({"names": classes, "_type": "ClassLabel"} if classes is not None
                       else {"dtype": "int64", "_type": "Value"})
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def hf_table(samples, *, classes: list[str] | None = None, names: bool = True,
             image: str = "image", label: str = "label", paths: bool = True):
    """A pyarrow table as ``datasets`` stores an Image + ClassLabel dataset."""
    import pyarrow as pa

    classes = classes or _classes(samples)
    index = {c: i for i, c in enumerate(classes)}
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": data, "path": name if paths else None}
                       for _, name, data in samples], type=struct)
    labels = pa.array([index[cls] for cls, _, _ in samples], type=pa.int64())
    table = pa.table({image: images, label: labels})
    return table.replace_schema_metadata(hf_metadata(classes if names else None, image, label))


def write_parquet(path: Path, samples, row_group_size: int = 4, **kw) -> Path:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(hf_table(samples, **kw), path, row_group_size=row_group_size)
    return path


def write_arrow(path: Path, table, batch_rows: int = 3) -> Path:
    """An Arrow IPC stream, as ``datasets``' ArrowWriter writes its ``data-*.arrow``."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return path


def save_to_disk(folder: Path, samples, *, classes=None, files: int = 1) -> Path:
    """A ``Dataset.save_to_disk`` folder: data-*.arrow, state.json, dataset_info.json."""
    classes = classes or _classes(samples)
    table = hf_table(samples, classes=classes)
    folder.mkdir(parents=True)
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        write_arrow(folder / name, table.slice(lo, hi - lo))
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0" * 16,
         "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
         "_output_all_columns": False, "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps(
        {"citation": "", "description": "", "features": {
            "image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}},
         "homepage": "", "license": ""}))
    return folder


def write_shard(path: Path, samples, classes: list[str] | None = None, *, extra=True) -> Path:
    """A WebDataset shard: KEY.<ext> and KEY.cls (and a KEY.json, ignored) per sample."""
    classes = classes or _classes(samples)
    index = {c: i for i, c in enumerate(classes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for k, (cls, name, data) in enumerate(samples):
            key = f"{k:06d}_{name.rsplit('.', 1)[0]}"
            members = [(f"{key}.{name.rsplit('.', 1)[1]}", data),
                       (f"{key}.cls", str(index[cls]).encode())]
            if extra:
                members.append((f"{key}.json", json.dumps({"class": cls}).encode()))
            for member, payload in members:
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of exactly these members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path
