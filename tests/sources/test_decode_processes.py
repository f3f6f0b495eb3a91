"""Decoding image files in worker processes (``decoder='processes'``): the same
pixels, names, labels and skip reasons as threads and as the caller's thread, a
decoder crash costing one file, workers that cannot start named, and workers
that end with the source."""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

import porder.sources.decode as decode
import porder.sources.procs as procs
from porder.sources import SourceError, open_source

from .test_sources import truncated_jpeg


def mixed_folder(root, n=24):
    """Class folders of PNG/JPEG/GIF images in several modes and sizes, one corrupt
    file, one truncated JPEG."""
    rng = np.random.default_rng(3)
    for i in range(n):
        cls = root / f"c{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        side = (32, 32) if i % 4 else (48 + i, 40)
        a = rng.integers(0, 256, (side[1], side[0], 3), dtype=np.uint8)
        im = Image.fromarray(a)
        if i % 5 == 1:
            im = im.convert("L")
        if i % 5 == 2:
            im = im.convert("RGBA")
        ext = ("png", "jpg", "gif", "png")[i % 4]
        if ext == "jpg" and im.mode == "RGBA":
            im = im.convert("RGB")
        im.save(cls / f"img{i}.{ext}")
    (root / "c0" / "bad.png").write_bytes(b"\x89PNG not really")
    truncated_jpeg(root / "c1" / "cut.jpg", rng)
    return root


def read(src, batch_size=5):
    batches = list(src.iter_batches("train", batch_size))
    return (np.concatenate([b.images for b in batches]),
            np.concatenate([b.labels for b in batches]),
            [n for b in batches for n in b.names],
            [s for b in batches for s in b.skipped])


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_processes_give_what_threads_and_one_thread_give(tmp_path, batch_size):
    root = mixed_folder(tmp_path / "d")
    got = {}
    for decoder, workers in (("threads", 1), ("threads", 2), ("processes", 2),
                             ("processes", 3)):
        with open_source(str(root), test_fraction=0, on_error="skip", workers=workers,
                         decoder=decoder) as src:
            got[decoder, workers] = read(src, batch_size)
            assert (src._procs is not None) == (decoder == "processes")
    ref = got["threads", 1]
    assert len(ref[2]) == 24 and [n for n, _ in ref[3]] == ["c0/bad.png", "c1/cut.jpg"]
    for key, (images, labels, names, skipped) in got.items():
        np.testing.assert_array_equal(images, ref[0], err_msg=str(key))
        np.testing.assert_array_equal(labels, ref[1], err_msg=str(key))
        assert names == ref[2] and skipped == ref[3], key


