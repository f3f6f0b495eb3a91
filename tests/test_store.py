"""The HDF5 cache: layout, atomic finish, resume, refusals."""
import os

import h5py
import numpy as np
import pytest

from porder.store import (
    FORMAT_VERSION,
    StoreError,
    Writer,
    describe,
    open_file,
    partial_path,
    read_meta,
    read_split,
)

META = {"measure": "mi", "patch": 8, "bins": 256, "reference": 0, "direction": "descending",
        "image_size": 32, "source": "test", "seed": 0}


def batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, n),
            np.stack([rng.permutation(16) for _ in range(n)]).astype(np.uint16),
            [f"img{seed}-{i}" for i in range(n)])


def write(path, **kw):
    w = Writer(path, meta=META, classes=["a", "b", "c"], **kw)
    for i, split in enumerate(["train", "train", "test"]):
        imgs, labels, perm, names = batch(4, seed=i)
        w.append(split, imgs, labels, perm, names, consumed=w.consumed(split) + 4)
    return w


def test_layout_and_roundtrip(tmp_path):
    out = tmp_path / "a.h5"
    w = write(out)
    assert not out.exists() and partial_path(out).exists()  # not final until finished
    w.finish()
    assert out.exists() and not partial_path(out).exists()
    with h5py.File(out) as f:
        assert f.attrs["format"] == "porder" and f.attrs["format_version"] == FORMAT_VERSION
        assert bool(f.attrs["complete"])
        for key in ("measure", "patch", "bins", "reference", "direction", "image_size",
                    "source", "porder_version", "created"):
            assert key in f.attrs
        assert f["train/images"].shape == (8, 32, 32, 3) and f["train/images"].dtype == np.uint8
        assert f["train/labels"].dtype == np.int64 and f["train/perm"].dtype == np.uint8  # K=16
        assert f["test/perm"].shape == (4, 16)
        assert [c.decode() for c in f["classes"][()]] == ["a", "b", "c"]
    meta = read_meta(out)
    assert meta["splits"] == {"train": 8, "test": 4} and meta["classes"] == ["a", "b", "c"]
    data = read_split(out, "train")
    want = batch(4, seed=1)
    assert np.array_equal(data["images"][4:], want[0])
    assert np.array_equal(data["perm"][4:], want[2]) and data["names"][4:] == want[3]
    assert describe(out)["splits"]["test"] == 4


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "a.h5"
    write(out).finish()
    with pytest.raises(StoreError, match="exists; pass --overwrite"):
        Writer(out, meta=META, classes=["a"])
    write(out, overwrite=True).finish()


def test_unwritable_and_missing_folders(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Writer(tmp_path / "nope" / "a.h5", meta=META, classes=["a"])
    with pytest.raises(StoreError, match="is a directory"):
        Writer(tmp_path, meta=META, classes=["a"])


def test_resume_drops_a_cut_off_batch(tmp_path):
    out = tmp_path / "a.h5"
    w = write(out)
    # simulate a kill in the middle of a batch: data grown, counters not updated
    g = w.f["train"]
    g["images"].resize(11, axis=0)
    w.close()
    w = Writer(out, meta=META, classes=["a", "b", "c"], resume=True)
    assert w.rows("train") == 8 and w.f["train/images"].shape[0] == 8
    assert w.consumed("train") == 8
    w.finish()
    assert read_meta(out)["splits"]["train"] == 8


def _ahead(g, extra: int, *, counters: bool) -> None:
    """What a kill inside an append can leave on disk: ``extra`` more rows in every
    dataset and a skipped name, and (``counters``) rows and consumed moved on."""
    for name in ("images", "labels", "perm", "names", "skipped"):
        ds = g[name]
        ds.resize(ds.shape[0] + extra, axis=0)
        ds[-extra:] = np.ones((extra, *ds.shape[1:]), ds.dtype) if ds.dtype.kind != "O" \
            else np.array(["stale"] * extra, dtype=object)
    if counters:
        g.attrs["rows"] += extra
        g.attrs["consumed"] += extra + 2


def test_resume_trusts_only_the_committed_count(tmp_path):
    out = tmp_path / "a.h5"
    w = write(out)
    empty = (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64),
             np.zeros((0, 16), np.uint8), [])
    w.append("train", *empty, consumed=10, skipped=[("bad.png", "unreadable")])
    assert list(w.f["train"].attrs["committed"]) == [8, 10, 1]
    _ahead(w.f["train"], 3, counters=True)   # counters written, commit not
    _ahead(w.f["test"], 2, counters=False)   # rows written, nothing counted
    w.close()
    w = Writer(out, meta=META, classes=["a", "b", "c"], resume=True)
    for split, (rows, consumed, skipped) in {"train": (8, 10, 1), "test": (4, 4, 0)}.items():
        g = w.f[split]
        assert (w.rows(split), w.consumed(split)) == (rows, consumed)
        assert [g[n].shape[0] for n in ("images", "labels", "perm", "names")] == [rows] * 4
        assert g["skipped"].shape[0] == skipped
    imgs, labels, perm, names = batch(2, seed=7)
    w.append("train", imgs, labels, perm, names, consumed=12, skipped=[("c.png", "empty")])
    w.finish()
    data = read_split(out, "train")
    assert data["names"] == [f"img{s}-{i}" for s in (0, 1) for i in range(4)] + names
    assert np.array_equal(data["images"][8:], imgs)
    with h5py.File(out) as f:
        assert [x.decode() for x in f["train/skipped"][()]] == ["bad.png: unreadable",
                                                                "c.png: empty"]
        assert "committed" not in f["train"].attrs  # a complete file is read by its rows
        assert int(f["train"].attrs["consumed"]) == 12


