"""Tests of porder.sources: every SOURCE form, image modes, splits, resuming and errors.

All data is made here in tmp_path with fixed seeds, except the optional real
Dogs vs. Cats sample ($PORDER_PHOTOS, or ../shared/data/dogs-vs-cats-1k; skipped when absent).
"""
from __future__ import annotations

import os
import pickle
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from porder.sources import (
    IMAGE_EXTENSIONS,
    SOURCE_HELP,
    Batch,
    Source,
    SourceError,
    open_source,
)

from ..conftest import DOGS_VS_CATS, PHOTOS_MISSING

# --------------------------------------------------------------------------
# Helpers


def read_all(source: Source, split: str, batch_size: int = 7, start: int = 0):
    """Concatenate a split: images (N, S, S, 3), labels (N,), names, skipped."""
    batches = list(source.iter_batches(split, batch_size, start))
    s = source.image_size
    images = (np.concatenate([b.images for b in batches]) if batches
              else np.empty((0, s, s, 3), np.uint8))
    labels = (np.concatenate([b.labels for b in batches]) if batches
              else np.empty(0, np.int64))
    names = [n for b in batches for n in b.names]
    skipped = [x for b in batches for x in b.skipped]
    return images, labels, names, skipped


def cifar_rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # (n, 3072)


