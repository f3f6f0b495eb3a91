"""Run the porder CLI with a fault injected from outside the library.

``python -m tests.cli.signal_after N:SIG reorder ARGS...`` (from the repository
root) runs ``porder reorder ARGS...`` and sends signal SIG (``SIGKILL``,
``SIGINT``, ...) to its own process right after the N-th batch has been written
(the N-th return of :meth:`porder.store.Writer.append`), so the kill-and-resume
tests cut a real run at a known point without any hook in porder itself.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from porder.cli import main
from porder.store import Writer


def after_append(count: int, action) -> None:
    """Patch Writer.append to call ``action()`` right after its ``count``-th return."""
    original = Writer.append
    calls = [0]

    def append(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == count:
            action()
        return result

    Writer.append = append


def signal_after(count: int, sig: signal.Signals) -> None:
    """Send ``sig`` to this process after ``count`` appends."""
    def send():
        os.kill(os.getpid(), sig)
        time.sleep(5)  # let the signal arrive

    after_append(count, send)


if __name__ == "__main__":
    n, name = sys.argv[1].split(":")
    signal_after(int(n), getattr(signal, name))
    main(args=sys.argv[2:], prog_name="porder")
