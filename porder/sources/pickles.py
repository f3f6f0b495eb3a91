"""A pickle reader for CIFAR batches that interprets the opcodes itself.

The CIFAR *python* files are pickles of dicts holding strings, lists of
integers and one NumPy array. :func:`load_cifar_pickle` reads exactly that, and
nothing else, without :mod:`pickle`'s general machinery: no class is imported
and no object is built by a function the file names.

What is understood
------------------
* Every opcode of protocols 0-5 that builds plain data: ``None``, booleans,
  integers, floats, ``str``, ``bytes`` (Python 2 ``str`` becomes ``bytes``, as
  ``pickle.load(..., encoding="bytes")`` does), lists, tuples, dicts (keys must
  be ``str``, ``bytes`` or ``int``), the memo, marks.
* The few names NumPy's own pickles use (``numpy.dtype``, ``_reconstruct``,
  ``_frombuffer``, ``scalar``) and ``_codecs.encode``, each replaced by a small
  builder of porder's own, never imported, that makes integer arrays only
  (:mod:`.pickle_numpy` says exactly what each accepts).

Anything else is refused with :class:`PickleError`. Memory is bounded by the
input: every length is checked against the bytes that remain before anything
is read, an array is a view of bytes already in the file, and the declared
shape of ``_reconstruct`` is never allocated.
"""
from __future__ import annotations

import codecs
import struct

from .pickle_numpy import PickleError, build, find_global, finish, reduce

__all__ = ["PickleError", "load_cifar_pickle"]

# Opcodes read at most. Each makes at most one small object (under ~100 bytes), so
# this bounds memory beyond the input itself; CIFAR-100's `train` needs about 250,000.
MAX_OPCODES = 2_000_000


def _hashable(key):
    if not isinstance(key, (str, bytes, int)):
        raise PickleError(f"a dict key of type {type(key).__name__}; CIFAR keys are strings")
    return key


def _text_int(line: bytes) -> int:
    text = line.rstrip(b"L").decode("ascii", "replace")
    if len(text) > 400:
        raise PickleError("an integer of more than 400 digits")
    try:
        return int(text, 10)
    except ValueError:
        raise PickleError(f"a malformed integer {text[:40]!r}") from None


def _quoted(line: bytes) -> bytes:
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        raise PickleError("a malformed quoted string")
    try:
        return codecs.escape_decode(line[1:-1])[0]
    except ValueError:
        raise PickleError("a malformed quoted string") from None


def _utf8(raw) -> str:
    try:
        return str(raw, "utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise PickleError("a string that is not UTF-8") from None


class _Machine:
    """The pickle virtual machine, restricted to plain data (one method per opcode)."""

    def __init__(self, data):
        self.buf = data if isinstance(data, bytes) else bytes(data)
        self.view = memoryview(self.buf)
        self.pos = 0
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    # -- reading the input --------------------------------------------------

    def take(self, n: int) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise PickleError(f"the pickle ends early (it declares {n} more bytes at offset "
                              f"{self.pos}, {len(self.buf) - self.pos} remain)")
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def line(self) -> bytes:
        end = self.buf.find(b"\n", self.pos)
        if end < 0:
            raise PickleError(f"a text field without an end of line at offset {self.pos}")
        out = self.buf[self.pos:end]
        self.pos = end + 1
        return out

    # -- the stack -----------------------------------------------------------

    def pop(self):
        stack = self.stack
        if not stack or (self.marks and len(stack) <= self.marks[-1]):
            raise PickleError("the pickle's stack is empty where a value was expected")
        return stack.pop()

    def top(self):
        if not self.stack:
            raise PickleError("the pickle's stack is empty where a value was expected")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.marks:
            raise PickleError("a MARK is missing")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def push(self, value) -> None:
        self.stack.append(value)

    def put(self, index: int) -> None:
        self.memo[index] = self.top()

    def get(self, index: int) -> None:
        if index not in self.memo:
            raise PickleError(f"a memo reference {index} to nothing")
        self.stack.append(self.memo[index])

    # -- opcodes ---------------------------------------------------------------

    def op_proto(self):
        if self.uint(1) > 5:
            raise PickleError("a pickle protocol above 5")

    def op_frame(self):  # only a hint for buffering
        if self.uint(8) > len(self.buf) - self.pos:
            raise PickleError("a frame longer than the pickle")

    def op_int(self):  # text; "00"/"01" are False/True
        line = self.line()
        self.push(line == b"01" if line in (b"00", b"01") else _text_int(line))

    def _long(self, width: int):
        n = self.uint(width)
        if n > 256:
            raise PickleError("an integer of more than 256 bytes")
        self.push(int.from_bytes(self.take(n), "little", signed=True))

    def op_float(self):
        try:
            self.push(float(self.line()))
        except ValueError:
            raise PickleError("a malformed float") from None

    def _bytes(self, width: int):  # BINSTRING & co: Python 2 str -> bytes (encoding="bytes")
        self.push(bytes(self.take(self.uint(width))))

    def op_unicode(self):  # protocol 0
        try:
            self.push(self.line().decode("raw-unicode-escape"))
        except UnicodeDecodeError:
            raise PickleError("a malformed unicode string") from None

    def _unicode(self, width: int):
        self.push(_utf8(self.take(self.uint(width))))

    def op_list(self):
        self.push([finish(x) for x in self.pop_mark()])

    def _tuple(self, n: int):
        stack = self.stack
        if len(stack) - n < (self.marks[-1] if self.marks else 0):
            raise PickleError("the pickle's stack is empty where a value was expected")
        items = tuple(stack[-n:])
        del stack[-n:]
        stack.append(items)

    def op_dict(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise PickleError("a dict with a key but no value")
        self.push({_hashable(items[i]): finish(items[i + 1]) for i in range(0, len(items), 2)})

    def op_append(self):
        value = finish(self.pop())
        target = self.top()
        if not isinstance(target, list):
            raise PickleError("APPEND to something that is not a list")
        target.append(value)

    def op_appends(self):
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, list):
            raise PickleError("APPENDS to something that is not a list")
        target.extend(finish(x) for x in items)

    def op_setitem(self):
        value, key = finish(self.pop()), self.pop()
        target = self.top()
        if not isinstance(target, dict):
            raise PickleError("SETITEM on something that is not a dict")
        target[_hashable(key)] = value

    def op_setitems(self):
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, dict) or len(items) % 2:
            raise PickleError("SETITEMS on something that is not a dict")
        for i in range(0, len(items), 2):
            target[_hashable(items[i])] = finish(items[i + 1])

    def op_global(self):  # 'module\nname\n'
        module = self.line().decode("ascii", "replace")
        self.push(find_global(module, self.line().decode("ascii", "replace")))

    def op_stack_global(self):
        name = self.pop()
        self.push(find_global(self.pop(), name))

    def op_reduce(self):
        args = self.pop()
        self.push(reduce(self.pop(), args))

    def op_build(self):
        state = self.pop()
        build(self.top(), state)

    def run(self):
        ops = _OPCODES
        buf = self.buf
        for _ in range(MAX_OPCODES):
            if self.pos >= len(buf):
                raise PickleError("the pickle ends without its STOP opcode (truncated?)")
            op = buf[self.pos]
            self.pos += 1
            if op == 0x2E:  # STOP
                return finish(self.pop())
            handler = ops.get(op)
            if handler is None:
                raise PickleError(f"unsupported pickle opcode {bytes([op])!r} at offset "
                                  f"{self.pos - 1}")
            handler(self)
        raise PickleError(f"more than {MAX_OPCODES:,} opcodes: not a CIFAR batch")