def rows_to_images(rows):
    """CIFAR rows (N, 3072), channel-planar R, G, B -> (N, 32, 32, 3)."""
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def dump(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(root: Path, per_batch: int = 3, seed: int = 0):
    """A tiny CIFAR-10 python folder; returns (folder, train rows, train labels, test...)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"name{i}".encode() for i in range(10)]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows = cifar_rows(rng, per_batch)
        labels = rng.integers(0, 10, per_batch).tolist()
        dump(folder / f"data_batch_{i}", {b"batch_label": b"training batch", b"data": rows,
                                          b"labels": labels,
                                          b"filenames": [b"x.png"] * per_batch})
        train_rows.append(rows)
        train_labels += labels
    test_rows = cifar_rows(rng, per_batch + 1)
    test_labels = rng.integers(0, 10, per_batch + 1).tolist()
    dump(folder / "test_batch", {b"data": test_rows, b"labels": test_labels})
    return (folder, np.concatenate(train_rows), np.array(train_labels), test_rows,
            np.array(test_labels))


def make_cifar100(root: Path, n_train: int = 9, n_test: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                           b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = cifar_rows(rng, n)
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        dump(folder / split, {b"data": rows, b"fine_labels": fine, b"coarse_labels": coarse})
        out[split] = (rows, np.array(fine), np.array(coarse))
    return folder, out


def make_tar(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return out


def save_rgb(path: Path, rng, size=(32, 32), **kw) -> np.ndarray:
    a = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, **kw)
    return a


def make_class_folder(root: Path, counts: dict[str, int], seed: int = 0) -> dict:
    """root/<class>/img<i>.png, 32x32 RGB; returns {relative name: pixels}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for cls, n in counts.items():
        for i in range(n):
            pixels[f"{cls}/img{i}.png"] = save_rgb(root / cls / f"img{i}.png", rng)
    return pixels


def truncated_jpeg(path: Path, rng) -> None:
    save_rgb(path, rng, size=(64, 64), quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------
# CIFAR


def test_cifar10_folder_pixels_labels_names(tmp_path):
    folder, train_rows, train_labels, test_rows, test_labels = make_cifar10(tmp_path)
    with open_source(str(folder)) as src:
        assert src.kind == "cifar10"
        assert src.classes == [f"name{i}" for i in range(10)]
        assert src.splits() == ["train", "test"]
        assert src.count("train") == 15 and src.count("test") == 4
        assert src.held_out is None
        assert "cifar10" in repr(src) and "train=15" in repr(src)
        images, labels, names, skipped = read_all(src, "train", batch_size=4)
        np.testing.assert_array_equal(images, rows_to_images(train_rows))  # exact at size 32
        np.testing.assert_array_equal(labels, train_labels)
        assert labels.dtype == np.int64 and images.dtype == np.uint8
        assert names[0] == "cifar-10-batches-py/data_batch_1#0"
        assert names[4] == "cifar-10-batches-py/data_batch_2#1"
        assert skipped == []
        images, labels, names, _ = read_all(src, "test")
        np.testing.assert_array_equal(images, rows_to_images(test_rows))
        np.testing.assert_array_equal(labels, test_labels)
        assert names[-1] == "cifar-10-batches-py/test_batch#3"


def test_cifar_channel_order(tmp_path):
    # One image whose R plane is 10, G plane 20, B plane 30: pixels must be (10, 20, 30).
    folder, *_ = make_cifar10(tmp_path)
    rows = np.repeat(np.array([10, 20, 30], np.uint8), 1024)[None, :]  # (1, 3072)
    dump(folder / "test_batch", {b"data": rows, b"labels": [3]})
    with open_source(str(folder)) as src:
        (batch,) = src.iter_batches("test", 5)
        assert batch.images.shape == (1, 32, 32, 3)
        assert (batch.images[0] == [10, 20, 30]).all()


def test_cifar10_archive_matches_folder(tmp_path):
    folder, *_ = make_cifar10(tmp_path / "x")
    archive = make_tar(folder, tmp_path / "cifar-10-python.tar.gz")
    a = open_source(str(folder))
    b = open_source(str(archive))
    assert b.kind == "cifar10" and b.description == str(archive)
    for split in ("train", "test"):
        ia, la, na, _ = read_all(a, split)
        ib, lb, nb, _ = read_all(b, split)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert na == nb


@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar100_fine_and_coarse(tmp_path, as_archive):
    folder, data = make_cifar100(tmp_path / "x")
    spec = str(make_tar(folder, tmp_path / "c100.tar.gz") if as_archive else folder)
    fine = open_source(spec)
    coarse = open_source(spec, label="coarse")
    assert fine.kind == coarse.kind == "cifar100"
    assert len(fine.classes) == 100 and fine.classes[7] == "fine7"
    assert len(coarse.classes) == 20 and coarse.classes[3] == "coarse3"
    rows, fine_labels, coarse_labels = data["train"]
    images, labels, names, _ = read_all(fine, "train", batch_size=4)
    np.testing.assert_array_equal(images, rows_to_images(rows))
    np.testing.assert_array_equal(labels, fine_labels)
    assert names[5] == "cifar-100-python/train#5"
    np.testing.assert_array_equal(read_all(coarse, "train")[1], coarse_labels)
    np.testing.assert_array_equal(read_all(coarse, "test")[1], data["test"][2])


def test_cifar_resized(tmp_path):
    folder, *_ = make_cifar10(tmp_path)
    src = open_source(str(folder), size=16)
    (batch, *_rest) = src.iter_batches("train", 6)
    assert batch.images.shape == (6, 16, 16, 3) and src.image_size == 16


def test_cifar_label_errors(tmp_path):
    folder, *_ = make_cifar10(tmp_path)
    with pytest.raises(SourceError, match="coarse.*CIFAR-100"):
        open_source(str(folder), label="coarse")
    with pytest.raises(SourceError, match="label must be one of"):
        open_source(str(folder), label="medium")
    with pytest.raises(SourceError, match="coarse"):
        open_source("synthetic:10", label="coarse")


def test_cifar_missing_member(tmp_path):
    folder, *_ = make_cifar10(tmp_path / "x")
    (folder / "data_batch_3").unlink()
    with pytest.raises(SourceError, match=r"cifar-10-batches-py' is missing data_batch_3") as e:
        open_source(str(folder))
    assert "\n" not in str(e.value)
    archive = make_tar(folder, tmp_path / "c.tar.gz")
    with pytest.raises(SourceError, match=r"c\.tar\.gz' is missing data_batch_3"):
        open_source(str(archive))
    c100, _ = make_cifar100(tmp_path / "y")
    (c100 / "test").unlink()
    with pytest.raises(SourceError, match="CIFAR-100 source .* is missing test"):
        open_source(str(c100))


def test_cifar_bad_pickles(tmp_path):
    folder, *_ = make_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(SourceError, match=r"cannot read CIFAR pickle '.*data_batch_2'"):
        open_source(str(folder))
    dump(folder / "data_batch_2", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(SourceError, match=r"data_batch_2': 'data' has shape \(2, 100\)"):
        open_source(str(folder))
    dump(folder / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(SourceError, match="1 'labels' for 2 images"):
        open_source(str(folder))
    dump(folder / "data_batch_2", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]})
    with pytest.raises(SourceError, match="outside 0..9"):
        open_source(str(folder))
    dump(folder / "data_batch_2", [1, 2, 3])
    with pytest.raises(SourceError, match="holds a list, not a dict"):
        open_source(str(folder))


def test_cifar_pickle_from_numpy_1(tmp_path):
    # The official files were pickled by NumPy 1 (module numpy.core.multiarray).
    folder, *_ = make_cifar10(tmp_path)
    rows = cifar_rows(np.random.default_rng(4), 2)
    raw = pickle.dumps({b"data": rows, b"labels": [1, 2]}, protocol=2)
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    (folder / "test_batch").write_bytes(raw.replace(b"numpy._core.multiarray",
                                                    b"numpy.core.multiarray"))
    (batch,) = open_source(str(folder)).iter_batches("test", 10)
    np.testing.assert_array_equal(batch.images, rows_to_images(rows))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder, *_ = make_cifar10(tmp_path)
    (folder / "batches.meta").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(SourceError, match="refusing to load .*system"):
        open_source(str(folder))


def test_cifar_parent_folder_hint(tmp_path):
    make_cifar10(tmp_path / "downloads")
    with pytest.raises(SourceError, match="looks like CIFAR: give that folder itself"):
        open_source(str(tmp_path / "downloads"))


def test_archive_errors(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.txt").write_text("hello")
    archive = make_tar(other, tmp_path / "other.tar.gz")
    with pytest.raises(SourceError, match="not a CIFAR-10/100 python archive"):
        open_source(str(archive))
    broken = tmp_path / "broken.tar.gz"
    folder, *_ = make_cifar10(tmp_path / "c")
    data = make_tar(folder, tmp_path / "good.tar.gz").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="broken.tar.gz"):
        open_source(str(broken))
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(SourceError, match="is a file but not a CIFAR"):
        open_source(str(text))


# --------------------------------------------------------------------------
# Image folders


def test_class_folder_exact_pixels_and_holdout(tmp_path):
    pixels = make_class_folder(tmp_path / "data", {"b": 5, "a": 7, "c": 8})
    src = open_source(str(tmp_path / "data"), test_fraction=0.25, seed=3)
    assert src.kind == "folder" and src.classes == ["a", "b", "c"]
    assert src.count("train") + src.count("test") == 20
    assert src.count("test") == 5 and src.held_out == 0.25
    tr_images, tr_labels, tr_names, _ = read_all(src, "train")
    te_images, te_labels, te_names, _ = read_all(src, "test")
    assert not set(tr_names) & set(te_names)
    assert sorted(tr_names + te_names) == sorted(pixels)
    for images, labels, names in ((tr_images, tr_labels, tr_names),
                                  (te_images, te_labels, te_names)):
        for image, label, name in zip(images, labels, names, strict=True):
            np.testing.assert_array_equal(image, pixels[name])  # 32x32: not resampled
            assert src.classes[label] == name.split("/")[0]
    # Both splits keep the source order (class, then natural file order).
    order = sorted(pixels, key=lambda n: (n.split("/")[0], int(n.split("img")[1][:-4])))
    assert tr_names == [n for n in order if n in set(tr_names)]
    assert te_names == [n for n in order if n in set(te_names)]
    # Deterministic: the same seed gives the same split; another seed another one.
    again = open_source(str(tmp_path / "data"), test_fraction=0.25, seed=3)
    assert read_all(again, "test")[2] == te_names
    other = open_source(str(tmp_path / "data"), test_fraction=0.25, seed=4)
    assert read_all(other, "test")[2] != te_names
    none = open_source(str(tmp_path / "data"), test_fraction=0.0)
    assert none.count("test") == 0 and read_all(none, "test")[0].shape == (0, 32, 32, 3)


def test_holdout_rule_is_the_documented_permutation(tmp_path):
    make_class_folder(tmp_path / "d", {"x": 6, "y": 6})
    src = open_source(str(tmp_path / "d"), test_fraction=0.3, seed=11)
    perm = np.random.default_rng(11).permutation(12)
    expected = sorted(perm[: round(0.3 * 12)])
    all_names = [f"x/img{i}.png" for i in range(6)] + [f"y/img{i}.png" for i in range(6)]
    assert read_all(src, "test")[2] == [all_names[i] for i in expected]


def test_train_test_layout(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"dog": 4, "cat": 3})
    make_class_folder(tmp_path / "d" / "test", {"dog": 2, "cat": 1}, seed=1)
    src = open_source(str(tmp_path / "d"), test_fraction=0.5)
    assert src.classes == ["cat", "dog"] and src.held_out is None
    assert src.count("train") == 7 and src.count("test") == 3
    _, labels, names, _ = read_all(src, "test")
    assert names == ["test/cat/img0.png", "test/dog/img0.png", "test/dog/img1.png"]
    np.testing.assert_array_equal(labels, [0, 1, 1])
    assert read_all(src, "train")[2][0] == "train/cat/img0.png"


def test_train_only_layout_holds_out(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"a": 5, "b": 5})
    src = open_source(str(tmp_path / "d"), test_fraction=0.2)
    assert src.count("train") == 8 and src.count("test") == 2 and src.held_out == 0.2


