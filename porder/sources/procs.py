"""Decoding image files in worker processes: Pillow without the GIL's limit.

For small files (CIFAR's 32x32 JPEGs, thumbnails) most of a decode is Pillow's
Python code (parsing markers, building the image object), which holds the GIL:
a thread pool then runs at about one core whatever its size. These worker
processes run the very same function (:func:`~porder.sources.pillow.decode_chunk`),
so the pixels are identical, and the work spreads over every core.

How the processes behave
------------------------
* Each worker is ``python -c`` running :func:`worker_main` (:data:`WORKER`
  names its module), started with the parent's ``sys.path``, in a session of
  its own: a Ctrl-C at the terminal reaches porder only, which then kills its
  workers (:meth:`DecodeProcesses.shutdown`) and never waits on them; they
  also ignore SIGINT. A worker whose parent has gone reads end-of-file and exits.
* Parent and worker talk over the worker's stdin/stdout: length-prefixed
  pickles of ``(paths, size)`` one way and of the decoded chunk the other
  way; nothing but porder's own worker writes them. The worker's stdout is
  reserved for that (``print`` and C-level writes go to its stderr, kept in a
  temporary file and quoted when the worker fails to start).
* One parent thread serves each worker, one chunk at a time, from a shared
  queue: the workers stay balanced however uneven the files.
* A worker that dies while decoding (a decoder crash on a hostile file) is
  replaced; its chunk is decoded again one file per fresh worker, so only the
  file that kills a worker fails, with the reason "the decoding process died
  (signal SIGSEGV)", and is skipped or raised like any bad image (``on_error``).
* A worker that cannot start (a broken environment) is a :class:`SourceError`
  naming the reason and ``--decoder threads``.
* Pillow's settings that change what decodes (``Image.MAX_IMAGE_PIXELS``,
  ``ImageFile.LOAD_TRUNCATED_IMAGES``) go with each chunk, so a change made in
  porder's process holds in the workers too; the warnings a chunk raised
  (Pillow's ``DecompressionBombWarning``, for one) come back with it and are
  issued again in porder's process, as the threads would issue them.
"""
from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile

from . import pillow  # pillow.decode_chunk is looked up per chunk: a test may patch it
from .base import SourceError, printable

#: The module whose ``worker_main`` each worker process runs (tests point it at a
#: module that patches decoding first).
WORKER = "porder.sources.procs"
_READY = b"porder-decode-worker-ready"
_HEADER = struct.Struct("<Q")  # the length of each message


def _send(stream, payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream) -> bytes | None:
    """One message, or None at end of file (the other side has gone)."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    payload = stream.read(n)
    return payload if len(payload) == n else None


def _pack(results: list[tuple[np.ndarray | None, str]], size: int) -> tuple[np.ndarray, list]:
    """Per-file results -> (decoded images (n_ok, S, S, 3) uint8, reasons: "" where decoded)."""
    ok = [image for image, _ in results if image is not None]
    images = np.stack(ok) if ok else np.empty((0, size, size, 3), dtype=np.uint8)
    return images, [reason if image is None else "" for image, reason in results]


def _unpack(images: np.ndarray, reasons: list) -> list[tuple[np.ndarray | None, str]]:
    """The inverse of :func:`_pack`: images are views into the one array."""
    out, k = [], 0
    for reason in reasons:
        if reason:
            out.append((None, reason))
        else:
            out.append((images[k], ""))
            k += 1
    return out


def _settings() -> tuple:
    """Pillow's settings that change what decodes, as this process has them."""
    return Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES


def _portable(category: type) -> type:
    """``category`` when the parent can unpickle it, else UserWarning."""
    try:
        pickle.dumps(category)
    except Exception:
        return UserWarning
    return category


def worker_main() -> None:
    """The worker process: decode the chunks read from stdin until end of file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol owns the original stdout; anything else printed goes to stderr.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer

    _send(channel, _READY)
    while True:
        message = _receive(requests)
        if message is None:
            return
        paths, size, settings = pickle.loads(message)
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = settings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the parent's filters decide what shows
            try:
                packed = _pack(pillow.decode_chunk(paths, size), size)
            except BaseException as exc:  # unexpected: every file of the chunk gets the reason
                packed = _pack([(None, f"decoding failed in the worker: {exc!r}")] * len(paths),
                               size)
        raised = [(str(w.message), _portable(w.category), w.filename, w.lineno) for w in caught]
        _send(channel, pickle.dumps((*packed, raised), protocol=pickle.HIGHEST_PROTOCOL))


class _Died(Exception):
    """The worker ended while holding a chunk; ``str`` says how."""


class _Worker:
    """One worker process and the pipes to it."""

    def __init__(self, log) -> None:
        path = [p for p in sys.path if isinstance(p, str)]
        code = (f"import sys; sys.path[:] = {path!r}; "
                f"from {WORKER} import worker_main; worker_main()")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, close_fds=True,
                                     start_new_session=True)

    def call(self, request: bytes) -> bytes:
        try:
            _send(self.proc.stdin, request)
            reply = _receive(self.proc.stdout)
        except (OSError, ValueError):  # a broken pipe, or pipes closed by shutdown
            reply = None
        if reply is None:
            raise _Died(self.end())
        return reply

    def end(self) -> str:
        """Kill the process (if still running) and say how it ended."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel did not reap it
            return "it did not end"
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit status {code}"


