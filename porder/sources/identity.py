"""What identifies a source's data: recorded in every cache, compared by
``--resume`` and by ``porder merge``.

Hashing is bounded: folders are identified by their listing (relative names
and sizes), archives by their bytes (past :data:`DIGEST_ALL`, by 64 spread
samples and the size). The same rule holds for the formats of datasets: a
``.parquet`` file or a WebDataset ``.tar`` shard given alone is a file (its
bytes); a parquet, ``save_to_disk`` or shard folder is a folder (its
listing); a pattern of shards (``shards/train-*.tar``) is the listing of the
files it names, relative to the folder above them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .base import SourceError
from .webdataset import expand_pattern, is_pattern

DIGEST_ALL = 2**30   # archives up to this size are hashed whole; larger ones in samples
_SAMPLE = 2**20


def file_digest(path, size: int) -> str:
    """SHA-256 of a file's bytes (of 64 spread 1 MiB samples and the size, past DIGEST_ALL)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= DIGEST_ALL:
            for block in iter(lambda: fh.read(2**22), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for i in range(64):
                fh.seek(i * (size - _SAMPLE) // 63)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def source_identity(source: str) -> dict:
    """What identifies a source's data, recorded in the file for --resume and merge.

    A file (an archive): its size and the SHA-256 of its bytes. A folder: the
    count and total size of every file beneath it and a digest of their
    relative names and sizes. Named sources (``synthetic:N``, ``digits``) are
    identified by the name alone. ``source_state`` adds modification times:
    it differs when a file was rewritten in place (checked by --resume only,
    as copies of one dataset on different machines have other times).

    Returns
    -------
    dict with ``source_files``, ``source_bytes``, ``source_digest`` and
    ``source_state`` (hex strings).
    """
    path = Path(source)
    named = source == "digits" or source.startswith("synthetic:") or not path.exists()
    if named and not source.startswith("synthetic:") and is_pattern(source):
        try:
            root, paths = expand_pattern(source)
        except SourceError:  # names nothing (now): identified by its text alone
            paths = []
        if paths:
            return _pattern_identity(root, paths)
    if named:
        return {"source_files": 0, "source_bytes": 0, "source_digest": "",
                "source_state": ""}
    listing, state = hashlib.sha256(), hashlib.sha256()
    files = total = 0
    if path.is_file():
        st = path.stat()
        digest = file_digest(path, st.st_size)
        state.update(f"{st.st_size} {st.st_mtime_ns}".encode())
        return {"source_files": 1, "source_bytes": st.st_size, "source_digest": digest,
                "source_state": state.hexdigest()}
    seen = set()
    errors = []
    for root, dirs, names in os.walk(path, followlinks=True, onerror=errors.append):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop: do not descend again
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        rel = os.path.relpath(root, path)
        for name in sorted(names):
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            line = f"{rel}/{name}\0{st.st_size}".encode("utf-8", "surrogateescape")
            listing.update(line + b"\n")
            state.update(line + f"\0{st.st_mtime_ns}\n".encode())
            files += 1
            total += st.st_size
    for e in errors:  # an unreadable folder is part of what the source is
        listing.update(f"!{os.path.relpath(e.filename or '', path)}\n".encode(
            "utf-8", "surrogateescape"))
    return {"source_files": files, "source_bytes": total, "source_digest": listing.hexdigest(),
            "source_state": state.hexdigest() + listing.hexdigest()[:8]}


def _pattern_identity(root: str, paths: list[str]) -> dict:
    """The identity of the files a pattern names: a folder's rule over just those files
    (their names relative to ``root``, in the pattern's order, and sizes)."""
    listing, state = hashlib.sha256(), hashlib.sha256()
    total = 0
    for p in paths:
        rel = os.path.relpath(p, root)
        try:
            st = os.stat(p)
        except OSError:
            listing.update(f"!{rel}\n".encode("utf-8", "surrogateescape"))
            continue
        line = f"{rel}\0{st.st_size}".encode("utf-8", "surrogateescape")
        listing.update(line + b"\n")
        state.update(line + f"\0{st.st_mtime_ns}\n".encode())
        total += st.st_size
    return {"source_files": len(paths), "source_bytes": total,
            "source_digest": listing.hexdigest(),
            "source_state": state.hexdigest() + listing.hexdigest()[:8]}
