"""porder.export: image folders and .npz files that round-trip to the cache's arrays."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

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


# ---------------------------------------------------------------------------
# --overwrite removes only what porder wrote (issue 20, class 1)

def snapshot(root):
    """Every entry under ``root`` (links not followed): kind and content."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                state[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                state[rel] = ("dir",)
            elif p.is_file():
                state[rel] = ("file", p.read_bytes())
            else:
                state[rel] = ("other", stat.S_IFMT(p.lstat().st_mode))
    return state


def refused(match, path, out, **kw):
    """export() refuses (ExportError matching ``match``) and changes nothing beside ``out``."""
    before = snapshot(out.parent)
    with pytest.raises(ExportError, match=match) as e:
        export(path, out, **kw)
    assert snapshot(out.parent) == before
    assert "\n" not in str(e.value)
    return str(e.value)


def test_the_issue_case_is_refused(cache, tmp_path):
    """`{}` is not an export record: thesis.tex is kept, and the refusal names it."""
    path, _ = cache
    d = tmp_path / "d"
    d.mkdir()
    (d / MANIFEST).write_text("{}\n")
    (d / "thesis.tex").write_text("x\n")
    msg = refused("not a porder export", path, d, overwrite=True)
    assert "'thesis.tex'" in msg and "no \"record\": \"porder-export\"" in msg


def _genuine(path, tmp_path, **kw):
    return export(path, tmp_path / "exp", **kw)


def _forge(out, rec):
    (out / MANIFEST).write_text(json.dumps(rec))


@pytest.mark.parametrize("forge", [
    "not-json", "not-utf8", "list", "deep", "no-record", "newer", "lists-thesis", "dotdot",
    "absolute", "npz-lists-thesis", "folder-escapes", "counts", "dir-named-record",
    "link-to-record", "fifo-record", "huge", "no-files"])
def test_overwrite_refuses_a_forged_or_damaged_record(cache, tmp_path, monkeypatch, forge):
    """Only a valid record that lists what an export writes lets --overwrite remove
    anything; a user's thesis.tex beside it is never touched."""
    import porder.export as ex

    path, _ = cache
    fmt = "npz" if forge.startswith("npz") else "imagefolder"
    out = _genuine(path, tmp_path, format=fmt, split="test")
    rec = read_manifest(out)
    (out / "thesis.tex").write_text("x\n")
    m = out / MANIFEST
    if forge == "not-json":
        m.write_text("{\"record\": \"porder-export\",")
    elif forge == "not-utf8":
        m.write_bytes(b"\xff\xfe{}")
    elif forge == "list":
        _forge(out, [rec])
    elif forge == "deep":
        m.write_text("[" * 100_000 + "]" * 100_000)
    elif forge == "no-record":
        del rec["record"]
        _forge(out, rec)
    elif forge == "newer":
        _forge(out, {**rec, "record_version": 2})
    elif forge in ("lists-thesis", "npz-lists-thesis"):
        rec["files"]["thesis.tex"] = 2
        _forge(out, rec)
    elif forge == "dotdot":
        rec["files"]["test/../../thesis.tex"] = 2
        _forge(out, rec)
    elif forge == "absolute":
        rec["files"][str(out / "thesis.tex")] = 2
        _forge(out, rec)
    elif forge == "folder-escapes":
        rec["folders"][0] = ".."
        _forge(out, rec)
    elif forge == "counts":
        _forge(out, {**rec, "splits": {"test": 99}})
    elif forge == "no-files":      # a record of an export from before records listed files
        del rec["files"], rec["dirs"]
        _forge(out, rec)
    elif forge == "huge":
        monkeypatch.setattr(ex, "MAX_RECORD_BYTES", 100)
    else:
        m.unlink()
        target = tmp_path / "real.json"
        target.write_text(json.dumps(rec))
        if forge == "dir-named-record":
            m.mkdir()
        elif forge == "link-to-record":
            m.symlink_to(target)
        else:
            os.mkfifo(m)
    msg = refused("not a porder export", path, out, overwrite=True)
    assert "'thesis.tex'" in msg


@pytest.mark.parametrize("where", ["top", "class", "split", "new-folder", "link", "changed",
                                   "fifo"])
def test_overwrite_refuses_a_users_file_inside_an_earlier_export(cache, tmp_path, where):
    """A file the earlier export did not write (or a PNG the user changed) is named,
    and nothing is removed."""
    path, _ = cache
    out = _genuine(path, tmp_path)
    folder = read_manifest(out)["folders"][0]
    name = {"top": "notes.txt", "class": f"train/{folder}/notes.txt", "split": "test/notes.txt",
            "new-folder": "mine/", "link": f"train/{folder}/link.png", "fifo": "test/pipe",
            "changed": None}[where]
    if where == "new-folder":
        (out / "mine").mkdir()
        (out / "mine" / "a.txt").write_text("keep")
    elif where == "link":
        outside = tmp_path / "outside.txt"
        outside.write_text("keep")
        (out / name).symlink_to(outside)
    elif where == "fifo":
        os.mkfifo(out / name)
    elif where == "changed":
        png = sorted((out / "train" / folder).iterdir())[0]
        png.write_bytes(png.read_bytes() + b"edited")
        name = f"{png.relative_to(out)} (changed since it was exported)"
    else:
        (out / name).write_text("keep")
    msg = refused("that the earlier export did not write", path, out, overwrite=True)
    assert f"('{name}')" in msg and "1 entry" in msg


