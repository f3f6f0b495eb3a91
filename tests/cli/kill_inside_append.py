"""Run the porder CLI and SIGKILL it inside one append, from outside the library.

``python -m tests.cli.kill_inside_append K:N[:flush] LOG ARGS...`` (from the
repository root) runs ``porder ARGS...`` and watches the HDF5 operations
(dataset resizes and writes, attribute writes, file flushes) that the K-th
call of :meth:`porder.store.Writer.append` makes on the writer thread (with
``K`` = ``resume``: those that ``--resume`` makes to cut the ``.part`` back):

* ``N`` = 0: nothing is killed; the operations of that append are written to
  LOG as a JSON list of strings such as ``"resize /train/images"``, ``"write
  /train/labels"``, ``"attr /train rows"``, ``"flush"``.
* ``N`` >= 1: right before the N-th of those operations the process kills
  itself with SIGKILL, as an OOM kill would. With ``:flush`` the file is first
  flushed, so that everything the append did so far is on disk (HDF5 may write
  any dirty metadata or chunk at any time: this is the worst case of a kill
  at that point); without it, only what HDF5 chose to write is.

The crash-consistency tests cut a real run at every point of an append this
way, with no hook in porder itself.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import h5py

from porder.cli import main
from porder.store import Writer


def kill_inside_append(call: int | str, op: int, flush: bool, log: Path) -> None:
    """Patch Writer.append and h5py so that the ``call``-th append (``"resume"``: the
    resume's cut-back) dies before operation ``op``."""
    state = {"calls": 0, "writer": None, "thread": None, "ops": []}

    def step(what: str) -> None:
        if state["writer"] is None or threading.get_ident() != state["thread"]:
            return
        state["ops"].append(what)
        if len(state["ops"]) == op:
            if flush:
                original_flush(state["writer"].f)
            os.kill(os.getpid(), signal.SIGKILL)

    method = "_resume" if call == "resume" else "append"
    original_method = getattr(Writer, method)
    original_resize = h5py.Dataset.resize
    original_setitem = h5py.Dataset.__setitem__
    original_attr = h5py.AttributeManager.__setitem__
    original_flush = h5py.File.flush

    def watched(self, *args, **kwargs):  # Writer.append or Writer._resume
        state["calls"] += 1
        if call != "resume" and state["calls"] != call:
            return original_method(self, *args, **kwargs)
        state["writer"], state["thread"] = self, threading.get_ident()
        try:
            return original_method(self, *args, **kwargs)
        finally:
            state["writer"] = None
            if op == 0:
                log.write_text(json.dumps(state["ops"]))

    def resize(self, *args, **kwargs):
        step(f"resize {self.name}")
        return original_resize(self, *args, **kwargs)

    def setitem(self, *args, **kwargs):
        step(f"write {self.name}")
        return original_setitem(self, *args, **kwargs)

    def attr(self, name, value):
        step(f"attr {h5py.h5i.get_name(self._id).decode()} {name}")
        return original_attr(self, name, value)

    def file_flush(self):
        step("flush")
        return original_flush(self)

    setattr(Writer, method, watched)
    h5py.Dataset.resize = resize
    h5py.Dataset.__setitem__ = setitem
    h5py.AttributeManager.__setitem__ = attr
    h5py.File.flush = file_flush


if __name__ == "__main__":
    spec = sys.argv[1].split(":")
    kill_inside_append(spec[0] if spec[0] == "resume" else int(spec[0]), int(spec[1]),
                       spec[2:] == ["flush"], Path(sys.argv[2]))
    main(args=sys.argv[3:], prog_name="porder")
