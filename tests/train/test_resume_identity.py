"""`train --resume` checks the bytes of the file it trains on, not only its name and metadata.

A checkpoint records the file's state (porder.train.checkpoint.file_state: size, SHA-256,
and the stat that lets a resume skip the hashing). A file rewritten under the same name
with the same metadata (labels edited in place, another cache renamed over it) is refused
in one line naming what changed; ``touch`` and a copy of the same bytes are not; a
checkpoint written before the record existed still resumes.
"""
from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

import porder.train.checkpoint as checkpoint
from porder.train import read_metrics, train
from porder.train.checkpoint import CHECKPOINT, STAT_KEYS, file_state

from .test_train import cfg, write_file
from .test_train_faults import assert_error, train_cli


@pytest.fixture
def cut(tmp_path):
    """A private copy of a tiny file, and a run on it stopped at step 2 of 4 (--steps 2)."""
    data = write_file(tmp_path / "tiny.h5")
    out = tmp_path / "run"
    res = train_cli(data, out, "--steps", "2")
    assert res.exit_code == 0, res.output
    return data, out


def _flip_labels(path):
    """Rewrite the train labels in place: same size, same metadata, other data."""
    with h5py.File(path, "r+") as f:
        f["train/labels"][...] = 1 - f["train/labels"][()]


def _same_meta_other_data(path, tmp_path, *, note: str = ""):
    """Another valid file with ``path``'s metadata (its ``created`` included); ``note``
    (an attribute no reader looks at) makes it larger."""
    other = write_file(tmp_path / "other.h5", seed=5)
    with h5py.File(path, "r") as a, h5py.File(other, "r+") as b:
        b.attrs["created"] = a.attrs["created"]
        if note:
            b["train/labels"].attrs["note"] = note
    return other


def _unchanged(out, before: dict) -> None:
    """Nothing in the run folder was written or removed."""
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _snapshot(out) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_file_rewritten_in_place_is_refused(cut):
    data, out = cut
    before = _snapshot(out)
    _flip_labels(data)
    res = train_cli(data, out, "--resume")
    assert_error(res, f"cannot resume '{out}': '{data}' changed since the run started "
                      f"(content digest differs, modified ")
    _unchanged(out, before)


def test_another_file_renamed_over_it_is_refused_naming_the_size(cut, tmp_path):
    data, out = cut
    size = data.stat().st_size
    other = _same_meta_other_data(data, tmp_path, note="x" * 20000)
    new_size = other.stat().st_size
    assert new_size != size
    os.replace(other, data)
    before = _snapshot(out)
    assert_error(train_cli(data, out, "--resume"),
                 f"'{data}' changed since the run started (size {size} -> {new_size} bytes")
    _unchanged(out, before)


def test_another_file_of_the_same_size_is_refused(cut, tmp_path):
    data, out = cut
    other = tmp_path / "other.h5"
    shutil.copy(data, other)
    _flip_labels(other)
    assert other.stat().st_size == data.stat().st_size
    shutil.copyfile(other, data)          # written into the same inode
    assert_error(train_cli(data, out, "--resume"), "changed since the run started "
                                                   "(content digest differs")


def test_touch_and_a_copy_of_the_same_bytes_resume(cut, tmp_path):
    data, out = cut
    os.utime(data, ns=(10**18, 10**18))   # touch: a new stat, the same bytes
    res = train_cli(data, out, "--resume")
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_metrics(out)] == [0, 2, 4]
    state = torch.load(out / CHECKPOINT, weights_only=True)["file_state"]
    assert state == file_state(data) and state["mtime_ns"] == 10**18   # the new stat kept
    # The same bytes at another path (a copy, a moved folder): resumed too.
    copy = tmp_path / "elsewhere" / "tiny.h5"
    copy.parent.mkdir()
    shutil.copy(data, copy)
    res = train_cli(copy, out, "--resume", "--steps", "6")
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_metrics(out)] == [0, 2, 4, 6]


def test_a_resume_of_an_unchanged_file_does_not_hash_it(tmp_path, monkeypatch):
    data = write_file(tmp_path / "tiny.h5")
    hashed = []
    real = checkpoint.file_digest
    monkeypatch.setattr(checkpoint, "file_digest", lambda p, n: hashed.append(p) or real(p, n))
    checkpoint._DIGESTS.clear()
    train(data, cfg(steps=2, eval_every=2), tmp_path / "run")
    assert hashed == [data]                 # a fresh run hashes the file once
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert ckpt["file_state"] == file_state(data)
    assert set(ckpt["file_state"]) == {*STAT_KEYS, "sha256", "sampled"}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["file_state"] == ckpt["file_state"]
    checkpoint._DIGESTS.clear()
    train(data, cfg(steps=4, eval_every=2), tmp_path / "run", resume=True)
    assert hashed == [data]                 # the stat is unchanged: no hashing on resume
    # A stat that differs (the file touched) is hashed once, and the new stat kept.
    os.utime(data, ns=(1, 1))
    train(data, cfg(steps=6, eval_every=2), tmp_path / "run", resume=True)
    assert hashed == [data, data]
    train(data, cfg(steps=8, eval_every=2), tmp_path / "run", resume=True)
    assert hashed == [data, data]


def test_large_files_are_hashed_in_samples(tmp_path, monkeypatch):
    from porder.sources import identity  # the one digest of sources and caches

    monkeypatch.setattr(checkpoint, "DIGEST_ALL", 2**21)
    monkeypatch.setattr(identity, "DIGEST_ALL", 2**21)
    monkeypatch.setattr(identity, "_SAMPLE", 2**10)
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, 2**22, np.uint8).tobytes())
    state = file_state(big)
    assert state["sampled"] and state["size"] == 2**22
    with open(big, "r+b") as fh:            # a sampled byte changes the digest
        fh.seek(2**22 - 1)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    assert file_state(big)["sha256"] != state["sha256"]


def test_a_checkpoint_without_the_record_still_resumes(cut):
    """Runs checkpointed by an older porder resume on the metadata alone, then record it."""
    data, out = cut
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    del ckpt["file_state"]
    torch.save(ckpt, out / CHECKPOINT)
    res = train_cli(data, out, "--resume")
    assert res.exit_code == 0, res.output
    assert torch.load(out / CHECKPOINT, weights_only=True)["file_state"] == file_state(data)


@pytest.mark.parametrize("bad", [[1, 2], {"size": 1}, {k: "x" for k in STAT_KEYS},
                                 "abc"])
def test_a_malformed_record_is_one_line_naming_the_checkpoint(cut, bad):
    data, out = cut
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    ckpt["file_state"] = bad
    torch.save(ckpt, out / CHECKPOINT)
    assert_error(train_cli(data, out, "--resume"), f"checkpoint '{out / CHECKPOINT}' has a "
                                                   "malformed 'file_state'")


def test_compare_plan_lists_a_run_on_a_changed_cache_as_a_conflict(cut):
    from porder.experiment.plan import RunItem, _run_state
    from porder.train.config import TrainConfig

    data, out = cut
    config = json.loads((out / "config.json").read_text())
    c = TrainConfig(**{**config["config"], "amp": True, "steps": 4})
    item = RunItem("resnet", "none", 4, 0, data, out)
    _run_state(item, c, config["file_meta"], "cpu")
    assert item.state == "resume", item.reason
    _flip_labels(data)
    item = RunItem("resnet", "none", 4, 0, data, out)
    _run_state(item, c, config["file_meta"], "cpu")
    assert item.state == "conflict"
    assert f"its cache '{data}' changed since the run started (content digest differs" \
        in item.reason
