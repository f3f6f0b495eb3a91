"""The NumPy side of :mod:`.pickles`: the five names a CIFAR pickle may use, each replaced
by a small builder of porder's own (nothing is imported from the names a file gives).

* ``numpy.dtype(name, ...)``: the integer dtypes only (:data:`ALLOWED_DTYPES`, any
  byte order; never object, void, string, datetime or structured dtypes). Its
  BUILD state may set the byte order and nothing else; flags are ignored.
* ``numpy[._]core.multiarray._reconstruct(ndarray, shape, typecode)`` + BUILD
  ``(version, shape, dtype, fortran, raw)``: how NumPy pickles an array up to
  protocol 4. The first shape is ignored (never allocated); the array is a view
  of ``raw`` after checking that shape x itemsize is its length.
* ``numpy[._]core.numeric._frombuffer(buffer, dtype, shape, order)``: protocol 5,
  the same check.
* ``numpy[._]core.multiarray.scalar(dtype, raw)``: an integer scalar.
* ``_codecs.encode(text, 'latin1')``: how protocol 2 stores bytes in Python 3, and
  ``bytes()`` (protocols 0-2 for ``b""``).
"""
from __future__ import annotations

import math

import numpy as np

# The integer dtypes an array or scalar may have (``numpy.dtype(name)`` names).
ALLOWED_DTYPES = frozenset({"i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"})
MAX_DIMS = 32


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


def find_global(module, name) -> _Name:
    """GLOBAL / STACK_GLOBAL: one of our builders for an allowed name; PickleError for any other."""
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


def reduce(func, args):
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


def build(obj, state) -> None:
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


def finish(obj):
    """Replace our builders by what they built (arrays), checking none is left unfinished."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise PickleError("an array without data")
        return obj.array
    if isinstance(obj, (_Name, _Dtype)):
        raise PickleError("a NumPy name or dtype where data was expected")
    return obj
