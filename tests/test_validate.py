"""Damaged and hostile porder files: one check (porder.validate) behind every reader.

Each case edits a valid file the way a crash, a bad disk, a hand edit or an
attacker would, and every reader — ``porder inspect``, ``porder show``,
``porder merge --copy``, training's data loading and ``--resume`` — must refuse
it with one line naming the file and the first thing wrong: no traceback, no
output that looks complete, and never a byte read from outside the file.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.patches import restore_images
from porder.pipeline import CacheSpec, build_cache
from porder.sources import open_source
from porder.store import StoreError, Writer, describe, partial_path, perm_dtype, read_split
from porder.validate import MAX_SHARDS

SECRET = b"SECRET-BYTES-" * 1400  # more than the images it stands for


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A valid 24-image file: 16x16 images, patch 4 (K = 16), 10 classes."""
    d = tmp_path_factory.mktemp("base")
    return build_cache(CacheSpec("synthetic:24", d / "base.h5", measure="entropy", size=16, patch=4,
                                 workers=1)).path


def _replace(f, name, data, **kw):
    del f[name]
    f.create_dataset(name, data=data, **kw)


def _virtual(f, name, file_name, dset_name):
    """Make ``name`` a virtual dataset over ``dset_name`` of ``file_name``."""
    shape, dtype = f[name].shape, f[name].dtype
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[:] = h5py.VirtualSource(file_name, dset_name, shape=shape, dtype=dtype)
    del f[name]
    f.create_virtual_dataset(name, layout)


def _loop(f):
    del f["train"]
    f["train"] = h5py.SoftLink("/loop")
    f["loop"] = h5py.SoftLink("/train")


def _secret_storage(f, folder):
    secret = folder / "secret.bin"
    secret.write_bytes(SECRET)
    n = f["train/images"].shape[0]
    del f["train/images"]
    f.create_dataset("train/images", (n, 16, 16, 3), np.uint8,
                     external=[(str(secret), 0, len(SECRET))])


def _external_link(f, folder, base):
    other = shutil.copy(base, folder / "other.h5")
    del f["train/labels"]
    f["train/labels"] = h5py.ExternalLink(str(other), "/train/labels")


def _shard_with_secret(f, folder, base):
    """A virtual dataset inside the folder, over a file that keeps bytes elsewhere."""
    shard = shutil.copy(base, folder / "shard.h5")
    with h5py.File(shard, "r+") as sf:
        _secret_storage(sf, folder)
    _virtual(f, "train/images", "shard.h5", "train/images")


