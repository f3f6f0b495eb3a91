"""CIFAR pickles and archives, real and hostile: the official format loads; forged
dtypes, lying sizes, memory bombs, truncated and oversized archives are refused
with one line naming the file, in bounded memory, and nothing crashes the process.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc

import numpy as np
import pytest

from porder.sources import SourceError, open_source
from porder.sources import cifar as cifar_module
from porder.sources.pickles import MAX_OPCODES, PickleError, load_cifar_pickle

from ..conftest import REPO
from .cifar_files import (
    forged_array_pickle,
    official_cifar10,
    official_cifar100,
    py2_pickle,
    rows_to_images,
    tar_gz,
)


def read_split(src, split):
    batches = list(src.iter_batches(split, 1000))
    return (np.concatenate([b.images for b in batches]),
            np.concatenate([b.labels for b in batches]), [n for b in batches for n in b.names])


# --------------------------------------------------------------------------
# The real format still loads


def test_official_cifar10_folder_and_archive(tmp_path):
    # test_batch has the real (10000, 3072) shape; the train batches are smaller.
    folder, content = official_cifar10(tmp_path / "f", per_batch=7, test_rows=10000)
    archive = tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    for spec in (folder, archive):
        with open_source(str(spec)) as src:
            assert src.kind == "cifar10" and src.classes[3] == "cat"
            images, labels, names = read_split(src, "test")
            rows, want = content["test_batch"]
            np.testing.assert_array_equal(images, rows_to_images(rows))
            np.testing.assert_array_equal(labels, want)
            assert names[9999] == "cifar-10-batches-py/test_batch#9999"
            images, labels, _ = read_split(src, "train")
            np.testing.assert_array_equal(labels, np.concatenate(
                [content[f"data_batch_{i}"][1] for i in range(1, 6)]))
            np.testing.assert_array_equal(images[7:14], rows_to_images(content["data_batch_2"][0]))


def test_official_cifar100_coarse(tmp_path):
    folder, content = official_cifar100(tmp_path)
    with open_source(str(tar_gz(folder, tmp_path / "c100.tar.gz")), label="coarse") as src:
        assert len(src.classes) == 20 and src.classes[0] == "coarse_0"
        _, labels, _ = read_split(src, "train")
        np.testing.assert_array_equal(labels, content["train"][2])


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_reader_agrees_with_pickle_on_plain_data(protocol):
    # Independent reference: the standard unpickler, on data it handles safely.
    arrays = [np.arange(12, dtype=np.uint8).reshape(3, 4),
              np.arange(-6, 6, dtype=">i4").reshape(2, 6),
              np.asfortranarray(np.arange(6, dtype="<u2").reshape(2, 3)),
              np.zeros((0, 3072), np.uint8), np.array(7, dtype=np.int64)]
    obj = {"data": arrays, b"labels": [0, 1, 255, 256, 65536, -1, 2**40, -2**70],
           "meta": ("t", b"b", 1.5, None, True, False, [], {}),
           "scalar": np.int64(-3), "text": "caf\u00e9 \U0001f600"}
    raw = pickle.dumps(obj, protocol=protocol)
    want = pickle.loads(raw, encoding="bytes")
    got = load_cifar_pickle(raw)
    assert got.keys() == want.keys()
    for a, b in zip(got["data"], want["data"], strict=True):
        # Same type and values; the byte order may be kept where NumPy swaps to native.
        assert (a.dtype.kind, a.dtype.itemsize, a.shape) == (b.dtype.kind, b.dtype.itemsize,
                                                             b.shape)
        np.testing.assert_array_equal(a, b)
    assert got[b"labels"] == want[b"labels"]
    assert got["meta"] == want["meta"] and got["text"] == want["text"]
    assert got["scalar"] == -3


def test_py2_style_files_read_like_pickle():
    obj = {b"data": np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072) % 251,
           b"labels": [3, 9], b"filenames": [b"x" * 300] * 300}  # LONG_BINPUT, BINSTRING
    raw = py2_pickle(obj)
    want = pickle.loads(raw, encoding="bytes")
    got = load_cifar_pickle(raw)
    np.testing.assert_array_equal(got[b"data"], want[b"data"])
    assert got[b"labels"] == want[b"labels"] and got[b"filenames"] == want[b"filenames"]


def test_python3_pickles_with_str_keys_load(tmp_path):
    folder, content = official_cifar100(tmp_path)
    rows, fine, coarse = content["test"]
    (folder / "test").write_bytes(pickle.dumps(
        {"data": rows, "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist()},
        protocol=5))
    with open_source(str(folder)) as src:
        images, labels, _ = read_split(src, "test")
    np.testing.assert_array_equal(images, rows_to_images(rows))
    np.testing.assert_array_equal(labels, fine)


def test_class_names_that_are_not_utf8_are_stored_escaped(tmp_path):
    folder, _ = official_cifar10(tmp_path)
    names = [b"caf\xe9", b"ok", b"\x1b[31mred", b"nul\x00"] + [f"n{i}".encode() for i in range(6)]
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": names}))
    with open_source(str(folder)) as src:  # kept exactly, but for what HDF5 cannot store
        assert src.classes[:4] == ["caf\\xe9", "ok", "\x1b[31mred", "nul\\x00"]


# --------------------------------------------------------------------------
# Forged pickles


FORGED_IN_SUBPROCESS = """
import struct, sys
from pathlib import Path
from porder.sources import SourceError, open_source
from tests.sources.cifar_files import forged_array_pickle, official_cifar10
root = Path(sys.argv[1])
folder, _ = official_cifar10(root)
cases = {
    "object": forged_array_pickle(b"O8", (4, 3072), struct.pack("<q", 8) * 4 * 3072),
    "void": forged_array_pickle(b"V8", (1, 3072), b"\\x00" * 8 * 3072),
    "flags": forged_array_pickle(b"u1", (1, 3072), b"\\x01" * 3072, labels=[4]),
    "string": forged_array_pickle(b"S8", (1, 3072), b"a" * 8 * 3072),
    "datetime": forged_array_pickle(b"M8", (1, 3072), b"\\x00" * 8 * 3072),
}
for name, raw in cases.items():
    (folder / "data_batch_3").write_bytes(raw)
    try:
        src = open_source(str(folder))
        b = next(src.iter_batches("train", 10**6))
        print(name, "LOADED", b.images.dtype, b.images.shape)
    except SourceError as e:
        print(name, "REFUSED", e)
