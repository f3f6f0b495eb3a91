"""`porder reorder / inspect / show / measures` end to end, and every bad input."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import porder
from porder.cli import main
from porder.sources import open_source
from porder.store import partial_path, read_meta, read_split

from ..conftest import REPO


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def assert_one_line_error(res, *fragments):
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    err = res.output.strip().splitlines()
    assert err and err[-1].startswith("Error: ") and len(err[-1]) < 400, res.output
    for frag in fragments:
        assert frag in err[-1], res.output


def check_against_library(out, spec, measure, patch, **src_kw):
    """The file holds exactly porder.reorder of the source's images, split by split."""
    src = open_source(spec, **src_kw)
    meta = read_meta(out)
    assert meta["classes"] == src.classes
    for split in ("train", "test"):
        data = read_split(out, split)
        imgs = [b.images for b in src.iter_batches(split, 1000)]
        labels = [b.labels for b in src.iter_batches(split, 1000)]
        if not imgs or sum(len(i) for i in imgs) == 0:
            assert len(data["labels"]) == 0
            continue
        imgs, labels = np.concatenate(imgs), np.concatenate(labels)
        want, perm = porder.reorder(imgs, measure, patch)
        assert np.array_equal(data["images"], want)
        assert np.array_equal(data["perm"], perm)
        assert np.array_equal(data["labels"], labels)
    src.close()


# ---------------------------------------------------------------------------
# data the tests make


