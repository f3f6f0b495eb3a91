"""A seeded fuzz of CIFAR pickles and archives through `porder reorder`.

Every corrupted input must end one of two ways: exit 0 with a complete file
(the damage happened to be harmless, e.g. a changed pixel), or exit 1 or 2 with
one ``Error:`` line naming the source, no traceback and no output file, not
even ``OUT.part``; each case in bounded time and memory.
"""
from __future__ import annotations

import gzip
import io
import time
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner

from porder.cli import main
from porder.store import partial_path, read_meta

from .cifar_files import official_cifar10

# Opcodes worth planting: structure, sizes, globals and calls.
OPCODES = b"(.012]})tlde sauRbc\x93\x85\x86\x87KMJT UXqrh\x94\x8a\x8e\x95\x80"


def mutate(raw: bytes, rng: np.random.Generator) -> bytes:
    """One random corruption of ``raw``: flipped bytes, a cut, an insertion, a planted
    opcode, a repeated slice or a 4-byte length overwritten with a large value."""
    data = bytearray(raw)
    kind = rng.integers(6)
    at = int(rng.integers(len(data)))
    if kind == 0:
        for _ in range(int(rng.integers(1, 9))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
    elif kind == 1:
        del data[at:]
    elif kind == 2:
        data[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    elif kind == 3:
        data[at] = OPCODES[int(rng.integers(len(OPCODES)))]
    elif kind == 4:
        n = int(rng.integers(1, 64))
        data[at:at] = data[max(0, at - n):at]
    else:
        data[at:at + 4] = int(rng.choice([2**31 - 1, 2**24, 3072 * 10**4])).to_bytes(4, "little")
    return bytes(data)


def check_run(source, out, where: str) -> None:
    """Run `porder reorder SOURCE OUT` and check the outcome (see the module docstring)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        res = CliRunner().invoke(main, ["reorder", "--no-progress", "-j", "1", "--measure",
                                        "entropy", "--patch", "8", str(source), str(out)])
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 30, f"{where}: {seconds:.1f} s"
    assert peak < 64 * 2**20, f"{where}: {peak / 2**20:.0f} MiB"
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        f"{where}: {res.exception!r}\n{res.output}"
    assert "Traceback" not in res.output, where
    if res.exit_code == 0:
        assert read_meta(out)["complete"], where
        out.unlink()
        return
    assert res.exit_code in (1, 2), f"{where}: exit {res.exit_code}\n{res.output}"
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"{where}:\n{res.output}"
    assert str(source) in lines[0], f"{where}: the error does not name the source: {lines[0]}"
    assert not out.exists() and not partial_path(out).exists(), where


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    folder, _ = official_cifar10(root, per_batch=3, test_rows=4)
    return folder


@pytest.mark.parametrize("member", ["data_batch_2", "batches.meta"])
def test_corrupted_pickles(cifar, tmp_path, member):
    rng = np.random.default_rng(2024 if member == "batches.meta" else 7)
    path = cifar / member
    original = path.read_bytes()
    try:
        for case in range(30):
            path.write_bytes(mutate(original, rng))
            check_run(cifar, tmp_path / "out.h5", f"{member} case {case}")
    finally:
        path.write_bytes(original)


def test_corrupted_archives(cifar, tmp_path):
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(cifar, arcname=cifar.name)
    tar_bytes = buf.getvalue()
    rng = np.random.default_rng(11)
    archive = tmp_path / "cifar-10-python.tar.gz"
    for case in range(45):
        if case % 3 == 0:  # damage the compressed bytes: gzip's checks see it
            data = mutate(gzip.compress(tar_bytes, compresslevel=1), rng)
        else:  # damage the tar itself: headers, sizes and the pickles inside
            data = gzip.compress(mutate(tar_bytes, rng), compresslevel=1)
        archive.write_bytes(data)
        check_run(archive, tmp_path / "out.h5", f"archive case {case}")
