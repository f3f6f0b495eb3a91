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


def _name(module, name) -> _Name:
    if not isinstance(module, str) or not isinstance(name, str):
        raise PickleError("a global name that is not text")
    role = _NAMES.get((module, name))
    if role is None:
        raise PickleError(f"refusing to load {module[:60]}.{name[:60]}: a CIFAR pickle holds "
                          f"only lists, strings, numbers and integer NumPy arrays")
    return _Name(role)


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
    if role == "encode":  # _codecs.encode(text, 'latin1'): protocol 2's bytes
        if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1",
                                                                              "latin-1"):
            raise PickleError("_codecs.encode used other than as encode(text, 'latin1')")
        try:
            return args[0].encode("latin-1")
        except UnicodeEncodeError:
            raise PickleError("_codecs.encode of text that is not latin-1") from None
    if role == "dtype":
        if not args or not isinstance(args[0], str) or args[0] not in ALLOWED_DTYPES:
            shown = repr(args[0])[:40] if args else "nothing"
            raise PickleError(f"refusing NumPy dtype {shown}: only integer arrays "
                              f"({', '.join(sorted(ALLOWED_DTYPES))}) are accepted")
        return _Dtype(args[0])
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
        if (not isinstance(state, tuple) or len(state) not in (8, 9)
                or state[1] not in ("<", ">", "|", "=")
                or any(s is not None for s in state[2:5])):
            raise PickleError("a NumPy dtype state other than a plain integer dtype's")
        if state[1] in "<>" and obj.dtype.itemsize > 1:
            obj.dtype = obj.dtype.newbyteorder(state[1])
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


