"""click command `porder merge`, and the `porder reorder --dask` entry point.

Registered on the group in :mod:`porder.cli`; shared CLI helpers come from
:mod:`porder.cli.common`.
"""
from __future__ import annotations

from pathlib import Path

import click

from .common import command, emit_json, json_option, option


@command()
@click.argument("paths", nargs=-1, required=True, metavar="SHARDS... OUT.h5",
                type=click.Path(dir_okay=False))
@option("--copy", is_flag=True,
        help="Copy the rows into a standalone file instead of linking to the shards.")
@option("--overwrite", is_flag=True, help="Replace OUT.h5 if it exists.")
@option("--progress/--no-progress", default=None,
        help="Progress of --copy [default: on a terminal; periodic lines otherwise].")
@json_option
def merge(paths, copy, overwrite, progress, as_json):
    """Stitch the shard files of a `porder reorder --shard I/N` run into OUT.h5.

    Give every slice I of one N, in any order; OUT.h5 reads exactly like a file
    made in one run. Shards made with different options, overlapping or missing
    slices and unfinished (.part) files are refused.

    By default OUT.h5 is a small file of HDF5 virtual datasets that point at the
    shards (by paths relative to OUT.h5): keep the shards where they are, or
    move the folder holding all of them as a whole. --copy writes a standalone
    file; the shards can then be deleted.

    \b
    Examples:
      for i in 0 1 2 3; do porder reorder --shard $i/4 cifar-100-python/ c100.$i.h5; done
      porder merge c100.0.h5 c100.1.h5 c100.2.h5 c100.3.h5 c100.h5
      porder merge --copy c100.?.h5 c100-standalone.h5 --json
    """
    from ..scale import merge as merge_shards
    from ..store import read_meta
    from .common import ProgressReporter, library_errors

    if len(paths) < 2:
        raise click.UsageError("give the shard files and then the output file: "
                               "porder merge SHARDS... OUT.h5")
    *shards, out = paths
    reporter = ProgressReporter(progress) if copy else None
    try:
        with library_errors():
            path = merge_shards(shards, out, copy=copy, overwrite=overwrite, progress=reporter)
            meta = read_meta(path)
    finally:
        if reporter is not None:
            reporter.close()
    if as_json:
        emit_json({"path": str(path), "rows": dict(meta["splits"]),
                   "skipped": dict(meta.get("skipped", {})), "shards": [str(s) for s in shards],
                   "copy": copy})
        return
    counts = ", ".join(f"{k} {v}" for k, v in meta["splits"].items())
    how = "standalone copy" if copy else "virtual: keep the shards in place"
    click.echo(f"Wrote {path}: {counts} images from {len(shards)} shards ({how})", err=True)


def dask_reorder(scheduler: str, spec, progress=None) -> Path:
    """Run ``porder reorder`` on a Dask cluster (``--dask SCHEDULER``); returns OUT.

    ``spec`` is the :class:`porder.pipeline.CacheSpec` the CLI made. Its ``shard``
    must be unset (a Dask run makes its own shards); ``resume`` and ``workers``
    are not used: every shard resumes its own unfinished file and uses one CPU
    thread per task. Library errors become one-line ``click.ClickException``; a
    missing Dask says ``pip install "patch-order[scale]"``.
    """
    from ..scale import run_dask
    from .common import library_errors

    if spec.shard is not None:
        raise click.UsageError("--dask makes its own shards; leave out --shard")
    with library_errors():
        return run_dask(scheduler, spec, progress=progress)