def test_a_refusal_lists_a_few_names_and_a_count(cache, tmp_path):
    path, _ = cache
    out = _genuine(path, tmp_path, format="npz")
    for i in range(7):
        (out / f"mine{i}.txt").write_text("keep")
    msg = refused("7 entries", path, out, overwrite=True)
    assert "('mine0.txt', 'mine1.txt', 'mine2.txt' and 4 more)" in msg


def test_a_refusal_prints_control_characters_escaped(cache, tmp_path):
    path, _ = cache
    out = _genuine(path, tmp_path, format="npz")
    (out / "a\nb\x1b[31m").write_text("keep")
    msg = refused("earlier export did not write", path, out, overwrite=True)
    assert "'a\\nb\\x1b[31m'" in msg


def test_the_record_lists_what_was_written(cache, tmp_path):
    path, _ = cache
    out = _genuine(path, tmp_path)
    rec = read_manifest(out)
    assert rec["record"] == "porder-export" and rec["record_version"] == 1
    files = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*")
             if p.is_file() and p.name != MANIFEST}
    dirs = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_dir())
    assert rec["files"] == files and len(files) == 52 and rec["dirs"] == dirs
    data = Path(path).read_bytes()
    assert rec["cache"] == {"path": str(Path(path).absolute()), "bytes": len(data),
                            "digest": hashlib.sha256(data).hexdigest()}


def test_overwrite_after_the_user_deleted_some_files(cache, tmp_path):
    """Files of the record that are gone are fine: what is left is all porder's."""
    path, _ = cache
    out = _genuine(path, tmp_path)
    shutil.rmtree(out / "test")
    next((out / "train").rglob("*.png")).unlink()
    export(path, out, overwrite=True, format="npz")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "test.npz", "train.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


@pytest.mark.parametrize("earlier", [True, False])
def test_overwrite_through_a_symlink(cache, tmp_path, earlier):
    """OUT a link to a folder: the export is written where it points; the link stays
    and nothing is left beside either."""
    path, _ = cache
    real = tmp_path / "disk" / "real"
    real.parent.mkdir()
    if earlier:
        export(path, real, format="npz")
    else:
        real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert export(path, link, overwrite=True, split="test") == link
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in real.iterdir()) == [MANIFEST, "test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["real"]


def test_a_symlink_to_a_users_folder_is_refused(cache, tmp_path):
    path, _ = cache
    real = tmp_path / "mine"
    real.mkdir()
    (real / "a.txt").write_text("keep")
    (tmp_path / "link").symlink_to(real)
    refused("holds no porder-export.json", path, tmp_path / "link", overwrite=True)


def _during_the_export(monkeypatch, action):
    """Run ``action()`` once, after the first chunk of images has been written."""
    import porder.export as ex

    rows = ex._rows

    def hooked(*a, **k):
        for i, item in enumerate(rows(*a, **k)):
            yield item
            if i == 0:
                action()

    monkeypatch.setattr(ex, "_rows", hooked)


@pytest.mark.parametrize("earlier", [True, False])
def test_a_file_added_during_the_export_is_kept(cache, tmp_path, monkeypatch, earlier):
    """OUT is checked again just before it is replaced: a file added meanwhile stops
    the export, and OUT is left as it then was."""
    path, _ = cache
    out = tmp_path / "exp"
    if earlier:
        export(path, out, format="npz")
    _during_the_export(monkeypatch, lambda: (out.mkdir(exist_ok=True),
                                             (out / "late.txt").write_text("keep")))
    with pytest.raises(ExportError, match="late.txt" if earlier else "exists and is not empty"):
        export(path, out, overwrite=earlier)
    assert (out / "late.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    if earlier:
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [MANIFEST, "late.txt", "test.npz", "train.npz"])


def test_an_interrupt_while_writing_leaves_nothing(cache, tmp_path, monkeypatch):
    path, _ = cache
    out = export(path, tmp_path / "exp", format="npz")
    before = snapshot(tmp_path)

    def interrupt():
        raise KeyboardInterrupt

    _during_the_export(monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt):
        export(path, out, overwrite=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("at", [1, 2, 3])
def test_an_interrupt_while_replacing_keeps_one_whole_export(cache, tmp_path, monkeypatch, at):
    """Ctrl-C at the rename that moves the earlier export aside (1), at the one that
    moves the new export in (2), or while the earlier one is removed (3): OUT holds
    one whole export (the earlier, or the new), and nothing else is left."""
    import porder.export as ex

    path, _ = cache
    out = export(path, tmp_path / "exp", format="npz")
    earlier = snapshot(out)
    calls = {"rename": 0, "unlink": 0}
    rename, unlink = os.rename, os.unlink

    def renaming(a, b):
        calls["rename"] += 1     # 1: tmp onto OUT (refused: not empty), 2: OUT aside, 3: tmp in
        if calls["rename"] == at + 1 and at < 3:
            raise KeyboardInterrupt
        rename(a, b)

    def unlinking(*a, **k):
        calls["unlink"] += 1
        if calls["unlink"] == 1 and at == 3:
            raise KeyboardInterrupt
        unlink(*a, **k)

    monkeypatch.setattr(ex.os, "rename", renaming)
    monkeypatch.setattr(ex.os, "unlink", unlinking)
    with pytest.raises(KeyboardInterrupt):
        export(path, out, overwrite=True, split="test")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    if at < 3:
        assert snapshot(out) == earlier
    else:
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "test"]
