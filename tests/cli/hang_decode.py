"""Run the porder CLI with one image whose decoding never ends, from outside the library.

``python -m tests.cli.hang_decode MARKER reorder ARGS...`` (from the repository
root) runs ``porder reorder ARGS...``; decoding any file named ``hang.png``
creates the file MARKER and then blocks for ten minutes, as a slow network
file system or a stuck device would. The interrupt tests send SIGINT or
SIGTERM once MARKER exists and check that the run still ends at once.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import porder.sources.decode as decode
from porder.cli import main


def hang_on(marker: Path) -> None:
    """Patch the decoding of one file so that it blocks after touching ``marker``."""
    original = decode._decode_file

    def decode_file(path, size):
        if os.path.basename(path) == "hang.png":
            marker.touch()
            time.sleep(600)
        return original(path, size)

    decode._decode_file = decode_file


if __name__ == "__main__":
    hang_on(Path(sys.argv[1]))
    main(args=sys.argv[2:], prog_name="porder")