def test_pillow_settings_and_warnings_are_those_of_porders_process(tmp_path, monkeypatch):
    # Settings changed in porder's process hold in the workers, and the workers'
    # warnings are issued here, as with threads. Over a limit of 3000 pixels the
    # truncated 64x64 JPEG warns (and loads), an 80x80 image (over twice the limit)
    # is a bomb, a 50x50 one is fine.
    root = tmp_path / "d" / "c"
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for side in (50, 80):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            root / f"s{side}.png")
    truncated_jpeg(root / "cut.jpg", rng)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    got = {}
    for decoder in ("threads", "processes"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with open_source(str(tmp_path / "d"), test_fraction=0, on_error="skip", workers=2,
                             decoder=decoder) as src:
                images, _, names, skipped = read(src)
        bombs = [str(w.message) for w in caught
                 if issubclass(w.category, Image.DecompressionBombWarning)]
        assert len(bombs) == 1 and "4096 pixels" in bombs[0], (decoder, bombs)
        assert names == ["c/cut.jpg", "c/s50.png"], decoder
        assert [n for n, _ in skipped] == ["c/s80.png"], decoder
        assert "decompression bomb" in skipped[0][1], decoder
        got[decoder] = images
    np.testing.assert_array_equal(got["processes"], got["threads"])


def test_a_bad_file_fails_the_run_naming_it(tmp_path):
    root = mixed_folder(tmp_path / "d")
    with open_source(str(root), test_fraction=0, workers=2, decoder="processes") as src:
        with pytest.raises(SourceError, match=r"cannot decode image '.*bad\.png': ") as e:
            read(src)
    assert "\n" not in str(e.value)


def test_auto_uses_processes_from_the_threshold(tmp_path, monkeypatch):
    root = mixed_folder(tmp_path / "d", n=8)
    monkeypatch.setattr(decode, "AUTO_PROCESSES_MIN", 8)
    for start, processes in ((2, True), (3, False)):  # 8 files to read, then 7
        with open_source(str(root), test_fraction=0, on_error="skip", workers=2) as src:
            list(src.iter_batches("train", 4, start=start))
            assert (src._procs is not None) is processes
    with open_source(str(root), test_fraction=0, on_error="skip", workers=1,
                     decoder="processes") as src:  # one worker: the caller's thread
        read(src)
        assert src._procs is None


def test_unknown_decoder_is_named(tmp_path):
    root = mixed_folder(tmp_path / "d", n=3)
    with pytest.raises(SourceError, match=r"decoder must be one of .*'gpu'"):
        open_source(str(root), decoder="gpu")


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_a_crashing_decoder_costs_one_file(tmp_path, monkeypatch, on_error):
    root = mixed_folder(tmp_path / "d", n=12)
    with open_source(str(root), test_fraction=0, on_error="skip", workers=1) as src:
        ref = read(src, 64)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "c2" / "crash.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "c1" / "exit3.png")
    monkeypatch.setattr(procs, "WORKER", "tests.sources.crash_worker")
    if on_error == "fail":  # exit3.png is then the first bad file
        (root / "c0" / "bad.png").unlink()
        (root / "c1" / "cut.jpg").unlink()
    with open_source(str(root), test_fraction=0, on_error=on_error, workers=2,
                     decoder="processes") as src:
        if on_error == "fail":
            with pytest.raises(SourceError, match=r"cannot decode image '.*exit3\.png': "
                                                  r"the decoding process died \(exit status 3\)"):
                read(src, 64)
            return
        images, labels, names, skipped = read(src, 64)
    assert sorted(skipped) == sorted(ref[3] + [
        ("c1/exit3.png", "the decoding process died (exit status 3)"),
        ("c2/crash.png", "the decoding process died (signal SIGSEGV)")])
    assert names == ref[2]
    np.testing.assert_array_equal(images, ref[0])


def test_a_worker_that_cannot_start_is_named(tmp_path, monkeypatch):
    root = mixed_folder(tmp_path / "d", n=3)
    monkeypatch.setattr(procs, "WORKER", "no_such_module_for_porder")
    with open_source(str(root), test_fraction=0, on_error="skip", workers=2,
                     decoder="processes") as src:
        with pytest.raises(SourceError, match=r"cannot start a decoding process \(exit status "
                                              r"1: .*no_such_module_for_porder.*\); use "
                                              r"--decoder threads"):
            read(src)


def test_closing_the_source_ends_its_workers(tmp_path):
    root = mixed_folder(tmp_path / "d", n=6)
    src = open_source(str(root), test_fraction=0, on_error="skip", workers=2,
                      decoder="processes")
    read(src)
    workers = [w.proc for w in src._procs._workers if w is not None]
    assert workers and all(p.poll() is None for p in workers)
    src.close()
    deadline = time.monotonic() + 10
    while any(p.poll() is None for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.poll() is not None for p in workers)
    with pytest.raises(SourceError, match="closed"):
        read(src)


def test_a_worker_ends_when_its_parent_has_gone(tmp_path):
    """End of file on its stdin (the parent died) ends a worker."""
    worker = procs._Worker(None)
    assert procs._receive(worker.proc.stdout) == procs._READY
    worker.proc.stdin.close()
    assert worker.proc.wait(timeout=30) == 0


def test_pack_unpack_round_trip():
    a, b = np.ones((2, 2, 3), np.uint8), np.full((2, 2, 3), 7, np.uint8)
    results = [(a, ""), (None, "broken"), (b, "")]
    images, reasons = procs._pack(results, 2)
    assert images.shape == (2, 2, 2, 3) and reasons == ["", "broken", ""]
    back = procs._unpack(images, reasons)
    assert back[1] == (None, "broken")
    np.testing.assert_array_equal(back[0][0], a)
    np.testing.assert_array_equal(back[2][0], b)
    empty, reasons = procs._pack([(None, "x")], 4)
    assert empty.shape == (0, 4, 4, 3) and reasons == ["x"]


def test_reorder_files_are_identical_with_processes_and_threads(tmp_path):
    import h5py

    from porder.pipeline import CacheSpec, build_cache

    root = mixed_folder(tmp_path / "d", n=30)
    outs = {}
    for decoder in ("threads", "processes"):
        outs[decoder] = tmp_path / f"{decoder}.h5"
        build_cache(CacheSpec(str(root), outs[decoder], measure="mi", patch=8, batch_size=7,
                              workers=2, decoder=decoder, on_error="skip"))
    with h5py.File(outs["threads"]) as a, h5py.File(outs["processes"]) as b:
        for split in ("train", "test"):
            for name in a[split]:
                np.testing.assert_array_equal(a[split][name][()], b[split][name][()],
                                              err_msg=f"{split}/{name}")