_M = _Machine
_OPCODES = {ord(code): handler for code, handler in {
    "\x80": _M.op_proto, "\x95": _M.op_frame,
    "(": lambda m: m.marks.append(len(m.stack)), "0": _M.pop, "1": _M.pop_mark,
    "2": lambda m: m.push(m.top()),
    "N": lambda m: m.push(None), "\x88": lambda m: m.push(True),
    "\x89": lambda m: m.push(False),
    "I": _M.op_int, "J": lambda m: m.push(struct.unpack("<i", m.take(4))[0]),
    "K": lambda m: m.push(m.uint(1)), "M": lambda m: m.push(m.uint(2)),
    "L": lambda m: m.push(_text_int(m.line())), "\x8a": lambda m: m._long(1),
    "\x8b": lambda m: m._long(4),
    "F": _M.op_float, "G": lambda m: m.push(struct.unpack(">d", m.take(8))[0]),
    "S": lambda m: m.push(_quoted(m.line())),  # protocol 0: a Python 2 str -> bytes
    "T": lambda m: m._bytes(4), "U": lambda m: m._bytes(1),
    "B": lambda m: m._bytes(4), "C": lambda m: m._bytes(1), "\x8e": lambda m: m._bytes(8),
    "\x96": lambda m: m.push(bytearray(m.take(m.uint(8)))),  # protocol 5 in-band buffer
    "V": _M.op_unicode, "X": lambda m: m._unicode(4), "\x8c": lambda m: m._unicode(1),
    "\x8d": lambda m: m._unicode(8),
    "]": lambda m: m.push([]), ")": lambda m: m.push(()), "}": lambda m: m.push({}),
    "l": _M.op_list, "t": lambda m: m.push(tuple(m.pop_mark())),
    "\x85": lambda m: m._tuple(1), "\x86": lambda m: m._tuple(2),
    "\x87": lambda m: m._tuple(3), "d": _M.op_dict,
    "a": _M.op_append, "e": _M.op_appends, "s": _M.op_setitem, "u": _M.op_setitems,
    "p": lambda m: m.put(_text_int(m.line())), "q": lambda m: m.put(m.uint(1)),
    "r": lambda m: m.put(m.uint(4)), "\x94": lambda m: m.put(len(m.memo)),
    "g": lambda m: m.get(_text_int(m.line())), "h": lambda m: m.get(m.uint(1)),
    "j": lambda m: m.get(m.uint(4)),
    "c": _M.op_global, "\x93": _M.op_stack_global, "R": _M.op_reduce, "b": _M.op_build,
}.items()}


def load_cifar_pickle(data) -> object:
    """Read a CIFAR pickle (bytes-like) into plain data and integer NumPy arrays.

    Parameters
    ----------
    data : bytes-like
        The whole pickle.

    Returns
    -------
    object
        Dicts, lists, tuples, str, bytes, int, float, bool, None and read-only
        integer ``numpy.ndarray`` views of ``data``.

    Raises
    ------
    PickleError
        Anything but plain data or an integer array, a truncated or malformed
        pickle; the message says what was found.
    """
    return _Machine(data).run()
