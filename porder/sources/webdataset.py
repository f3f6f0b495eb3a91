"""WebDataset shards: samples ``KEY.jpg`` (``.jpeg``, ``.png``, ``.webp``) plus ``KEY.cls`` in
uncompressed ``.tar`` files, read with the standard :mod:`tarfile` module (no extra package).

SOURCE is a shard (``x.tar``), a folder whose shards lie directly inside it
(and nothing image-like besides: no image files, no sub-folders), or a pattern
of shards: a glob (``shards/train-*.tar``) or WebDataset's brace range
(``shards/train-{000000..000099}.tar``, also ``{a,b}``), expanded by porder.

Samples follow WebDataset's rule: a member's key is its path up to the first
dot of its file name, its extension the rest (``n01/000017.jpg`` is key
``n01/000017``, extension ``jpg``), and consecutive members with one key form a
sample. porder reads the one image of a sample and its ``.cls`` member, an
integer as text; other members (``.json``, ``.txt``) are ignored. A sample
with no image, two images, no ``.cls`` or a ``.cls`` that is not a class
number is a bad sample: an error, or skipped and listed under
``on_error="skip"``, like an image file Pillow cannot decode.

Class names come from ``classes.txt`` (line ``i`` names class ``i``) or
``classes.json`` (a list of names, or ``{name: i}``, or ``{"i": name}``)
beside the shards; without one, the classes are the distinct labels, sorted,
named by their digits. Shards whose names hold the word ``train`` or ``test``
(:func:`~porder.sources.base.split_of`) form those splits; otherwise porder
holds out a seeded ``test_fraction``.

Reading
-------
Opening lists every shard: tarfile reads the 512-byte headers and seeks past
the data (nothing is extracted, no image is read), then each ``.cls`` is read.
A shard must be a plain ``tar`` (a compressed shard is refused with the
command that decompresses it), at most :data:`MAX_SHARD_MEMBERS` entries, each
entry inside the file, and end with tar's end-of-archive block (a shard cut
short, or with a corrupt header, is an error naming it: tarfile alone would
stop there silently). An image is read when its batch is decoded, by the
decoding thread or process itself (:class:`~porder.sources.pillow.Member`: a
seek and one read of its declared size, at most :data:`MAX_IMAGE_BYTES`), so
shards of any size stream through a bounded memory, and any sample is
reached directly (held-out splits, ``--resume``, ``--shard``).
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from ..messages import one_line
from .base import (
    SourceError,
    holdout,
    label_classes,
    natural_key,
    open_regular,
    printable,
    split_files,
    stored_name,
)
from .decode import ContainerSource
from .pillow import Member, Missing

#: The extensions of a sample's image (WebDataset's; any case).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: Entries of one shard (headers read when it is listed); WebDataset writes 1,000s.
MAX_SHARD_MEMBERS = 1_000_000
#: One image member (its declared size, checked before it is read).
MAX_IMAGE_BYTES = 256 * 2**20
#: One ``.cls`` member: a class number as text.
MAX_LABEL_BYTES = 64
#: ``classes.txt`` / ``classes.json``.
MAX_CLASSES_BYTES = 64 * 2**20
#: Files a pattern may name.
MAX_PATTERN_FILES = 1_000_000

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_BLOCK = 512
_COMPRESSED = {b"\x1f\x8b": "gzip -d", b"BZh": "bunzip2", b"\xfd7zXZ": "unxz",
               b"\x28\xb5\x2f\xfd": "zstd -d"}

# --------------------------------------------------------------------------
# Patterns of files (shared with sources/identity.py)


def _alternatives(body: str) -> list[str] | None:
    """The strings a brace group stands for, or None when it is literal text."""
    m = _RANGE.fullmatch(body)
    if m:
        a, b = m.groups()
        lo, hi = int(a), int(b)
        if abs(hi - lo) >= MAX_PATTERN_FILES:
            raise SourceError(f"the range {{{body}}} names more than {MAX_PATTERN_FILES:,} files")
        padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        return [str(v).zfill(width) for v in range(lo, hi + step, step)]
    if "," in body:
        return body.split(",")
    return None


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace notation: ``a-{000..002}.tar`` -> ``a-000.tar, a-001.tar, a-002.tar``;
    ``{x,y}`` -> ``x, y``; several groups multiply; other braces are kept as text."""
    out, pos = [""], 0
    for m in _BRACE.finditer(pattern):
        alts = _alternatives(m.group(1))
        if alts is None:
            continue
        if len(out) * len(alts) > MAX_PATTERN_FILES:
            raise SourceError(f"pattern '{printable(pattern)}' names more than "
                              f"{MAX_PATTERN_FILES:,} files")
        lit = pattern[pos:m.start()]
        out = [o + lit + a for o in out for a in alts]
        pos = m.end()
    return [o + pattern[pos:] for o in out]