"""


def test_forged_dtypes_are_refused_without_crashing(tmp_path):
    # A subprocess, so that a segfault (the old unpickler's fate) fails the test
    # instead of killing pytest.
    res = subprocess.run([sys.executable, "-c", FORGED_IN_SUBPROCESS, str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    for name in ("object", "void", "string", "datetime"):
        assert lines[name].startswith("REFUSED"), res.stdout
        assert "data_batch_3" in lines[name] and "refusing NumPy dtype" in lines[name]
    # An integer dtype with the object flags in its state: the flags are ignored
    # (the dtype is built from its name alone), so it is a plain uint8 array.
    assert lines["flags"].startswith("LOADED uint8"), res.stdout


def test_declared_shape_is_never_allocated():
    # _reconstruct's shape argument and a state shape of 10^12 x 3072 over 3072 bytes.
    huge = forged_array_pickle(b"u1", (10**12, 3072), b"\x00" * 3072)
    tracemalloc.start()
    try:
        with pytest.raises(PickleError, match=r"needs 3072000000000000 bytes, the pickle "
                                              r"holds 3072"):
            load_cifar_pickle(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("opcode, width", [(b"B", "<I"), (b"\x8e", "<Q"), (b"T", "<i"),
                                           (b"X", "<I"), (b"\x8d", "<Q"), (b"\x96", "<Q")])
def test_lengths_beyond_the_file_are_refused(opcode, width):
    raw = b"\x80\x04" + opcode + struct.pack(width, 2**31 - 1) + b"abc."
    with pytest.raises(PickleError, match="ends early"):
        load_cifar_pickle(raw)


BOMBS = {
    # 382 kB each, like the file of the report; each opcode makes a new object.
    "memo": b"\x80\x04}" + b"\x94" * 382_000 + b".",
    "dicts": b"\x80\x04" + b"}" * 382_000 + b".",
    "dup": b"\x80\x04]" + b"2" * 382_000 + b".",
    "tuples": b"\x80\x04K\x01" + b"\x85" * 382_000 + b".",
    "ints": b"\x80\x04(" + b"M\xff\xff" * 127_000 + b"l.",
    "nested lists": b"\x80\x04" + b"(" * 191_000 + b"l" * 191_000 + b".",
}


BOMBS_IN_SUBPROCESS = """
import re, sys
from porder.sources.pickles import load_cifar_pickle
from tests.sources.test_cifar_hostile import BOMBS

def peak_mib():  # VmHWM: the peak resident memory since the last reset
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1)) / 1024

for name, raw in BOMBS.items():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident memory
    before = peak_mib()
    try:
        load_cifar_pickle(raw)
    except Exception:
        pass
    print(name, "|", peak_mib() - before)