# name -> (edit(f, folder, base), what the one line must say)
CASES = {
    "no classes": (lambda f, d, b: f.__delitem__("classes"), "has no /classes"),
    "no names": (lambda f, d, b: f.__delitem__("train/names"), "has no /train/names"),
    "no labels": (lambda f, d, b: f.__delitem__("test/labels"), "has no /test/labels"),
    "no perm": (lambda f, d, b: f.__delitem__("train/perm"), "has no /train/perm"),
    "no patch": (lambda f, d, b: f.attrs.__delitem__("patch"), "has no patch attribute"),
    "no image_size": (lambda f, d, b: f.attrs.__delitem__("image_size"),
                      "has no image_size attribute"),
    "no format": (lambda f, d, b: f.attrs.__delitem__("format"), "is not a porder file"),
    "soft-link loop": (lambda f, d, b: _loop(f), "/train is a soft link"),
    "float images": (lambda f, d, b: _replace(f, "train/images", np.zeros((22, 16, 16, 3),
                                                                          np.float32)),
                     "/train/images is float32"),
    "wrong image size": (lambda f, d, b: _replace(f, "train/images",
                                                  np.zeros((22, 8, 8, 3), np.uint8)),
                         r"expected uint8 \(N, 16, 16, 3\)"),
    "four channels": (lambda f, d, b: _replace(f, "test/images", np.zeros((2, 16, 16, 4),
                                                                          np.uint8)),
                      r"/test/images is uint8 \(2, 16, 16, 4\)"),
    "fewer images than labels": (lambda f, d, b: f["train/images"].resize(20, axis=0),
                                 "has 20 rows of images but 22 labels"),
    "label out of range": (lambda f, d, b: f["train/labels"].__setitem__(3, 99),
                           r"label 99 of /train row 3 is outside 0\.\.9"),
    "negative label": (lambda f, d, b: f["train/labels"].__setitem__(1, -1),
                       r"label -1 of /train row 1"),
    "perm not a permutation": (lambda f, d, b: f["train/perm"].__setitem__(5, np.zeros(16)),
                               r"/train/perm row 5 is not a permutation of 0\.\.15"),
    "complete='false'": (lambda f, d, b: f.attrs.__setitem__("complete", "false"),
                         "attribute complete is 'false'; expected a boolean"),
    "complete='true'": (lambda f, d, b: f.attrs.__setitem__("complete", "true"),
                        "attribute complete is 'true'; expected a boolean"),
    "incomplete": (lambda f, d, b: f.attrs.__setitem__("complete", False), "is incomplete"),
    "shard_count 0": (lambda f, d, b: f.attrs.__setitem__("shard_count", 0),
                      "attribute shard_count is 0; expected 1..100000"),
    "shard_count 1e7": (lambda f, d, b: f.attrs.__setitem__("shard_count", 10**7),
                        "attribute shard_count is 10000000"),
    "patch as text": (lambda f, d, b: f.attrs.__setitem__("patch", "4"),
                      "attribute patch is '4'; expected an integer"),
    "future format": (lambda f, d, b: f.attrs.__setitem__("format_version", 99),
                      "has format_version 99; this porder reads up to 1"),
    "no train split": (lambda f, d, b: f.__delitem__("train"), "has no /train"),
    "committed not 3 counts": (lambda f, d, b: f["train"].attrs.__setitem__("committed",
                                                                           [1, 2]),
                               "attribute committed of /train is .*expected 3 counts"),
    "committed behind rows": (lambda f, d, b: f["train"].attrs.__setitem__(
                                  "committed", np.array([5, 5, 0])),
                              "/train records 22 rows but 5 committed"),
    # hostile: bytes from outside the file
    "external raw storage": (lambda f, d, b: _secret_storage(f, d),
                             "/train/images keeps its data in external file"),
    "external link": (lambda f, d, b: _external_link(f, d, b),
                      "/train/labels is an external link to"),
    "virtual, absolute path": (lambda f, d, b: _virtual(f, "train/labels", str(b),
                                                        "train/labels"),
                               "which is not a file inside the folder"),
    "virtual, ../ path": (lambda f, d, b: _virtual(f, "train/labels", "../base/base.h5",
                                                   "train/labels"),
                          "'../base/base.h5', which is not a file inside the folder"),
    "virtual, other dataset": (lambda f, d, b: (shutil.copy(b, d / "s.h5"),
                                                _virtual(f, "train/labels", "s.h5",
                                                         "test/labels")),
                               "onto dataset 'test/labels' of 's.h5'"),
    "virtual, itself": (lambda f, d, b: _virtual(f, "train/labels", "bad.h5", "train/labels"),
                        "read from the file itself"),
    "virtual over a hostile shard": (lambda f, d, b: _shard_with_secret(f, d, b),
                                     "shard.h5': /train/images keeps its data in external"),
}


def _damaged(base: Path, folder: Path, case: str) -> Path:
    folder.mkdir(exist_ok=True)
    bad = shutil.copy(base, folder / "bad.h5")
    with h5py.File(bad, "r+") as f:
        CASES[case][0](f, folder, base)
    return Path(bad)