def test_each_batch_is_on_the_disk_before_it_is_committed(tmp_path, monkeypatch):
    # fsync between the batch's rows and its commit: a power cut cannot leave a
    # commit whose rows never reached the disk.
    w = write(tmp_path / "a.h5")
    seen = []
    real_fsync = os.fsync

    def fsync(fd):
        g = w.f["train"]
        seen.append((g["images"].shape[0], int(g.attrs["committed"][0])))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    imgs, labels, perm, names = batch(2, seed=7)
    w.append("train", imgs, labels, perm, names, consumed=10)
    assert seen == [(10, 8)]  # 10 rows written, 8 still committed
    assert int(w.f["train"].attrs["committed"][0]) == 10
    w.close()


def test_a_part_without_a_committed_count_resumes_from_its_rows(tmp_path):
    """A .part of an older porder: rows and consumed are all there is (as before)."""
    out = tmp_path / "a.h5"
    w = write(out)
    for split in ("train", "test"):
        del w.f[split].attrs["committed"]
    _ahead(w.f["train"], 3, counters=False)
    w.close()
    w = Writer(out, meta=META, classes=["a", "b", "c"], resume=True)
    assert (w.rows("train"), w.consumed("train"), w.rows("test")) == (8, 8, 4)
    assert w.f["train/names"].shape[0] == 8 and w.f["train/skipped"].shape[0] == 3
    w.finish()
    assert read_meta(out)["splits"] == {"train": 8, "test": 4}


def test_resume_refuses_a_part_with_fewer_rows_than_committed(tmp_path):
    out = tmp_path / "a.h5"
    w = write(out)
    w.f["train/perm"].resize(5, axis=0)
    w.close()
    with pytest.raises(StoreError) as info:
        Writer(out, meta=META, classes=["a", "b", "c"], resume=True)
    msg = str(info.value)
    assert "\n" not in msg and f"'{partial_path(out)}'" in msg
    assert "has 5 rows of perm but 8 labels" in msg and "run without --resume" in msg
    w = Writer(out, meta=META, classes=["a", "b", "c"])    # starting afresh works
    w.finish()


def test_resume_refuses_other_options(tmp_path):
    out = tmp_path / "a.h5"
    write(out).close()
    with pytest.raises(StoreError, match="options differ.*measure"):
        Writer(out, meta=dict(META, measure="je"), classes=["a", "b", "c"], resume=True)
    with pytest.raises(StoreError, match="nothing to resume"):
        Writer(tmp_path / "b.h5", meta=META, classes=["a"], resume=True)


def test_reading_bad_files(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_file(tmp_path / "none.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="cannot read"):
        open_file(junk)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a porder file"):
        open_file(tmp_path / "other.h5")
    out = tmp_path / "a.h5"
    write(out).close()
    with pytest.raises(StoreError, match="does not exist.*--resume"):
        open_file(out)
    with pytest.raises(StoreError, match="incomplete"):
        open_file(partial_path(out))
