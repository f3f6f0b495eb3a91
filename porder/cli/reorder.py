"""click commands `porder reorder`, `porder inspect`, `porder show` and `porder measures`
(registered on the group in :mod:`porder.cli`)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..backend import DEVICES
from ..measures import MEASURES
from .common import (
    SEED,
    FiniteFloat,
    IntRange,
    MeasureChoice,
    ProgressReporter,
    command,
    compile_kernels_first,
    emit_json,
    exit_interrupted,
    interrupt_handlers,
    json_option,
    library_errors,
    option,
    parse_shard_option,
    printable,
    restore_handlers,
)

WORKERS_HELP = "CPU threads porder uses (and decoding processes: --decoder) [default: all cores]."
DEVICE_HELP = ("cpu, cuda, or auto: CUDA when CuPy sees a GPU (`porder info` shows what it "
               "sees), else the CPU. Both give identical files.")


@command()
@click.argument("source")
@click.argument("out", type=click.Path(dir_okay=False, writable=False))
@option("-m", "--measure", type=MeasureChoice(), default="mi",
        show_default=True, help="Ordering measure (see `porder measures`).")
@option("-p", "--patch", type=IntRange(min=1), default=8, show_default=True,
        help="Patch side in pixels; must divide --size.")
@option("--bins", type=IntRange(1, 256), default=256, show_default=True,
        help="Intensity bins of histogram measures (256 = one per intensity).")
@option("--size", type=IntRange(min=1), default=32, show_default=True,
        help="Images are resized to SIZE x SIZE RGB.")
@option("--reference", type=IntRange(min=0), default=0, show_default=True,
        help="Row-major index of the patch the chain starts from.")
@option("--descending/--ascending", default=None,
        help="Override the measure's default direction.")
@option("--label", type=click.Choice(["fine", "coarse"]), default="fine",
        show_default=True, help="CIFAR-100 labels: 100 fine classes or 20 superclasses.")
@option("--test-fraction", type=FiniteFloat(0, 1, max_open=True), default=0.1,
        show_default=True, help="Held-out share for sources without a test split.")
@option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
        help=DEVICE_HELP)
@option("--backend", type=click.Choice(["compiled", "generic"]), default="compiled",
        show_default=True,
        help="compiled: the fused kernels (numba on the CPU, CUDA C++ on a GPU); generic: "
             "the NumPy/CuPy reference path. Both give identical files. The first "
             "compiled run on a machine compiles the CPU kernels (about 30 s, said on "
             "one line) and caches them for later runs.")
@option("-b", "--batch-size", type=IntRange(min=1), default=512, show_default=True,
        help="Images per batch (memory is bounded by a few batches).")
@option("-j", "--workers", type=IntRange(min=1), default=None, help=WORKERS_HELP)
@option("--decoder", type=click.Choice(["auto", "threads", "processes", "nvjpeg"]),
        default="auto", show_default=True,
        help="How image files are decoded: threads (instant start; fast on photos), "
             "processes (same pixels; several times faster on tiny files such as "
             "CIFAR's 32x32 JPEGs, about 0.3 s to start), or auto: processes from "
             "4096 files with 2 or more workers. nvjpeg: JPEGs decoded and resized on "
             "the GPU (torchvision's nvJPEG; needs a GPU: --device cuda or auto; pixels "
             "differ slightly from Pillow's; other files still go to Pillow).")
@option("--seed", type=SEED, default=0, show_default=True,
        help="Seed of the `random` control and of the held-out split.")
@option("--on-error", type=click.Choice(["fail", "skip"]), default="fail",
        show_default=True, help="A corrupt image stops the run, or is skipped and listed.")
@option("--shard", default=None, metavar="I/N", callback=parse_shard_option,
        help="Process only slice I of N of every split (merge with `porder merge`).")
@option("--dask", "dask_scheduler", default=None, metavar="SCHEDULER",
        help="Run shards on a Dask cluster: an address (tcp://host:8786) or local:N "
             "for N local worker processes; needs `pip install \"patch-order[scale]\"`.")
@option("--resume", is_flag=True, help="Continue an interrupted run (OUT.part).")
@option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@option("--progress/--no-progress", default=None,
        help="Progress bar [default: on a terminal; periodic lines otherwise].")
@json_option
def reorder(source, out, measure, patch, bins, size, reference, descending, label,
            test_fraction, device, backend, batch_size, workers, decoder, seed, on_error, shard,
            dask_scheduler, resume, overwrite, progress, as_json):
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
      porder reorder synthetic:1000 demo.h5 --json
      porder reorder --shard 0/4 cifar-100-python/ c100.0.h5   # then `porder merge`
      porder reorder --dask local:2 synthetic:100000 big.h5
    """
    from ..backend import resolve_device
    from ..pipeline import CacheSpec

    if decoder == "nvjpeg" and (device == "cpu" or (device == "auto"
                                                    and resolve_device("auto") != "cuda")):
        raise click.UsageError(f"--decoder nvjpeg decodes on the GPU and needs --device cuda "
                               f"(got --device {device}, and no GPU is in use); on the CPU "
                               f"use --decoder threads")
    with library_errors():
        spec = CacheSpec(source, out, measure=measure, patch=patch, bins=bins, size=size,
                         label=label, test_fraction=test_fraction, seed=seed,
                         reference=reference, descending=descending, batch_size=batch_size,
                         device=device, backend=backend, workers=workers, decoder=decoder,
                         on_error=on_error, overwrite=overwrite, resume=resume, shard=shard)
    report = build(spec, dask_scheduler, progress)
    if as_json:
        emit_json(report)
        return
    rows, here, rate = sum(report["rows"].values()), report["processed"], report["images_per_s"]
    speed = f"{rate:.0f} img/s"
    if here < rows:
        speed = f"{here} processed now, {speed}" if here else "all written before: nothing to do"
    skipped = sum(report["skipped"].values())
    click.echo(f"Wrote {printable(report['path'])}: "
               + ", ".join(f"{k} {v}" for k, v in report["rows"].items())
               + f" images ({speed})"
               + (f"; skipped {skipped} unreadable (listed in the file)" if skipped else ""),
               err=True)


