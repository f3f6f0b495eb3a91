"""Sharded runs and `porder merge` (porder.scale.merge, porder.cli.scale).

Every merged file is checked sample by sample against one unsharded
``build_cache`` run of the same seeded ``synthetic:103`` source (``full`` in
conftest.py). Shards split 93 train / 10 test samples into uneven slices
(23/23/23/24 and 2/3/2/3), and batch sizes (7 for shards, 8 for the reference)
divide neither.
"""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from porder.cli.scale import merge as merge_cmd
from porder.scale import merge, missing_sources
from porder.store import StoreError, read_meta, read_split

from .shards import N, assert_same_file, build

# ------------------------------------------------------------------------- merge


@pytest.mark.parametrize("copy", [False, True], ids=["virtual", "copy"])
def test_merge_matches_unsharded_run(full, shards, tmp_path, copy):
    # a virtual merge lives in the shards' folder (or above it); a copy anywhere
    where = tmp_path if copy else shards[0].parent
    out = merge(list(reversed(shards)), where / "merged.h5", copy=copy)
    try:
        assert out == where / "merged.h5" and not (where / "merged.h5.part").exists()
        assert_same_file(full, out)
        with h5py.File(out, "r") as f:
            assert f["train/images"].is_virtual is (not copy)
        assert missing_sources(out) == []
    finally:
        out.unlink()


def test_merge_copy_progress_and_is_standalone(full, shards, tmp_path):
    calls = []
    d = tmp_path / "moved"
    d.mkdir()
    copies = [shutil.copy(p, d / p.name) for p in shards]
    out = merge(copies, tmp_path / "standalone.h5", copy=True,
                progress=lambda *a: calls.append(a))
    assert calls[0] == ("merge", 0, 103)   # the start, so that rates count from it
    assert calls[-1] == ("merge", 103, 103)
    shutil.rmtree(d)  # the copy no longer needs its shards
    assert_same_file(full, out)


def test_virtual_merge_moves_with_its_folder_and_reports_missing_shards(full, shards, tmp_path):
    d = tmp_path / "run"
    (d / "parts").mkdir(parents=True)
    copies = [shutil.copy(p, d / "parts" / p.name) for p in shards]
    merge(copies, d / "merged.h5")
    moved = shutil.move(d, tmp_path / "elsewhere")  # relative paths: move the folder whole
    assert_same_file(full, moved / "merged.h5")
    # `merge --copy` of the merged file alone materializes it
    standalone = merge([moved / "merged.h5"], tmp_path / "standalone.h5", copy=True)
    (moved / "parts" / "part-2.h5").unlink()
    assert_same_file(full, standalone)
    assert missing_sources(moved / "merged.h5") == ["parts/part-2.h5"]
    with pytest.raises(StoreError, match="shard files are missing: parts/part-2.h5"):
        read_split(moved / "merged.h5", "train")


def test_merge_of_random_control_matches(tmp_path):
    """`random` is keyed by the sample index, so shards agree with one run."""
    ref = build(tmp_path / "ref.h5", measure="random", batch_size=16)
    parts = [build(tmp_path / f"r{i}.h5", shard=(i, 3), measure="random") for i in range(3)]
    assert_same_file(ref, merge(parts, tmp_path / "m.h5"))


def test_merge_single_unsharded_file_is_a_copy_of_it(full, tmp_path):
    assert_same_file(full, merge([full], tmp_path / "one.h5", copy=True))


def test_merge_overwrite(shards, tmp_path):
    out = shards[0].parent / "m-overwrite.h5"
    out.write_bytes(b"old")
    try:
        with pytest.raises(StoreError, match="exists; pass --overwrite"):
            merge(shards, out)
        merge(shards, out, overwrite=True)
        assert read_meta(out)["splits"] == {"train": 93, "test": 10}
    finally:
        out.unlink()


