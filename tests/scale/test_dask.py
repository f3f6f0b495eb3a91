"""Dask execution of sharded runs (porder.scale.dask, ``porder reorder --dask``).

Every Dask-built file is checked sample by sample against one unsharded
``build_cache`` run of the same seeded ``synthetic:103`` source (``full`` in
conftest.py); shards use batch size 7, the reference 8.
"""
from __future__ import annotations

import os
import sys

import pytest

from porder.cli.scale import dask_reorder
from porder.pipeline import CacheSpec
from porder.scale import ScaleError, parse_scheduler, run_dask
from porder.store import StoreError

from .dask_kill_preload import KILL_SHARD_ENV, PRELOAD
from .shards import OPTS, SOURCE, assert_same_file


def test_parse_scheduler():
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://10.0.0.5:8786") == ("tcp://10.0.0.5:8786", 0)
    for bad in ("local:0", "local:x", "cluster"):
        with pytest.raises(ScaleError, match="local:N"):
            parse_scheduler(bad)


def test_dask_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` fails
    with pytest.raises(ScaleError, match=r'pip install "patch-order\[scale\]"'):
        run_dask("local:2", CacheSpec(SOURCE, tmp_path / "x.h5"))
    import click

    with pytest.raises(click.ClickException, match=r'pip install "patch-order\[scale\]"'):
        dask_reorder("local:2", CacheSpec(SOURCE, tmp_path / "x.h5", batch_size=7), None)


def test_dask_refuses_before_starting_a_cluster(tmp_path, full):
    import click

    with pytest.raises(StoreError, match="exists; pass --overwrite"):
        run_dask("local:2", CacheSpec(SOURCE, full))
    with pytest.raises(click.UsageError, match="leave out --shard"):
        dask_reorder("local:2", CacheSpec(SOURCE, tmp_path / "x.h5", shard=(0, 2)), None)
    with pytest.raises(ValueError, match="sets shard itself"):
        run_dask("local:2", CacheSpec(SOURCE, tmp_path / "x.h5", shard=(0, 2)))


def _no_cluster_left():
    import distributed

    assert not distributed.client._global_clients, "a Dask client was left open"


def test_dask_local_cluster_matches_single_process_run(full, tmp_path):
    events = []
    out = tmp_path / "dask.h5"
    env = dict(os.environ)
    options = dict(OPTS, batch_size=7, resume=True, shard=None)  # as the CLI hands them over
    path = dask_reorder("local:2", CacheSpec(SOURCE, out, **options), lambda *a: events.append(a))
    assert path == out.absolute()
    assert_same_file(full, out)
    assert not (tmp_path / "dask.h5.shards").exists()
    assert ("images", 103, 103) in events and events[-1] == ("merge", 103, 103)
    dones = [d for stage, d, _ in events if stage == "images"]
    assert dones == sorted(dones)
    assert dict(os.environ) == env, "the nannies' OMP_NUM_THREADS etc. leaked into this process"
    _no_cluster_left()


def test_dask_worker_killed_mid_shard_is_rerun(full, tmp_path, monkeypatch):
    """Shard 1's worker process dies after its first batch; the scheduler re-runs
    the shard elsewhere (resuming its .part file) and the result is unchanged."""
    import dask

    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_SHARD_ENV, f"1:{marker}")
    with dask.config.set({"distributed.worker.preload": [PRELOAD]}):
        out = run_dask("local:2", CacheSpec(SOURCE, tmp_path / "killed.h5", batch_size=7,
                                            **{k: v for k, v in OPTS.items() if k != "workers"}),
                       shards=4)
    assert marker.exists(), "the kill hook did not fire"
    assert_same_file(full, out)
    _no_cluster_left()


def test_dask_shard_error_comes_back_as_one_line(tmp_path):
    out = tmp_path / "bad.h5"
    with pytest.raises(ValueError, match="patch size 5 does not divide") as info:
        run_dask("local:1", CacheSpec(SOURCE, out, patch=5, batch_size=7), shards=2)
    assert "\n" not in str(info.value)
    assert not out.exists() and not (tmp_path / "bad.h5.shards").exists()
    _no_cluster_left()


def test_dask_shard_whose_workers_keep_dying_fails_in_one_line(tmp_path, monkeypatch):
    import dask

    monkeypatch.setenv(KILL_SHARD_ENV, f"0:{tmp_path / 'killed'}")
    with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                          "distributed.worker.preload": [PRELOAD]}):
        with pytest.raises(ScaleError, match=r"shard 0/2: its workers died too often") as info:
            run_dask("local:1", CacheSpec(SOURCE, tmp_path / "dead.h5", batch_size=7), shards=2)
    assert "\n" not in str(info.value)
    assert (tmp_path / "killed").exists() and not (tmp_path / "dead.h5").exists()
    _no_cluster_left()
