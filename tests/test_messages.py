"""porder.messages: the one-line reason of an exception, names as stored and shown."""
from __future__ import annotations

import pytest

from porder.messages import one_line, printable, stored_name


@pytest.mark.parametrize("exc, kwargs, want", [
    (OSError("bad\n  file"), {}, "bad file"),                        # every line, joined
    (OSError("bad\n  file"), {"first": True}, "bad"),                # the first line only
    (ValueError("  a\tb  "), {}, "a b"),                             # whitespace runs: one space
    (KeyError(), {}, "KeyError"),                                    # empty: the type's name
    (ValueError("\ndetail"), {"first": True}, "ValueError"),         # empty first line
    (ValueError("x" * 250), {"first": True, "limit": 200}, "x" * 200 + "..."),
    (ValueError("x" * 200), {"limit": 200}, "x" * 200),
])
def test_one_line(exc, kwargs, want):
    assert one_line(exc, **kwargs) == want


def test_names_are_reexported_where_they_were():
    import porder.sources.base as base

    assert base.printable is printable and base.stored_name is stored_name
    assert printable("a\x1bb\n") == "a\\x1bb\\n" and stored_name(b"caf\xe9") == "caf\\xe9"