def _copy_with(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _set_classes(f):
    del f["classes"]
    f.create_dataset("classes", data=np.array([f"c{i}" for i in range(10)], dtype=object),
                     dtype=h5py.string_dtype())


def test_merge_refusals(shards, tmp_path):
    """Every refusal is one line naming the offending file or slices."""
    s0, s1, s2, s3 = (str(p) for p in shards)
    out = tmp_path / "out.h5"

    def refused(paths, pattern, **kw):
        with pytest.raises(StoreError, match=pattern) as info:
            merge(paths, kw.pop("out", out), **kw)
        assert "\n" not in str(info.value)
        assert not out.exists() and not (tmp_path / "out.h5.part").exists()
        return str(info.value)

    refused([], "no shards to merge")
    refused([s0, s1, s0, s2, s3], f"shard '{s0}' is given twice")
    refused([s0, s1, s2, s3], "is one of the shards", out=s3)
    # different options, classes or shard counts
    other = build(tmp_path / "entropy-1.h5", shard=(1, N), measure="entropy")
    msg = refused([s0, str(other), s2, s3], "made with different options")
    assert "entropy-1.h5" in msg and "measure: 'entropy' vs 'mi'" in msg
    seeded = build(tmp_path / "seed-1.h5", shard=(1, N), seed=4)
    assert "seed: 4 vs 3" in refused([s0, str(seeded), s2, s3], "seed-1.h5")
    classes = _copy_with(s1, tmp_path / "classes-1.h5", _set_classes)
    refused([s0, str(classes), s2, s3], "classes-1.h5' has different classes")
    thirds = build(tmp_path / "third-1.h5", shard=(1, 3))
    refused([s0, str(thirds), s2], r"third-1.h5' is slice 1/3 but .* is slice 0/4")
    # overlapping, missing and misaligned slices
    twin = shutil.copy(s1, tmp_path / "twin-1.h5")
    refused([s0, s1, str(twin), s2, s3], r"part-1.h5' and '.*twin-1.h5' are both slice 1/4")
    refused([s3, s0], r"missing shard slices 1/4, 2/4 \(given: 0/4, 3/4\)")
    shifted = _copy_with(s2, tmp_path / "shifted-2.h5",
                         lambda f: f["train"].attrs.__setitem__("first_sample", 40))
    refused([s0, s1, str(shifted), s3], r"shifted-2.h5' starts at sample 40 of split 'train' "
                                        r"but the previous slice ends at 46: it overlaps")
    # unfinished, incomplete, unreadable, missing files
    part = shutil.copy(s1, tmp_path / "part-1.h5.part")
    refused([s0, str(part), s2, s3], r"part-1.h5.part' is an unfinished shard")
    open_ = _copy_with(s1, tmp_path / "open-1.h5", lambda f: f.attrs.__setitem__("complete", False))
    refused([s0, str(open_), s2, s3], r"open-1.h5' is incomplete")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    refused([s0, str(junk), s2, s3], r"cannot read '.*junk.h5' as HDF5")
    refused([s0, str(tmp_path / "gone.h5"), s2, s3], r"gone.h5' does not exist")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = 1
    refused([s0, str(plain), s2, s3], r"plain.h5' is not a porder file")


# --------------------------------------------------------------------------- CLI


def test_cli_merge(full, shards, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.h5"
    r = runner.invoke(merge_cmd, [*map(str, shards), str(out)])
    assert r.exit_code == 1 and "outside the folder" in r.output and "--copy" in r.output
    assert not out.exists()
    out = shards[0].parent / "cli.h5"  # a virtual merge sits beside (or above) its shards
    r = runner.invoke(merge_cmd, [*map(str, shards), str(out)])
    assert r.exit_code == 0, r.output
    assert "Wrote" in r.output and "train 93, test 10" in r.output and "virtual" in r.output
    assert_same_file(full, out)
    r = runner.invoke(merge_cmd, ["--copy", "--overwrite", "--no-progress", *map(str, shards),
                                  str(out)])
    assert r.exit_code == 0 and "standalone" in r.output, r.output
    assert_same_file(full, out)
    r = runner.invoke(merge_cmd, [str(shards[0]), str(shards[2]), str(tmp_path / "x.h5")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "Error: missing shard slices 1/4, 3/4 (given: 0/4, 2/4)"]
    r = runner.invoke(merge_cmd, [str(out)])
    assert r.exit_code == 2 and "SHARDS... OUT.h5" in r.output
    out.unlink()
    r = runner.invoke(merge_cmd, ["-h"])
    assert r.exit_code == 0 and "porder merge c100.0.h5" in r.output