def test_train_test_class_mismatch(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"a": 2, "b": 2})
    make_class_folder(tmp_path / "d" / "test", {"a": 1, "c": 1})
    with pytest.raises(SourceError, match=r"only in train/: \['b'\], only in test/: \['c'\]"):
        open_source(str(tmp_path / "d"))


def test_split_layout_errors(tmp_path):
    make_class_folder(tmp_path / "d" / "train", {"a": 1})
    make_class_folder(tmp_path / "d" / "val", {"a": 1})
    with pytest.raises(SourceError, match="beside other folders"):
        open_source(str(tmp_path / "d"))
    make_class_folder(tmp_path / "e" / "test", {"a": 1})
    with pytest.raises(SourceError, match="has test/ but no train/"):
        open_source(str(tmp_path / "e"))


def test_empty_class_folder(tmp_path):
    make_class_folder(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "d" / "empty").mkdir()
    (tmp_path / "d" / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(SourceError, match=r"class folder '.*empty' holds no images"):
        open_source(str(tmp_path / "d"))


def test_nested_class_folders_extensions_and_hidden_files(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    save_rgb(root / "a" / "sub" / "deep.PNG", rng)
    save_rgb(root / "a" / "x.JPEG", rng)
    save_rgb(root / "a" / "y.bmp", rng)
    save_rgb(root / "a" / "z.webp", rng)
    save_rgb(root / "b" / "p.gif", rng)
    save_rgb(root / "b" / "q.tiff", rng)
    (root / "b" / ".DS_Store").write_bytes(b"junk")
    (root / "b" / "._q.tiff").write_bytes(b"apple double junk")
    (root / "b" / "readme.md").write_text("not an image")
    src = open_source(str(root), test_fraction=0)
    _, labels, names, _ = read_all(src, "train")
    assert names == ["a/sub/deep.PNG", "a/x.JPEG", "a/y.bmp", "a/z.webp", "b/p.gif",
                     "b/q.tiff"]
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1])
    assert {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"} == set(
        IMAGE_EXTENSIONS)


