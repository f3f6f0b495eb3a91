"""Writing outputs safely: exclusive locks, refused targets, free space, disk-full errors.

Every command that writes a file or a run folder takes an exclusive lock here
*before* it touches anything, so two porder processes never write the same
output and no process truncates a file another one owns:

* a file ``OUT`` is locked through ``OUT.lock`` (:func:`lock_output`), which
  covers ``OUT``, ``OUT.part`` and ``OUT.shards/``;
* a folder (a training run, a comparison) through ``FOLDER/.porder.lock``
  (:func:`lock_folder`).

Locks are ``flock`` locks: the kernel drops them when the process ends however
it ends, so a lock file left by a killed run is stale and harmless (the next
run takes it over). They hold between processes and between threads of one
process; they are advisory (only porder honours them) and need a file system
with ``flock`` (local disks, NFS v4; where locking is unsupported the write
goes ahead unlocked).

A full disk is caught before HDF5 writes: :class:`SpaceReserver` reserves the
blocks of each batch ahead of writing it (``fallocate`` with ``KEEP_SIZE`` on
Linux, a free-space check elsewhere), so running out of space raises
:class:`DiskFull` with what was needed, while the partial file is intact.

A finished file takes its name with :func:`durable_replace`: its bytes are
synced to the disk before the rename and the folder's entry after it, so even
a power cut never leaves the final name on a file whose blocks were not written.

This module imports neither h5py nor NumPy.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; outputs are written unlocked
    fcntl = None

LOCK_SUFFIX = ".lock"
FOLDER_LOCK = ".porder.lock"
_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE = 0x01, 0x02
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class OutputError(ValueError):
    """An output that must not or cannot be written (one-line message naming it)."""


class Busy(OutputError):
    """Another process holds the lock of an output."""


class DiskFull(OutputError):
    """Not enough free space for an output; says how much was needed and where."""


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``: sizes in messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# --------------------------------------------------------------------------
# Locks


class Lock:
    """An exclusive lock on a lock file, held until :meth:`release`.

    Use :func:`lock_output` or :func:`lock_folder` to take one; it is also a
    context manager.
    """

    def __init__(self, lock_file: Path, what: str, *, made_folder: Path | None = None):
        self.file = Path(lock_file)
        self.what = what
        self._made_folder = made_folder
        self._fd: int | None = None
        self._acquire()

    def _acquire(self) -> None:
        for _ in range(50):  # retried only when a releasing holder deletes the file under us
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                             0o644)
            except OSError as e:
                raise OutputError(f"cannot lock {self.what}: cannot create '{self.file}' "
                                  f"({e.strerror or e})") from None
            if fcntl is None:
                self._fd = fd
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise Busy(f"{self.what} is in use by another porder process{holder}; wait for "
                           f"it to finish or choose another output") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                self._fd = fd  # a file system without flock: go ahead unlocked
                return
            try:  # the holder we waited on may have deleted the file: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.file))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            except OSError:
                pass
            return
        raise Busy(f"{self.what} is in use by another porder process; try again")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, remove_folder: bool = False) -> None:
        """Delete the lock file and drop the lock (idempotent).

        ``remove_folder``: also remove the folder :func:`lock_folder` created,
        if nothing else was put in it (a run refused before it wrote anything).
        """
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.file)):
                self.file.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if remove_folder and self._made_folder is not None:
            try:
                self._made_folder.rmdir()
            except OSError:  # not empty: it holds what the run wrote
                pass

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lost Lock must not keep the descriptor (and the lock)
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text and text.isprintable() else ""


def lock_path(path) -> Path:
    """The lock file of output ``path``: ``<path>.lock``."""
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


def lock_output(path, *, what: str | None = None) -> Lock:
    """Take the exclusive lock of output file ``path`` (``<path>.lock``).

    Raises
    ------
    Busy
        Another process (or another writer in this one) holds it; the message
        names the holder's pid and host.
    OutputError
        The lock file cannot be created (e.g. the folder is not writable).
    """
    path = Path(path)
    return Lock(lock_path(path), what or f"output '{path}'")


def lock_folder(folder, *, what: str | None = None) -> Lock:
    """Create ``folder`` if needed and take its exclusive lock (``FOLDER/.porder.lock``).

    ``release(remove_folder=True)`` removes the folder again if this call made
    it and nothing was written into it.
    """
    folder = Path(folder)
    made = None
    if not folder.exists():
        try:
            folder.mkdir(parents=True)
            made = folder
        except FileExistsError:
            pass
        except OSError as e:
            raise OutputError(f"cannot create folder '{folder}' ({e.strerror or e})") from None
    if not folder.is_dir():
        raise OutputError(f"'{folder}' is a file; give a folder")
    try:
        return Lock(folder / FOLDER_LOCK, what or f"folder '{folder}'", made_folder=made)
    except BaseException:
        if made is not None:
            try:
                made.rmdir()
            except OSError:
                pass
        raise


# --------------------------------------------------------------------------
# Refused targets


def check_not_inside_source(out, source) -> None:
    """Refuse an output that is, or lies inside, the source path ``source``.

    ``source`` that is not an existing path (``synthetic:N``, ``digits``) is
    fine. The check resolves symbolic links and also catches hard links to the
    source file.

    Raises
    ------
    OutputError
    """
    src = Path(str(source))
    if not src.exists():
        return
    out = Path(out)
    s, o = src.resolve(), out.absolute().resolve()
    if o == s or (out.exists() and src.is_file() and os.path.samefile(out, src)):
        raise OutputError(f"output '{out}' is the source '{source}' itself; writing it would "
                          f"destroy the input: choose another output name")
    if s.is_dir() and s in o.parents:
        raise OutputError(f"output '{out}' is inside the source folder '{source}'; it would be "
                          f"read as input next time: write it outside that folder")


# --------------------------------------------------------------------------
# Free space


def durable_replace(tmp, path) -> None:
    """Rename the finished file ``tmp`` to ``path``, durably.

    ``os.replace`` alone is atomic for processes but not across a crash of the
    machine: the new name may reach the disk before the file's blocks do. So
    ``tmp`` is synced first (an I/O error raises, and ``path`` is untouched),
    then renamed, then its folder is synced (best effort: some systems cannot
    sync a folder).
    """
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        fd = os.open(Path(path).parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows cannot open a folder: the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def free_bytes(folder) -> int | None:
    """Bytes free to this user in ``folder``'s file system (None when unknown)."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return None
    return usage.free if usage.total else None


