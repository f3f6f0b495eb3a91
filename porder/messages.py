"""Text that porder stores or shows: names as stored, text safe for a terminal, and the
one line that stands for an exception in a message.

A leaf module (the standard library only: no NumPy, h5py or click), so every layer
uses it, from the sources and the store up to the CLI.
"""
from __future__ import annotations

import re

# What HDF5 strings cannot hold: lone surrogates (bytes that are not UTF-8) and NUL.
_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")
_UNPRINTABLE_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")


def _escape_unstorable(m: re.Match) -> str:
    o = ord(m.group())
    return f"\\x{o & 0xFF:02x}" if o == 0 or 0xDC80 <= o <= 0xDCFF else f"\\u{o:04x}"


def stored_name(name) -> str:
    """A file, folder or class name as porder stores it: valid UTF-8 text without NUL.

    Names are kept exactly, except for bytes that are not UTF-8 (on Linux,
    ``os.fsdecode`` gives them as the surrogate escapes U+DC80..U+DCFF) and NUL
    characters (from a CIFAR meta file): each such byte is written ``\\xNN``
    (``café`` in Latin-1 is stored ``caf\\xe9``), so the stored name shows the
    original bytes. ``bytes`` names are decoded the same way.
    """
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    name = str(name)
    return _UNSTORABLE.sub(_escape_unstorable, name) if not name.isprintable() else name


def printable(text) -> str:
    """``text`` safe for a terminal: control and format characters (ESC, newlines,
    bidirectional overrides, ...) written as Python escapes (``\\x1b``, ``\\n``,
    ``\\u202e``), and bytes that are not UTF-8 as ``\\xNN``."""
    text = stored_name(text)
    if text.isprintable():
        return text
    import unicodedata

    return "".join(repr(ch)[1:-1] if ch != " " and unicodedata.category(ch)
                   in _UNPRINTABLE_CATEGORIES else ch for ch in text)


def one_line(exc: BaseException, *, first: bool = False, limit: int | None = None) -> str:
    """The one line that stands for ``exc`` in a message.

    Parameters
    ----------
    exc : BaseException
    first : bool, optional
        Keep only the first line of the message (up to the first ``\\n``), for
        errors whose later lines are detail (HDF5, Dask); by default every line
        is kept, joined.
    limit : int, optional
        Cut the text to this many characters, then ``...``.

    Returns
    -------
    str
        The message with every run of whitespace (newlines included) made one
        space, or the exception's type name when that leaves nothing:
        ``one_line(OSError("bad\\n  file")) == "bad file"``,
        ``one_line(KeyError()) == "KeyError"``.
    """
    text = str(exc)
    if first:
        text = text.split("\n", 1)[0]
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text or type(exc).__name__
