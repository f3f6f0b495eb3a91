"""build_cache's stages: the writer thread overlaps scoring, keeps order, and fails cleanly.

Faults and waits are injected from outside (``Writer.append`` and
``porder.pipeline.reorder`` patched by the tests), never by hooks in porder.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import porder.pipeline as pipeline
from porder import reorder
from porder.pipeline import CacheSpec, WriteBehind, build_cache
from porder.sources import open_source
from porder.store import SPLITS, Writer, partial_path, read_split


def writer_threads():
    return [t for t in threading.enumerate() if t.name == "porder-writer"]


def test_write_behind_runs_calls_in_order_and_raises_the_first_error():
    seen = []

    def fail(x):
        raise OSError(f"boom {x}")

    w = WriteBehind(depth=1)
    for i in range(5):
        w.submit(seen.append, i)
    w.drain()
    assert seen == [0, 1, 2, 3, 4]
    w.submit(fail, 1)
    with pytest.raises(OSError, match="boom 1"):
        w.drain()
    w.submit(seen.append, 99)  # after a failure nothing more runs
    w.drain()
    assert seen == [0, 1, 2, 3, 4]
    w.stop()
    w.stop()  # stopping twice is harmless
    assert w.busy >= 0 and w.waited >= 0


def test_the_file_holds_every_batch_in_order(tmp_path):
    out = tmp_path / "o.h5"
    r = build_cache(CacheSpec("synthetic:150", out, measure="mi", patch=8, batch_size=7, workers=1))
    assert set(r.seconds) == {"decode", "measure", "write", "write_wait", "other", "total"}
    with open_source("synthetic:150") as src:
        for split in SPLITS:
            images = np.concatenate([b.images for b in src.iter_batches(split, 1000)])
            want, perm = reorder(images, "mi", 8)  # all at once: an independent batching
            got = read_split(out, split)
            assert r.rows[split] == len(want) == len(got["images"])
            assert np.array_equal(got["images"], want) and np.array_equal(got["perm"], perm)
    assert not writer_threads()


def test_batch_k_plus_1_is_scored_while_batch_k_is_written(tmp_path, monkeypatch):
    scored = []
    second_scored = threading.Event()
    original_append, original_reorder = Writer.append, pipeline.reorder

    def slow_append(self, *args, **kwargs):
        # the first append waits for the next batch to be scored: it would wait
        # forever (the timeout) if writing still held up the main thread
        if not second_scored.is_set():
            assert second_scored.wait(timeout=30), "batch 2 was not scored during write 1"
        original_append(self, *args, **kwargs)

    def counting_reorder(*args, **kwargs):
        scored.append(1)
        if len(scored) == 2:
            second_scored.set()
        return original_reorder(*args, **kwargs)

    monkeypatch.setattr(Writer, "append", slow_append)
    monkeypatch.setattr(pipeline, "reorder", counting_reorder)
    r = build_cache(CacheSpec("synthetic:100", tmp_path / "o.h5", measure="entropy",
                              batch_size=10, workers=1))
    assert sum(r.rows.values()) == 100


@pytest.mark.parametrize("error", [RuntimeError("writer broke"), KeyboardInterrupt()])
def test_a_failing_write_stops_the_run(tmp_path, monkeypatch, error):
    calls = []
    original = Writer.append

    def append(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        original(self, *args, **kwargs)

    monkeypatch.setattr(Writer, "append", append)
    out = tmp_path / "o.h5"
    with pytest.raises(type(error)):
        build_cache(CacheSpec("synthetic:200", out, measure="entropy", batch_size=10, workers=1))
    assert len(calls) == 2  # nothing was written after the failure
    assert not out.exists()
    # Ctrl-C keeps a resumable .part with the one batch written; an error leaves nothing
    assert partial_path(out).exists() == isinstance(error, KeyboardInterrupt)
    assert not writer_threads()
    if isinstance(error, KeyboardInterrupt):
        monkeypatch.setattr(Writer, "append", original)
        r = build_cache(CacheSpec("synthetic:200", out, measure="entropy", batch_size=10,
                                  workers=1, resume=True))
        assert r.resumed and sum(r.rows.values()) == 200


@pytest.mark.parametrize("options, message", [
    (dict(measure="nope"), "unknown measure 'nope'"),
    (dict(bins=0), "bins must be an integer from 1 to 256, got 0"),
    (dict(size=0), "size must be at least 1, got 0"),
    (dict(patch=5), "patch size 5 does not divide the image size 32"),
    (dict(reference=16, patch=8), r"reference patch 16 is out of range 0\.\.15 for patch 8 on "
                                  r"32x32 images"),
    (dict(backend="fast"), "backend='fast' is not one of compiled, generic"),
    (dict(device="tpu"), "device='tpu' is not one of cpu, cuda, auto"),
    (dict(decoder="nvjpeg"), "decoder='nvjpeg' decodes on the GPU and needs device='cuda'"),
    (dict(batch_size=0), "batch size must be at least 1, got 0"),
    (dict(shard=(2, 2)), r"shard 2/2 needs 0 <= I < N"),
    (dict(shard="0/2"), r"shard must be a pair \(I, N\) of integers"),
])
def test_a_cache_spec_is_checked_when_it_is_made(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        CacheSpec("synthetic:10", tmp_path / "o.h5", **options)
    assert list(tmp_path.iterdir()) == []  # refused before anything is touched


def test_a_cache_spec_travels_and_prints(tmp_path):
    """Picklable (a Dask task's payload), frozen, and made again from its JSON-able dict."""
    import json
    import pickle
    from dataclasses import FrozenInstanceError

    spec = CacheSpec("synthetic:10", str(tmp_path / "o.h5"), measure="ssim", shard=[1, 3])
    assert spec.out == tmp_path / "o.h5" and spec.shard == (1, 3)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert CacheSpec(**json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(FrozenInstanceError):
        spec.patch = 4


def test_the_file_records_the_specs_stored_options(tmp_path):
    from porder.store import RESUME_KEYS, read_meta

    spec = CacheSpec("synthetic:30", tmp_path / "o.h5", measure="psnr", patch=4, bins=64,
                     reference=3, descending=False, seed=2, shard=(0, 2), workers=1)
    build_cache(spec)
    meta = read_meta(spec.out)
    stored = spec.stored_options()
    assert {k: meta[k] for k in stored} == stored
    assert stored["direction"] == "ascending" and stored["shard_count"] == 2
    # what --resume compares, but for the source's files, comes from the spec
    assert set(RESUME_KEYS) - set(stored) == {"source_files", "source_bytes", "source_digest",
                                              "source_state"}


def test_the_pipeline_holds_no_hdf5_code():
    """ARCHITECTURE.md: pipeline.py reads and writes the file only through Writer's methods."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(pipeline.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names}
    assert "h5py" not in names
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and n.attr in ("attrs", "f")]