class DecodeProcesses:
    """``workers`` decoding processes behind a ``submit(paths, size) -> Future`` interface.

    The future's result is what :func:`~porder.sources.pillow.decode_chunk`
    returns for the paths: a list of ``(image (S, S, 3) uint8, "")`` or
    ``(None, reason)``. Each worker starts when its serving thread takes its
    first chunk.
    """

    def __init__(self, workers: int, name: str = "porder-decode") -> None:
        if not sys.executable:
            raise SourceError("cannot start decoding processes: this Python has no "
                              "sys.executable; use --decoder threads (decoder='threads')")
        self._tasks: SimpleQueue = SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._log = tempfile.TemporaryFile()  # the workers' stderr
        self._warned: dict = {}  # the registry of the warnings issued again here
        self._workers: list[_Worker | None] = [None] * workers
        self._threads = [threading.Thread(target=self._serve, args=(i,), name=f"{name}_{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, paths: Sequence[str], size: int) -> Future:
        future: Future = Future()
        self._tasks.put((future, list(paths), int(size)))
        return future

    def shutdown(self) -> None:
        """Cancel the chunks not started and kill the workers (reaped within 0.5 s);
        waits for no decoding."""
        self._closed = True
        while not self._tasks.empty():
            task = self._tasks.get_nowait()
            if task is not None:
                task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        with self._lock:
            workers, self._workers = self._workers, [None] * len(self._workers)
        procs = [w.proc for w in workers if w is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        deadline = time.monotonic() + 0.5  # reap them (SIGKILL ends a process at once)
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # pragma: no cover - left to the OS
                pass
        self._log.close()  # the workers' stderr: nothing reads it once they are gone

    # -- the serving threads --------------------------------------------

    def _serve(self, i: int) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, paths, size = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._decode(i, paths, size))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def _decode(self, i: int, paths: list[str], size: int) -> list:
        try:
            return self._call(i, paths, size)
        except _Died as died:
            if len(paths) == 1:
                return [(None, f"the decoding process died ({died})")]
        # Some file of the chunk kills the decoder: find it, each file in a fresh worker.
        out = []
        for path in paths:
            try:
                out += self._call(i, [path], size)
            except _Died as died:
                out.append((None, f"the decoding process died ({died})"))
        return out

    def _call(self, i: int, paths: list[str], size: int) -> list:
        worker = self._worker(i)
        try:
            images, reasons, raised = pickle.loads(
                worker.call(pickle.dumps((paths, size, _settings()))))
        except _Died:
            with self._lock:
                if self._workers[i] is worker:
                    self._workers[i] = None
            self._check_open()
            raise
        for message, category, filename, lineno in raised:  # once per place, like a thread's
            warnings.warn_explicit(message, category, filename, lineno, registry=self._warned)
        return _unpack(images, reasons)

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError("the decoding processes were shut down")

    def _worker(self, i: int) -> _Worker:
        """Worker i, started (and checked to be ready) if it is not running."""
        self._check_open()
        worker = self._workers[i]
        if worker is not None:
            return worker
        worker = _Worker(self._log)
        try:
            ready = _receive(worker.proc.stdout)
        except (OSError, ValueError):
            ready = None
        if ready != _READY:
            how = worker.end()
            self._check_open()
            raise SourceError(f"cannot start a decoding process ({how}: "
                              f"{printable(self._last_log_line())}); use --decoder threads "
                              f"(decoder='threads')")
        with self._lock:
            if self._closed:
                worker.end()
                self._check_open()
            self._workers[i] = worker
        return worker

    def _last_log_line(self) -> str:
        try:
            self._log.seek(0)
            lines = self._log.read()[-4096:].decode("utf-8", "replace").strip().splitlines()
        except (OSError, ValueError):  # ValueError: closed by shutdown meanwhile
            return "no message"
        return lines[-1] if lines else "no message"
