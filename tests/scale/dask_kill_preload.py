"""Dask worker preload for the scale tests: kill a worker mid-shard, from outside porder.

Passed to the cluster with ``dask.config.set({"distributed.worker.preload":
[PRELOAD]})``; every worker process runs :func:`dask_setup` when it starts. When
the environment holds ``PORDER_TEST_KILL_SHARD="I:MARKER"``, the first attempt of
shard I kills its worker process mid-way (after a batch is on disk), like an
OOM-killed worker, and creates the MARKER file; a re-run finds MARKER and goes
on, so the tests can check that the scheduler re-runs the shard.
"""
from __future__ import annotations

import os
from pathlib import Path

KILL_SHARD_ENV = "PORDER_TEST_KILL_SHARD"
PRELOAD = str(Path(__file__).resolve())


def dask_setup(worker) -> None:
    spec = os.environ.get(KILL_SHARD_ENV, "")
    if not spec:
        return
    index, _, marker = spec.partition(":")
    marker = Path(marker)

    import porder.pipeline
    import porder.store

    original = porder.pipeline.build_cache
    original_append = porder.store.Writer.append
    armed = []

    # porder appends on a writer thread: the kill lands right after an append has
    # completed (between batches, as the test means), never inside one.
    def append(self, *args, **kwargs):
        result = original_append(self, *args, **kwargs)
        if armed and not marker.exists():
            marker.touch()
            os._exit(1)  # die like an OOM-killed worker, mid-shard
        return result

    def build_cache(spec, *, progress=None):
        report = progress
        if spec.shard is not None and str(spec.shard[0]) == index:
            def report(split, done, total):
                if progress is not None:
                    progress(split, done, total)
                if 0 < done < total:
                    armed.append(True)  # the next completed append ends the process
        return original(spec, progress=report)

    porder.store.Writer.append = append
    porder.pipeline.build_cache = build_cache