def test_image_modes_become_rgb(tmp_path):
    root = tmp_path / "modes" / "all"
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(grey).save(root / "grey.png")  # L
    Image.fromarray(grey).convert("LA").save(root / "la.png")  # LA, alpha 255
    wide = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0..65472
    Image.fromarray(wide).save(root / "wide16.png")  # I;16
    assert Image.open(root / "wide16.png").mode.startswith("I")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:16, :, 3] = 0  # top half transparent
    rgba[16:, :, 3] = 128  # bottom half half-transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    pal = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (32, 8)), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])
    pal.save(root / "pal.png", transparency=0)  # palette index 0 transparent
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red in CMYK
    cmyk.save(root / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((32, 32), 0.5, np.float32), "F").save(root / "float.tif")
    src = open_source(str(tmp_path / "modes"), test_fraction=0)
    images, _, names, _ = read_all(src, "train", batch_size=100)
    got = dict(zip(names, images, strict=True))
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)
    np.testing.assert_array_equal(got["all/grey.png"], np.repeat(grey[..., None], 3, 2))
    np.testing.assert_array_equal(got["all/la.png"], np.repeat(grey[..., None], 3, 2))
    expected16 = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(got["all/wide16.png"][..., 0], expected16)
    assert got["all/wide16.png"].max() == 255 * 65472 // 65535 + 1  # scaled, not clipped
    np.testing.assert_array_equal(got["all/rgba.png"][:16], 0)  # composited on black
    np.testing.assert_allclose(got["all/rgba.png"][16:], np.broadcast_to(
        np.array([200, 100, 50]) * 128 / 255, (16, 32, 3)), atol=1)
    pal_px = got["all/pal.png"]
    np.testing.assert_array_equal(pal_px[:, 0::4], 0)  # transparent index -> black
    np.testing.assert_array_equal(pal_px[:, 1::4], np.broadcast_to([0, 255, 0], (32, 8, 3)))
    assert (np.abs(got["all/cmyk.jpg"].astype(int) - [255, 0, 0]) <= 8).all()
    np.testing.assert_array_equal(got["all/float.tif"], 128)


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high
    a[:, :32] = (255, 0, 0)  # left half red
    a[:, 32:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: left half goes on top
    (tmp_path / "d" / "k").mkdir(parents=True)
    Image.fromarray(a).save(tmp_path / "d" / "k" / "rot.jpg", quality=95, exif=exif)
    src = open_source(str(tmp_path / "d"), test_fraction=0)
    image = read_all(src, "train")[0][0].astype(int)
    assert image[:12, :, 0].mean() > 200 and image[:12, :, 2].mean() < 50
    assert image[-12:, :, 2].mean() > 200 and image[-12:, :, 0].mean() < 50


def test_large_images_are_squashed(tmp_path):
    rng = np.random.default_rng(2)
    save_rgb(tmp_path / "d" / "k" / "wide.jpg", rng, size=(640, 200))
    save_rgb(tmp_path / "d" / "k" / "tall.png", rng, size=(30, 90))
    src = open_source(str(tmp_path / "d"), size=24, test_fraction=0)
    images = read_all(src, "train")[0]
    assert images.shape == (2, 24, 24, 3)


def test_corrupt_and_truncated_fail_or_skip(tmp_path):
    pixels = make_class_folder(tmp_path / "d", {"a": 3, "b": 3})
    rng = np.random.default_rng(9)
    (tmp_path / "d" / "a" / "img10.png").write_bytes(b"\x89PNG garbage garbage")
    truncated_jpeg(tmp_path / "d" / "b" / "img10.jpg", rng)
    failing = open_source(str(tmp_path / "d"), test_fraction=0)
    with pytest.raises(SourceError, match=r"cannot decode image '.*img10\.png': ") as e:
        read_all(failing, "train", batch_size=3)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    # The first batch (before the bad file) is fine; the bad file is in batch 2.
    assert len(next(failing.iter_batches("train", 3)).names) == 3
    with pytest.raises(SourceError, match=r"cannot decode image '.*img10\.jpg': .*truncated"):
        list(failing.iter_batches("train", 4, start=4))
    skipping = open_source(str(tmp_path / "d"), test_fraction=0, on_error="skip")
    batches = list(skipping.iter_batches("train", 3))
    assert [len(b.names) + len(b.skipped) for b in batches] == [3, 3, 2]
    skipped = [s for b in batches for s in b.skipped]
    assert [name for name, _ in skipped] == ["a/img10.png", "b/img10.jpg"]
    assert all(reason for _, reason in skipped)
    images, labels, names, _ = read_all(skipping, "train", batch_size=3)
    assert names == sorted(pixels, key=lambda n: (n[0], n))
    assert len(images) == len(labels) == 6
    for image, name in zip(images, names, strict=True):
        np.testing.assert_array_equal(image, pixels[name])


def test_all_images_of_a_batch_skipped(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "bad.png").write_bytes(b"nope")
    src = open_source(str(tmp_path / "d"), test_fraction=0, on_error="skip")
    (batch,) = src.iter_batches("train", 4)
    assert batch.images.shape == (0, 32, 32, 3) and batch.labels.shape == (0,)
    assert batch.skipped[0][0] == "a/bad.png"


def test_workers_do_not_change_output(tmp_path):
    make_class_folder(tmp_path / "d", {"a": 9, "b": 8})
    outs = []
    for workers in (1, 2, 3):
        with open_source(str(tmp_path / "d"), workers=workers, test_fraction=0.2) as src:
            outs.append(read_all(src, "train", batch_size=5))
    for images, labels, names, _ in outs[1:]:
        np.testing.assert_array_equal(images, outs[0][0])
        np.testing.assert_array_equal(labels, outs[0][1])
        assert names == outs[0][2]


def test_abandoned_iteration_and_close(tmp_path):
    make_class_folder(tmp_path / "d", {"a": 10})
    src = open_source(str(tmp_path / "d"), test_fraction=0, workers=2)
    it = src.iter_batches("train", 2)
    next(it)
    it.close()  # drops the prefetched batch
    src.close()
    with pytest.raises(SourceError, match="closed"):
        list(src.iter_batches("train", 2))


# --------------------------------------------------------------------------
# Kaggle flat layout


def test_kaggle_flat_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ["cat.10.png", "cat.2.png", "cat.1.png", "dog.3.png", "dog.20.png"]:
        save_rgb(tmp_path / "k" / name, rng)
    (tmp_path / "k" / "empty_subfolder").mkdir()
    src = open_source(str(tmp_path / "k"), test_fraction=0)
    assert src.kind == "kaggle" and src.classes == ["cat", "dog"]
    _, labels, names, _ = read_all(src, "train")
    assert names == ["cat.1.png", "cat.2.png", "cat.10.png", "dog.3.png", "dog.20.png"]
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])