def _one_line(text: str, path: Path) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    assert str(path) in lines[0] and "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_every_reader_refuses_a_damaged_or_hostile_file(base, tmp_path, case):
    from porder.train.batches import Data

    bad = _damaged(base, tmp_path / "d", case)
    pattern = CASES[case][1]
    with pytest.raises(StoreError, match=pattern) as info:
        describe(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(StoreError, match=pattern):
        Data(bad, device="cpu")  # what `porder train` loads
    runner = CliRunner()
    grid, merged = tmp_path / "grid.png", tmp_path / "m.h5"
    for args in (["inspect", bad], ["inspect", "--json", bad], ["show", "-o", grid, bad],
                 ["merge", "--copy", bad, merged], ["merge", bad, tmp_path / "d" / "v.h5"]):
        res = runner.invoke(main, [str(a) for a in args])
        assert res.exit_code == 1, (args, res.output)
        assert re.search(pattern, _one_line(res.output, bad)), (args, res.output)
        assert SECRET[:13].decode() not in res.output
    assert not grid.exists() and not merged.exists() and not (tmp_path / "d" / "v.h5").exists()
    assert not partial_path(merged).exists()


def test_resume_checks_the_part_before_writing_to_it(base, tmp_path):
    """A .part without /train, or one whose data lives in another file, is refused
    before a byte is written (the secret file stays as it was)."""
    meta = {"measure": "entropy", "patch": 4, "bins": 256, "reference": 0,
            "direction": "descending", "image_size": 16, "source": "s", "seed": 0}
    for case, pattern in (("no train split", "has no /train"),
                          ("external raw storage", "keeps its data in external file")):
        folder = tmp_path / case.replace(" ", "-")
        bad = _damaged(base, folder, case)
        part = partial_path(folder / "out.h5")
        bad.rename(part)
        with pytest.raises(StoreError, match=pattern):
            Writer(folder / "out.h5", meta=meta, classes=[f"c{i}" for i in range(10)],
                   resume=True)
        assert part.exists()
        if (folder / "secret.bin").exists():
            assert (folder / "secret.bin").read_bytes() == SECRET
    res = CliRunner().invoke(main, ["reorder", "--resume", "--size", "16", "--patch", "4",
                                    "synthetic:24", str(tmp_path / "no-train-split" / "out.h5")])
    assert res.exit_code == 1 and "has no /train" in _one_line(
        res.output, partial_path(tmp_path / "no-train-split" / "out.h5"))


def test_a_valid_file_passes_every_reader(base, tmp_path):
    """The checks refuse nothing porder writes (the control for the cases above)."""
    runner = CliRunner()
    assert runner.invoke(main, ["inspect", str(base)]).exit_code == 0
    res = runner.invoke(main, ["show", "-o", str(tmp_path / "g.png"), str(base)])
    assert res.exit_code == 0 and (tmp_path / "g.png").exists()
    assert describe(base)["splits"] == {"train": 22, "test": 2}


# ------------------------------------------------------------------- perm dtype


def test_perm_dtype_follows_the_patch_count():
    assert [perm_dtype(k) for k in (1, 16, 256, 257, 65536, 65537, 2**32)] == [
        np.uint8, np.uint8, np.uint8, np.uint16, np.uint16, np.uint32, np.uint32]
    with pytest.raises(StoreError, match="more than porder stores"):
        perm_dtype(2**32 + 1)


def test_more_than_65536_patches_round_trip(tmp_path):
    """--size 257 --patch 1: K = 66049 patches need uint32; restoring gives the originals."""
    out = build_cache(CacheSpec("synthetic:3", tmp_path / "big.h5", measure="random", size=257,
                                patch=1, test_fraction=0.34, workers=1)).path
    with h5py.File(out, "r") as f:
        assert f["train/perm"].dtype == np.uint32 and f["train/perm"].shape == (2, 66049)
    data = read_split(out, "train")
    assert data["perm"].max() > 65535
    with open_source("synthetic:3", size=257, test_fraction=0.34) as src:
        originals = next(iter(src.iter_batches("train", 8))).images  # (2, 257, 257, 3)
    assert np.array_equal(restore_images(data["images"], data["perm"], 1), originals)


def test_a_perm_too_narrow_for_its_patches_is_refused(tmp_path):
    """A file whose perm wrapped around (uint8 for K = 1024, as uint16 did above 65,536)."""
    out = build_cache(CacheSpec("synthetic:4", tmp_path / "p1.h5", measure="random", size=32,
                                patch=1, test_fraction=0.25, workers=1)).path
    with h5py.File(out, "r+") as f:
        _replace(f, "train/perm", f["train/perm"][()].astype(np.uint8))
    with pytest.raises(StoreError, match=r"/train/perm is uint8, too small for 1024 patches"):
        read_split(out, "train")


def test_shard_count_bound_is_documented():
    assert MAX_SHARDS == 100_000
