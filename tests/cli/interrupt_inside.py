"""Run the porder CLI and Ctrl-C it while its main thread runs code where that is hard.

``python -m tests.cli.interrupt_inside WHERE N reorder ARGS...`` (from the
repository root) runs ``porder reorder ARGS...``; as the main thread starts
scoring the N-th batch, it sends itself SIGINT from, and waits in, code of one
of two kinds, so that the signal's handler runs there. A real Ctrl-C lands in
both while numba loads the cached kernels of a run's first batch.

``exec``
    Code that ``exec`` runs from a source string (numba's load imports scipy,
    which execs ``from numpy import *``). CPython marks a KeyboardInterrupt
    leaving such code as unhandled even once porder has caught it, and under
    ``python -m`` then ends the process through SIGINT instead of exit 130.
``callback``
    A Python function that LLVM calls back through ctypes: llvmlite's
    object-cache hook, by which numba stores and fetches compiled kernels.
    ctypes prints and drops an exception raised there, so the Ctrl-C is lost
    and the run goes on (or LLVM misses the object it asked for and crashes).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import porder.pipeline as pipeline
from porder.cli import main

_SEND = "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.5)"


def in_exec() -> None:
    # a source string, not a code object: CPython's PyRun_String path
    exec(_SEND, {"os": os, "signal": signal, "time": time})


def in_callback() -> None:
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly("define i32 @f() {\n  ret i32 0\n}\n")
    machine = llvm.Target.from_default_triple().create_target_machine()
    engine = llvm.create_mcjit_compiler(module, machine)

    def notify(module, object_code):  # LLVM -> ctypes -> llvmlite -> here
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)

    engine.set_object_cache(notify_func=notify)
    engine.finalize_object()  # compiles f, and calls notify with its object code


def interrupt_at(where: str, count: int) -> None:
    """Patch the pipeline's reorder to Ctrl-C this process ``where``, at call ``count``."""
    send = {"exec": in_exec, "callback": in_callback}[where]
    original = pipeline.reorder
    calls = [0]

    def reorder(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            send()
        return original(*args, **kwargs)

    pipeline.reorder = reorder


if __name__ == "__main__":
    interrupt_at(sys.argv[1], int(sys.argv[2]))
    main(args=sys.argv[3:], prog_name="porder")
