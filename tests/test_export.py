"""porder.export: image folders and .npz files that round-trip to the cache's arrays."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

import porder
from porder.export import MANIFEST, ExportError, export, folder_name, folder_names, read_manifest
from porder.store import StoreError, Writer, read_split

CLASSES = ["cat", "dog", "bird"]


def make_cache(path, *, n_train=40, n_test=12, size=16, patch=4, measure="entropy", seed=0,
               classes=CLASSES, chunk=4):
    """A small porder file made by porder.reorder (so perm is not the identity).

    Written in batches of 16 with HDF5 chunks of ``chunk`` rows. Returns the
    path and the original images of each split.
    """
    rng = np.random.default_rng(seed)
    w = Writer(path, meta={"measure": measure, "patch": patch, "bins": 256, "image_size": size,
                           "source": "test-fixture", "seed": seed}, classes=classes, chunk=chunk)
    originals = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        y = rng.integers(0, len(classes), n).astype(np.int64)
        out, perm = porder.reorder(x, measure, patch)
        for lo in range(0, n, 16):
            hi = min(lo + 16, n)
            w.append(split, out[lo:hi], y[lo:hi], perm[lo:hi].astype(np.uint16),
                     [f"{split}/{i}.png" for i in range(lo, hi)], consumed=hi)
        originals[split] = x
    return w.finish(), originals


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("export") / "c.h5")


def read_folder(root, split, folders):
    """(images, labels, rows) of an exported split, in row order, from the PNGs alone."""
    items = []
    for label, name in enumerate(folders):
        d = root / split / name
        if d.is_dir():
            items += [(int(f.stem), label, np.asarray(Image.open(f))) for f in d.iterdir()]
    items.sort()
    return (np.stack([i[2] for i in items]), np.array([i[1] for i in items]),
            [i[0] for i in items])


def tree_digest(root):
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_imagefolder_round_trip(cache, tmp_path):
    path, _ = cache
    out = export(path, tmp_path / "exp")
    man = read_manifest(out)
    assert man["format"] == "imagefolder" and man["restored"] is False
    assert man["splits"] == {"train": 40, "test": 12} and man["folders"] == CLASSES
    assert man["options"]["measure"] == "entropy" and man["options"]["patch"] == 4
    for split in ("train", "test"):
        want = read_split(path, split)
        images, labels, rows = read_folder(out, split, man["folders"])
        assert rows == list(range(len(want["labels"])))
        assert np.array_equal(images, want["images"])
        assert np.array_equal(labels, want["labels"])
    # zero-padded names sort in row order
    names = sorted(f.name for f in (out / "train").rglob("*.png"))
    assert names[:3] == ["00.png", "01.png", "02.png"] and len(names) == 40


def test_imagefolder_restore_gives_the_originals(cache, tmp_path):
    path, originals = cache
    out = export(path, tmp_path / "exp", restore=True, split="test")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "test"]
    images, labels, _ = read_folder(out, "test", read_manifest(out)["folders"])
    assert np.array_equal(images, originals["test"])
    assert not np.array_equal(images, read_split(path, "test")["images"])
    assert read_manifest(out)["restored"] is True


def test_export_is_deterministic(cache, tmp_path):
    path, _ = cache
    a = export(path, tmp_path / "a", workers=1)
    b = export(path, tmp_path / "b", workers=2)
    assert tree_digest(a) == tree_digest(b)


@pytest.mark.parametrize("restore", [False, True])
def test_npz_round_trip(cache, tmp_path, restore):
    path, originals = cache
    out = export(path, tmp_path / "npz", format="npz", restore=restore)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "test.npz", "train.npz"]
    for split in ("train", "test"):
        want = read_split(path, split)
        with np.load(out / f"{split}.npz", allow_pickle=False) as z:
            assert z["images"].dtype == np.uint8
            expect = originals[split] if restore else want["images"]
            assert np.array_equal(z["images"], expect)
            assert np.array_equal(z["labels"], want["labels"])
            assert np.array_equal(z["perm"], want["perm"]) and z["perm"].dtype == np.int64
            assert z["names"].tolist() == want["names"]
            assert z["classes"].tolist() == CLASSES
            assert bool(z["restored"]) is restore
            # the stored perm still maps the originals to the cached images
            if restore:
                assert np.array_equal(porder.restore_images(want["images"], z["perm"], 4),
                                      z["images"])


def test_npz_streams_in_chunks(tmp_path, monkeypatch):
    import porder.export as ex

    monkeypatch.setattr(ex, "CHUNK_ROWS", 7)     # several chunks, a partial one last
    path, _ = make_cache(tmp_path / "c.h5", n_train=23, n_test=0)
    out = export(path, tmp_path / "npz", format="npz")
    with np.load(out / "train.npz") as z:
        assert np.array_equal(z["images"], read_split(path, "train")["images"])
    with np.load(out / "test.npz") as z:
        assert z["images"].shape == (0, 16, 16, 3) and z["perm"].shape == (0, 16)


def test_refuses_a_non_empty_folder(cache, tmp_path):
    path, _ = cache
    out = tmp_path / "exp"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
        export(path, out)
    with pytest.raises(ExportError, match="not a porder export; refusing to replace it"):
        export(path, out, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]    # no temporary left behind


def test_overwrite_replaces_an_earlier_export(cache, tmp_path):
    path, _ = cache
    out = export(path, tmp_path / "exp", format="npz")
    with pytest.raises(ExportError, match="not empty"):
        export(path, out)
    export(path, out, split="test", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_an_empty_folder_is_used(cache, tmp_path):
    path, _ = cache
    (tmp_path / "exp").mkdir()
    out = export(path, tmp_path / "exp", format="npz", split="train")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "train.npz"]


def test_bad_arguments(cache, tmp_path):
    path, _ = cache
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="is a file"):
        export(path, tmp_path / "file")
    with pytest.raises(ExportError, match="does not exist"):
        export(path, tmp_path / "no" / "exp")
    with pytest.raises(ExportError, match="format='png' is not one of imagefolder, npz"):
        export(path, tmp_path / "x", format="png")
    with pytest.raises(ExportError, match="split='val'"):
        export(path, tmp_path / "x", split="val")
    with pytest.raises(StoreError, match="does not exist"):
        export(tmp_path / "missing.h5", tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failed_export_leaves_nothing(cache, tmp_path, monkeypatch):
    import porder.export as ex

    path, _ = cache

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "_npy_into", broken)
    with pytest.raises(OSError, match="disk full"):
        export(path, tmp_path / "exp", format="npz")
    assert list(tmp_path.iterdir()) == []


def test_folder_names_are_safe_and_unique():
    assert folder_name("a/b\\c") == "a_b_c"
    assert folder_name("x:y*?") == "x_y__"
    assert folder_name("..") == "_" and folder_name("") == "_" and folder_name(" . ") == "_"
    assert folder_name("con") == "con_" and folder_name("nul.txt") == "nul.txt_"
    assert folder_name("trail. ") == "trail"
    assert folder_name("é" * 150).encode() == ("é" * 100).encode()
    assert folder_names(["Cat", "cat", "dog", "a/b", "a_b"]) == \
        ["Cat_0", "cat_1", "dog", "a_b_3", "a_b_4"]


def test_awkward_class_names_export(tmp_path):
    path, _ = make_cache(tmp_path / "c.h5", n_train=12, n_test=3, classes=["a/b", "..", "A/B"])
    out = export(path, tmp_path / "exp")
    folders = read_manifest(out)["folders"]
    assert folders == ["a_b_0", "_", "A_B_2"]
    images, labels, _ = read_folder(out, "train", folders)
    assert np.array_equal(images, read_split(path, "train")["images"])
    assert np.array_equal(labels, read_split(path, "train")["labels"])


def test_progress_is_reported_per_split(cache, tmp_path):
    path, _ = cache
    events = []
    export(path, tmp_path / "exp", format="npz", progress=lambda *a: events.append(a))
    assert events[0] == ("train", 0, 40) and ("train", 40, 40) in events
    assert events[-1] == ("test", 12, 12)