def test_kaggle_unlabelled_name(tmp_path):
    rng = np.random.default_rng(0)
    save_rgb(tmp_path / "k" / "cat.1.png", rng)
    save_rgb(tmp_path / "k" / "17.png", rng)
    with pytest.raises(SourceError, match=r"cannot take a label from '.*17\.png'"):
        open_source(str(tmp_path / "k"))


def test_mixed_flat_and_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    save_rgb(tmp_path / "k" / "cat.1.png", rng)
    save_rgb(tmp_path / "k" / "dog" / "x.png", rng)
    with pytest.raises(SourceError, match="both image files and class folders"):
        open_source(str(tmp_path / "k"))


def test_photos_are_found_through_the_environment(monkeypatch, tmp_path):
    from ..conftest import PHOTOS_ENV, REPO, photos_dir

    monkeypatch.setenv(PHOTOS_ENV, str(tmp_path))
    assert photos_dir() == tmp_path
    monkeypatch.delenv(PHOTOS_ENV)
    assert photos_dir() == REPO.parent / "shared" / "data" / "dogs-vs-cats-1k"


@pytest.mark.skipif(not DOGS_VS_CATS.is_dir(), reason=PHOTOS_MISSING)
def test_dogs_vs_cats_sample():
    with open_source(str(DOGS_VS_CATS), test_fraction=0) as whole:
        assert whole.kind == "kaggle" and whole.classes == ["cat", "dog"]
        assert whole.count("train") == 1000 and whole.count("test") == 0
        images, labels, names, skipped = read_all(whole, "train", batch_size=250)
    assert images.shape == (1000, 32, 32, 3) and skipped == []
    assert np.bincount(labels).tolist() == [500, 500]
    assert names[:3] == ["cat.0.jpg", "cat.1.jpg", "cat.2.jpg"]  # natural order
    assert images.std() > 30  # real photos, not blank
    with open_source(str(DOGS_VS_CATS)) as src, open_source(str(DOGS_VS_CATS)) as again:
        assert src.count("train") == 900 and src.count("test") == 100  # default 10% held out
        test_images, _, test_names, _ = read_all(src, "test", batch_size=64)
        assert read_all(again, "test", batch_size=64)[2] == test_names  # deterministic
    assert len(set(test_names)) == 100 and set(test_names) <= set(names)
    index = {n: i for i, n in enumerate(names)}
    np.testing.assert_array_equal(test_images, images[[index[n] for n in test_names]])


