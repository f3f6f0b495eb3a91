"""Run the porder CLI paused mid-write, from outside the library.

``python -m tests.pause_after N READY GO ARGS...`` (from the repository root)
runs ``porder ARGS...``; right after the N-th batch is written (the N-th
return of :meth:`porder.store.Writer.append`) it creates the file READY and
waits until the file GO exists (at most 60 s). The lock tests run a second
porder process against the same output while the first is paused there.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from porder.cli import main

from .cli.signal_after import after_append


def pause_after(count: int, ready: Path, go: Path) -> None:
    """Pause after ``count`` appends until ``go`` exists (at most 60 s)."""
    def pause():
        ready.touch()
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    after_append(count, pause)


if __name__ == "__main__":
    pause_after(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    main(args=sys.argv[4:], prog_name="porder")
