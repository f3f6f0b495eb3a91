"""Outputs are never lost: locks between real processes, refused targets, full disks.

porder.output (locks, free space, space reservation) as used by
``build_cache``/``porder reorder``, ``porder merge``, ``porder train`` and
``compare``. Concurrency is tested with real processes: a paused ``porder
reorder`` (tests/pause_after.py) or a process holding a folder's lock while a
second command runs against the same output.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.output import (
    Busy,
    DiskFull,
    OutputError,
    SpaceReserver,
    lock_folder,
    lock_output,
    lock_path,
)
from porder.pipeline import CacheSpec, build_cache
from porder.scale import merge
from porder.store import StoreError, Writer, describe, partial_path, read_split

REPO = Path(__file__).resolve().parents[1]
META = {"measure": "mi", "patch": 8, "bins": 256, "reference": 0, "direction": "descending",
        "image_size": 32, "source": "test", "seed": 0}


def porder(*args, cwd=REPO, **kw):
    return subprocess.run([sys.executable, "-m", "porder", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, **kw)


def one_error_line(text: str) -> str:
    """The one ``Error:`` line of a failed command (progress lines may precede it)."""
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    assert "Traceback" not in text and text.strip().endswith(lines[0]), text
    return lines[0]


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def hold_lock(target: Path, *, folder: bool) -> subprocess.Popen:
    """A second process holding the lock of ``target`` (a file or a folder) until killed."""
    call = "lock_folder" if folder else "lock_output"
    code = textwrap.dedent(f"""
        import sys, time
        from porder.output import {call}
        lock = {call}({str(target)!r})
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# --------------------------------------------------------------------------- locks


def test_second_reorder_on_the_same_output_fails_and_leaves_the_first_intact(tmp_path):
    """A paused `porder reorder` holds OUT; a second one (plain, --overwrite, --resume)
    and a merge into OUT fail with one line and never touch the first's .part."""
    out, ready, go = tmp_path / "o.h5", tmp_path / "ready", tmp_path / "go"
    args = ["reorder", "--measure", "entropy", "-b", "16", "--no-progress", "synthetic:64", out]
    first = subprocess.Popen([sys.executable, "-m", "tests.pause_after", "2", ready, go, *args],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, first)
        part = partial_path(out)
        before = (part.stat().st_ino, part.stat().st_size, part.stat().st_mtime_ns)
        for extra in ([], ["--overwrite"], ["--resume"]):
            res = porder(*args[:-2], *extra, "synthetic:64", out)
            assert res.returncode == 1
            line = one_error_line(res.stderr)
            assert f"output '{out}' is in use by another porder process (pid {first.pid}" in line
        res = porder("merge", "--copy", tmp_path / "x.h5", out)
        assert res.returncode == 1 and "in use by another porder process" in res.stderr
        after = part.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == before
        assert not out.exists()
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert not partial_path(out).exists() and not lock_path(out).exists()
    info = describe(out)  # complete, and every label and perm row checks out
    assert info["splits"] == {"train": 58, "test": 6} and info["complete"] is True


def test_writers_in_one_process_exclude_each_other(tmp_path):
    out = tmp_path / "a.h5"
    w = Writer(out, meta=META, classes=["a", "b"])
    size = partial_path(out).stat().st_size
    with pytest.raises(Busy, match=f"pid {os.getpid()}"):
        Writer(out, meta=META, classes=["a", "b"], overwrite=True)
    with pytest.raises(Busy):
        merge([tmp_path / "x.h5"], out, copy=True)
    assert partial_path(out).stat().st_size == size  # not truncated
    w.discard()
    assert not lock_path(out).exists() and not partial_path(out).exists()
    Writer(out, meta=META, classes=["a", "b"]).discard()  # free again


def test_a_stale_lock_file_does_not_block(tmp_path):
    """A killed run leaves OUT.lock behind; the kernel dropped its lock, so it is free."""
    out = tmp_path / "o.h5"
    lock_path(out).write_text("pid 1 on elsewhere\n")
    build_cache(CacheSpec("synthetic:12", out, measure="entropy", workers=1))
    assert out.exists() and not lock_path(out).exists()


def test_lock_of_an_unwritable_folder_is_one_line(tmp_path):
    with pytest.raises(OutputError, match="cannot lock"):
        lock_output(tmp_path / "missing" / "o.h5")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        lock_folder(tmp_path / "file")