# --------------------------------------------------------------------------
# synthetic and digits


def test_synthetic_deterministic_and_batch_size_independent():
    a = open_source("synthetic:300", seed=7)
    b = open_source("synthetic:300", seed=7)
    assert a.kind == "synthetic" and a.classes == [f"class{i}" for i in range(10)]
    assert a.count("train") == 270 and a.count("test") == 30
    for split in ("train", "test"):
        ia, la, na, _ = read_all(a, split, batch_size=64)
        ib, lb, nb, _ = read_all(b, split, batch_size=7)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert na == nb
    assert set(read_all(a, "train")[2]).isdisjoint(read_all(a, "test")[2])
    c = open_source("synthetic:300", seed=8)
    assert not np.array_equal(read_all(c, "train")[0], read_all(a, "train")[0])


def test_synthetic_threads_do_not_change_output():
    one = open_source("synthetic:3000", workers=1, size=40)
    three = open_source("synthetic:3000", workers=3, size=40)
    a, b = next(one.iter_batches("train", 2000)), next(three.iter_batches("train", 2000))
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.names == b.names and a.images.shape == (2000, 40, 40, 3)
    three.close()


def test_synthetic_sample_depends_only_on_seed_and_index():
    # The same global index gives the same image whatever the split layout.
    a = open_source("synthetic:200", seed=1, test_fraction=0)
    b = open_source("synthetic:200", seed=1, test_fraction=0.5)
    all_images, all_labels, _, _ = read_all(a, "train", batch_size=50)
    for split in ("train", "test"):
        images, labels, names, _ = read_all(b, split, batch_size=13)
        idx = [int(n.split("#")[1]) for n in names]
        np.testing.assert_array_equal(images, all_images[idx])
        np.testing.assert_array_equal(labels, all_labels[idx])


