"""The interrupt handler of the CLI (porder/cli/common.py) in a real process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from ..conftest import REPO

SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    from porder.cli.common import interrupt_handlers
    interrupt_handlers()
    # The signal comes while the main thread runs code of llvmlite's binding layer
    # (where the handler holds it back), and the main thread then blocks for good
    # in a lock wait, as the pipeline does waiting for a batch a stuck decode never gives.
    fake = os.path.join(os.sep + "x", "llvmlite", "binding", "ffi.py")
    code = compile("import os, signal, time\\nos.kill(os.getpid(), signal.SIGINT)\\n"
                   "time.sleep(0.001)\\nheld = True", fake, "exec")
    scope = {}
    try:
        exec(code, scope)
        print("held back:", scope.get("held"), flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(7)
""")


def test_an_interrupt_held_back_reaches_a_main_thread_blocked_in_a_wait():
    """The held-back signal is sent again to the main thread itself: a mark that the
    handler is pending (``_thread.interrupt_main``) would never run in a blocked wait."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.split() == ["held", "back:", "True", "interrupted"], proc.stderr
    assert proc.returncode == 7, proc.stderr
