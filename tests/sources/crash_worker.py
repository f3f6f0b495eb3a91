"""A decoding worker process whose decoder crashes on one file, from outside the library.

Tests set ``porder.sources.procs.WORKER`` to this module's name: decoding a file
named ``crash.png`` then kills the worker with SIGSEGV, as a decoder bug hit by a
hostile file would, and ``exit3.png`` makes it exit with status 3.
"""
from __future__ import annotations

import os
import signal

import porder.sources.pillow as pillow
import porder.sources.procs as procs


def worker_main() -> None:
    original = pillow.decode_file

    def decode_file(path, size):
        name = os.path.basename(path)
        if name == "crash.png":
            os.kill(os.getpid(), signal.SIGSEGV)
        if name == "exit3.png":
            os._exit(3)
        return original(path, size)

    pillow.decode_file = decode_file
    procs.worker_main()