def test_synthetic_content():
    src = open_source("synthetic:2000:4", test_fraction=0)
    images, labels, _, _ = read_all(src, "train", batch_size=500)
    assert src.classes == ["class0", "class1", "class2", "class3"]
    assert images.shape == (2000, 32, 32, 3) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=4)
    assert counts.min() > 400  # roughly uniform labels
    assert images.std() > 30  # structure and noise, not flat
    # Class-dependent structure: class means differ much more than noise allows.
    means = np.stack([images[labels == c].astype(float).mean(0) for c in range(4)])
    assert np.abs(means[0] - means[1]).mean() > 5
    resized = open_source("synthetic:20:4", size=48, test_fraction=0)
    (batch,) = resized.iter_batches("train", 20)
    assert batch.images.shape == (20, 48, 48, 3)


def test_synthetic_bounded_memory_and_random_access():
    src = open_source("synthetic:1000000", seed=2, test_fraction=0.01)
    n = src.count("train")
    tracemalloc.start()
    try:
        it = src.iter_batches("train", 512, start=n - 2000)
        tail = [next(it) for _ in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40e6  # a few batches, not 10**6 images (3 GB)
    assert tail[0].names[0] == f"synthetic#{src._index['train'][n - 2000]}"
    again = next(src.iter_batches("train", 100, start=n - 2000))
    np.testing.assert_array_equal(again.images, tail[0].images[:100])


def test_synthetic_spec_errors():
    for spec in ["synthetic", "synthetic:", "synthetic:abc", "synthetic:10:2:3",
                 "synthetic:0", "synthetic:10:1"]:
        with pytest.raises(SourceError, match="synthetic"):
            open_source(spec)


def test_digits():
    src = open_source("digits", size=16, test_fraction=0.2, seed=0)
    assert src.kind == "digits" and src.classes == [str(i) for i in range(10)]
    assert src.count("train") + src.count("test") == 1797
    assert src.count("test") == round(0.2 * 1797)
    images, labels, names, _ = read_all(src, "test", batch_size=100)
    assert images.shape == (src.count("test"), 16, 16, 3)
    assert (images[..., 0] == images[..., 2]).all()  # grey
    assert images.max() > 200 and images.min() == 0
    assert set(labels.tolist()) == set(range(10))
    assert names[0].startswith("digits#")
    native = open_source("digits", size=8, test_fraction=0)
    from sklearn.datasets import load_digits

    first = next(native.iter_batches("train", 1)).images[0, :, :, 0]
    np.testing.assert_array_equal(first, np.rint(load_digits().images[0] * 255 / 16))


# --------------------------------------------------------------------------
# Resuming and argument errors


@pytest.mark.parametrize("kind", ["cifar", "folder", "synthetic"])
def test_resume_gives_the_tail(tmp_path, kind):
    if kind == "cifar":
        spec = str(make_cifar10(tmp_path)[0])
    elif kind == "folder":
        make_class_folder(tmp_path / "d", {"a": 6, "b": 7})
        spec = str(tmp_path / "d")
    else:
        spec = "synthetic:23"
    src = open_source(spec, test_fraction=0)
    full = list(src.iter_batches("train", 4))
    resumed = list(src.iter_batches("train", 4, start=8))
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed, strict=True):
        assert isinstance(b, Batch)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.names == b.names
    # Any start: sample-for-sample the same as the full read.
    images, _, names, _ = read_all(src, "train", batch_size=5, start=3)
    full_images, _, full_names, _ = read_all(src, "train", batch_size=4)
    np.testing.assert_array_equal(images, full_images[3:])
    assert names == full_names[3:]
    assert list(src.iter_batches("train", 4, start=src.count("train"))) == []


