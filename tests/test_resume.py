"""--resume continues only the run it was: same options, same slice, same source files.

A run is cut off after its first batch (``Writer.append`` patched from outside
to raise KeyboardInterrupt, as Ctrl-C does); then the source or the options
change, and the resume must be refused with one line naming what changed,
leaving the ``.part`` as it was. Put back, the resume gives the file of an
uninterrupted run. Also: empty shards are valid shards and merge; and a real
``porder reorder`` killed (SIGKILL) before any HDF5 operation of an append
resumes to the file of an uninterrupted run (tests.cli.kill_inside_append).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.pipeline import CacheSpec, build_cache
from porder.scale import merge
from porder.sources.identity import source_identity
from porder.store import SPLITS, StoreError, Writer, partial_path, read_meta, read_split
from tests.conftest import REPO
from tests.scale.shards import assert_same_file
from tests.sources.test_sources import make_cifar10, make_class_folder, make_tar

OPTS = dict(measure="entropy", batch_size=4, workers=1)


def cut_after_one_batch(source, out, monkeypatch, **kw):
    """Start a build of ``source`` and stop it like Ctrl-C after its first batch."""
    original = Writer.append

    def append(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Writer, "append", append)
    with pytest.raises(KeyboardInterrupt):
        build_cache(CacheSpec(str(source), out, **{**OPTS, **kw}))
    monkeypatch.setattr(Writer, "append", original)
    assert partial_path(out).exists() and not out.exists()
    return partial_path(out).read_bytes()


def refused(source, out, pattern, **kw):
    part = partial_path(out).read_bytes()
    with pytest.raises(StoreError, match=pattern) as info:
        build_cache(CacheSpec(str(source), out, resume=True, **{**OPTS, **kw}))
    assert "\n" not in str(info.value) and f"cannot resume '{partial_path(out)}'" in str(
        info.value)
    assert partial_path(out).read_bytes() == part  # untouched, still resumable


def same_rows(a, b):
    for split in SPLITS:
        x, y = read_split(a, split), read_split(b, split)
        assert x["names"] == y["names"]
        assert all(np.array_equal(x[k], y[k]) for k in ("images", "labels", "perm"))


def test_resume_refuses_a_changed_folder(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_class_folder(src, {"ant": 6, "bee": 6})
    whole = build_cache(CacheSpec(str(src), tmp_path / "whole.h5", **OPTS)).path
    out = tmp_path / "o.h5"
    cut_after_one_batch(src, out, monkeypatch)

    extra = src / "bee" / "img9.png"
    shutil.copy(src / "bee" / "img0.png", extra)              # a file added
    refused(src, out, r"the source changed \(the source has 13 files now, 12 when the .part "
                      r"was started \(files were added or removed\)\)")
    extra.unlink()
    gone = src / "ant" / "img5.png"
    data, st = gone.read_bytes(), gone.stat()
    gone.unlink()                                               # a file removed
    refused(src, out, "has 11 files now, 12 when")
    gone.write_bytes(data + b"\0")                              # a file changed size
    refused(src, out, r"the source's files hold \d+ bytes now, \d+ then")
    gone.write_bytes(data)                                      # rewritten in place
    os.utime(gone, ns=(1, 1))
    refused(src, out, r"modified since the .part was started \(their modification times")
    os.utime(gone, ns=(st.st_atime_ns, st.st_mtime_ns))        # as it was
    refused(src, out, r"options differ \(measure: the .part has 'entropy', now 'psnr';",
            measure="psnr")
    refused(src, out, r"--shard is 0/2 now, none in the .part", shard=(0, 2))
    assert build_cache(CacheSpec(str(src), out, resume=True, **OPTS)).resumed
    same_rows(whole, out)


def test_resume_refuses_a_changed_archive_and_a_changed_shard(tmp_path, monkeypatch):
    folder, *_ = make_cifar10(tmp_path / "a", per_batch=4)
    archive = make_tar(folder, tmp_path / "c10.tar.gz")
    whole = build_cache(CacheSpec(str(archive), tmp_path / "w.h5", shard=(1, 2), **OPTS)).path
    out = tmp_path / "o.h5"
    cut_after_one_batch(archive, out, monkeypatch, shard=(1, 2))
    refused(archive, out, r"--shard is none now, 1/2 in the .part")
    res = CliRunner().invoke(main, ["reorder", "--resume", "--measure", "entropy", "-b", "4",
                                    "--shard", "0/2", str(archive), str(out)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: cannot resume '{partial_path(out)}': --shard is 0/2 now, 1/2 in the .part; "
        f"run without --resume to start afresh"]
    data, st = archive.read_bytes(), archive.stat()
    other, *_ = make_cifar10(tmp_path / "b", per_batch=4, seed=5)
    make_tar(other, archive)                                    # other bytes, same name
    refused(archive, out, r"the source changed \(the source's (files hold|file names)",
            shard=(1, 2))
    archive.write_bytes(data)                                   # the same bytes again...
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))     # ...and times: resumable
    assert build_cache(CacheSpec(str(archive), out, resume=True, shard=(1, 2), **OPTS)).resumed
    same_rows(whole, out)


def test_source_identity_of_named_sources_is_the_name():
    assert source_identity("synthetic:10") == {"source_files": 0, "source_bytes": 0,
                                               "source_digest": "", "source_state": ""}


# -------------------------------------------------------------------- empty shards


@pytest.mark.parametrize("copy", [False, True], ids=["virtual", "copy"])
def test_more_shards_than_images_merge_to_the_unsharded_file(tmp_path, copy):
    """Shards that receive no sample are written (0 rows) and merge like any other."""
    src = tmp_path / "src"
    make_class_folder(src, {"ant": 2, "bee": 1})   # 3 images: 3 train, 0 test
    whole = build_cache(CacheSpec(str(src), tmp_path / "whole.h5", **OPTS)).path
    n = 5
    parts = [build_cache(CacheSpec(str(src), tmp_path / f"s{i}.h5", shard=(i, n), **OPTS)).path
             for i in range(n)]
    rows = [read_meta(p)["splits"]["train"] for p in parts]
    assert sum(rows) == 3 and rows.count(0) >= 2
    assert_same_file(whole, merge(parts, tmp_path / "m.h5", copy=copy))


def test_an_unsharded_run_with_no_images_is_still_an_error(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError):
        build_cache(CacheSpec(str(tmp_path / "src"), tmp_path / "o.h5", on_error="skip", **OPTS))
    assert not (tmp_path / "o.h5").exists() and not partial_path(tmp_path / "o.h5").exists()


def test_dask_on_a_small_folder_with_empty_shards(tmp_path):
    pytest.importorskip("distributed")
    from porder.scale import run_dask

    src = tmp_path / "src"
    make_class_folder(src, {"ant": 2, "bee": 1})
    whole = build_cache(CacheSpec(str(src), tmp_path / "whole.h5", **OPTS)).path
    out = run_dask("local:1", CacheSpec(str(src), tmp_path / "d.h5", measure="entropy",
                                        batch_size=4), shards=5)
    assert_same_file(whole, out)
    assert not (tmp_path / "d.h5.shards").exists()


def test_a_dask_interrupt_names_the_shard_folder(tmp_path):
    from porder.cli.reorder import left_behind

    out = tmp_path / "big.h5"
    assert "no shard was written yet" in left_behind(out, "local:2")
    (tmp_path / "big.h5.shards").mkdir()
    assert f"shards kept in {tmp_path / 'big.h5.shards'}/" in left_behind(out, "local:2")
    assert ".part" not in left_behind(out, "local:2")
    assert "nothing was written yet" in left_behind(out, None)
    partial_path(out).touch()
    assert f"partial output kept in {partial_path(out)}; run the same command with --resume" \
        in left_behind(out, None)


# ------------------------------------------------------- a kill inside an append


KILL_ARGS = ["--measure", "entropy", "-b", "3", "--on-error", "skip", "--test-fraction", "0",
             "--backend", "generic", "--workers", "1"]
KILLED_CALL = 2  # the append of the batch holding the unreadable file


def _kill_inside_append(spec, log, *args):
    """``porder reorder ARGS`` through tests.cli.kill_inside_append (see there)."""
    return subprocess.run([sys.executable, "-m", "tests.cli.kill_inside_append", spec, str(log),
                           "reorder", *KILL_ARGS, *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def _resume(src, out):
    res = CliRunner().invoke(main, ["reorder", *KILL_ARGS, "--resume", str(src), str(out)])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture
def killable(tmp_path):
    """A folder of 10 images and one unreadable file that batch 2 skips, and the file of
    its uninterrupted run with the HDF5 operations of that batch's append (in order)."""
    src = tmp_path / "src"
    make_class_folder(src, {"ant": 5, "bee": 5})
    (src / "ant" / "img3b.png").write_bytes(b"not a png")
    whole, log = tmp_path / "whole.h5", tmp_path / "ops.json"
    res = _kill_inside_append(f"{KILLED_CALL}:0", log, src, whole)
    assert res.returncode == 0, res.stderr
    ops = json.loads(log.read_text())
    assert "write /train/skipped" in ops  # the batch that skips is the one cut
    return src, whole, ops