class _Reader:
    def __init__(self, data):
        self.buf = data if isinstance(data, bytes) else bytes(data)
        self.data = memoryview(self.buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or n > len(self.data) - self.pos:
            raise PickleError(f"the pickle ends early (it declares {n} more bytes at offset "
                              f"{self.pos}, {len(self.data) - self.pos} remain)")
        out = self.data[self.pos:self.pos + n]
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
    r = _Reader(data)
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list:
        if not marks:
            raise PickleError("a MARK is missing")
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    def pop():
        if not stack or (marks and len(stack) <= marks[-1]):
            raise PickleError("the pickle's stack is empty where a value was expected")
        return stack.pop()

    def top():
        if not stack:
            raise PickleError("the pickle's stack is empty where a value was expected")
        return stack[-1]

    def put(index: int) -> None:
        memo[index] = top()

    def get(index: int):
        if index not in memo:
            raise PickleError(f"a memo reference {index} to nothing")
        stack.append(memo[index])

    def text(raw) -> str:
        try:
            return str(raw, "utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise PickleError("a string that is not UTF-8") from None

    for _ in range(MAX_OPCODES):
        if r.pos >= len(r.data):
            raise PickleError("the pickle ends without its STOP opcode (truncated?)")
        op = r.data[r.pos]
        r.pos += 1
        c = chr(op)
        if c == "\x80":  # PROTO
            if r.uint(1) > 5:
                raise PickleError("a pickle protocol above 5")
        elif c == "\x95":  # FRAME: only a hint for buffering
            if r.uint(8) > len(r.data) - r.pos:
                raise PickleError("a frame longer than the pickle")
        elif c == ".":  # STOP
            return _finish(pop())
        elif c == "(":
            marks.append(len(stack))
        elif c == "0":
            pop()
        elif c == "1":
            pop_mark()
        elif c == "2":
            stack.append(top())
        elif c == "N":
            stack.append(None)
        elif c == "\x88":
            stack.append(True)
        elif c == "\x89":
            stack.append(False)
        elif c == "I":  # INT (text); "00"/"01" are False/True
            line = r.line()
            stack.append(line == b"01" if line in (b"00", b"01") else _text_int(line))
        elif c == "J":
            stack.append(struct.unpack("<i", r.take(4))[0])
        elif c == "K":
            stack.append(r.uint(1))
        elif c == "M":
            stack.append(r.uint(2))
        elif c == "L":
            stack.append(_text_int(r.line()))
        elif c in "\x8a\x8b":  # LONG1, LONG4
            n = r.uint(1 if c == "\x8a" else 4)
            if n > 256:
                raise PickleError("an integer of more than 256 bytes")
            stack.append(int.from_bytes(r.take(n), "little", signed=True))
        elif c == "F":
            try:
                stack.append(float(r.line()))
            except ValueError:
                raise PickleError("a malformed float") from None
        elif c == "G":
            stack.append(struct.unpack(">d", r.take(8))[0])
        elif c == "S":  # STRING (protocol 0): a Python 2 str -> bytes
            stack.append(_quoted(r.line()))
        elif c in "TU":  # BINSTRING, SHORT_BINSTRING -> bytes (encoding="bytes")
            stack.append(bytes(r.take(r.uint(4 if c == "T" else 1))))
        elif c in "BC\x8e":  # BINBYTES, SHORT_BINBYTES, BINBYTES8
            stack.append(bytes(r.take(r.uint({"B": 4, "C": 1, "\x8e": 8}[c]))))
        elif c == "\x96":  # BYTEARRAY8 (protocol 5 in-band buffer)
            stack.append(bytearray(r.take(r.uint(8))))
        elif c == "V":  # UNICODE (protocol 0)
            try:
                stack.append(r.line().decode("raw-unicode-escape"))
            except UnicodeDecodeError:
                raise PickleError("a malformed unicode string") from None
        elif c in "X\x8c\x8d":  # BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
            stack.append(text(r.take(r.uint({"X": 4, "\x8c": 1, "\x8d": 8}[c]))))
        elif c == "]":
            stack.append([])
        elif c == ")":
            stack.append(())
        elif c == "}":
            stack.append({})
        elif c == "l":
            stack.append([_finish(x) for x in pop_mark()])
        elif c == "t":
            stack.append(tuple(pop_mark()))
        elif c in "\x85\x86\x87":  # TUPLE1..3
            n = ord(c) - 0x84
            items = [pop() for _ in range(n)][::-1]
            stack.append(tuple(items))
        elif c == "d":
            items = pop_mark()
            if len(items) % 2:
                raise PickleError("a dict with a key but no value")
            stack.append({_hashable(items[i]): _finish(items[i + 1])
                          for i in range(0, len(items), 2)})
        elif c == "a":
            value = _finish(pop())
            target = top()
            if not isinstance(target, list):
                raise PickleError("APPEND to something that is not a list")
            target.append(value)
        elif c == "e":
            items = pop_mark()
            target = top()
            if not isinstance(target, list):
                raise PickleError("APPENDS to something that is not a list")
            target.extend(_finish(x) for x in items)
        elif c == "s":
            value, key = _finish(pop()), pop()
            target = top()
            if not isinstance(target, dict):
                raise PickleError("SETITEM on something that is not a dict")
            target[_hashable(key)] = value
        elif c == "u":
            items = pop_mark()
            target = top()
            if not isinstance(target, dict) or len(items) % 2:
                raise PickleError("SETITEMS on something that is not a dict")
            for i in range(0, len(items), 2):
                target[_hashable(items[i])] = _finish(items[i + 1])
        elif c == "p":
            put(_text_int(r.line()))
        elif c == "q":
            put(r.uint(1))
        elif c == "r":
            put(r.uint(4))
        elif c == "\x94":  # MEMOIZE
            put(len(memo))
        elif c == "g":
            get(_text_int(r.line()))
        elif c == "h":
            get(r.uint(1))
        elif c == "j":
            get(r.uint(4))
        elif c == "c":  # GLOBAL 'module\nname\n'
            module = r.line().decode("ascii", "replace")
            stack.append(_name(module, r.line().decode("ascii", "replace")))
        elif c == "\x93":  # STACK_GLOBAL
            name = pop()
            stack.append(_name(pop(), name))
        elif c == "R":
            args = pop()
            stack.append(_reduce(pop(), args))
        elif c == "b":
            state = pop()
            _build(top(), state)
        else:
            raise PickleError(f"unsupported pickle opcode {bytes([op])!r} at offset "
                              f"{r.pos - 1}")
    raise PickleError(f"more than {MAX_OPCODES:,} opcodes: not a CIFAR batch")