def test_argument_errors(tmp_path):
    make_class_folder(tmp_path / "d", {"a": 2})
    spec = str(tmp_path / "d")
    bad_options = [
        (dict(size=0), "size must be an integer >= 1"),
        (dict(size=3.5), "size must be"),
        (dict(seed=-1), "seed must be"),
        (dict(test_fraction=1.0), "test_fraction must be"),
        (dict(test_fraction=-0.1), "test_fraction must be"),
        (dict(test_fraction=float("nan")), "test_fraction must be"),
        (dict(on_error="ignore"), "on_error must be one of"),
        (dict(workers=0), "workers must be"),
    ]
    for kwargs, message in bad_options:
        with pytest.raises(SourceError, match=message):
            open_source(spec, **kwargs)
    src = open_source(spec)
    with pytest.raises(SourceError, match="unknown split 'val'"):
        src.count("val")
    with pytest.raises(SourceError, match="batch_size must be"):
        src.iter_batches("train", 0)
    with pytest.raises(SourceError, match="start 99 is past the end"):
        src.iter_batches("train", 1, start=99)


def test_missing_empty_and_unknown_sources(tmp_path):
    with pytest.raises(SourceError, match=r"source '.*nowhere' does not exist"):
        open_source(str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="source 'cifar10' does not exist"):
        open_source("cifar10")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"folder '.*empty' holds no images"):
        open_source(str(tmp_path / "empty"))
    assert issubclass(SourceError, ValueError)


def test_source_help_lists_every_form():
    for word in ["cifar-10-batches-py", "cifar-100-python", "tar.gz", "<class>", "train/",
                 "cat.12.jpg", "synthetic:N[:C]", "digits", "bicubic", "black"]:
        assert word in SOURCE_HELP


def test_iter_batches_stop_reads_a_slice():
    src = open_source("synthetic:50", test_fraction=0)
    whole = np.concatenate([b.images for b in src.iter_batches("train", 8)])
    part = [b for b in src.iter_batches("train", 8, start=10, stop=27)]
    assert [len(b.labels) for b in part] == [8, 8, 1]
    assert np.array_equal(np.concatenate([b.images for b in part]), whole[10:27])
    with pytest.raises(SourceError, match="stop 51 is past the end"):
        src.iter_batches("train", 8, stop=51)
    with pytest.raises(SourceError, match="stop must be an integer >= 10"):
        src.iter_batches("train", 8, start=10, stop=5)
    src.close()
