"""click command `porder export`: a porder cache as an image folder or .npz files.

Registered on the group in :mod:`porder.cli`; the work is :func:`porder.export.export`.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..export import FORMATS, MANIFEST
from ..sources.base import SPLITS, printable
from .common import (
    IntRange,
    ProgressReporter,
    command,
    emit_json,
    interruptible,
    json_option,
    library_errors,
    option,
)


@command("export")
@click.argument("file", type=click.Path())  # checked by the library: one `Error:` line
@click.argument("out", type=click.Path(file_okay=True))
@option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="imagefolder",
        show_default=True,
        help="imagefolder: OUT/SPLIT/CLASS/INDEX.png; npz: OUT/SPLIT.npz.")
@option("--split", type=click.Choice(SPLITS), default=None,
        help="Export one split [default: every split of FILE].")
@option("--restore", is_flag=True,
        help="Export the original images (recovered through perm), not the reordered ones.")
@option("--overwrite", is_flag=True,
        help="Replace OUT if it holds an earlier porder export, and only what that "
             "export wrote.")
@option("-j", "--workers", type=IntRange(min=1), default=None,
        help="CPU threads porder uses (encoding PNGs) [default: all cores].")
@option("--progress/--no-progress", default=None,
        help="Progress bar [default: on a terminal; periodic lines otherwise].")
@json_option
def export(file, out, fmt, split, restore, overwrite, workers, progress, as_json):
    """Write a porder cache FILE as an image folder or .npz files in folder OUT.

    \b
    imagefolder  OUT/train/CLASS/00042.png: read by torchvision ImageFolder,
                 Keras image_dataset_from_directory, Hugging Face datasets
                 ("imagefolder"), and FFCV's writers through those.
    npz          OUT/train.npz: images, labels, perm, names, classes, restored
                 (numpy.load, no pickle).

    OUT is built under a temporary name beside it and renamed when complete;
    OUT/porder-export.json records what was exported, how FILE was made and
    every file written. Class folders are the class names made safe for any
    file system. --overwrite removes only the files an earlier export's record
    lists: anything else in OUT makes it refuse. Ctrl-C leaves OUT as it was.

    \b
    Examples:
      porder export c100-mi8.h5 c100-png/
      porder export c100-mi8.h5 c100-npz/ --format npz --split test
      porder export c100-mi8.h5 c100-orig/ --restore     # the original images
      porder export c100-mi8.h5 c100-png/ --overwrite --json
    """
    from ..export import export as run_export
    from ..export import read_manifest

    reporter = ProgressReporter(progress)
    # An interrupt at the very end (while the earlier export is removed) comes
    # after OUT was replaced: the message says both.
    kept = (f"no partial export is left; '{printable(out)}' is as it was (or complete, if "
            f"the export had just finished)")
    with interruptible(kept), library_errors():
        try:
            path = run_export(file, out, format=fmt, split=split, restore=restore,
                              overwrite=overwrite, workers=workers, progress=reporter)
        finally:
            reporter.close()
        done = read_manifest(path)["splits"]
    if as_json:
        emit_json({"path": str(path), "format": fmt, "restored": restore,
                   "splits": {s: done[s] for s in SPLITS if s in done},
                   "record": str(Path(path) / MANIFEST)})
        return
    counts = ", ".join(f"{s} {done[s]}" for s in SPLITS if s in done)
    what = "original" if restore else "stored"
    click.echo(f"Wrote {printable(path)}/ ({fmt}, {what} images): {counts} images", err=True)
