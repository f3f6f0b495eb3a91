"""Run ``porder reorder --dask local:2`` in this process, then list this process's children.

``python -m tests.scale.dask_children OUT.h5`` (from the repository root) prints one JSON
line: {"code": the command's exit status, "children": [[pid, state, command line], ...]},
the children read from /proc a moment after the command returned. tests/scale/
test_dask_children.py runs it in a fresh process, where nothing else started children.
"""
from __future__ import annotations

import json
import os
import sys
import time


def children() -> list:
    """[pid, state, command line] of every process whose parent is this one (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == os.getpid():
            found.append([int(entry), state, cmd])
    return found


def main(out: str) -> None:
    from porder.cli import main as cli

    try:
        cli(["reorder", "--dask", "local:2", "-m", "entropy", "--size", "16", "--patch", "4",
             "synthetic:24", out], standalone_mode=False)
        code = 0
    except SystemExit as e:
        code = e.code
    time.sleep(1.0)
    print(json.dumps({"code": code, "children": children()}), flush=True)


if __name__ == "__main__":   # spawned workers import this module again: run only once
    main(sys.argv[1])
