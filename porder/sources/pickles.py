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
* Five names, each replaced by a small builder of our own, never imported:
  ``numpy.dtype(name, ...)`` for the integer dtypes only (``i1 .. i8``,
  ``u1 .. u8``, any byte order; never object, void, string or structured
  dtypes), ``numpy[._]core.multiarray._reconstruct`` + ``BUILD`` (how NumPy
  pickles an array up to protocol 4: the array is made from the raw bytes of
  its state after checking that shape x itemsize is their length),
  ``numpy[._]core.numeric._frombuffer`` (protocol 5, same check),
  ``numpy[._]core.multiarray.scalar`` (an integer scalar) and
  ``_codecs.encode(text, 'latin1')`` (how protocol 2 stores bytes in Python 3).

Anything else is refused with :class:`PickleError`. Memory is bounded by the
input: every length is checked against the bytes that remain before anything
is read, an array is a view of bytes already in the file, and the declared
shape of ``_reconstruct`` is never allocated.
"""
from __future__ import annotations

import codecs
import math
import struct

import numpy as np

__all__ = ["PickleError", "load_cifar_pickle"]

# The integer dtypes an array or scalar may have (``numpy.dtype(name)`` names).
ALLOWED_DTYPES = frozenset({"i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"})
MAX_DIMS = 32
# Opcodes read at most. Each makes at most one small object (under ~100 bytes), so
# this bounds memory beyond the input itself; CIFAR-100's `train` needs about 250,000.
MAX_OPCODES = 2_000_000


class PickleError(ValueError):
    """A pickle that is not plain CIFAR data: malformed, truncated, or naming something else."""


class _Name:
    """A name from GLOBAL / STACK_GLOBAL that is one of ours (never imported)."""

    def __init__(self, role: str):
        self.role = role


class _Dtype:
    """``numpy.dtype(name)`` of an allowed integer dtype; BUILD may set its byte order."""

    def __init__(self, name: str):
        self.dtype = np.dtype(name)


class _Array:
    """``_reconstruct(ndarray, ...)``: an array whose content comes with BUILD."""

    def __init__(self):
        self.array: np.ndarray | None = None


_NAMES = {}
for _core in ("numpy.core", "numpy._core"):
    _NAMES[(f"{_core}.multiarray", "_reconstruct")] = "reconstruct"
    _NAMES[(f"{_core}.multiarray", "scalar")] = "scalar"
    _NAMES[(f"{_core}.numeric", "_frombuffer")] = "frombuffer"
_NAMES[("numpy", "ndarray")] = "ndarray"
_NAMES[("numpy", "dtype")] = "dtype"
_NAMES[("_codecs", "encode")] = "encode"
_NAMES[("__builtin__", "bytes")] = _NAMES[("builtins", "bytes")] = "bytes"  # bytes() = b""


def _name(module, name) -> _Name:
    if not isinstance(module, str) or not isinstance(name, str):
        raise PickleError("a global name that is not text")
    role = _NAMES.get((module, name))
    if role is None:
        raise PickleError(f"refusing to load {module[:60]}.{name[:60]}: a CIFAR pickle holds "
                          f"only lists, strings, numbers and integer NumPy arrays")
    return _Name(role)


def _ascii(x) -> str | None:
    """Text given as str (Python 3) or bytes (Python 2 str), or None."""
    if isinstance(x, bytes):
        return x.decode("ascii", "replace")
    return x if isinstance(x, str) else None


def _dtype_of(obj) -> np.dtype:
    if not isinstance(obj, _Dtype):
        raise PickleError("an array or scalar whose dtype is not a numpy.dtype")
    return obj.dtype


def _array_from(raw, dtype: np.dtype, shape, fortran: bool) -> np.ndarray:
    """The array of ``shape`` over ``raw`` (bytes-like), after checking their sizes agree."""
    if not isinstance(shape, tuple) or len(shape) > MAX_DIMS or not all(
            type(d) is int and d >= 0 for d in shape):
        raise PickleError(f"an array shape that is not a tuple of at most {MAX_DIMS} "
                          f"non-negative integers")
    if not isinstance(raw, (bytes, bytearray)):
        raise PickleError("array data that is not bytes")
    need = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if need != len(raw):
        raise PickleError(f"an array of shape {shape} and dtype {dtype} needs {need} bytes, "
                          f"the pickle holds {len(raw)}")
    flat = np.frombuffer(bytes(raw) if isinstance(raw, bytearray) else raw, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C")


def _reduce(func, args):
    """Apply one of our builders (REDUCE)."""
    if not isinstance(func, _Name) or not isinstance(args, tuple):
        raise PickleError("REDUCE of something that is not an allowed NumPy builder")
    role = func.role
    if role == "bytes":  # protocols 0-2 write b"" as bytes()
        if args:
            raise PickleError("bytes() called with arguments")
        return b""
    if role == "encode":  # _codecs.encode(text, 'latin1'): protocol 2's bytes
        if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1",
                                                                              "latin-1"):
            raise PickleError("_codecs.encode used other than as encode(text, 'latin1')")
        try:
            return args[0].encode("latin-1")
        except UnicodeEncodeError:
            raise PickleError("_codecs.encode of text that is not latin-1") from None
    if role == "dtype":  # the name is bytes in Python 2 files
        name = _ascii(args[0]) if args else None
        if name not in ALLOWED_DTYPES:
            shown = repr(args[0])[:40] if args else "nothing"
            raise PickleError(f"refusing NumPy dtype {shown}: only integer arrays "
                              f"({', '.join(sorted(ALLOWED_DTYPES))}) are accepted")
        return _Dtype(name)
    if role == "reconstruct":  # _reconstruct(ndarray, shape, typecode); the shape is ignored
        if len(args) != 3 or not isinstance(args[0], _Name) or args[0].role != "ndarray":
            raise PickleError("_reconstruct of something other than numpy.ndarray")
        return _Array()
    if role == "frombuffer":  # _frombuffer(buffer, dtype, shape, order): protocol 5
        if len(args) != 4 or args[3] not in ("C", "F"):
            raise PickleError("_frombuffer with unexpected arguments")
        return _array_from(args[0], _dtype_of(args[1]), args[2], args[3] == "F")
    if role == "scalar":  # scalar(dtype, raw bytes) -> int
        if len(args) != 2 or not isinstance(args[1], bytes):
            raise PickleError("a NumPy scalar with unexpected arguments")
        dtype = _dtype_of(args[0])
        if len(args[1]) != dtype.itemsize:
            raise PickleError(f"a {dtype} scalar of {len(args[1])} bytes")
        return int(np.frombuffer(args[1], dtype=dtype)[0])
    raise PickleError(f"{role} cannot be called")


def _build(obj, state) -> None:
    """BUILD: set the state of a dtype (byte order) or of a reconstructed array."""
    if isinstance(obj, _Dtype):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        order = _ascii(state[1]) if isinstance(state, tuple) and len(state) > 1 else None
        if (not isinstance(state, tuple) or len(state) not in (8, 9)
                or order not in ("<", ">", "|", "=")
                or any(s is not None for s in state[2:5])):
            raise PickleError("a NumPy dtype state other than a plain integer dtype's")
        if order in ("<", ">") and obj.dtype.itemsize > 1:
            obj.dtype = obj.dtype.newbyteorder(order)
        return
    if isinstance(obj, _Array):
        if obj.array is not None:
            raise PickleError("an array built twice")
        # (version, shape, dtype, is_fortran, raw) or, from old NumPy, without version
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4 or type(state[2]) not in (bool, int):
            raise PickleError("an array state other than (shape, dtype, fortran, data)")
        shape, dtype, fortran, raw = state
        obj.array = _array_from(raw, _dtype_of(dtype), shape, bool(fortran))
        return
    raise PickleError("BUILD of something other than a NumPy array or dtype")


def _finish(obj):
    """Replace our builders by what they built (arrays), checking none is left unfinished."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise PickleError("an array without data")
        return obj.array
    if isinstance(obj, (_Name, _Dtype)):
        raise PickleError("a NumPy name or dtype where data was expected")
    return obj


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

    def op_mark(self):
        self.marks.append(len(self.stack))

    def op_pop(self):
        self.pop()

    def op_pop_mark(self):
        self.pop_mark()

    def op_dup(self):
        self.push(self.top())

    def op_int(self):  # text; "00"/"01" are False/True
        line = self.line()
        self.push(line == b"01" if line in (b"00", b"01") else _text_int(line))

    def op_binint(self):
        self.push(struct.unpack("<i", self.take(4))[0])

    def op_binint1(self):
        self.push(self.uint(1))

    def op_binint2(self):
        self.push(self.uint(2))

    def op_long(self):
        self.push(_text_int(self.line()))

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

    def op_binfloat(self):
        self.push(struct.unpack(">d", self.take(8))[0])

    def op_string(self):  # protocol 0: a Python 2 str -> bytes
        self.push(_quoted(self.line()))

    def _bytes(self, width: int):  # BINSTRING & co: Python 2 str -> bytes (encoding="bytes")
        self.push(bytes(self.take(self.uint(width))))

    def op_bytearray8(self):  # protocol 5 in-band buffer
        self.push(bytearray(self.take(self.uint(8))))

    def op_unicode(self):  # protocol 0
        try:
            self.push(self.line().decode("raw-unicode-escape"))
        except UnicodeDecodeError:
            raise PickleError("a malformed unicode string") from None

    def _unicode(self, width: int):
        self.push(_utf8(self.take(self.uint(width))))

    def op_list(self):
        self.push([_finish(x) for x in self.pop_mark()])

    def op_tuple(self):
        self.push(tuple(self.pop_mark()))

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
        self.push({_hashable(items[i]): _finish(items[i + 1]) for i in range(0, len(items), 2)})

    def op_append(self):
        value = _finish(self.pop())
        target = self.top()
        if not isinstance(target, list):
            raise PickleError("APPEND to something that is not a list")
        target.append(value)

    def op_appends(self):
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, list):
            raise PickleError("APPENDS to something that is not a list")
        target.extend(_finish(x) for x in items)

    def op_setitem(self):
        value, key = _finish(self.pop()), self.pop()
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
            target[_hashable(items[i])] = _finish(items[i + 1])

    def op_memoize(self):
        self.put(len(self.memo))

    def op_global(self):  # 'module\nname\n'
        module = self.line().decode("ascii", "replace")
        self.push(_name(module, self.line().decode("ascii", "replace")))

    def op_stack_global(self):
        name = self.pop()
        self.push(_name(self.pop(), name))

    def op_reduce(self):
        args = self.pop()
        self.push(_reduce(self.pop(), args))

    def op_build(self):
        state = self.pop()
        _build(self.top(), state)

    def run(self):
        ops = _OPCODES
        buf = self.buf
        for _ in range(MAX_OPCODES):
            if self.pos >= len(buf):
                raise PickleError("the pickle ends without its STOP opcode (truncated?)")
            op = buf[self.pos]
            self.pos += 1
            if op == 0x2E:  # STOP
                return _finish(self.pop())
            handler = ops.get(op)
            if handler is None:
                raise PickleError(f"unsupported pickle opcode {bytes([op])!r} at offset "
                                  f"{self.pos - 1}")
            handler(self)
        raise PickleError(f"more than {MAX_OPCODES:,} opcodes: not a CIFAR batch")