def check_free_space(folder, need: int, *, what: str) -> None:
    """Raise :class:`DiskFull` unless ``folder`` has ``need`` bytes free for ``what``."""
    free = free_bytes(folder)
    if free is not None and need > free:
        raise DiskFull(f"not enough free space for {what} in '{folder}': needs about "
                       f"{human_bytes(need)}, {human_bytes(free)} free; free some space or "
                       f"write elsewhere")


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error (an OSError, or h5py's RuntimeError text) means 'no space left'."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    text = str(exc)
    return any(f"errno = {n}," in text for n in _NO_SPACE) or "No space left on device" in text


def _fallocate():
    try:
        f = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    f.restype = ctypes.c_int
    return f


_FALLOCATE = _fallocate()


class SpaceReserver:
    """Reserve disk blocks for a growing file before a library writes them.

    :meth:`reserve` makes sure the next ``n`` bytes past the file's end are
    allocated (Linux ``fallocate`` with ``FALLOC_FL_KEEP_SIZE``: the file's
    size does not change, and the writes that follow cannot fail for lack of
    space). Where ``fallocate`` is unsupported, it checks the free space
    instead. :meth:`close` gives back what was reserved and not used.

    Parameters
    ----------
    path : path-like
        An existing file (opened write-only here, beside the writer's handle).
    what : str
        How messages name the output, e.g. ``"'out.h5.part'"``.
    """

    def __init__(self, path, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        self._end = 0           # bytes of the file known to be allocated
        self._fallocate = _FALLOCATE

    def reserve(self, n: int) -> None:
        """Ensure ``n`` more bytes can be written past the end of the file.

        Raises
        ------
        DiskFull
            Naming the file, the folder and how much was needed.
        """
        if self._fd is None:
            return
        size = os.fstat(self._fd).st_size
        end = size + int(n)
        if end <= self._end:
            return
        if self._fallocate is not None:
            start = max(0, size - int(n))  # also fill holes the library left near the end
            if self._fallocate(self._fd, _FALLOC_KEEP_SIZE, start, end - start) == 0:
                self._end = end
                return
            err = ctypes.get_errno()
            if err in _NO_SPACE:
                raise self._full(end - size)
            self._fallocate = None  # unsupported here: check the free space instead
        free = free_bytes(self.path.parent)
        if free is not None and free < n:
            raise self._full(n, free)

    def _full(self, need: int, free: int | None = None) -> DiskFull:
        free = free_bytes(self.path.parent) if free is None else free
        have = f", {human_bytes(free)} free" if free is not None else ""
        return DiskFull(f"disk full writing {self.what} in '{self.path.parent}': the next "
                        f"write needs {human_bytes(need)}{have}")

    def close(self) -> None:
        """Give back the blocks reserved past the end of the file, then close."""
        if self._fd is None:
            return
        try:
            size = os.fstat(self._fd).st_size
            if self._end > size:
                if self._fallocate is not None:  # tmpfs frees blocks past the end this way
                    self._fallocate(self._fd, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, size,
                                    self._end - size)
                os.ftruncate(self._fd, size)  # ext4 and xfs this way (same size: no data lost)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None