def write_cifar100(folder, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"fine_labels": rng.integers(0, 100, n).tolist(),
             b"coarse_labels": rng.integers(0, 20, n).tolist(),
             b"filenames": [f"{name}{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(d))
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return folder


def write_folder(root, classes=("ant", "bee"), per_class=4, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(arr).save(root / c / f"{c}{i}.{ext}")
    return root


@pytest.fixture
def cifar(tmp_path):
    return write_cifar100(tmp_path / "cifar-100-python")


# ---------------------------------------------------------------------------
# end to end


def test_measures_command():
    res = run("measures")
    for name in porder.MEASURES:
        assert name in res.output
    assert json.loads(run("measures", "--json").output)[0]["name"] == "entropy"


def test_help_and_version():
    assert "reorder" in run("--help").output
    assert porder.__version__ in run("--version").output
    assert "Examples" in run("reorder", "--help").output
    out = subprocess.run([sys.executable, "-m", "porder", "--version"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0 and porder.__version__ in out.stdout


def test_reorder_cifar_folder_and_archive(tmp_path, cifar):
    out = tmp_path / "c.h5"
    run("reorder", "--measure", "mi", "--patch", "8", cifar, out)
    check_against_library(out, str(cifar), "mi", 8)
    meta = read_meta(out)
    assert meta["splits"] == {"train": 20, "test": 10} and len(meta["classes"]) == 100
    assert meta["measure"] == "mi" and meta["patch"] == 8 and meta["complete"]
    tgz = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(cifar, arcname="cifar-100-python")
    out2 = tmp_path / "c2.h5"
    run("reorder", "--measure", "mi", "--patch", "8", "--label", "coarse", tgz, out2)
    assert len(read_meta(out2)["classes"]) == 20
    assert np.array_equal(read_split(out2)["images"], read_split(out)["images"])


@pytest.mark.parametrize("measure,patch", [("ssim", 4), ("entropy", 16), ("kl", 8)])
def test_reorder_image_folder(tmp_path, measure, patch):
    src = write_folder(tmp_path / "imgs")
    out = tmp_path / "f.h5"
    run("reorder", "--measure", measure, "--patch", patch, "--test-fraction", "0.25", src, out)
    check_against_library(out, str(src), measure, patch, test_fraction=0.25)
    assert read_meta(out)["splits"] == {"train": 6, "test": 2}


def test_reorder_kaggle_flat_folder_with_odd_modes(tmp_path):
    """The Kaggle layout through the CLI, with every awkward image mode in it."""
    rng = np.random.default_rng(5)
    src = tmp_path / "flat"
    src.mkdir()
    rgb = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(src / "cat.1.png")
    Image.fromarray(rgb).convert("P").save(src / "cat.2.png")
    Image.fromarray(rgb).convert("RGBA").save(src / "cat.10.png")
    Image.fromarray(rgb).convert("CMYK").save(src / "dog.1.jpg")
    Image.fromarray((rng.integers(0, 65536, (50, 50))).astype(np.uint16)).save(src / "dog.2.png")
    Image.fromarray(rgb).save(src / "dog.3.jpg")
    out = tmp_path / "k.h5"
    run("reorder", "--measure", "mi", "--patch", "4", "--test-fraction", "0.34", src, out)
    meta = read_meta(out)
    assert meta["classes"] == ["cat", "dog"] and meta["source_kind"] == "kaggle"
    assert sum(meta["splits"].values()) == 6
    check_against_library(out, str(src), "mi", 4, test_fraction=0.34)


def test_reorder_dogs_vs_cats_subprocess(tmp_path, dogs_vs_cats):
    out = tmp_path / "dvc.h5"
    res = subprocess.run([sys.executable, "-m", "porder", "reorder", "--measure", "mi",
                          "--patch", "8", str(dogs_vs_cats), str(out)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "img/s" in res.stderr  # plain progress lines when not on a terminal
    meta = read_meta(out)
    assert meta["classes"] == ["cat", "dog"] and sum(meta["splits"].values()) == 1000
    check_against_library(out, str(dogs_vs_cats), "mi", 8)


def test_output_is_deterministic(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run("reorder", "--measure", "random", "--seed", "3", "synthetic:300", a)
    run("reorder", "--measure", "random", "--seed", "3", "-b", "7", "synthetic:300", b)
    for split in ("train", "test"):
        da, db = read_split(a, split), read_split(b, split)
        for key in ("images", "labels", "perm"):
            assert np.array_equal(da[key], db[key])
        assert da["names"] == db["names"]


def test_none_caches_the_unmodified_images(tmp_path):
    out = tmp_path / "n.h5"
    run("reorder", "--measure", "none", "digits", out)
    src = open_source("digits")
    imgs = np.concatenate([b.images for b in src.iter_batches("train", 5000)])
    assert np.array_equal(read_split(out)["images"], imgs)


def test_inspect_and_show(tmp_path):
    out = tmp_path / "s.h5"
    run("reorder", "--measure", "ssim", "--patch", "8", "synthetic:50", out)
    text = run("inspect", out).output
    assert "ssim" in text and "train 45" in text and "test 5" in text
    info = json.loads(run("inspect", "--json", out).output)
    assert info["measure"] == "ssim" and info["splits"] == {"train": 45, "test": 5}
    png = tmp_path / "grid.png"
    run("show", out, "-o", png, "-n", "3", "--start", "0")
    img = Image.open(png)
    assert img.size[0] > 2 * 32 * 4 and img.size[1] > 3 * 32 * 4
    # the left column is the original: recovered exactly through perm
    data = read_split(out, start=0, stop=1)
    orig = porder.restore_images(data["images"], data["perm"], 8)[0]
    left = np.asarray(img.convert("RGB"))[18:18 + 128:4, 4:4 + 128:4]
    assert np.array_equal(left, orig)


def test_show_samples_across_classes_and_checks_its_options(tmp_path):
    from porder.store import Writer
    from porder.visual import across_classes

    labels = np.array([2, 0, 0, 0, 1, 1, 2, 0])    # rows sorted-ish, as many splits are
    assert across_classes(labels, 5).tolist() == [1, 4, 0, 2, 5]  # class 0, 1, 2, then again
    assert across_classes(labels, 100).tolist() == [1, 4, 0, 2, 5, 6, 3, 7]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    perm = np.stack([rng.permutation(16) for _ in range(8)]).astype(np.uint16)
    w = Writer(tmp_path / "c.h5", meta={"measure": "mi", "patch": 4, "bins": 256,
                                        "image_size": 16, "source": "test"},
               classes=["ant", "bee", "cat"])
    w.append("train", images, labels, perm, [f"r{i}" for i in range(8)], consumed=8)
    out = w.finish()
    png = tmp_path / "grid.png"
    run("show", out, "-o", png, "-n", "3", "--scale", "1")
    grid = np.asarray(Image.open(png).convert("RGB"))
    want = porder.restore_images(images, perm.astype(np.int64), 4)
    for i, row in enumerate([1, 4, 0]):        # the first image of each class
        y = 18 + i * (16 + 4)
        assert np.array_equal(grid[y:y + 16, 4:20], want[row]), i
    assert "Images shown" in run("show", "--help").output
    assert "Split the images come from" in run("show", "--help").output
    assert_one_line_error(run("show", out, "-o", png, "--start", "8", ok=False),
                          "--start 8 is past the end", "8 images")
    assert_one_line_error(run("show", out, "-o", tmp_path / "no" / "g.png", ok=False),
                          "folder", "does not exist")


def test_corrupt_image_fail_and_skip(tmp_path):
    src = write_folder(tmp_path / "imgs")
    (src / "ant" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "x.h5"
    res = run("reorder", src, out, ok=False)
    assert_one_line_error(res, "broken.jpg", "--on-error skip")  # the CLI's spelling
    assert not out.exists() and not partial_path(out).exists()
    res = run("reorder", "--on-error", "skip", "--test-fraction", "0", src, out)
    assert "skipped 1" in res.output
    info = json.loads(run("inspect", "--json", out).output)
    assert info["splits"]["train"] == 8
    assert any("broken.jpg" in s for s in info["skipped_names"]["train"])


def test_shards_with_skipped_images_merge_to_the_unsharded_file(tmp_path):
    from porder.scale import merge

    src = write_folder(tmp_path / "imgs", per_class=5)
    (src / "ant" / "ant2.jpg").write_bytes(b"corrupt")
    opts = ["--on-error", "skip", "--test-fraction", "0", "-b", "3", "--measure", "ssim"]
    run("reorder", *opts, src, tmp_path / "whole.h5")
    for i in range(2):
        run("reorder", *opts, "--shard", f"{i}/2", src, tmp_path / f"s{i}.h5")
    merged = merge([tmp_path / "s0.h5", tmp_path / "s1.h5"], tmp_path / "m.h5", copy=True)
    a, b = read_split(tmp_path / "whole.h5"), read_split(merged)
    assert len(a["labels"]) == 9
    for key in ("images", "labels", "perm"):
        assert np.array_equal(a[key], b[key])
    assert a["names"] == b["names"]


def test_progress_rates_count_only_the_work_done(monkeypatch, capsys):
    from porder.cli import common

    clock = iter([100.0, 100.0, 101.0, 102.0])     # __init__, first call, then one per call
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    rep = common.ProgressReporter(False, every=0.5)
    rep("train", 500, 1000)                         # a resumed run: 500 rows were written before
    rep("train", 700, 1000)
    rep("train", 1000, 1000)
    err = capsys.readouterr().err.splitlines()
    assert err == ["train: 500/1000 images (50%, resuming)",
                   "train: 700/1000 images (70%, 200 img/s)",
                   "train: 1000/1000 images (100%, 250 img/s)"]
    assert rep.work == {"train": 500}


# ---------------------------------------------------------------------------
# interruption and resume


def _subprocess_reorder(args, signal_after=None):
    """``python -m porder reorder ARGS``; with ``signal_after="N:SIG"``, through the
    wrapper that sends SIG to the process after its N-th written batch."""
    cmd = ["-m", "porder"] if signal_after is None else ["-m", "tests.cli.signal_after",
                                                           signal_after]
    return subprocess.run([sys.executable, *cmd, "reorder", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_resume_after_a_killed_run_is_identical(tmp_path, sig):
    args = ["--measure", "mi", "--patch", "4", "-b", "64", "synthetic:600"]
    whole = tmp_path / "whole.h5"
    assert _subprocess_reorder(args + [whole]).returncode == 0
    out = tmp_path / "cut.h5"
    res = _subprocess_reorder(args + [out], signal_after=f"3:{sig}")
    assert res.returncode != 0 and not out.exists() and partial_path(out).exists()
    if sig == "SIGINT":
        assert res.returncode == 130 and "--resume" in res.stderr
        assert "Traceback" not in res.stderr
    res = _subprocess_reorder(args + ["--resume", out])
    assert res.returncode == 0, res.stderr
    # Rates count only the work of this run: the rows resumed from are not "processed now".
    base = int(re.search(r"train: (\d+)/540 images \(\d+%, resuming\)", res.stderr).group(1))
    assert f"({600 - base} processed now, " in res.stderr, res.stderr
    for split in ("train", "test"):
        a, b = read_split(whole, split), read_split(out, split)
        for key in ("images", "labels", "perm"):
            assert np.array_equal(a[key], b[key])
        assert a["names"] == b["names"]
    ma, mb = read_meta(whole), read_meta(out)
    for key in ("measure", "patch", "bins", "source", "classes", "splits"):
        assert ma[key] == mb[key]


@pytest.mark.parametrize("where", ["exec", "callback"])
def test_a_ctrl_c_where_python_mishandles_it_still_exits_130(tmp_path, where):
    # SIGINT sent, as the 3rd batch is scored, from code where a real Ctrl-C lands while
    # numba loads its cached kernels (tests/cli/interrupt_inside.py): exec'd source, after
    # which `python -m` used to end through SIGINT (-2) after porder's exit(130), and a
    # ctypes callback from LLVM, which used to drop the interrupt (the run went on, exit 0).
    out = tmp_path / "cut.h5"
    res = subprocess.run([sys.executable, "-m", "tests.cli.interrupt_inside", where, "3",
                          "reorder", "--no-progress", "--measure", "mi", "-j", "1", "-b", "64",
                          "synthetic:600", out], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert res.returncode == 130, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("Interrupted")]
    assert lines == [f"Interrupted: partial output kept in {partial_path(out)}; run the same "
                     f"command with --resume to continue."], res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr
    assert partial_path(out).exists() and not out.exists()


# ---------------------------------------------------------------------------
# bad input: one line naming the file or option, non-zero exit, nothing left


def test_bad_inputs(tmp_path, cifar):
    out = tmp_path / "o.h5"
    cases = [
        (["reorder", tmp_path / "missing", out], ["missing"]),
        (["reorder", "--measure", "nope", "synthetic:5", out], ["--measure", "nope"]),
        (["reorder", "--patch", "5", "synthetic:5", out], ["patch size 5", "32"]),
        (["reorder", "--patch", "8", "--size", "20", "synthetic:5", out], ["patch size 8"]),
        (["reorder", "synthetic:5", tmp_path / "no-such-dir" / "o.h5"], ["no-such-dir"]),
        (["reorder", "--device", "cuda", "synthetic:5", out], ["cuda"]),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["reorder", empty, out], ["empty"]))
    src = write_folder(tmp_path / "imgs")
    (src / "wasp").mkdir()
    cases.append((["reorder", src, out], ["wasp"]))
    bad = tmp_path / "cifar-bad" / "cifar-100-python"
    bad.mkdir(parents=True)
    (bad / "train").write_bytes(b"junk")
    (bad / "meta").write_bytes(b"junk")
    cases.append((["reorder", bad, out], ["cifar-100-python"]))
    if porder.backend.cuda_available():
        cases.pop(5)
    for args, frags in cases:
        res = run(*args, ok=False)
        assert_one_line_error(res, *frags)
        assert not out.exists() and not partial_path(out).exists(), args
    run("reorder", "synthetic:5", out)
    assert_one_line_error(run("reorder", "synthetic:5", out, ok=False), "--overwrite")
    run("reorder", "--overwrite", "synthetic:5", out)
    assert_one_line_error(run("inspect", tmp_path / "nope.h5", ok=False), "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    assert_one_line_error(run("show", tmp_path / "junk.h5", ok=False), "junk.h5")


def test_unwritable_output(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(run("reorder", "synthetic:5", afile / "o.h5", ok=False), "afile")
    assert_one_line_error(run("reorder", "synthetic:5", "/proc/porder-test.h5", ok=False),
                          "/proc/porder-test.h5")
    if os.geteuid() != 0:  # root may write into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert_one_line_error(run("reorder", "synthetic:5", ro / "o.h5", ok=False), "ro")
