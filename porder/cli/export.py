"""click command `porder export`: a porder cache as an image folder or .npz files.

Registered on the group in :mod:`porder.cli`; the work is :func:`porder.export.export`.
"""
from __future__ import annotations

import click

from ..export import FORMATS
from ..sources.base import SPLITS, printable
from .common import CONTEXT, ProgressReporter, interruptible, library_errors


@click.command("export", context_settings=CONTEXT)
@click.argument("file", type=click.Path())  # checked by the library: one `Error:` line
@click.argument("out", type=click.Path(file_okay=True))
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="imagefolder",
              show_default=True,
              help="imagefolder: OUT/SPLIT/CLASS/INDEX.png; npz: OUT/SPLIT.npz.")
@click.option("--split", type=click.Choice(SPLITS), default=None,
              help="Export one split [default: every split of FILE].")
@click.option("--restore", is_flag=True,
              help="Export the original images (recovered through perm), not the reordered ones.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it holds an earlier porder export, and only what that "
                   "export wrote.")
@click.option("-j", "--workers", type=click.IntRange(min=1), default=None,
              help="Threads encoding PNGs [default: all cores].")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on a terminal; periodic lines otherwise].")
def export(file, out, fmt, split, restore, overwrite, workers, progress):
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
    counts = ", ".join(f"{s} {done[s]}" for s in SPLITS if s in done)
    what = "original" if restore else "stored"
    click.echo(f"Wrote {printable(path)}/ ({fmt}, {what} images): {counts} images")