def build(spec, dask_scheduler, progress) -> dict:
    """Run one `porder reorder` build (here, or on Dask); the ``--json`` report.

    A first compile of the CPU kernels happens before the clock starts (said on one
    line): ``seconds`` and ``images_per_s`` count only the images of this run.
    """
    from ..backend import resolve_device
    from ..pipeline import BuildResult, build_cache

    reporter = ProgressReporter(progress)
    old = interrupt_handlers()
    compile_s = None
    try:
        with library_errors():
            if not dask_scheduler and spec.backend == "compiled":
                compile_s = compile_kernels_first([spec.measure],
                                                  on_cpu=resolve_device(spec.device) == "cpu")
            t0 = time.perf_counter()
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
        click.echo(f"Interrupted: {left_behind(spec.out, dask_scheduler)}", err=True)
        exit_interrupted()
    finally:
        reporter.close()
        restore_handlers(old)
    dt = time.perf_counter() - t0
    # The rate counts the images this run processed, not those a resumed run had written.
    here = sum(v for k, v in reporter.work.items() if k != "merge")
    return {"path": str(result.path), "rows": dict(result.rows), "skipped": dict(result.skipped),
            "processed": here, "resumed": bool(result.resumed),
            "seconds": dt, "images_per_s": here / max(dt, 1e-9), "compile_seconds": compile_s,
            "stages": dict(result.seconds), "options": spec.to_dict()}


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


@command()
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
def inspect(file, as_json):
    """Show what a porder FILE holds and how it was made.

    Text from the file (class names, the source, attributes) is printed with
    control characters escaped (\\x1b, \\n, ...), as --json does.

    \b
    Examples:
      porder inspect c100-mi8.h5
      porder inspect c100-mi8.h5 --json | python -c "import json,sys; print(json.load(sys.stdin)['splits'])"
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


def save_image(image, path: str, *, overwrite: bool) -> None:
    """Write ``image`` (PIL) to ``path``: never over an existing file unless ``overwrite``,
    and never a half-written one (a temporary file beside it, renamed when complete)."""
    import os
    import tempfile

    from PIL import Image

    from ..output import durable_replace

    target = Path(path)
    if target.exists() and not overwrite:
        raise click.ClickException(f"'{printable(path)}' exists; use --overwrite to replace it")
    fmt = Image.registered_extensions()[target.suffix.lower()]
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
        if overwrite:
            durable_replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the name appeared meanwhile: nothing replaced
            except FileExistsError:
                raise
            except OSError:  # no hard links on this file system
                if target.exists():
                    raise FileExistsError(path) from None
                os.replace(tmp, target)
    except FileExistsError:
        raise click.ClickException(f"'{printable(path)}' exists; use --overwrite to replace "
                                   f"it") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@command()
@click.argument("file", type=click.Path(dir_okay=False))
@option("-o", "--out", type=click.Path(dir_okay=False), default="grid.png",
        show_default=True, callback=_image_output, old_names=("--output",),
        help="Image file to write; its extension picks the format (.png, .jpg, ...).")
@option("-n", "--samples", type=IntRange(1, 256), default=8, show_default=True,
        help="Images shown (one row each).")
@option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
        help="Split the images come from.")
@option("--scale", type=IntRange(1, 32), default=4, show_default=True,
        help="Upscaling factor (nearest neighbour).")
@option("--start", type=IntRange(min=0), default=None,
        help="Show consecutive rows from this one [default: samples across the classes].")
@option("--overwrite", is_flag=True, help="Replace the image file if it exists.")
@json_option
def show(file, out, samples, split, scale, start, overwrite, as_json):
    """Write a PNG grid of original images beside their reordered versions.

    Originals are recovered from the stored images through `perm`. By default
    the samples are spread over the classes (the first image of each class, then
    the second, ...); --start N shows SAMPLES consecutive rows from row N.
    An existing image is kept unless --overwrite is given.

    \b
    Examples:
      porder show c100-mi8.h5 -o grid.png
      porder show c100-mi8.h5 -o test.png --split test -n 16 --start 100 --overwrite
    """
    from ..visual import comparison_grid

    folder = Path(out).parent
    if not folder.is_dir():
        raise click.ClickException(f"cannot write '{out}': folder '{folder}' does not exist")
    with library_errors():
        grid = comparison_grid(file, split=split, samples=samples, scale=scale, start=start)
        save_image(grid, out, overwrite=overwrite)
    if as_json:
        emit_json({"path": out, "file": file, "split": split, "samples": samples,
                   "start": start, "scale": scale, "width": grid.size[0],
                   "height": grid.size[1]})
        return
    click.echo(f"Wrote {out}", err=True)


@command()
@json_option
def measures(as_json):
    """List the ordering measures: kind, default direction, origin and meaning.

    The origin is 'porder' for the built-in measures and the distribution name
    for measures that installed packages add (entry-point group
    ``porder.measures``). --json prints a list of objects (name, kind,
    direction, origin, summary).

    \b
    Examples:
      porder measures
      porder measures --json
    """
    rows = [(m.name, m.kind, m.direction, m.origin or "-", m.summary) for m in MEASURES.values()]
    if as_json:
        emit_json([dict(zip(("name", "kind", "direction", "origin", "summary"), r))
                   for r in rows])
        return
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:<{w[3]}}  {r[4]}")
