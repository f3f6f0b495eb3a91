"""The command line against hostile input: interrupts during a stuck decode, FIFOs,
folders that cannot be listed, odd names on the terminal, and malformed options.

Every failure is one ``Error:`` line naming the file or option (exit 1, or 2 for
an option), with no traceback and nothing that looks like output left behind.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from porder.cli import main
from porder.store import describe, partial_path, read_meta, read_split

from ..conftest import REPO


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_error(res, code, *fragments):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), res.output
    for frag in fragments:
        assert frag in last, res.output


def images(root: Path, names, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return root


def porder_process(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# --------------------------------------------------------------------------
# Interrupts


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie no init has reaped yet counts)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.parametrize("sig, workers, decoder",
                         [(signal.SIGINT, 1, "threads"), (signal.SIGTERM, 2, "threads"),
                          (signal.SIGINT, 2, "processes")],
                         ids=["SIGINT-1-thread", "SIGTERM-2-threads", "SIGINT-2-processes"])
def test_interrupt_ends_a_run_stuck_in_decoding(tmp_path, sig, workers, decoder):
    src = images(tmp_path / "d", [f"a/{i}.png" for i in range(6)] + ["b/0.png", "b/hang.png"])
    marker, out = tmp_path / "decoding", tmp_path / "out.h5"
    proc = porder_process("-m", "tests.cli.hang_decode", marker, "reorder", "--no-progress",
                          "-j", workers, "--decoder", decoder, "-b", 2, "--test-fraction", 0,
                          src, out)
    try:
        for _ in range(600):  # the run is blocked in decoding hang.png
            if (marker.exists() and marker.read_text()) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), proc.communicate(timeout=60)
        decoding_pid = int(marker.read_text())
        assert (decoding_pid == proc.pid) == (decoder == "threads")
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
    # 130, never an end through the signal (test_cli.py's
    # test_a_ctrl_c_where_python_mishandles_it_still_exits_130 pins the cases)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if "Interrupted" in line] == [
        f"Interrupted: partial output kept in {partial_path(out)}; run the same command with "
        f"--resume to continue."], err
    assert "Traceback" not in err
    # it must not wait for the stuck decode (that would be the 60 s timeout); 10 s leaves
    # room for a loaded CI machine (0.4 to 0.7 s here)
    assert seconds < 10, f"the run took {seconds:.1f} s to end after {sig.name}"
    assert partial_path(out).exists() and not out.exists()
    for _ in range(50):  # a decoding process is killed, not left decoding
        if process_gone(decoding_pid):
            break
        time.sleep(0.1)
    assert process_gone(decoding_pid)


def test_fifo_named_like_an_image_through_the_cli(tmp_path):
    src = images(tmp_path / "d", ["a/0.png", "a/1.png", "b/0.png", "b/1.png"])
    os.mkfifo(src / "b" / "pipe.jpg")
    out = tmp_path / "out.h5"
    res = subprocess.run([sys.executable, "-m", "porder", "reorder", "--no-progress",
                          "--test-fraction", "0", str(src), str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "b/pipe.jpg': not a regular file (a FIFO)" in res.stderr.strip().splitlines()[-1]
    assert not out.exists() and not partial_path(out).exists()
    res = subprocess.run([sys.executable, "-m", "porder", "reorder", "--no-progress",
                          "--test-fraction", "0", "--on-error", "skip", str(src), str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "skipped 1 unreadable" in res.stderr
    assert describe(out)["skipped_names"]["train"] == ["b/pipe.jpg: not a regular file (a FIFO)"]


# --------------------------------------------------------------------------
# Folders that cannot be listed


def test_unlistable_folder_through_the_cli(tmp_path, monkeypatch):
    src = images(tmp_path / "d", ["a/0.png", "a/deep/1.png", "b/0.png", "b/1.png"])
    real = os.scandir
    locked = str(src / "a" / "deep")

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out.h5"
    assert_error(run("reorder", "--no-progress", src, out), 1, "cannot list folder",
                 "a/deep", "Permission denied")
    assert not out.exists() and not partial_path(out).exists()
    res = run("reorder", "--no-progress", "--on-error", "skip", "--test-fraction", 0, src, out)
    assert res.exit_code == 0, res.output
    assert read_meta(out)["splits"]["train"] == 3
    assert describe(out)["skipped_names"]["train"] == [
        f"a/deep/: cannot list folder: [Errno 13] Permission denied: '{locked}'"]


# --------------------------------------------------------------------------
# Odd names: stored, and escaped on the terminal


def test_odd_names_are_stored_and_escaped_on_output(tmp_path):
    root = os.fsencode(tmp_path) + b"/d\xff"  # the source itself, too
    for cls, name in ((b"caf\xe9", b"\xff.png"), (b"evil\x1b[31m", b"new\nline.png"),
                      (b"plain", b"0.png")):
        path = os.path.join(root, cls, name)
        os.makedirs(os.path.dirname(path))
        Image.new("RGB", (32, 32), (9, 99, 199)).save(os.fsdecode(path), format="PNG")
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/out\xfe.h5"))
    res = run("reorder", "--no-progress", "--test-fraction", 0, os.fsdecode(root), out)
    assert res.exit_code == 0, res.output
    assert f"Wrote {tmp_path}/out\\xfe.h5: train 3" in res.output
    meta = read_meta(out)
    assert meta["source"] == f"{tmp_path}/d\\xff"
    assert meta["classes"] == ["caf\\xe9", "evil\x1b[31m", "plain"]
    assert read_split(out, "train")["names"] == ["caf\\xe9/\\xff.png", "evil\x1b[31m/new\nline.png",
                                                 "plain/0.png"]
    text = run("inspect", out).output
    assert "\x1b" not in text and "classes:     caf\\xe9, evil\\x1b[31m, plain\n" in text
    assert len(text.splitlines()) == 8
    assert json.loads(run("inspect", "--json", out).output)["classes"] == meta["classes"]


def test_errors_escape_control_characters(tmp_path):
    root = tmp_path / "d"
    images(root, ["a/0.png", "b/0.png"])
    (root / "b" / "bad\x1b]0;owned\x07\n.png").write_bytes(b"junk")
    res = run("reorder", "--no-progress", root, tmp_path / "o.h5")
    assert_error(res, 1, "bad\\x1b]0;owned\\x07\\n.png': cannot identify image file")
    assert "\x1b" not in res.output and "\x07" not in res.output


def test_inspect_a_hand_edited_shard_count(tmp_path):
    import h5py

    out = tmp_path / "o.h5"
    assert run("reorder", "--no-progress", "synthetic:20", out).exit_code == 0
    with h5py.File(out, "r+") as f:
        f.attrs["source"] = "x\x1b[2J\ny"
    res = run("inspect", out)
    assert res.exit_code == 0
    assert "source:      x\\x1b[2J\\ny (synthetic)" in res.output
    with h5py.File(out, "r+") as f:  # a shard count that is no number: refused, naming the file
        f.attrs["shard_count"] = "abc"
    res = run("inspect", out)
    assert res.exit_code == 1 and "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and str(out) in last and "shard_count" in last, res.output


# --------------------------------------------------------------------------
# Options: malformed values are exit 2 naming the option, before anything is written


@pytest.mark.parametrize("seed", [str(2**63), str(10**30), "-1", "1.5", "abc"])
def test_seed_out_of_range(tmp_path, seed):
    out = tmp_path / "o.h5"
    assert_error(run("reorder", "--seed", seed, "synthetic:10", out), 2, "--seed")
    assert not out.exists() and not partial_path(out).exists()
    assert_error(run("train", "--seed", seed, out), 2, "--seed")


def test_largest_seed_is_accepted(tmp_path):
    out = tmp_path / "o.h5"
    res = run("reorder", "--no-progress", "--measure", "random", "--seed", 2**63 - 1,
              "synthetic:10", out)
    assert res.exit_code == 0, res.output
    assert read_meta(out)["seed"] == 2**63 - 1


@pytest.mark.parametrize("shard", ["abc", "1/2/3", "1/4.0", "", " 1/4", "4/4", "1/0", "-1/4",
                                   "1/", "/4"])
def test_malformed_shard(tmp_path, shard):
    out = tmp_path / "o.h5"
    assert_error(run("reorder", "--shard", shard, "synthetic:10", out), 2, "--shard")
    assert not out.exists() and not partial_path(out).exists()


def test_shard_still_works(tmp_path):
    out = tmp_path / "o.h5"
    assert run("reorder", "--no-progress", "--shard", "1/2", "synthetic:10", out).exit_code == 0
    assert read_meta(out)["shard_index"] == 1


@pytest.mark.parametrize("option, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-inf"), ("--lr", "0"), ("--lr", "-1"),
    ("--width", "inf"), ("--width", "nan"), ("--width", "0"), ("--width", "-0.5"),
    ("--width", "1e6"),
])
def test_train_and_compare_refuse_non_finite_or_out_of_range(tmp_path, option, value):
    f = tmp_path / "f.h5"
    f.write_bytes(b"")
    assert_error(run("train", option, value, f), 2, option)
    assert_error(run("compare", option, value, "synthetic:10", "-o", tmp_path / "c"), 2, option)
    assert not (tmp_path / "c").exists() and not Path("runs").joinpath("f-vgg-seed0").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "1"])
def test_test_fraction_must_be_finite(tmp_path, value):
    assert_error(run("reorder", "--test-fraction", value, "synthetic:10", tmp_path / "o.h5"),
                 2, "--test-fraction")


def test_show_refuses_an_unknown_image_extension_up_front(tmp_path):
    out = tmp_path / "o.h5"
    assert run("reorder", "--no-progress", "synthetic:10", out).exit_code == 0
    assert_error(run("show", out, "-o", tmp_path / "grid.xyz"), 2, "--output", "grid.xyz",
                 ".png")
    assert_error(run("show", out, "-o", tmp_path / "grid"), 2, "--output")
    assert run("show", out, "-o", tmp_path / "grid.jpg").exit_code == 0


def test_cli_limits_match_the_library():
    from porder.cli.common import SEED
    from porder.cli.train import MAX_WIDTH
    from porder.sources import MAX_SEED as SOURCE_MAX_SEED
    from porder.train.config import MAX_SEED
    from porder.train.config import MAX_WIDTH as CONFIG_MAX_WIDTH

    assert MAX_WIDTH == CONFIG_MAX_WIDTH and SEED.max == MAX_SEED == SOURCE_MAX_SEED == 2**63 - 1
