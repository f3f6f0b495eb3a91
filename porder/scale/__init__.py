"""Scaling out ``porder reorder``: merging shards, and running shards on Dask.

Two ways to spread one dataset over many processes or machines, both built on
``build_cache(..., shard=(i, n))``, which reorders the i-th of n contiguous
slices of every split:

* **Batch jobs** (SLURM arrays, CI matrices, Kubernetes indexed jobs): each job
  runs ``porder reorder --shard I/N``; :func:`merge` (``porder merge``) then
  stitches the shard files into one file that readers cannot tell from an
  unsharded run.
* **Dask** (:func:`run_dask`, ``porder reorder --dask SCHEDULER``): the shards
  run as tasks on a ``distributed`` cluster (``local:N`` starts one on this
  machine); a worker that dies has its shard re-run (resuming its ``.part``
  file), and the shards are merged into one standalone file.

The merged file holds the same root attributes (``shard_index`` 0,
``shard_count`` 1), the same ``/classes`` and the same ``/<split>`` datasets in
sample order as a single-process run, so ``read_split``, ``porder inspect`` and
training read it unchanged.

By default :func:`merge` writes HDF5 *virtual* datasets: the merged file is a
few kilobytes and maps its rows onto the shard files, which must stay where
they are (the paths are stored relative to the merged file, so the folder
holding both may be moved or copied as a whole). If a shard file goes missing,
HDF5 reads its rows as fill values (labels read as -1; :func:`missing_sources`
finds such files). ``copy=True`` copies the rows into a standalone file, a
bounded number of rows at a time.

Dask is an optional extra (``pip install "patch-order[scale]"``); ``distributed`` is
imported only inside the functions that need it.

Layout: :mod:`.merge` (shard files -> one file, virtual or copied) and
:mod:`.dask` (the Dask runner, which merges with ``copy=True``).
"""
from __future__ import annotations

from .dask import ScaleError, parse_scheduler, run_dask
from .merge import COPY_BYTES, DATASETS, merge, missing_sources

__all__ = ["COPY_BYTES", "DATASETS", "ScaleError", "merge", "missing_sources", "parse_scheduler",
           "run_dask"]