def is_pattern(spec: str) -> bool:
    """Whether ``spec`` is a glob or brace pattern (and so is expanded, not opened)."""
    return glob.has_magic(spec) or expand_braces(spec) != [spec]


def pattern_root(pattern: str) -> str:
    """The folder above every file a pattern names: its leading components without
    ``* ? [ {`` (``shards/train-*.tar`` -> ``shards``); sample names are relative to it."""
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if any(c in part for c in "*?[{"):
            break
        fixed.append(part)
    if not fixed:
        return "."
    return "/".join(fixed) or "/"


def expand_pattern(spec: str) -> tuple[str, list[str]]:
    """The files a pattern names, in order: brace groups in their order, each glob's
    matches in natural order, each file once. Returns (root, paths).

    Raises
    ------
    SourceError
        A file named without a glob is missing, or nothing matches.
    """
    root = pattern_root(spec)
    found: dict[str, None] = {}
    for one in expand_braces(os.path.expanduser(spec)):
        if glob.has_magic(one):
            matches = sorted(glob.glob(one), key=natural_key)
        elif os.path.lexists(one):
            matches = [one]
        else:
            raise SourceError(f"source pattern '{printable(spec)}': '{printable(one)}' "
                              f"does not exist")
        for m in matches:
            found.setdefault(m, None)
            if len(found) > MAX_PATTERN_FILES:
                raise SourceError(f"pattern '{printable(spec)}' names more than "
                                  f"{MAX_PATTERN_FILES:,} files")
    if not found:
        raise SourceError(f"source pattern '{printable(spec)}' matches no file")
    return os.path.expanduser(root), list(found)


# --------------------------------------------------------------------------
# What is a shard


def _tar_head(path) -> bytes:
    with open_regular(path) as handle:
        return handle.read(_BLOCK)


def _check_plain_tar(head: bytes, where: str) -> None:
    for magic, command in _COMPRESSED.items():
        if head.startswith(magic):
            raise SourceError(f"shard '{where}' is compressed; porder reads plain .tar shards "
                              f"(decompress it first: {command} FILE)")
    if len(head) < _BLOCK or head[257:262] != b"ustar":
        raise SourceError(f"'{where}' is not a tar file (no ustar header)")


