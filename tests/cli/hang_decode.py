"""Run the porder CLI with one image whose decoding never ends, from outside the library.

``python -m tests.cli.hang_decode MARKER reorder ARGS...`` (from the repository
root) runs ``porder reorder ARGS...``; decoding any file named ``hang.png``
writes the decoding process's pid to the file MARKER and then blocks for ten
minutes, as a slow network file system or a stuck device would. This holds in
decoding threads and in decoding processes (``--decoder processes``: the
workers run :func:`worker_main` of this module, which patches decoding the
same way). The interrupt tests send SIGINT or SIGTERM once MARKER exists and
check that the run still ends at once.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import porder.sources.pillow as pillow
import porder.sources.procs as procs

_MARKER = "PORDER_TEST_HANG_MARKER"


def hang_on(marker: Path) -> None:
    """Patch the decoding of one file so that it blocks after writing ``marker``."""
    original = pillow.decode_file

    def decode_file(path, size):
        if os.path.basename(path) == "hang.png":
            marker.write_text(str(os.getpid()))
            time.sleep(600)
        return original(path, size)

    pillow.decode_file = decode_file


def worker_main() -> None:
    """A decoding process that hangs on ``hang.png`` too."""
    hang_on(Path(os.environ[_MARKER]))
    procs.worker_main()


if __name__ == "__main__":
    from porder.cli import main

    os.environ[_MARKER] = sys.argv[1]
    hang_on(Path(sys.argv[1]))
    procs.WORKER = __spec__.name
    main(args=sys.argv[2:], prog_name="porder")