_M = _Machine
_OPCODES = {ord(code): handler for code, handler in {
    "\x80": _M.op_proto, "\x95": _M.op_frame, "(": _M.op_mark, "0": _M.op_pop,
    "1": _M.op_pop_mark, "2": _M.op_dup,
    "N": lambda m: m.push(None), "\x88": lambda m: m.push(True),
    "\x89": lambda m: m.push(False),
    "I": _M.op_int, "J": _M.op_binint, "K": _M.op_binint1, "M": _M.op_binint2,
    "L": _M.op_long, "\x8a": lambda m: m._long(1), "\x8b": lambda m: m._long(4),
    "F": _M.op_float, "G": _M.op_binfloat,
    "S": _M.op_string, "T": lambda m: m._bytes(4), "U": lambda m: m._bytes(1),
    "B": lambda m: m._bytes(4), "C": lambda m: m._bytes(1), "\x8e": lambda m: m._bytes(8),
    "\x96": _M.op_bytearray8,
    "V": _M.op_unicode, "X": lambda m: m._unicode(4), "\x8c": lambda m: m._unicode(1),
    "\x8d": lambda m: m._unicode(8),
    "]": lambda m: m.push([]), ")": lambda m: m.push(()), "}": lambda m: m.push({}),
    "l": _M.op_list, "t": _M.op_tuple, "\x85": lambda m: m._tuple(1),
    "\x86": lambda m: m._tuple(2), "\x87": lambda m: m._tuple(3), "d": _M.op_dict,
    "a": _M.op_append, "e": _M.op_appends, "s": _M.op_setitem, "u": _M.op_setitems,
    "p": lambda m: m.put(_text_int(m.line())), "q": lambda m: m.put(m.uint(1)),
    "r": lambda m: m.put(m.uint(4)), "\x94": _M.op_memoize,
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