"""


def test_small_pickles_stay_small_in_memory():
    # Peak resident memory of each 382 kB bomb, in a fresh process (Linux's VmHWM).
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    res = subprocess.run([sys.executable, "-c", BOMBS_IN_SUBPROCESS], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    peaks = {n: float(v) for n, v in (line.split(" | ") for line in res.stdout.splitlines())}
    assert peaks.keys() == BOMBS.keys()
    assert max(peaks.values()) < 64, peaks  # MiB, for 382 kB pickles


def test_opcode_budget():
    raw = b"\x80\x04" + b"N0" * (MAX_OPCODES // 2 + 1) + b"N."
    with pytest.raises(PickleError, match="more than 2,000,000 opcodes"):
        load_cifar_pickle(raw)


@pytest.mark.parametrize("raw, message", [
    (pickle.dumps(print), "refusing to load builtins.print"),
    (b"\x80\x02cos\nsystem\n(U\x02idtR.", "refusing to load os.system"),
    (pickle.dumps({(1, 2): 3}), "dict key of type tuple"),
    (pickle.dumps({1, 2}), "unsupported pickle opcode"),
    (b"\x80\x02cnumpy\ndtype\nU\x02u1\x85R.", "a NumPy name or dtype where data"),
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R.",
     "_reconstruct of something other than numpy.ndarray"),
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-7\x86R.",
     "_codecs.encode used other than"),
    (b"\x80\x02K\x01K\x02R.", "REDUCE of something that is not"),
    (b"\x80\x02]K\x01b.", "BUILD of something other than"),
    (b"\x80\x02h\x05.", "memo reference 5 to nothing"),
    (b"\x80\x02e.", "MARK is missing"),
    (b"\x80\x02}(K\x01K\x02u", "ends without its STOP"),
    (b"\x80\x09N.", "protocol above 5"),
    (b"\x80\x02I12x\n.", "malformed integer"),
])
def test_malformed_or_foreign_pickles(raw, message):
    with pytest.raises(PickleError, match=message):
        load_cifar_pickle(raw)


def test_labels_and_data_are_checked_before_numpy_sees_them(tmp_path):
    folder, _ = official_cifar10(tmp_path)
    rows = np.zeros((2, 3072), np.uint8)
    for labels, message in (([1, "2"], "not a list of integers"),
                            ([1, 2**80], r"outside 0\.\.9"),
                            ([[1], [2]], "not a list of integers"),
                            ([True, False], "not a list of integers"),
                            (np.zeros((2, 1), np.int64), r"has shape \(2, 1\)")):
        (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": rows, b"labels": labels}))
        with pytest.raises(SourceError, match=message):
            open_source(str(folder))
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": [[1] * 3072], b"labels": [1]}))
    with pytest.raises(SourceError, match="'data' is a list, not a NumPy array"):
        open_source(str(folder))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", 3]}))
    with pytest.raises(SourceError, match="must be a list of strings"):
        open_source(str(folder))


# --------------------------------------------------------------------------
# Archives


def _raw_tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    for info, data in members:
        buf.write(info.tobuf(format=tarfile.GNU_FORMAT))
        buf.write(data + b"\0" * (-len(data) % 512))
    buf.write(b"\0" * 1024)
    return buf.getvalue()


def test_member_size_is_checked_before_reading(tmp_path):
    # A header claiming 1 GiB for data_batch_1, followed by 2 kB: refused at the header.
    info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    info.size = 2**30
    path = tmp_path / "liar.tar.gz"
    path.write_bytes(gzip.compress(_raw_tar([(info, b"")])[:2048]))
    tracemalloc.start()
    try:
        with pytest.raises(SourceError, match=r"data_batch_1' is 1,073,741,824 bytes; a CIFAR "
                                              r"python batch is at most 192 MiB"):
            open_source(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_oversized_file_in_a_cifar_folder_is_refused_unread(tmp_path):
    folder, _ = official_cifar10(tmp_path)
    os.truncate(folder / "data_batch_4", 200 * 2**20)  # sparse: nothing is written
    with pytest.raises(SourceError, match=r"data_batch_4' is 209,715,200 bytes; a CIFAR "
                                          r"python batch is at most 192 MiB"):
        open_source(str(folder))


def test_archive_expansion_is_capped(tmp_path, monkeypatch):
    # A gzip bomb in a member porder does not even want: the decompressed stream is capped.
    monkeypatch.setattr(cifar_module, "MAX_ARCHIVE_BYTES", 2**20)
    info = tarfile.TarInfo("junk.bin")
    info.size = 4 * 2**20
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(gzip.compress(_raw_tar([(info, b"\0" * info.size)])))
    assert path.stat().st_size < 10_000
    with pytest.raises(SourceError, match=r"archive '.*bomb.tar.gz' expands to more than 1 MiB"):
        open_source(str(path))


def test_archive_member_count_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar_module, "MAX_ARCHIVE_MEMBERS", 5)
    path = tmp_path / "many.tar.gz"
    path.write_bytes(gzip.compress(_raw_tar([(tarfile.TarInfo(f"f{i}"), b"") for i in range(6)])))
    with pytest.raises(SourceError, match="holds more than 5 entries"):
        open_source(str(path))


def test_the_limits_cover_the_real_cifar_sizes():
    # CIFAR-100's train file: 50,000 rows of 3,072 bytes, plus labels and names.
    assert 50_000 * 3072 * 1.05 < cifar_module.MAX_FILE_BYTES
    assert (50_000 + 10_000) * 3072 * 1.05 < cifar_module.MAX_ARCHIVE_BYTES


def test_truncated_archives_are_one_clean_error(tmp_path):
    folder, _ = official_cifar10(tmp_path / "c")
    data = tar_gz(folder, tmp_path / "good.tar.gz").read_bytes()
    for cut in (10, 100, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        path = tmp_path / f"cut{cut}.tar.gz"
        path.write_bytes(data[:cut])
        with pytest.raises(SourceError, match=rf"cannot read archive '.*cut{cut}.tar.gz': "):
            open_source(str(path))


@pytest.mark.parametrize("suffix", ["gz", "bz2", "xz"])
def test_corrupt_compressed_data_anywhere_is_one_clean_error(tmp_path, suffix):
    # Damage at every tenth of the stream: in a header, in a member's data, near the end.
    folder, _ = official_cifar10(tmp_path / "c")
    path = tmp_path / f"c.tar.{suffix}"
    def fixed_time(info):  # the same archive bytes in every run: the damage lands alike
        info.mtime = 0
        return info

    with tarfile.open(path, f"w:{suffix}") as tar:
        tar.add(folder, arcname=folder.name, filter=fixed_time)
    data = path.read_bytes()
    for i in range(1, 10):
        at = len(data) * i // 10
        path.write_bytes(data[:at] + bytes(b ^ 0x5A for b in data[at:at + 8]) + data[at + 8:])
        with pytest.raises(SourceError, match=rf"cannot read (archive|CIFAR pickle) '.*c.tar.{suffix}"):
            open_source(str(path))


def test_decompression_errors_mid_stream(tmp_path, monkeypatch):
    # zlib raises its own error type (not OSError) for bad deflate data inside a member.
    import zlib

    class Failing(io.RawIOBase):
        def __init__(self, f):
            self.inner, self.count = gzip.GzipFile(fileobj=f, mode="rb"), 0

        def readable(self):
            return True

        def readinto(self, buffer):
            if self.count > 20_000:
                raise zlib.error("Error -3 while decompressing data: invalid code lengths set")
            data = self.inner.read(len(buffer))
            buffer[:len(data)] = data
            self.count += len(data)
            return len(data)

    monkeypatch.setattr(cifar_module, "_COMPRESSED", ((b"\x1f\x8b", Failing),))
    folder, _ = official_cifar10(tmp_path / "c")
    path = tar_gz(folder, tmp_path / "c.tar.gz")
    with pytest.raises(SourceError, match=r"cannot read archive '.*c.tar.gz': Error -3 while "
                                          r"decompressing data"):
        open_source(str(path))


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz", "w"])
def test_other_tar_compressions(tmp_path, mode):
    folder, content = official_cifar100(tmp_path)
    path = tmp_path / "c100.tar"
    with tarfile.open(path, mode) as tar:
        tar.add(folder, arcname=folder.name)
    with open_source(str(path)) as src:
        np.testing.assert_array_equal(read_split(src, "test")[1], content["test"][1])


def test_a_fifo_or_folder_in_place_of_a_cifar_file(tmp_path):
    folder, _ = official_cifar10(tmp_path)
    (folder / "test_batch").unlink()
    os.mkfifo(folder / "test_batch")
    script = textwrap.dedent(f"""
        from porder.sources import SourceError, open_source
        try:
            open_source({str(folder)!r})
        except SourceError as e:
            print(e)
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert "test_batch': not a regular file (a FIFO)" in res.stdout, res.stdout + res.stderr
    fifo = tmp_path / "x.tar.gz"
    os.mkfifo(fifo)
    script = script.replace(repr(str(folder)), repr(str(fifo)))
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert "x.tar.gz': not a regular file (a FIFO)" in res.stdout, res.stdout + res.stderr