def test_a_kill_anywhere_inside_an_append_resumes_to_the_uninterrupted_file(tmp_path, killable):
    """SIGKILL right before each HDF5 operation of an append (after a resize before its
    write, between two datasets, after the writes before the counters, between counters),
    with all done so far on disk: the resume writes the file of the uninterrupted run."""
    src, whole, ops = killable
    # Among the points: a resize done and its write not, one dataset written and the next
    # not, every row written and no counter, one counter written and the next not.
    assert ops[:3] == ["resize /train/images", "write /train/images", "resize /train/labels"]
    first = next(i for i, op in enumerate(ops) if op.startswith("attr "))
    assert {"write /train/names", "write /train/skipped"} <= set(ops[:first])
    assert ops[first + 1].startswith("attr ")
    wrong = []
    for n in range(1, len(ops) + 1):
        out = tmp_path / f"cut{n}.h5"
        res = _kill_inside_append(f"{KILLED_CALL}:{n}:flush", tmp_path / "unused", src, out)
        assert res.returncode == -signal.SIGKILL, (n, ops[n - 1], res.stderr)
        assert partial_path(out).exists() and not out.exists()
        _resume(src, out)
        try:
            assert_same_file(whole, out)
        except AssertionError as e:
            wrong.append(f"killed before {ops[n - 1]!r} (operation {n}): {e}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("point", ["write /train/images", "resize /train/labels", "flush"])
def test_a_kill_inside_an_append_without_a_flush_resumes_too(tmp_path, killable, point):
    """The same kill where HDF5 wrote only what it chose to: the resume is as exact."""
    src, whole, ops = killable
    out = tmp_path / "cut.h5"
    res = _kill_inside_append(f"{KILLED_CALL}:{ops.index(point) + 1}", tmp_path / "unused",
                              src, out)
    assert res.returncode == -signal.SIGKILL, res.stderr
    _resume(src, out)
    assert_same_file(whole, out)


def test_an_unreadable_part_is_refused_with_one_line(tmp_path, killable):
    """A .part HDF5 cannot open (cut short, or its superblock overwritten) is refused
    with one line naming it; starting afresh without --resume gives the right file."""
    src, whole, ops = killable
    out = tmp_path / "cut.h5"
    res = _kill_inside_append(f"{KILLED_CALL}:{ops.index('resize /train/labels') + 1}:flush",
                              tmp_path / "unused", src, out)
    assert res.returncode == -signal.SIGKILL, res.stderr
    part = partial_path(out)
    data = part.read_bytes()
    for damaged in (data[: len(data) // 2], b"\0" * 64 + data[64:]):
        part.write_bytes(damaged)
        res = CliRunner().invoke(main, ["reorder", *KILL_ARGS, "--resume", str(src), str(out)])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert lines[-1].startswith(f"Error: cannot resume: cannot read '{part}' as HDF5: ")
        assert lines[-1].endswith("run without --resume to start afresh"), lines[-1]
        assert part.read_bytes() == damaged and not out.exists()
    res = CliRunner().invoke(main, ["reorder", *KILL_ARGS, str(src), str(out)])
    assert res.exit_code == 0, res.output
    assert_same_file(whole, out)


def test_a_kill_inside_the_resume_cut_back_resumes_again(tmp_path, killable):
    """SIGKILL inside --resume's own cut-back: before it, after the counters are reset,
    with some datasets cut and others not, a dataset between its two resizes, before the
    last flush. Resuming again still gives the file of the uninterrupted run."""
    src, whole, ops = killable
    # the .part of a run killed with the batch's rows written and nothing committed
    first_attr = next(i for i, op in enumerate(ops) if op.startswith("attr "))
    cut = tmp_path / "cut.h5"
    res = _kill_inside_append(f"{KILLED_CALL}:{first_attr + 1}:flush", tmp_path / "unused",
                              src, cut)
    assert res.returncode == -signal.SIGKILL, res.stderr
    part = partial_path(cut).read_bytes()
    log = tmp_path / "resume-ops.json"
    out = tmp_path / "watched.h5"
    partial_path(out).write_bytes(part)
    res = _kill_inside_append("resume:0", log, "--resume", src, out)
    assert res.returncode == 0, res.stderr
    assert_same_file(whole, out)
    resume_ops = json.loads(log.read_text())
    assert resume_ops[:2] == ["attr /train rows", "attr /train consumed"], resume_ops
    assert resume_ops[-1] == "flush", resume_ops
    test_images = resume_ops.index("resize /test/images")  # grown by one, then cut
    points = [0, 2, resume_ops.index("resize /train/names"), test_images, test_images + 1,
              len(resume_ops) - 1]
    for n in points:
        out = tmp_path / f"cut{n}.h5"
        partial_path(out).write_bytes(part)
        res = _kill_inside_append(f"resume:{n + 1}:flush", tmp_path / "unused", "--resume", src,
                                  out)
        assert res.returncode == -signal.SIGKILL, (resume_ops[n], res.stderr)
        _resume(src, out)
        assert_same_file(whole, out)
