"""Image folders with odd entries: folders that cannot be listed, link loops, FIFOs and
dangling links named like images, names that are not UTF-8 or hold control characters.

Nothing is dropped silently: each is an error naming it, or (``on_error="skip"``)
left out and listed; nothing waits on a FIFO; every name is stored.
"""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from porder.sources import SourceError, open_source
from porder.sources.base import printable, stored_name


def save(path: Path, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return a


def read_all(src, split="train", batch_size=4):
    """(images, names, skipped) of a split, read in a thread that must end within 60 s
    (a FIFO opened for reading would block it forever)."""
    out = {}

    def work():
        try:
            batches = list(src.iter_batches(split, batch_size))
            out["value"] = (np.concatenate([b.images for b in batches]),
                            [n for b in batches for n in b.names],
                            [s for b in batches for s in b.skipped])
        except BaseException as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "reading the source hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def tree(tmp_path):
    """root/a/{0,1}.png, root/a/sub/{2,3}.png, root/b/{4,5}.png."""
    root = tmp_path / "d"
    for rel, seed in (("a/0.png", 0), ("a/1.png", 1), ("a/sub/2.png", 2), ("a/sub/3.png", 3),
                      ("b/4.png", 4), ("b/5.png", 5)):
        save(root / rel, seed)
    return root


def refuse_listing(monkeypatch, *folders: Path):
    """os.scandir raises PermissionError for ``folders``, as for a folder without read
    permission (the tests run as root, which reads everything)."""
    real = os.scandir
    refused = {os.fspath(f) for f in folders}

    def scandir(path="."):
        if os.fspath(path) in refused:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


# --------------------------------------------------------------------------
# Folders that cannot be listed


def test_unlistable_subfolder_is_an_error_naming_it(tree, monkeypatch):
    refuse_listing(monkeypatch, tree / "a" / "sub")
    with pytest.raises(SourceError, match=r"cannot list folder '.*/a/sub': \[Errno 13\] "
                                          r"Permission denied.*on_error='skip'"):
        open_source(str(tree), test_fraction=0)


def test_unlistable_subfolder_is_listed_with_skip(tree, monkeypatch):
    refuse_listing(monkeypatch, tree / "a" / "sub")
    with open_source(str(tree), test_fraction=0, on_error="skip") as src:
        assert src.count("train") == 4  # a/0, a/1, b/4, b/5
        images, names, skipped = read_all(src)
    assert names == ["a/0.png", "a/1.png", "b/4.png", "b/5.png"]
    assert skipped == [("a/sub/", "cannot list folder: [Errno 13] Permission denied: "
                                  f"'{tree / 'a' / 'sub'}'")]
    # Reported once, with the batch that covers sample 0 (a resumed run starts later).
    with open_source(str(tree), test_fraction=0, on_error="skip") as src:
        assert all(not b.skipped for b in src.iter_batches("train", 1, start=1))


def test_unlistable_class_folder_keeps_its_class(tree, monkeypatch):
    refuse_listing(monkeypatch, tree / "b")
    with open_source(str(tree), test_fraction=0, on_error="skip") as src:
        assert src.classes == ["a", "b"]
        _, names, skipped = read_all(src)
    assert names == ["a/0.png", "a/1.png", "a/sub/2.png", "a/sub/3.png"]
    assert [s[0] for s in skipped] == ["b/"]


def test_unlistable_folder_in_the_test_split(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            save(root / split / cls / "0.png", 0)
            save(root / split / cls / "more" / "1.png", 1)
    refuse_listing(monkeypatch, root / "test" / "b" / "more")
    with open_source(str(root), on_error="skip") as src:
        assert read_all(src, "train")[2] == []
        _, names, skipped = read_all(src, "test")
    assert names == ["test/a/0.png", "test/a/more/1.png", "test/b/0.png"]
    assert [s[0] for s in skipped] == ["test/b/more/"]


def test_a_split_without_samples_still_reports_its_unlisted_folders(tmp_path, monkeypatch):
    root = tmp_path / "d"
    save(root / "a" / "0.png", 0)
    save(root / "b" / "1.png", 1)
    (root / "b" / "deep").mkdir()
    refuse_listing(monkeypatch, root / "b" / "deep")
    with open_source(str(root), test_fraction=0, on_error="skip") as src:
        assert src.count("test") == 0
        (batch,) = src.iter_batches("train", 10)
        assert batch.names == ["a/0.png", "b/1.png"] and batch.skipped[0][0] == "b/deep/"


def test_linked_folders_are_followed_and_loops_refused(tree):
    other = tree.parent / "elsewhere"
    save(other / "9.png", 9)
    (tree / "b" / "linked").symlink_to(other, target_is_directory=True)
    with open_source(str(tree), test_fraction=0) as src:
        assert "b/linked/9.png" in read_all(src)[1]
    (tree / "a" / "sub" / "up").symlink_to(tree / "a", target_is_directory=True)
    with pytest.raises(SourceError, match=r"cannot list folder '.*a/sub/up': it links back "
                                          r"to a folder above it"):
        open_source(str(tree), test_fraction=0)
    with open_source(str(tree), test_fraction=0, on_error="skip") as src:
        _, names, skipped = read_all(src)
    assert "a/sub/2.png" in names and [s[0] for s in skipped] == ["a/sub/up/"]


# --------------------------------------------------------------------------
# Entries named like images that are not regular files


@pytest.mark.parametrize("workers", [1, 2])
def test_fifo_named_like_an_image_is_refused_not_waited_on(tree, workers):
    os.mkfifo(tree / "a" / "x.jpg")
    with open_source(str(tree), test_fraction=0, workers=workers) as src:
        with pytest.raises(SourceError, match=r"cannot decode image '.*/a/x.jpg': not a "
                                              r"regular file \(a FIFO\)"):
            read_all(src)
    with open_source(str(tree), test_fraction=0, workers=workers, on_error="skip") as src:
        images, names, skipped = read_all(src)
    assert len(names) == 6 and skipped == [("a/x.jpg", "not a regular file (a FIFO)")]


def test_fifo_in_a_flat_kaggle_folder(tmp_path):
    root = tmp_path / "k"
    save(root / "cat.1.png", 1)
    save(root / "dog.1.png", 2)
    os.mkfifo(root / "cat.2.png")
    with open_source(str(root), test_fraction=0, on_error="skip") as src:
        _, names, skipped = read_all(src)
    assert names == ["cat.1.png", "dog.1.png"] and skipped[0][0] == "cat.2.png"


def test_dangling_link_and_folder_named_like_images(tree):
    (tree / "a" / "gone.png").symlink_to(tree / "nowhere.png")
    with open_source(str(tree), test_fraction=0) as src:
        with pytest.raises(SourceError, match=r"cannot decode image '.*/a/gone.png': "
                                              r"\[Errno 2\] No such file"):
            read_all(src)
    (tree / "a" / "gone.png").unlink()
    save(tree / "a" / "folder.png" / "6.png", 6)  # a folder named like an image is a folder
    with open_source(str(tree), test_fraction=0) as src:
        assert "a/folder.png/6.png" in read_all(src)[1]


# --------------------------------------------------------------------------
# Names


def test_names_that_are_not_utf8_are_stored_escaped(tmp_path):
    root = os.fsencode(tmp_path / "d")
    pixels = {}
    for cls, name, seed in ((b"caf\xe9", b"img\xff.png", 0), (b"caf\xe9", b"ok.png", 1),
                            (b"plain", b"\x80.png", 2)):
        path = os.path.join(root, cls, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels[path] = save(Path(os.fsdecode(path)), seed)
    with open_source(os.fsdecode(root), test_fraction=0) as src:
        assert src.classes == ["caf\\xe9", "plain"]
        images, names, _ = read_all(src)
    assert names == ["caf\\xe9/img\\xff.png", "caf\\xe9/ok.png", "plain/\\x80.png"]
    for image, path in zip(images, pixels, strict=True):  # each decoded from its real file
        np.testing.assert_array_equal(image, pixels[path])


def test_a_bad_image_with_an_odd_name_is_named_on_one_line(tmp_path):
    root = tmp_path / "d"
    save(root / "a" / "0.png", 0)
    bad = os.path.join(os.fsencode(root / "a"), b"bad\n\x1b[2J\xff.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with open_source(str(root), test_fraction=0) as src:
        with pytest.raises(SourceError) as e:
            read_all(src)
    message = str(e.value)
    assert "\n" not in message and "\x1b" not in message
    assert "bad\\n\\x1b[2J\\xff.png': cannot identify image file" in message
    with open_source(str(root), test_fraction=0, on_error="skip") as src:
        assert read_all(src)[2] == [("a/bad\n\x1b[2J\\xff.png", "cannot identify image file")]


def test_stored_name_and_printable():
    # stored: exact, but bytes that are not UTF-8 and NUL become \xNN (HDF5 cannot hold them)
    assert stored_name(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert stored_name(b"caf\xc3\xa9") == "caf\u00e9" == stored_name("caf\u00e9")
    assert stored_name("a\x00b\x1b") == "a\\x00b\x1b"
    # printable: also control and format characters, for a terminal
    assert printable("a\x1b[31m\nb\tc\u202ed\u2028") == "a\\x1b[31m\\nb\\tc\\u202ed\\u2028"
    assert printable("caf\u00e9 \U0001f600 x") == "caf\u00e9 \U0001f600 x"
    assert printable(os.fsdecode(b"\xff\n")) == "\\xff\\n"
