"""Dataset readers: every SOURCE becomes batches of uint8 RGB images of one size.

A source is opened with :func:`open_source` and read split by split with
:meth:`Source.iter_batches`, one batch at a time, so memory stays bounded
whatever the dataset size (CIFAR and ``digits`` are small enough to be held
whole; image folders are decoded per batch; ``synthetic`` images are generated
per batch).

Accepted SOURCE forms (see :data:`SOURCE_HELP`)
-----------------------------------------------
* CIFAR-10 / CIFAR-100, the official *python* version: the extracted folder
  (``cifar-10-batches-py/``, ``cifar-100-python/``) or the archive as
  distributed (``.tar.gz``, read in one pass without extracting). Pickles are
  read by porder's own opcode reader (:mod:`.pickles`), which builds only
  plain data and integer NumPy arrays, and sizes are checked before anything
  is read, so a malicious file can neither run code nor exhaust memory.
* An image folder with one sub-folder per class (class names are the sorted
  sub-folder names; images are found recursively inside a class folder,
  following linked folders), optionally below ``train/`` and ``test/``, which
  must hold the same classes. A folder that cannot be listed (or a link loop)
  is an error naming it; with ``on_error="skip"`` it is left out and listed
  in :attr:`Batch.skipped`.
* The Kaggle Dogs vs. Cats layout: images directly inside a folder, named
  ``<label>.<id>.<ext>`` (``cat.12.jpg`` is class ``cat``).
* Hugging Face datasets as they ship (:mod:`.parquet`, needs pyarrow, the
  extra ``[parquet]``): one ``.parquet`` file, a folder of
  ``train-*.parquet``/``test-*.parquet`` files (also below ``data/``), or a
  ``save_to_disk`` folder of Arrow files; an image column of ``{bytes, path}``
  structs and a label column, with the ``ClassLabel`` names.
* WebDataset shards (:mod:`.webdataset`, the standard library's ``tarfile``,
  no extra): a ``.tar`` file, a folder of them, or a glob or brace pattern
  (``shards/train-{000..009}.tar``); samples ``KEY.jpg``/``.png``/``.webp``
  with ``KEY.cls``.
* ``synthetic:N[:C]``: N generated images of C classes (default 10).
* ``digits``: the 1797 8x8 handwritten digits of the UCI repository, as
  scikit-learn ships them, shipped with porder (``data/digits.npz``; no
  download, no scikit-learn).

Splits
------
Every source has the splits ``train`` and ``test``. CIFAR, image folders
with ``train/`` and ``test/``, and parquet files or shards named ``train``/``test``
bring their own; every other source holds out a
deterministic fraction ``test_fraction`` of its samples: the samples whose rank
in ``np.random.default_rng(seed).permutation(n)`` is below
``round(test_fraction * n)`` form the test split; both splits keep the source
order. Samples are read in a fixed order (natural order of file names, e.g.
``cat.2.jpg`` before ``cat.10.jpg``), so resuming at sample ``start`` gives
exactly the batches an uninterrupted run would have given.

How image files become RGB arrays (modes, EXIF, resizing, bad files, files
that are not regular files) is stated once, in :mod:`porder.sources.pillow`.

Names
-----
Class names and sample names are kept exactly as the file system or the CIFAR
meta file gives them, except for what an HDF5 string cannot hold: bytes that
are not UTF-8 and NUL are written ``\\xNN`` (see
:func:`porder.messages.stored_name`). Messages show names with control
characters escaped (:func:`porder.messages.printable`).

Layout: :mod:`.base` (Source, Batch, the held-out split, opening regular
files), :mod:`.pillow` (decoding one file with Pillow, resizing: the leaf that
threads, processes and the nvJPEG fallback share), :mod:`.decode` (the file
source, decoding on threads or in the processes of :mod:`.procs`, or with
:mod:`.gpu_decode`; the source of images inside larger files), one module per
source kind (:mod:`.cifar` with its pickle reader :mod:`.pickles`,
:mod:`.folders`, :mod:`.parquet`, :mod:`.webdataset`, :mod:`.synthetic` with
``digits``), and :func:`open_source` here, which picks the kind: a CIFAR folder,
then a Hugging Face layout, then a folder of shards, then an image folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..messages import one_line
from .base import Batch, Source, SourceError, check_int, printable
from .cifar import cifar_kind, is_archive, open_cifar_archive, open_cifar_folder
from .decode import DECODER_CHOICES
from .folders import open_folder
from .parquet import hf_layout, open_table
from .pillow import IMAGE_EXTENSIONS, RESAMPLE
from .synthetic import DigitsSource, SyntheticSource, parse_synthetic
from .webdataset import expand_pattern, is_pattern, looks_like_shard, open_shards, shard_folder

__all__ = [
    "SOURCE_HELP",
    "IMAGE_EXTENSIONS",
    "RESAMPLE",
    "SourceError",
    "Batch",
    "Source",
    "open_source",
]

LABEL_CHOICES = ("fine", "coarse")
# Seeds are stored in the output file as int64.
MAX_SEED = 2**63 - 1
ON_ERROR_CHOICES = ("fail", "skip")

SOURCE_HELP = """\
SOURCE is one of:
  PATH/cifar-10-batches-py, cifar-10-python.tar.gz   CIFAR-10, python version, folder or archive
  PATH/cifar-100-python, cifar-100-python.tar.gz     CIFAR-100 (--label coarse: 20 superclasses)
  PATH/<class>/<image>                                image folder, one sub-folder per class
  PATH/train/<class>/..., PATH/test/<class>/...       image folder with its own test split
  PATH/<label>.<id>.<ext>                             flat folder, Kaggle Dogs vs. Cats (cat.12.jpg)
  FILE.parquet, PATH/[data/]train-*.parquet           Hugging Face parquet: an image column
                                                      ({bytes, path}) and a label (ClassLabel)
  PATH (save_to_disk)                                 Hugging Face Arrow folder (Dataset or
                                                      DatasetDict); both need patch-order[parquet]
  SHARD.tar, PATH/*.tar, 'PATH/train-{000..009}.tar'  WebDataset shards: KEY.jpg|.png|.webp +
                                                      KEY.cls; class names from classes.txt
  synthetic:N[:C]                                     N generated images of C classes (default 10)
  digits                                              the 1797 8x8 handwritten digits (built in)
Images (.png .jpg .jpeg .bmp .gif .tif .tiff .webp) of any mode become RGB (alpha composited on
black, 16-bit scaled to 8-bit, EXIF orientation applied) and are squashed, not cropped, to
SIZE x SIZE with bicubic resampling. Parquet files and shards whose names hold the word train
or test are those splits (others, such as validation, are left out). Sources without their own
test split hold out a seeded random TEST_FRACTION of their samples as the test split."""


# --------------------------------------------------------------------------
# Entry point


def _default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def open_source(spec: str, *, size: int = 32, label: str = "fine", test_fraction: float = 0.1,
                seed: int = 0, on_error: str = "fail", workers: int | None = None,
                decoder: str = "auto") -> Source:
    """Open a dataset as a :class:`Source` of uint8 RGB images of ``size x size``.

    Parameters
    ----------
    spec : str
        A path (CIFAR folder or ``.tar.gz``, image folder, Kaggle flat folder,
        ``.parquet`` file or folder, ``save_to_disk`` folder, WebDataset ``.tar``
        shard or folder of shards), a pattern of shards or parquet files
        (``shards/train-*.tar``, ``shards/train-{000..009}.tar``),
        ``"synthetic:N"``, ``"synthetic:N:C"`` or ``"digits"``; see :data:`SOURCE_HELP`.
        ``digits`` and ``synthetic:...`` win over a path of the same name
        (write ``./digits`` for the folder).
    size : int, optional
        Side of the output images (>= 1); images are squashed to it with
        bicubic resampling.
    label : {'fine', 'coarse'}, optional
        CIFAR-100 labels: the 100 classes or the 20 superclasses (for parquet
        and Arrow files, the column ``coarse_label``). ``'coarse'`` is an error
        for every other source.
    test_fraction : float, optional
        Fraction of samples held out as the test split, 0 <= f < 1, for
        sources without their own test split (ignored by the others).
    seed : int, optional
        Seed (0 <= seed <= 2**63 - 1) of the held-out split and of ``synthetic`` images.
    on_error : {'fail', 'skip'}, optional
        What an undecodable image file does: raise, or leave it out and list it
        in :attr:`Batch.skipped`.
    workers : int or None, optional
        Threads decoding image files or generating ``synthetic`` images (>= 1;
        1 works in the caller's thread); default: the CPUs this process may use (``os.cpu_count()``
        narrowed to the CPU affinity where the OS has one).
    decoder : {'auto', 'threads', 'processes', 'nvjpeg'}, optional
        How image files are decoded with ``workers`` > 1: worker threads
        (instant start; Pillow releases the GIL on photos), worker processes
        (identical pixels; faster on small files such as 32x32 JPEGs, whose
        decoding is mostly Python code under the GIL; about 0.3 s to start),
        or ``'auto'``: processes from 4096 files to read. ``'nvjpeg'`` decodes
        JPEGs on a CUDA GPU with torchvision (>= 0.19) and yields batches whose
        images are CuPy arrays on the GPU; the pixels differ slightly from
        Pillow's (see :mod:`porder.sources.gpu_decode`). Other sources ignore it.

    Returns
    -------
    Source
        Call :meth:`Source.close` when done (or use it in a ``with`` block).

    Raises
    ------
    SourceError
        A missing path, an unknown form, a wrong layout or a bad option
        (``decoder='nvjpeg'`` without torchvision, CuPy or a GPU; parquet or
        Arrow files without pyarrow: the message names the extra
        ``patch-order[parquet]``); the message is one line naming the file or option.
    """
    spec_text = str(spec)
    size = check_int("size", size, 1)
    seed = check_int("seed", seed, 0, MAX_SEED)
    if label not in LABEL_CHOICES:
        raise SourceError(f"label must be one of {list(LABEL_CHOICES)}, got {label!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise SourceError(f"on_error must be one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0 <= test_fraction < 1:
        raise SourceError(f"test_fraction must be a number with 0 <= f < 1, "
                          f"got {test_fraction!r}")
    test_fraction = float(test_fraction)
    workers = _default_workers() if workers is None else check_int("workers", workers, 1)
    if decoder not in DECODER_CHOICES:
        raise SourceError(f"decoder must be one of {list(DECODER_CHOICES)}, got {decoder!r}")
    if decoder == "nvjpeg":
        from .gpu_decode import check_available

        check_available()

    if spec_text.startswith("synthetic:") or spec_text == "digits":
        if label != "fine":
            raise SourceError(f"label='coarse' needs CIFAR-100, not {spec_text!r}; "
                              f"use label='fine'")
        if spec_text == "digits":
            return DigitsSource(spec_text, size, test_fraction, seed)
        n, num_classes = parse_synthetic(spec_text)
        return SyntheticSource(spec_text, n, num_classes, size, test_fraction, seed,
                                workers)

    path = Path(spec_text).expanduser()
    shown = printable(spec_text)
    options = (size, test_fraction, seed, on_error, workers, decoder)
    try:
        if not path.exists():
            if is_pattern(spec_text):
                return _open_pattern(spec_text, label, options)
            raise SourceError(f"source '{shown}' does not exist; give a CIFAR folder or "
                              f".tar.gz, an image folder, Hugging Face parquet or Arrow files, "
                              f"WebDataset .tar shards, synthetic:N[:C] or digits")
        if not path.is_dir():
            return _open_file(spec_text, path, label, options)
        files = {p.name for p in path.iterdir() if p.is_file()}
        kind = cifar_kind(files)
        if kind is not None:
            return open_cifar_folder(kind, spec_text, path, label, size)
        layout = hf_layout(path, files)
        if layout is not None:
            return open_table(spec_text, path, *layout, size, label, *options[1:])
        shards = shard_folder(path)
        if label != "fine":
            what = "an image folder" if shards is None else "a folder of WebDataset shards"
            raise SourceError(f"label='coarse' needs CIFAR-100 (or a parquet coarse_label "
                              f"column), but '{spec_text}' is {what}; use label='fine'")
        if shards is not None:
            return open_shards(spec_text, str(path), shards, *options)
        return open_folder(spec_text, path, *options)
    except OSError as exc:  # unreadable folder or file, or not a regular file
        raise SourceError(f"cannot read source '{shown}': {one_line(exc)}") from None


def _open_file(spec_text: str, path: Path, label: str, options: tuple) -> Source:
    """A SOURCE that is one file: parquet, a WebDataset shard, or a CIFAR archive."""
    layout = hf_layout(path, set())
    if layout is not None:
        return open_table(spec_text, path.parent, *layout, options[0], label, *options[1:])
    shard = path.suffix.lower() == ".tar" and looks_like_shard(path)
    if shard:
        if label != "fine":
            raise SourceError(f"label='coarse' needs CIFAR-100, but '{spec_text}' is a "
                              f"WebDataset shard; use label='fine'")
        return open_shards(spec_text, str(path.parent), [str(path)], *options)
    if not is_archive(path):
        raise SourceError(f"source '{printable(spec_text)}' is a file but not a CIFAR .tar.gz "
                          f"archive, a .parquet file or a WebDataset .tar shard; give a "
                          f"folder of images or one of those")
    return open_cifar_archive(spec_text, path, label, options[0])


def _open_pattern(spec_text: str, label: str, options: tuple) -> Source:
    """A glob or brace pattern of WebDataset shards (or of parquet files)."""
    root, paths = expand_pattern(spec_text)
    if all(p.lower().endswith(".parquet") for p in paths):
        files = [(p, os.path.relpath(p, root)) for p in paths]
        return open_table(spec_text, Path(root), "parquet", files, options[0], label,
                          *options[1:])
    if label != "fine":
        raise SourceError(f"label='coarse' needs CIFAR-100, but '{spec_text}' names "
                          f"WebDataset shards; use label='fine'")
    return open_shards(spec_text, root, paths, *options)