def test_train_holds_its_run_folder_while_it_runs(tmp_path):
    """While `train` runs, its run folder's lock is taken (checked from its progress
    callback); once it returns, the lock is gone."""
    from porder.train import TrainConfig, train

    data = build_cache(CacheSpec("synthetic:40", tmp_path / "d.h5", measure="none", size=8, patch=4,
                                 workers=1)).path
    run = tmp_path / "run"
    seen = []

    def progress(step, steps, row):
        with pytest.raises(Busy, match=f"folder '{run}' is in use .*pid {os.getpid()}"):
            lock_folder(run)
        seen.append(step)

    cfg = TrainConfig(arch="vgg", width=0.05, steps=1, eval_every=1, batch_size=4,
                      device="cpu", threads=1)
    train(data, cfg, run, progress=progress)
    assert seen and not (run / ".porder.lock").exists()
    lock_folder(run).release()


def test_second_train_into_a_busy_run_folder_fails_cleanly(tmp_path):
    """Another process holds the run folder (as a running `train` does): `porder train`
    into it, with or without --resume, fails at once with one line and writes nothing."""
    data = build_cache(CacheSpec("synthetic:40", tmp_path / "d.h5", measure="none", size=8, patch=4,
                                 workers=1)).path
    run = tmp_path / "run"
    holder = hold_lock(run, folder=True)
    try:
        for extra in ([], ["--resume"]):
            res = CliRunner().invoke(main, ["train", str(data), "-o", str(run), *extra,
                                            "--steps", "1", "--width", "0.05", "--device",
                                            "cpu"])
            assert res.exit_code == 1
            line = one_error_line(res.output)
            assert f"run folder '{run}' is in use by another porder process (pid " \
                   f"{holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in run.iterdir()) == [".porder.lock"]  # the holder's only


def test_compare_folder_is_locked(tmp_path):
    from porder.experiment import compare

    out = tmp_path / "cmp"
    holder = hold_lock(out, folder=True)
    try:
        with pytest.raises(Busy, match=f"comparison folder '{out}' is in use"):
            compare("synthetic:40", out, measures=["none"], archs=["resnet"], seeds=1, steps=1,
                    size=8, patches=[4], device="cpu")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".porder.lock"]  # nothing else written


