"""Run the porder CLI and Ctrl-C it while its main thread runs exec'd source.

``python -m tests.cli.interrupt_in_exec N reorder ARGS...`` (from the
repository root) runs ``porder reorder ARGS...``; as the main thread starts
scoring the N-th batch, it sends itself SIGINT from code that ``exec`` runs
from a source string, and waits there, so the KeyboardInterrupt is raised
inside that code. A real Ctrl-C lands there whenever it comes during an import
that execs source (scipy execs ``from numpy import *`` while numba loads the
cached kernels of the first batch). CPython marks such an interrupt as
unhandled even once porder has caught it, and under ``python -m`` would then
end the process through SIGINT instead of porder's exit status 130.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import porder.pipeline as pipeline
from porder.cli import main


def interrupt_at(count: int) -> None:
    """Patch the pipeline's reorder to Ctrl-C this process, in exec'd source, at call ``count``."""
    original = pipeline.reorder
    calls = [0]

    def reorder(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            # a source string, not a code object: CPython's PyRun_String path
            exec("os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)",
                 {"os": os, "signal": signal, "time": time})
        return original(*args, **kwargs)

    pipeline.reorder = reorder


if __name__ == "__main__":
    interrupt_at(int(sys.argv[1]))
    main(args=sys.argv[2:], prog_name="porder")