def looks_like_shard(path) -> bool:
    """Whether a file is a plain tar whose first entries include a WebDataset image or
    ``.cls`` (a CIFAR archive holds neither)."""
    try:
        head = _tar_head(path)
        if len(head) < _BLOCK or head[257:262] != b"ustar":
            return False
        with open_regular(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for _ in range(32):
                member = tar.next()
                if member is None:
                    return False
                m = _KEY.match(member.name)
                if member.isreg() and m and m.group(2).lower() in (*IMAGE_EXTS, "cls"):
                    return True
    except (OSError, tarfile.TarError):
        return False
    return False


def shard_folder(folder: Path) -> list[str] | None:
    """The ``.tar`` files directly in ``folder``, in natural order, when it holds shards
    and nothing image-like besides (no image file, no visible sub-folder); else None."""
    from .pillow import IMAGE_EXTENSIONS

    shards = []
    with os.scandir(folder) as it:
        for entry in it:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir or name.lower().endswith(IMAGE_EXTENSIONS):
                return None
            if name.lower().endswith(".tar"):
                shards.append(os.path.join(str(folder), name))
    return sorted(shards, key=natural_key) or None


# --------------------------------------------------------------------------
# Listing a shard


class _Sample:
    __slots__ = ("key", "images", "labels")

    def __init__(self, key: str):
        self.key = key
        self.images: list = []  # (member name, offset, size)
        self.labels: list = []  # (offset, size)


def _members(handle, where: str, file_size: int) -> list[_Sample]:
    """The samples of an open shard, from its headers; checks its end."""
    samples: list[_Sample] = []
    with tarfile.open(fileobj=handle, mode="r:") as tar:
        count = 0
        while True:
            member = tar.next()
            if member is None:
                break
            tar.members.clear()  # tarfile keeps every header otherwise
            count += 1
            if count > MAX_SHARD_MEMBERS:
                raise SourceError(f"shard '{where}' holds more than {MAX_SHARD_MEMBERS:,} "
                                  f"entries; split it into smaller shards")
            if member.offset_data + member.size > file_size:
                raise SourceError(f"shard '{where}' is cut short: entry "
                                  f"'{printable(member.name)}' ends past the end of the file")
            m = _KEY.match(member.name)
            if not member.isreg() or not m:
                continue
            key, ext = m.group(1), m.group(2).lower()
            if ext not in IMAGE_EXTS and ext != "cls":
                continue
            if not samples or samples[-1].key != key:
                samples.append(_Sample(key))
            if ext == "cls":
                samples[-1].labels.append((member.offset_data, member.size))
            else:
                samples[-1].images.append((member.name, member.offset_data, member.size))
        end = tar.offset
    handle.seek(end)
    tail = handle.read(_BLOCK)
    if len(tail) < _BLOCK:
        raise SourceError(f"shard '{where}' is cut short: it ends without tar's "
                          f"end-of-archive block (truncated?)")
    if tail.count(0) != _BLOCK:
        raise SourceError(f"shard '{where}' has a corrupt entry header at byte {end:,}")
    return samples


def _label(handle, sample: _Sample) -> int | str:
    """The class number of a sample, or the reason it has none."""
    if len(sample.labels) != 1:
        return (f"sample '{printable(sample.key)}' has no .cls label" if not sample.labels
                else f"sample '{printable(sample.key)}' has {len(sample.labels)} .cls members")
    offset, size = sample.labels[0]
    if size > MAX_LABEL_BYTES:
        return f"its label {printable(sample.key)}.cls is {size:,} bytes, not a class number"
    handle.seek(offset)
    raw = handle.read(size)
    text = raw.decode("ascii", "replace").strip()
    if not re.fullmatch(r"\d+", text):
        return f"its label {printable(sample.key)}.cls holds {text[:20]!r}, not a class number"
    return int(text)


def _bad_sample(s: _Sample, label: int | str) -> str:
    """Why a sample cannot be read, or ""."""
    if len(s.images) != 1:
        if not s.images:
            return f"sample '{printable(s.key)}' has no image (.{' .'.join(IMAGE_EXTS)})"
        exts = " ".join(n.rsplit(".", 1)[-1] for n, _, _ in s.images)
        return f"sample '{printable(s.key)}' has {len(s.images)} images ({exts}); porder reads one"
    if isinstance(label, str):
        return label
    if s.images[0][2] > MAX_IMAGE_BYTES:
        return (f"its image is {s.images[0][2]:,} bytes, over porder's limit of "
                f"{MAX_IMAGE_BYTES // 2**20} MiB for one image")
    return ""


def _scan(path: str, rel: str) -> list[tuple[str, object, int | None]]:
    """One shard -> [(sample name, Member or Missing, label or None)] in shard order; the
    label is None where the sample's ``.cls`` is missing or not a class number."""
    where = printable(path)
    try:
        with open_regular(path) as handle:
            file_size = os.fstat(handle.fileno()).st_size
            _check_plain_tar(handle.read(_BLOCK), where)
            handle.seek(0)
            samples = _members(handle, where, file_size)
            out = []
            for s in samples:
                label = _label(handle, s)
                name = stored_name(f"{rel}/{s.images[0][0] if len(s.images) == 1 else s.key}")
                why = _bad_sample(s, label)
                item = Missing(why) if why else Member(path, s.images[0][1], s.images[0][2])
                out.append((name, item, None if isinstance(label, str) else label))
            return out
    except tarfile.TarError as exc:
        if "unexpected end of data" in str(exc):
            raise SourceError(f"shard '{where}' is cut short: it ends inside an entry "
                              f"(truncated?)") from None
        raise SourceError(f"cannot read shard '{where}': {one_line(exc)} (truncated or "
                          f"not a tar file?)") from None
    except OSError as exc:
        raise SourceError(f"cannot read shard '{where}': {one_line(exc)}") from None


# --------------------------------------------------------------------------
# Class names


def _class_file(folder: str) -> list[str] | None:
    """The names of ``classes.txt`` or ``classes.json`` in ``folder``, or None."""
    found = [n for n in ("classes.txt", "classes.json") if os.path.isfile(os.path.join(folder, n))]
    if not found:
        return None
    if len(found) > 1:
        raise SourceError(f"'{printable(folder)}' holds both classes.txt and classes.json; "
                          f"keep one")
    path = os.path.join(folder, found[0])
    where = printable(path)
    try:
        with open_regular(path) as handle:
            raw = handle.read(MAX_CLASSES_BYTES + 1)
    except OSError as exc:
        raise SourceError(f"cannot read '{where}': {one_line(exc)}") from None
    if len(raw) > MAX_CLASSES_BYTES:
        raise SourceError(f"'{where}' is over {MAX_CLASSES_BYTES // 2**20} MiB; it should "
                          f"hold one class name a line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SourceError(f"'{where}' is not UTF-8 text") from None
    if found[0] == "classes.txt":
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
        if not names or not all(names):
            raise SourceError(f"'{where}' must hold one class name a line, with no empty line")
        return names
    return _json_names(text, where)


def _json_names(text: str, where: str) -> list[str]:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise SourceError(f"'{where}' is not JSON: {one_line(exc)}") from None
    if isinstance(obj, list) and obj and all(isinstance(n, str) for n in obj):
        return obj
    if isinstance(obj, dict) and obj:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in obj.values()):
            pairs = {v: k for k, v in obj.items()}  # {name: i}
        elif all(k.isdigit() and isinstance(v, str) for k, v in obj.items()):
            pairs = {int(k): v for k, v in obj.items()}  # {"i": name}
        else:
            pairs = {}
        if pairs and sorted(pairs) == list(range(len(obj))):
            return [pairs[i] for i in range(len(obj))]
    raise SourceError(f"'{where}' must be a list of class names, {{name: i}} or "
                      f"{{\"i\": name}} for i = 0..K-1")


# --------------------------------------------------------------------------
# The source


def open_shards(description: str, root: str, shards: list[str], size, test_fraction, seed,
                on_error, workers, decoder) -> ContainerSource:
    """A :class:`~porder.sources.decode.ContainerSource` of WebDataset shards.

    ``root`` is the folder sample names are relative to (``train-000.tar/x.jpg``);
    ``shards`` the ``.tar`` files, in order.
    """
    for path in shards:
        if not path.lower().endswith(".tar"):
            raise SourceError(f"'{printable(path)}' is not a .tar shard; a WebDataset source "
                              f"names plain .tar files only")
    rels = [os.path.relpath(p, root) for p in shards]
    by_split, own_test = split_files(list(zip(shards, rels)), rels, printable(description))
    names = _class_file(os.path.dirname(os.path.abspath(shards[0])))
    scanned = {split: [s for path, rel in pairs for s in _scan(path, rel)]
               for split, pairs in by_split.items()}
    every = [s for split in ("train", "test") for s in scanned[split]]
    if not every:
        raise SourceError(f"source '{printable(description)}' holds no samples "
                          f"(KEY.jpg/.png/.webp with KEY.cls)")
    good = [(name, label) for name, _, label in every if label is not None]
    if not good:
        raise SourceError(f"no sample of '{printable(description)}' has a .cls label; porder "
                          f"reads the class number from KEY.cls beside KEY.jpg")
    classes, mapped = label_classes(np.asarray([lab for _, lab in good], dtype=np.int64), names,
                                    [n for n, _ in good], printable(description))
    index = {}  # label value -> class index
    for (_, value), cls in zip(good, mapped.tolist()):
        index[value] = cls
    files = {}
    for split, samples in scanned.items():
        labels = np.asarray([0 if lab is None else index[lab] for _, _, lab in samples],
                            dtype=np.int64)
        files[split] = ([item for _, item, _ in samples], labels, [n for n, _, _ in samples])
    if not own_test:
        items, labels, sample_names = files["train"]
        train, test = holdout(len(items), test_fraction, seed)
        files = {split: ([items[i] for i in idx], labels[idx], [sample_names[i] for i in idx])
                 for split, idx in (("train", train), ("test", test))}
    return ContainerSource("webdataset", description, classes, size,
                           None if own_test else test_fraction, files, on_error, workers,
                           decoder, root)