def test_a_refused_train_leaves_no_empty_folder(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not a porder file")
    res = CliRunner().invoke(main, ["train", str(bad), "-o", str(tmp_path / "run"),
                                    "--steps", "1", "--device", "cpu"])
    assert res.exit_code == 1 and "bad.h5" in res.output
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ refused targets


def test_output_that_is_or_is_inside_the_source_is_refused(tmp_path):
    from tests.sources.test_sources import make_cifar10, make_class_folder, make_tar

    src = tmp_path / "src"
    make_class_folder(src, {"a": 2, "b": 2})
    folder, *_ = make_cifar10(tmp_path / "c10")
    archive = make_tar(folder, tmp_path / "c10.tar.gz")
    link = tmp_path / "link.tar.gz"
    link.symlink_to(archive)
    before = archive.read_bytes()
    for source, out, pattern in [
        (src, src / "out.h5", "inside the source folder"),
        (src, src / "a" / "out.h5", "inside the source folder"),
        (archive, archive, "is the source"),
        (archive, link, "is the source"),
    ]:
        for extra in ([], ["--overwrite"], ["--resume"]):
            res = CliRunner().invoke(main, ["reorder", *extra, str(source), str(out)])
            assert res.exit_code == 1, res.output
            assert pattern in one_error_line(res.output)
    assert archive.read_bytes() == before
    assert sorted(p.name for p in src.rglob("*")) == ["a", "b", "img0.png", "img0.png",
                                                      "img1.png", "img1.png"]
    res = CliRunner().invoke(main, ["reorder", "--dask", "local:1", str(src), str(src / "o.h5")])
    assert res.exit_code == 1 and "inside the source folder" in res.output
    assert not (src / "o.h5.shards").exists()


# ------------------------------------------------------------------------ full disk


def test_not_enough_space_is_refused_up_front(tmp_path, monkeypatch):
    import porder.output

    monkeypatch.setattr(porder.output, "free_bytes", lambda folder: 10_000)
    out = tmp_path / "o.h5"
    with pytest.raises(DiskFull, match=r"needs about 1\.\d MiB, 9\.8 KiB free") as info:
        build_cache(CacheSpec("synthetic:100", out, measure="entropy", workers=1))
    assert str(tmp_path) in str(info.value) and "100 images" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no .part, no lock


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (needs root), unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill ({res.stderr.strip() or 'not root'})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


FILL_AFTER = """
import os
from porder.store import Writer

def fill_after(count, filler):
    # Patch Writer.append: after `count` batches, fill the disk to the last block.
    original = Writer.append
    calls = [0]

    def append(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == count:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, bytes(4096)):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)

    Writer.append = append
"""


@pytest.mark.parametrize("fallocate", [True, False], ids=["fallocate", "free-space-check"])
def test_disk_full_mid_run_keeps_a_resumable_part(tiny_disk, tmp_path, fallocate):
    """Another process fills the disk after two batches: `porder reorder` stops with one
    line saying how much the next write needed and that the .part is kept, before HDF5
    writes (with fallocate, and without it through the per-batch free-space check);
    after freeing space, --resume gives the file of an undisturbed run."""
    opts = ["--measure", "entropy", "-b", "32", "--no-progress", "synthetic:200"]
    whole = tmp_path / "whole.h5"
    assert porder("reorder", *opts, whole).returncode == 0
    out, filler = tiny_disk / "o.h5", tiny_disk / "filler"
    code = FILL_AFTER + textwrap.dedent(f"""
        import porder.output
        if not {fallocate}:
            porder.output._FALLOCATE = None
        fill_after(2, {str(filler)!r})
        from porder.cli import main
        main(args=["reorder", *{opts!r}, {str(out)!r}], prog_name="porder")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1, (res.returncode, res.stderr)
    line = one_error_line(res.stderr)
    assert f"disk full writing '{partial_path(out)}' in '{tiny_disk}': the next write needs" \
        in line
    assert f"the partial output '{partial_path(out)}' is kept" in line and "--resume" in line
    assert partial_path(out).exists() and not out.exists() and not lock_path(out).exists()
    filler.unlink()
    res = porder("reorder", "--resume", *opts, out)
    assert res.returncode == 0, res.stderr
    for split in ("train", "test"):
        a, b = read_split(whole, split), read_split(out, split)
        assert all(np.array_equal(a[k], b[k]) for k in ("images", "labels", "perm"))


def test_space_reserver_reserves_before_writing(tiny_disk):
    path = tiny_disk / "f"
    path.write_bytes(b"x")
    space = SpaceReserver(path, "'f'")
    space.reserve(1024 * 1024)           # fits
    with pytest.raises(DiskFull, match=r"'f' in '.*disk': the next write needs 4\.0 MiB"):
        space.reserve(4 * 1024 * 1024)   # does not
    assert path.stat().st_blocks * 512 >= 2**20   # held for the writes to come
    space.close()
    assert path.stat().st_size == 1     # reserving never changes the file
    assert path.stat().st_blocks * 512 < 2**16    # and closing gives back what was unused


def test_a_finished_file_holds_no_reserved_blocks(tmp_path):
    out = build_cache(CacheSpec("synthetic:300", tmp_path / "o.h5", measure="entropy",
                                batch_size=32, workers=1)).path
    assert out.stat().st_blocks * 512 < out.stat().st_size + 2**16


def test_store_error_is_not_output_error():
    """Both are ValueErrors (one line at the CLI), but distinct families."""
    assert issubclass(Busy, ValueError) and issubclass(StoreError, ValueError)
    assert not issubclass(Busy, StoreError)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
def test_finished_files_reach_the_disk_before_their_name(tmp_path, monkeypatch):
    # A power cut must never leave OUT naming a file whose blocks were not written:
    # each finished file is synced, renamed, then its folder synced (cache and merge).
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = build_cache(CacheSpec("synthetic:40", tmp_path / "o.h5", measure="entropy", batch_size=16,
                                workers=1)).path
    (tmp_path / "m").mkdir()
    merged = merge([out], tmp_path / "m" / "all.h5", copy=True)
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert [events[i][2] for i in renames] == [str(out), str(merged)]
    for i in renames:
        _, src, dst = events[i]
        assert events[i - 1] == ("fsync", src), events
        assert events[i + 1] == ("fsync", str(Path(dst).parent)), events
