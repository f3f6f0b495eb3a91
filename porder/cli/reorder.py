"""click commands `porder reorder`, `porder inspect`, `porder show` and `porder measures`
(registered on the group in :mod:`porder.cli`)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..backend import DEVICES
from ..measures import MEASURES
from .common import (
    CONTEXT,
    SEED,
    FiniteFloat,
    MeasureChoice,
    ProgressReporter,
    exit_interrupted,
    interrupt_handlers,
    library_errors,
    parse_shard_option,
    printable,
    restore_handlers,
)


@click.command(context_settings=CONTEXT)
@click.argument("source")
@click.argument("out", type=click.Path(dir_okay=False, writable=False))
@click.option("-m", "--measure", type=MeasureChoice(), default="mi",
              show_default=True, help="Ordering measure (see `porder measures`).")
@click.option("-p", "--patch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Patch side in pixels; must divide --size.")
@click.option("--bins", type=click.IntRange(1, 256), default=256, show_default=True,
              help="Intensity bins of histogram measures (256 = one per intensity).")
@click.option("--size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images are resized to SIZE x SIZE RGB.")
@click.option("--reference", type=click.IntRange(min=0), default=0, show_default=True,
              help="Row-major index of the patch the chain starts from.")
@click.option("--descending/--ascending", default=None,
              help="Override the measure's default direction.")
@click.option("--label", type=click.Choice(["fine", "coarse"]), default="fine",
              show_default=True, help="CIFAR-100 labels: 100 fine classes or 20 superclasses.")
@click.option("--test-fraction", type=FiniteFloat(0, 1, max_open=True), default=0.1,
              show_default=True, help="Held-out share for sources without a test split.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Compute on the CPU (NumPy) or a CUDA GPU (CuPy); auto picks CUDA if present. "
                   "cpu by default, unlike train's auto: CuPy is an optional extra, and "
                   "reordering costs little next to training.")
@click.option("--backend", type=click.Choice(["compiled", "generic"]), default="compiled",
              show_default=True,
              help="compiled: the fused kernels (numba on the CPU, CUDA C++ on a GPU); generic: "
                   "the NumPy/CuPy reference path. Both give identical files. The first "
                   "compiled run on a machine compiles the CPU kernels (about 30 s on 2 "
                   "cores) and caches them for later runs.")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Images per batch (memory is bounded by a few batches).")
@click.option("-j", "--workers", type=click.IntRange(min=1), default=None,
              help="CPU workers for decoding and scoring [default: all cores].")
@click.option("--decoder", type=click.Choice(["auto", "threads", "processes", "nvjpeg"]),
              default="auto", show_default=True,
              help="How image files are decoded: threads (instant start; fast on photos), "
                   "processes (same pixels; several times faster on tiny files such as "
                   "CIFAR's 32x32 JPEGs, about 0.3 s to start), or auto: processes from "
                   "4096 files with 2 or more workers. nvjpeg: JPEGs decoded and resized on "
                   "the GPU (torchvision's nvJPEG; needs --device cuda; pixels differ "
                   "slightly from Pillow's; other files still go to Pillow).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the `random` control and of the held-out split.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail",
              show_default=True, help="A corrupt image stops the run, or is skipped and listed.")
@click.option("--shard", default=None, metavar="I/N", callback=parse_shard_option,
              help="Process only slice I of N of every split (merge with `porder merge`).")
@click.option("--dask", "dask_scheduler", default=None, metavar="SCHEDULER",
              help="Run shards on a Dask cluster: an address (tcp://host:8786) or local:N "
                   "for N local worker processes; needs `pip install \"patch-order[scale]\"`.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (OUT.part).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on a terminal; periodic lines otherwise].")
def reorder(source, out, measure, patch, bins, size, reference, descending, label,
            test_fraction, device, backend, batch_size, workers, decoder, seed, on_error, shard,
            dask_scheduler, resume, overwrite, progress):
    """Reorder the patches of every image in SOURCE and write OUT (HDF5).

    \b
    SOURCE is one of:
      cifar-100-python/ or .tar.gz   CIFAR-10/100 python version (--label coarse: 20 classes)
      DIR/<class>/<image>            image folder, optionally under DIR/train and DIR/test
      DIR/<label>.<id>.jpg           flat folder, Kaggle Dogs vs. Cats (cat.12.jpg)
      synthetic:N[:C]                N generated, learnable images of C classes (default 10)
      digits                         scikit-learn's 1797 handwritten digits (built in)

    Images of any mode become RGB (alpha composited on black, 16-bit scaled to
    8-bit) and are squashed, not cropped, to SIZE x SIZE with bicubic
    resampling. Sources without a test split hold out a seeded TEST_FRACTION.

    The file is written as OUT.part and renamed when complete. Ctrl-C keeps
    OUT.part; run the same command with --resume to continue.

    \b
    Examples:
      porder reorder --measure mi --patch 8 cifar-100-python.tar.gz c100-mi8.h5
      porder reorder --measure none dogs-vs-cats/ baseline.h5
      porder reorder synthetic:1000 demo.h5
      porder reorder --shard 0/4 cifar-100-python/ c100.0.h5   # then `porder merge`
      porder reorder --dask local:2 synthetic:100000 big.h5
    """
    from ..pipeline import BuildResult, CacheSpec, build_cache

    if decoder == "nvjpeg" and device != "cuda":
        raise click.UsageError(f"--decoder nvjpeg decodes on the GPU and needs --device cuda "
                               f"(got --device {device}); on the CPU use --decoder threads")
    reporter = ProgressReporter(progress)
    old = interrupt_handlers()
    t0 = time.perf_counter()
    try:
        with library_errors():
            spec = CacheSpec(source, out, measure=measure, patch=patch, bins=bins, size=size,
                             label=label, test_fraction=test_fraction, seed=seed,
                             reference=reference, descending=descending, batch_size=batch_size,
                             device=device, backend=backend, workers=workers, decoder=decoder,
                             on_error=on_error, overwrite=overwrite, resume=resume, shard=shard)
            if dask_scheduler:
                from ..store import read_meta
                from .scale import dask_reorder

                path = dask_reorder(dask_scheduler, spec, progress=reporter)
                meta = read_meta(path)
                result = BuildResult(path, rows=meta["splits"], skipped=meta["skipped"])
            else:
                result = build_cache(spec, progress=reporter)
    except KeyboardInterrupt:
        reporter.close()
        click.echo(f"Interrupted: {left_behind(out, dask_scheduler)}", err=True)
        exit_interrupted()
    finally:
        reporter.close()
        restore_handlers(old)
    dt = time.perf_counter() - t0
    rows = sum(result.rows.values())
    skipped = sum(result.skipped.values())
    # The rate counts the images this run processed, not those a resumed run had written.
    here = sum(v for k, v in reporter.work.items() if k != "merge")
    rate = f"{here / max(dt, 1e-9):.0f} img/s"
    if here < rows:
        rate = f"{here} processed now, {rate}" if here else "all written before: nothing to do"
    click.echo(f"Wrote {printable(result.path)}: " + ", ".join(f"{k} {v}" for k, v in result.rows.items())
               + f" images ({rate})"
               + (f"; skipped {skipped} unreadable (listed in the file)" if skipped else ""),
               err=True)


def left_behind(out, dask_scheduler) -> str:
    """What an interrupted `porder reorder` left behind, and how to go on."""
    from pathlib import Path

    from ..store import partial_path

    if dask_scheduler:  # the state of a Dask run is its shard files
        shards = Path(out).absolute().with_name(Path(out).name + ".shards")
        if shards.is_dir():
            return (f"finished and partial shards kept in {shards}/; run the same command "
                    f"(same cluster size) to resume them.")
        return "no shard was written yet; nothing to resume."
    if partial_path(out).exists():
        return (f"partial output kept in {printable(partial_path(out))}; run the same command with "
                f"--resume to continue.")
    return "nothing was written yet; nothing to resume."


@click.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def inspect(file, as_json):
    """Show what a porder FILE holds and how it was made.

    Text from the file (class names, the source, attributes) is printed with
    control characters escaped (\\x1b, \\n, ...), as --json does.
    """
    from ..store import describe, to_json

    with library_errors():
        info = describe(file)
    if as_json:
        click.echo(to_json(info))
        return
    classes = info["classes"]
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    lines = [
        f"file:        {info['path']} ({info['bytes'] / 2**20:.1f} MiB"
        + (f"; virtual, reads {len(info['virtual_sources'])} shard files)"
           if info["virtual_sources"] else ")"),
        f"source:      {info.get('source')} ({info.get('source_kind', '?')})",
        f"measure:     {info.get('measure')}  patch {info.get('patch')}  bins {info.get('bins')}  "
        f"reference {info.get('reference')}  {info.get('direction')}",
        f"images:      {info.get('image_size')}x{info.get('image_size')} RGB",
        "splits:      " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()),
        f"classes:     {shown}",
        "skipped:     " + ", ".join(f"{k} {v}" for k, v in info.get("skipped", {}).items()),
        f"made by:     porder {info.get('porder_version')} on {info.get('created')}"
        f" (format {info.get('format_version')})",
    ]
    if str(info.get("shard_count", 1)) not in ("1", "None"):
        lines.append(f"shard:       {info.get('shard_index')}/{info.get('shard_count')}")
    # Names and attributes come from the file: escape control characters (ESC, newlines).
    click.echo("\n".join(printable(line) for line in lines))


def _image_output(ctx, param, value):
    """An output file name whose extension Pillow can write (checked before any work)."""
    from PIL import Image

    Image.init()
    ext = Path(value).suffix.lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise click.BadParameter(f"cannot write an image named {printable(value)!r}: "
                                 f"give a name ending in .png (or .jpg, .bmp, .tif, .webp)",
                                 ctx, param)
    return value


@click.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="grid.png",
              show_default=True, callback=_image_output,
              help="Image file to write; its extension picks the format (.png, .jpg, ...).")
@click.option("-n", "--samples", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Images shown (one row each).")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Split the images come from.")
@click.option("--scale", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Upscaling factor (nearest neighbour).")
@click.option("--start", type=click.IntRange(min=0), default=None,
              help="Show consecutive rows from this one [default: samples across the classes].")
def show(file, output, samples, split, scale, start):
    """Write a PNG grid of original images beside their reordered versions.

    Originals are recovered from the stored images through `perm`. By default
    the samples are spread over the classes (the first image of each class, then
    the second, ...); --start N shows SAMPLES consecutive rows from row N.

    \b
    Examples:
      porder show c100-mi8.h5 -o grid.png
      porder show c100-mi8.h5 -o test.png --split test -n 16 --start 100
    """
    from pathlib import Path

    from ..visual import comparison_grid

    folder = Path(output).parent
    if not folder.is_dir():
        raise click.ClickException(f"cannot write '{output}': folder '{folder}' does not exist")
    with library_errors():
        grid = comparison_grid(file, split=split, samples=samples, scale=scale, start=start)
        grid.save(output)
    click.echo(f"Wrote {output}", err=True)


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def measures(as_json):
    """List the ordering measures: kind, default direction, origin and meaning.

    The origin is 'porder' for the built-in measures and the distribution name
    for measures that installed packages add (entry-point group
    ``porder.measures``).
    """
    rows = [(m.name, m.kind, m.direction, m.origin or "-", m.summary) for m in MEASURES.values()]
    if as_json:
        import json

        click.echo(json.dumps([dict(zip(("name", "kind", "direction", "origin", "summary"), r))
                               for r in rows], indent=2))
        return
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:<{w[3]}}  {r[4]}")
