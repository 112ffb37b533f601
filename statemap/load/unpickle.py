"""An allowlist unpickler: reads torch / numpy / fairseq pickles without running their code.

A pickle is a program; ``pickle.load`` runs whatever callables it names. This unpickler
never imports a module named by the file and never calls anything the file names. Every
call a pickle makes (``REDUCE``, ``NEWOBJ``, ``INST``, ``OBJ``, ``BUILD``) goes through one
gate, :meth:`SafeUnpickler._call`, which only runs statemap's own constructors of inert data:

* torch tensors become :class:`TensorRef` (where the bytes are: storage key, dtype,
  offset, shape, stride); torch itself is not imported;
* containers and scalars (``dict``, ``OrderedDict``, ``list``, ``set``, ``slice`` ...) load,
  with their sizes checked before anything is allocated;
* numpy arrays (any protocol, including protocol 5 in-band buffers) are rebuilt from their
  raw bytes by statemap's own code; string / object / structured arrays are kept as data;
* any other class (``argparse.Namespace``, omegaconf ``DictConfig``, ``functools.partial``,
  ``pathlib.PosixPath``, ``io.BytesIO``, ``datetime``, enums, ...) becomes an :class:`Opaque`
  placeholder that records its name, arguments and state; :func:`to_plain` turns those into
  plain data;
* names that can only mean code execution (``os.system``, ``builtins.eval``, ``subprocess``,
  ``importlib``, ...) are refused with :class:`UnsafeCheckpointError`, naming the file, the
  object path inside it and the name.

Python 2 names (protocols 0-2: ``__builtin__.long``, ``copy_reg._reconstructor``,
``exceptions.ValueError``) are mapped exactly as Python's ``_compat_pickle`` maps them, before
the allowlist decides. Every resource a pickle can claim is bounded (the ``MAX_*`` constants
below; docs/security.md lists them).
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import math
import os
import pickle
import struct
from dataclasses import dataclass
from types import FunctionType
from typing import TYPE_CHECKING, Any, ClassVar

from ..dtypes import TORCH_NAMES
from ..dtypes import dtype as lookup_dtype
from ..errors import CheckpointError, StatemapError, UnsafeCheckpointError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Opaque", "StorageRef", "TensorRef", "safe_load", "to_plain", "finish", "opaque_type"]

# -- bounds (docs/security.md, "Bounds") ---------------------------------------------------------
MAX_OPS = 20_000_000  # opcodes run per pickle: bounds time, memo entries, container items
MAX_DEPTH = 200  # nesting depth of the object graph
MAX_EXPANDED = 10_000_000  # nodes of the object graph walked as a tree (shared containers counted per use)
MAX_LINE = 1 << 20  # one text line of a protocol-0 opcode
MAX_INT_BYTES = 1024  # one LONG1/LONG4 integer (stays printable: < 4300 digits)
MAX_RANGE = 1_000_000  # len(range(...)) a pickle may build, and items a constructor may expand from it
MAX_ZERO_BYTES = 16 << 20  # bytes(n) / bytearray(n) from an integer
MAX_NDIM = 64  # tensor / array dimensions
MAX_DIM = 1 << 62  # one size, stride or offset; and the element count of a tensor
MAX_VIEW_BYTES = 1 << 30  # bytes a broadcast (stride-0 / overlapping) view may expand to beyond its storage
MAX_SHOWN = 60  # characters of a file-controlled value shown in a message

# torch storage class name -> dtype (legacy typed storages are how torch pickles dtypes)
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
    "Float8_e4m3fnStorage": "float8_e4m3fn",
    "Float8_e5m2Storage": "float8_e5m2",
    "UInt16Storage": "uint16",
    "UInt32Storage": "uint32",
    "UInt64Storage": "uint64",
}
TORCH_DTYPES = TORCH_NAMES

# Modules and builtins whose only use in a pickle is to run code: refused outright
# (the harmless classes of HARMLESS below are the only exceptions).
DENY_MODULES = (
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "importlib",
    "runpy",
    "shutil",
    "socket",
    "pickle",
    "_pickle",
    "marshal",
    "types",
    "ctypes",
    "code",
    "codeop",
    "pty",
    "webbrowser",
    "multiprocessing",
    "threading",
    "asyncio",
    "signal",
    "tempfile",
    "pathlib",
    "io",
    "_io",
    "operator",
    "functools",
    "inspect",
    "pydoc",
    "commands",
    "popen2",
    "platform",
    "urllib",
    "http",
    "ftplib",
    "smtplib",
    "telnetlib",
    "requests",
    "cloudpickle",
    "dill",
    "joblib",
    "numpy.testing",
    "numpy.f2py",
    "numpy.distutils",
    "torch._dynamo",
    "torch.hub",
    "torch.jit",
    "torch.ops",
    "torch.utils.cpp_extension",
    "torch._ops",
)
DENY_BUILTINS = {
    "eval",
    "exec",
    "compile",
    "open",
    "__import__",
    "getattr",
    "setattr",
    "delattr",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
    "exit",
    "quit",
    "help",
    "memoryview",
    "print",
    "type",
    "super",
    "classmethod",
    "staticmethod",
    "property",
    "apply",
    "execfile",
    "file",
    "reload",
    "dir",
    "callable",
    "iter",
    "next",
    "map",
    "filter",
    "zip",
}
SAFE_BUILTINS = {
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "int": int,
    "float": float,
    "complex": complex,
    "bool": bool,
    "str": str,
    "bytes": bytes,
    "bytearray": bytearray,
    "slice": slice,
    "range": range,
}
# Known-harmless classes of otherwise refused modules: kept as inert placeholders (never imported,
# never called). Exact names only: a dotted protocol-4 name (``pathlib.Path.write_text``) is refused.
HARMLESS = {
    ("functools", "partial"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("io", "BytesIO"),
    ("_io", "BytesIO"),
    ("types", "SimpleNamespace"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"),
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
    # enums and records of network / process modules, as they appear in configs
    ("http", "HTTPStatus"),
    ("http", "HTTPMethod"),
    ("signal", "Signals"),
    ("signal", "Handlers"),
    ("socket", "AddressFamily"),
    ("socket", "SocketKind"),
    ("urllib.parse", "ParseResult"),
    ("urllib.parse", "SplitResult"),
}


@dataclass(frozen=True)
class StorageRef:
    """A torch storage named by a pickle: which bytes, read later (never here)."""

    key: str
    dtype: str
    numel: int
    location: str = "cpu"


@dataclass(frozen=True)
class TensorRef:
    """A tensor found in a pickle: a view of a storage. Immutable: a pickle ``BUILD`` on it is refused."""

    storage: StorageRef
    offset: int  # in elements of the storage dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    dtype: str = ""  # element type; differs from the storage's for _rebuild_tensor_v3 (byte storages)
    quantizer: tuple[
        Any, ...
    ] = ()  # quantized tensors: (qscheme, scale(s), zero point(s)[, axis]); values are the int representation

    @property
    def element_dtype(self) -> str:
        return self.dtype or self.storage.dtype


class Opaque:
    """An object of a class statemap does not import. Inert: it records, it never runs.

    Fields: ``_module`` / ``_name`` (the class, as the file names it; ``qualname`` joins them),
    ``args`` / ``kwargs`` (constructor arguments), ``state`` (what ``BUILD`` gave), ``items``
    (``SETITEM`` s) and ``list`` (``APPEND`` s)."""

    _module = "?"
    _name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, list=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["list"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["list"].extend(values)

    def add(self, value: Any) -> None:  # ADDITEMS on a set subclass
        self.__dict__["list"].append(value)

    def __reduce__(self) -> Any:
        raise TypeError("statemap placeholders cannot be pickled")

    @property
    def qualname(self) -> str:
        return f"{self._module}.{self._name}"

    def __repr__(self) -> str:
        return f"<{self.qualname} (not loaded)>"


_OPAQUE_TYPES: dict[tuple[str, str], type[Opaque]] = {}


def opaque_type(module: str, name: str) -> type[Opaque]:
    """The placeholder class for ``module.name`` (one per name; never the real class)."""
    key = (module, name)
    if key not in _OPAQUE_TYPES:
        _OPAQUE_TYPES[key] = type(name.replace(".", "_") or "_", (Opaque,), {"_module": module, "_name": name})
    return _OPAQUE_TYPES[key]


class _Refused:
    """A name the file asked for that can only mean code execution. Inert; the load is refused
    once the object path to it is known (see :func:`safe_load`)."""

    def __init__(self, written: str) -> None:
        self.written = written

    def __call__(self, *args: Any, **kwargs: Any) -> _Refused:
        return self

    def __repr__(self) -> str:
        return f"<refused {self.written}>"


# -- messages: never repr a huge object, never show an internal class name ----------------------


def short(obj: Any) -> str:
    """A bounded, user-facing description of a value that came from a file."""
    if isinstance(obj, (str, bytes, bytearray)):
        head = obj[:MAX_SHOWN]
        return repr(head if isinstance(head, (str, bytes)) else bytes(head)) + ("..." if len(obj) > MAX_SHOWN else "")
    if isinstance(obj, bool) or obj is None or isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, int):
        return str(obj) if obj.bit_length() < 128 else f"an integer of {obj.bit_length()} bits"
    if isinstance(obj, _TorchDtype):
        return f"torch.{obj}"
    if (
        isinstance(obj, (tuple, list))
        and len(obj) <= 8
        and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in obj)
    ):
        inner = ", ".join(short(x) for x in obj)
        return f"({inner})" if isinstance(obj, tuple) else f"[{inner}]"
    if isinstance(obj, (tuple, list, dict, set, frozenset)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return _kind(obj)


def _kind(obj: Any) -> str:
    if isinstance(obj, Opaque):
        return f"a {obj.qualname} object"
    if isinstance(obj, type) and issubclass(obj, Opaque):
        return f"the class {obj._module}.{obj._name}"
    if isinstance(obj, TensorRef):
        return "a tensor"
    if isinstance(obj, StorageRef):
        return "a torch storage"
    if isinstance(obj, _StorageType):
        return f"the torch storage type of {obj.dtype}"
    if isinstance(obj, _Refused):
        return f"{obj.written!r}"
    if isinstance(obj, (_NpArray, _NpDtype)):
        return "a numpy array" if isinstance(obj, _NpArray) else "a numpy dtype"
    if isinstance(obj, type):
        return f"the type {obj.__name__}"
    if callable(obj):
        return "a constructor"
    return f"a {type(obj).__name__}"


# -- safe constructors the pickle may call --------------------------------------------------


def _as_storage(obj: Any) -> StorageRef:
    if not isinstance(obj, StorageRef):
        raise CheckpointError(f"tensor rebuild got {_kind(obj)} instead of a storage")
    return obj


def _ints(obj: Any, what: str) -> tuple[int, ...]:
    if isinstance(obj, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) for x in obj):
        return tuple(obj)
    raise CheckpointError(f"tensor {what} must be a tuple of integers, got {short(obj)}")


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *_: Any
) -> Any:
    """torch >= 2.1 writes dtypes without a typed storage (uint16, float8, ...) this way:
    a byte storage plus the element dtype; offset, size and stride count elements of that dtype."""
    st = _as_storage(storage)
    if not isinstance(dtype, _TorchDtype):
        raise CheckpointError(f"tensor rebuild names dtype {short(dtype)}, not a torch dtype")
    dt = lookup_dtype(dtype)
    if dt.value_bits:  # packed quantized values without a quantizer: not a tensor torch can use
        return opaque_type("torch._utils", "_rebuild_tensor_v3")(dt.name, size, stride)
    if st.dtype != "uint8" or st.numel % dt.itemsize:
        raise CheckpointError(f"storage of {st.numel} {st.dtype} cannot hold {dt.name} elements")
    as_elems = StorageRef(st.key, dt.name, st.numel // dt.itemsize, st.location)
    ref = _rebuild_tensor(as_elems, offset, size, stride, requires_grad)
    return TensorRef(st, ref.offset, ref.shape, ref.stride, ref.requires_grad, dt.name)


def check_view(shape: tuple[int, ...], stride: tuple[int, ...], offset: int, numel: int, itemsize: int) -> None:
    """Bounds of a tensor view of a ``numel``-element storage: ndim, sizes, reach, expansion."""
    if len(shape) > MAX_NDIM:
        raise CheckpointError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} are supported")
    if len(shape) != len(stride) or any(d < 0 for d in shape) or any(s < 0 for s in stride):
        raise CheckpointError(f"tensor size {short(shape)} and stride {short(stride)} are inconsistent")
    if any(d >= MAX_DIM for d in shape) or any(s >= MAX_DIM for s in stride) or offset >= MAX_DIM:
        raise CheckpointError("tensor size, stride or offset does not fit in 62 bits")
    count = math.prod(shape)
    if count >= MAX_DIM:
        raise CheckpointError(f"tensor of size {short(shape)} has more than 2**62 elements")
    if count:
        last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
        if last >= numel:
            raise CheckpointError(
                f"tensor of size {list(shape)} at offset {offset} reaches element {last} of a storage of {numel} elements"
            )
        extra = (count - min(count, numel)) * itemsize
        if extra > MAX_VIEW_BYTES:
            raise CheckpointError(
                f"tensor of size {list(shape)} is a broadcast view (stride {list(stride)}) of {numel} stored elements; "
                f"reading it would take {count * itemsize} bytes (limit: {MAX_VIEW_BYTES} beyond the storage)"
            )


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any) -> Any:
    st = _as_storage(storage)
    if lookup_dtype(st.dtype).value_bits:  # a quint4x2 tensor without quantizer (built by .view): not one torch can use
        return opaque_type("torch._utils", "_rebuild_tensor")(st.dtype, size, stride)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise CheckpointError(f"tensor storage offset must be a non-negative integer, got {short(offset)}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    check_view(shape, strides, offset, st.numel, lookup_dtype(st.dtype).itemsize)
    return TensorRef(st, offset, shape, strides, bool(requires_grad))


def _rebuild_qtensor(
    storage: Any, offset: Any, size: Any, stride: Any, quantizer: Any, requires_grad: Any = False, *_: Any
) -> Any:
    """A quantized tensor: its bytes are the int representation (``int_repr()``); the quantizer is recorded."""
    st = _as_storage(storage)
    if not isinstance(quantizer, tuple) or not quantizer:
        raise CheckpointError("quantized tensor without quantizer parameters")
    dt = lookup_dtype(st.dtype)
    if dt.value_bits:  # several values per byte (quint4x2): packed, one whole contiguous storage
        shape, strides = _ints(size, "size"), _ints(stride, "stride")
        if offset != 0 or strides != _c_strides(shape) or dt.nbytes(math.prod(shape)) > st.numel:
            return opaque_type("torch._utils", "_rebuild_qtensor")(st.dtype, size, stride, quantizer)
        ref = TensorRef(st, 0, shape, strides, bool(requires_grad))
    else:
        ref = _rebuild_tensor(st, offset, size, stride, requires_grad)
    scheme = quantizer[0]
    name = f"torch.{scheme._name}" if isinstance(scheme, type) and issubclass(scheme, Opaque) else short(scheme)
    return TensorRef(st, ref.offset, ref.shape, ref.stride, ref.requires_grad, "", (name, *quantizer[1:]))


def _rebuild_parameter(data: Any, requires_grad: Any = False, *_: Any) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        raise CheckpointError(f"refused to rebuild a tensor subclass through {_kind(func)}")
    if not isinstance(args, tuple):
        raise CheckpointError("tensor subclass rebuild without an argument tuple")
    return func(*args)


def _rebuild_device_tensor_from_numpy(data: Any, dtype: Any = None, device: Any = None, requires_grad: Any = False) -> Any:
    """Tensors of devices without storages (XLA, ...) are pickled as a numpy array: keep the array."""
    return data


def _torch_device(kind: Any, index: Any = None) -> str:
    if not isinstance(kind, str) or (index is not None and (not isinstance(index, int) or isinstance(index, bool))):
        raise CheckpointError(f"torch.device({short(kind)}, {short(index)}) is not a device")
    return kind[:MAX_SHOWN] if index is None else f"{kind[:MAX_SHOWN]}:{index}"


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(dims, "torch.Size")


# -- numpy --------------------------------------------------------------------------------------


class _NpArray:
    """Stand-in for ``numpy.ndarray`` during unpickling; ``__setstate__`` builds the real array."""

    def __setstate__(self, state: Any) -> None:
        self.value = _array_from_state(state)


def _np_reconstruct(subtype: Any, shape: Any = None, dtype: Any = None) -> Any:
    if isinstance(subtype, type) and issubclass(subtype, Opaque):  # an ndarray subclass (np.matrix, masked ...)
        return subtype(shape, dtype)
    return _NpArray()


def _np_dtype(spec: Any, align: Any = False, copy: Any = False) -> _NpDtype:
    if not isinstance(spec, str) or len(spec) > 16:
        raise CheckpointError(f"numpy dtype {short(spec)} is not a plain type code")
    return _NpDtype(spec)


class _NpDtype:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.order = "|"
        self.structured = False

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], str):
            self.order = state[1]
        if isinstance(state, tuple) and len(state) > 3 and state[3] is not None:
            self.structured = True

    @property
    def is_data(self) -> bool:
        """Strings, objects, records, datetimes: kept as data, never tensors."""
        return self.structured or self.spec.lstrip("<>|=").startswith(("O", "V", "U", "S", "M", "m", "a"))

    def resolve(self) -> np.dtype:
        import numpy as np

        if self.structured or self.spec.lstrip("<>|=").startswith(("O", "V")):
            raise CheckpointError(f"numpy dtype {self.spec!r} holds objects or records")
        try:
            d = np.dtype(self.spec)
        except TypeError as e:
            raise CheckpointError(f"bad numpy dtype {short(self.spec)}: {e}") from None
        return d.newbyteorder(">") if self.order == ">" else d.newbyteorder("<") if d.byteorder != "|" else d


def _np_data(dt: _NpDtype, shape: tuple[int, ...], raw: Any) -> Opaque:
    """A numpy array that is not a tensor (strings, objects, records): kept as data."""
    values: Any = None
    if isinstance(raw, list):  # object arrays pickle their items
        values = raw
    elif dt.spec.lstrip("<>|=").startswith(("U", "S")) and isinstance(raw, (bytes, bytearray)):
        arr = _np_frombytes(dt, shape, raw, "C")
        values = arr.tolist()
    obj = opaque_type("numpy", "ndarray")()
    obj.__setstate__({"dtype": dt.spec, "shape": list(shape), "values": values})
    return obj


def _np_frombytes(dt: _NpDtype, shape: tuple[int, ...], raw: Any, order: str) -> np.ndarray:
    import numpy as np

    dtype = dt.resolve()
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise CheckpointError(f"numpy array data is {_kind(raw)}, not raw bytes")
    n = math.prod(shape)
    if n * dtype.itemsize != len(raw):
        raise CheckpointError(
            f"numpy array of shape {list(shape)} {dtype} needs {n * dtype.itemsize} bytes, pickle has {len(raw)}"
        )
    arr = np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if order == "F" else "C")
    if dtype.kind in "US":
        return arr
    return np.asarray(arr.astype(dtype.newbyteorder("<") if dtype.byteorder != "|" else dtype, copy=False), order="C")


def _np_shape(shape: Any) -> tuple[int, ...]:
    dims = _ints(shape, "numpy shape")
    if len(dims) > MAX_NDIM or any(d < 0 or d >= MAX_DIM for d in dims) or math.prod(dims) >= MAX_DIM:
        raise CheckpointError(f"numpy array shape {short(dims)} is out of bounds")
    return dims


def _array_from_state(state: Any) -> Any:
    try:
        _version, shape, dt, fortran, raw = state
    except (TypeError, ValueError):
        raise CheckpointError("malformed numpy array state in pickle") from None
    if not isinstance(dt, _NpDtype):
        raise CheckpointError("numpy array without a plain dtype")
    dims = _np_shape(shape)
    if dt.is_data or isinstance(raw, list):
        return _np_data(dt, dims, raw)
    return _np_frombytes(dt, dims, raw, "F" if fortran else "C")


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> Any:
    """``numpy.core.numeric._frombuffer``: protocol 5 pickles arrays with the bytes in-band."""
    if not isinstance(dtype, _NpDtype):
        raise CheckpointError("numpy array without a plain dtype")
    dims = _np_shape(shape)
    if dtype.is_data:
        return _np_data(dtype, dims, bytes(buf) if isinstance(buf, (bytes, bytearray)) else buf)
    return _np_frombytes(dtype, dims, buf, "F" if order == "F" else "C")


def _np_scalar(dt: Any, raw: Any = b"") -> Any:
    import numpy as np

    if not isinstance(dt, _NpDtype):
        raise CheckpointError("numpy scalar without a plain dtype")
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        return opaque_type("numpy", "generic")(dt.spec, raw)
    if dt.structured or dt.spec.lstrip("<>|=").startswith(("O", "V", "M", "m")):
        return opaque_type("numpy", "generic")(dt.spec, bytes(raw))
    dtype = dt.resolve()
    if len(raw) != dtype.itemsize:
        raise CheckpointError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes, pickle has {len(raw)}")
    return np.frombuffer(bytes(raw), dtype=dtype)[0].item()


# -- other allowlisted callables --------------------------------------------------------------


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CheckpointError("refused _codecs.encode call with unexpected arguments")
    return text.encode(encoding)


def _reconstructor(cls: Any, base: Any = None, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocols 0 and 1): a placeholder of ``cls``; never the real class."""
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls()
    if cls is dict or cls is _ordered_dict:
        return collections.OrderedDict() if cls is _ordered_dict else {}
    return opaque_type("copyreg", "_reconstructor")(_as_data(cls) if callable(cls) else short(cls))


def _newobj(cls: Any, *args: Any) -> Any:
    """``copyreg.__newobj__``: a placeholder of ``cls``."""
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls(*args)
    return opaque_type("copyreg", "__newobj__")(_as_data(cls) if callable(cls) else short(cls), *args)


def _ordered_dict(*args: Any) -> collections.OrderedDict[Any, Any]:
    if len(args) > 1 or (args and not isinstance(args[0], (dict, list, tuple))):
        raise CheckpointError(f"OrderedDict built from {short(args)}")
    return collections.OrderedDict(*args)


class _Marker:
    """An inert stand-in for a name that is only ever an argument (``builtins.object``)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(f"refused to call {self.what!r}: statemap never runs code from a checkpoint")

    def __repr__(self) -> str:
        return f"<{self.what}>"


_OBJECT_BASE = _Marker("builtins.object")


class _TorchDtype(str):
    """A torch dtype named in a pickle (``torch.float32``), kept as its name."""


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def __call__(self, *args: Any) -> Any:
        raise CheckpointError("refused to construct a torch storage from pickle arguments")


_FINITE = (list, tuple, dict, set, frozenset, str, bytes, bytearray)


def _bounded_iterable(x: Any, what: str) -> None:
    if isinstance(x, range) and len(x) > MAX_RANGE:
        raise CheckpointError(f"{what} of a range of {len(x)} items (limit {MAX_RANGE})")
    if not isinstance(x, (*_FINITE, range)):
        raise CheckpointError(f"{what} of {_kind(x)}")


def _checked_builtin(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:  # noqa: C901 - one case per type
    """Builtins with their arguments checked first: nothing a pickle passes can allocate unbounded memory."""
    name = cls.__name__
    if name in ("list", "tuple", "set", "frozenset"):
        if kwargs or len(args) > 1:
            raise CheckpointError(f"{name}() with unexpected arguments")
        if args:
            _bounded_iterable(args[0], f"{name}()")
        return cls(*args)
    if name == "dict":
        if len(args) > 1:
            raise CheckpointError("dict() with unexpected arguments")
        if args and not isinstance(args[0], (dict, list, tuple)):
            raise CheckpointError(f"dict() of {_kind(args[0])}")
        return dict(*args, **kwargs)
    if name in ("bytes", "bytearray"):
        if kwargs or len(args) > 3:
            raise CheckpointError(f"{name}() with unexpected arguments")
        if args:
            x = args[0]
            if isinstance(x, int) and not 0 <= x <= MAX_ZERO_BYTES:
                raise CheckpointError(f"{name}({short(x)}) asks for more than {MAX_ZERO_BYTES} bytes")
            if not isinstance(x, int):
                _bounded_iterable(x, f"{name}()")
        return cls(*args)
    if name == "range":
        if kwargs or not all(isinstance(a, int) for a in args):
            raise CheckpointError("range() of non-integers")
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise CheckpointError(f"range of {len(r)} items (limit {MAX_RANGE})")
        return r
    if name == "str":
        if kwargs or len(args) > 3 or (args and not isinstance(args[0], (str, bytes, bytearray, int, float, bool, type(None)))):
            raise CheckpointError(f"str() of {_kind(args[0]) if args else 'unexpected arguments'}")
        return str(*args)
    if name in ("int", "float", "complex", "bool"):
        if kwargs or len(args) > 2 or not all(isinstance(a, (str, bytes, int, float, complex)) for a in args):
            raise CheckpointError(f"{name}() of unexpected arguments")
        if any(isinstance(a, (str, bytes)) and len(a) > 5000 for a in args):
            raise CheckpointError(f"{name}() of a {max(len(a) for a in args)}-character text")
        return cls(*args)
    if name == "slice":
        if kwargs or len(args) > 3:
            raise CheckpointError("slice() with unexpected arguments")
        return slice(*args)
    raise CheckpointError(f"refused to call {name}")


_SAFE_TYPES = frozenset(SAFE_BUILTINS.values())
_OUR_CALLABLES = frozenset(
    {
        _rebuild_tensor,
        _rebuild_tensor_v3,
        _rebuild_parameter,
        _rebuild_from_type_v2,
        _rebuild_device_tensor_from_numpy,
        _rebuild_qtensor,
        _torch_device,
        _torch_size,
        _np_reconstruct,
        _np_dtype,
        _np_frombuffer,
        _np_scalar,
        _codecs_encode,
        _reconstructor,
        _newobj,
        _ordered_dict,
    }
)


def compat_name(module: str, name: str, proto: int) -> tuple[str, str]:
    """Python 2 names -> Python 3 names, exactly as ``pickle.Unpickler.find_class`` maps them
    (``_compat_pickle``, for protocols < 3).

    Example::

        >>> compat_name("__builtin__", "long", 2)
        ('builtins', 'int')
    """
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            return _compat_pickle.NAME_MAPPING[(module, name)]
        if module in _compat_pickle.IMPORT_MAPPING:
            return _compat_pickle.IMPORT_MAPPING[module], name
    return module, name


def _is_builtin_exception(name: str) -> bool:
    obj = builtins.__dict__.get(name)
    return isinstance(obj, type) and issubclass(obj, BaseException)


class _Source:
    """The bytes of one pickle: every read is checked against what is left, before it allocates."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.start = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(self.start)
        self.end = end

    def remaining(self) -> int:
        return self.end - self.f.tell()

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.remaining():
            raise CheckpointError(f"pickle asks for {n} bytes; only {self.remaining()} remain (truncated or corrupt)")
        return bytes(self.f.read(n))

    def readline(self) -> bytes:
        line = bytes(self.f.readline(MAX_LINE))
        if len(line) == MAX_LINE and not line.endswith(b"\n"):
            raise CheckpointError(f"pickle text line longer than {MAX_LINE} bytes")
        return line

    def readinto(self, b: Any) -> int:
        if len(b) > self.remaining():
            raise CheckpointError(f"pickle asks for {len(b)} bytes; only {self.remaining()} remain (truncated or corrupt)")
        return int(self.f.readinto(b))


class SafeUnpickler(pickle._Unpickler):
    """Unpickler with an allowlist; see the module docstring.

    Built on the pure-Python unpickler: its memo is a dict (a memo index of 2**32 costs one
    entry, not an array of that size), and each opcode that calls, builds or allocates is
    overridden here and checked first."""

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, source: str, storage_dtype_hook: Any = None) -> None:
        # A pickle in memory is read as one frame (C-speed reads; short reads are errors);
        # a file is read through _Source, which checks each length against what is left.
        self._whole: io.BytesIO | None = None
        self._whole_len = 0
        if isinstance(file, (bytes, bytearray, memoryview)):
            self._whole = io.BytesIO(file)
            self._whole_len = len(file)
            file = io.BytesIO(b"")
        self._src = _Source(file)
        super().__init__(self._src, encoding="latin1")
        self.source = source
        self.storages: dict[str, StorageRef] = {}
        self.refused: list[_Refused] = []

    # -- the one loop: an opcode budget ----------------------------------------------------------

    def load(self) -> Any:
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore[attr-defined]
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        if self._whole is not None:  # C-speed reads; a short read always ends in EOFError at the next opcode
            self.read = self._whole.read
            self.readinto = self._whole.readinto
            self.readline = self._whole.readline
        self.metastack: list[Any] = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        read = self.read
        dispatch = self.dispatch
        budget = MAX_OPS
        try:
            while budget:
                budget -= 1
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value
        raise CheckpointError(f"pickle runs more than {MAX_OPS} opcodes; refusing")

    def position(self) -> int:
        if self._whole is not None:
            return self._whole.tell()
        return self._src.f.tell() - self._src.start

    # -- names -------------------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        written = f"{module}.{name}"
        module, name = compat_name(module, name, self.proto)
        found = self._find(module, name)
        if isinstance(found, _Refused):
            found = _Refused(written)
            self.refused.append(found)
        return found

    def _find(self, module: str, name: str) -> Any:  # noqa: C901 - one table, read top-down
        full = f"{module}.{name}"
        root = module.split(".")[0]
        if (module, name) in HARMLESS:
            return opaque_type(module, name)
        if module == "builtins":
            if name in SAFE_BUILTINS:
                return SAFE_BUILTINS[name]
            if _is_builtin_exception(name):
                return opaque_type(module, name)
            if name == "object":  # the base class argument of copyreg._reconstructor (protocols 0 and 1)
                return _OBJECT_BASE
            if name in DENY_BUILTINS or name.startswith("_") or "." in name:
                return _Refused(full)
            return opaque_type(module, name)  # max, len, sorted ... as data (a partial's function): inert, never called
        if any(module == d or module.startswith(d + ".") for d in DENY_MODULES) or name.startswith("__"):
            if module == "copyreg" and name in ("__newobj__", "__newobj_ex__"):
                return _newobj
            return _Refused(full)
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module == "_codecs" and name == "encode":
            return _codecs_encode
        if root == "torch":
            return self._find_torch(module, name)
        if root == "numpy":
            core = module in ("numpy.core.multiarray", "numpy._core.multiarray")
            if name == "_reconstruct" and core:
                return _np_reconstruct
            if name == "ndarray" and module == "numpy":
                return _NpArray
            if name == "dtype" and module == "numpy":
                return _np_dtype
            if name == "scalar" and core:
                return _np_scalar
            if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
                return _np_frombuffer
        return opaque_type(module, name)

    def _find_torch(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_tensor_v3
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch._utils" and name == "_rebuild_qtensor":
            return _rebuild_qtensor
        if module == "torch._utils" and name == "_rebuild_device_tensor_from_numpy":
            return _rebuild_device_tensor_from_numpy
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return _TorchDtype(lookup_dtype(name).name)
        if module == "torch" and name == "Size":
            return _torch_size
        if module == "torch" and name == "device":
            return _torch_device
        if module == "torch.serialization" and name == "_get_layout":
            return str
        # everything else (sparse / quantized / meta tensors, modules, torch.load ...): an inert placeholder
        return opaque_type(module, name)

    # -- calls: the one gate -----------------------------------------------------------------------

    def _call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        if type(args) is not tuple:
            if isinstance(args, (tuple, list)):
                args = tuple(args)
            else:
                raise CheckpointError(f"pickle calls {_kind(func)} with {_kind(args)} instead of an argument tuple")
        if kwargs:
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise CheckpointError(f"pickle calls {_kind(func)} with bad keyword arguments")
        else:
            kwargs = {}
        if self.refused:  # only then can a refused marker be anywhere
            if isinstance(func, _Refused):
                return func
            for a in (*args, *kwargs.values()):  # a refused name as an argument: the result is that name, inert,
                if isinstance(a, _Refused):  # so the object path to it can be reported
                    return a
                if isinstance(a, (tuple, list)) and len(a) <= 16:
                    inner = next((x for x in a if isinstance(x, _Refused)), None)
                    if inner is not None:
                        return inner
        if type(func) is FunctionType:
            if func in _OUR_CALLABLES:
                try:
                    return func(*args, **kwargs)
                except TypeError:
                    raise CheckpointError(f"pickle calls {_callable_name(func)} with {len(args)} arguments") from None
        elif isinstance(func, type):
            if func in _SAFE_TYPES:
                return _checked_builtin(func, args, kwargs)
            if issubclass(func, Opaque):
                return func(*args, **kwargs)
        elif isinstance(func, (_StorageType, _Marker)):
            return func(*args, **kwargs)
        raise CheckpointError(f"pickle calls {_kind(func)}, which is data, not a constructor")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, kwargs)

    def load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        klass = self.find_class(module, name)
        self.append(self._call(klass, tuple(self.pop_mark())))  # type: ignore[attr-defined]

    def load_obj(self) -> None:
        args = self.pop_mark()  # type: ignore[attr-defined]
        cls = args.pop(0)
        self.append(self._call(cls, tuple(args)))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (Opaque, _NpArray, _NpDtype)):
            inst.__setstate__(state)
        elif isinstance(inst, collections.OrderedDict):  # torch state dicts carry `_metadata`
            if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
                state = state[0]
            if not isinstance(state, dict):
                raise CheckpointError(f"pickle sets the state of a dict to {_kind(state)}")
            for k, v in state.items():
                if isinstance(k, str) and not k.startswith("__"):
                    inst.__dict__[k] = v
        elif isinstance(inst, _Refused):
            pass
        elif isinstance(inst, (TensorRef, StorageRef)):
            raise CheckpointError("pickle BUILD tries to change a tensor record after it was checked; refusing")
        else:
            raise CheckpointError(f"pickle BUILD on {_kind(inst)} is not allowed")

    # -- sizes -------------------------------------------------------------------------------------

    def _avail(self) -> int:
        if self._whole is not None:
            return self._whole_len - self._whole.tell()
        frame = self._unframer.current_frame
        if frame is None:
            return self._src.remaining()
        return self._src.remaining() + len(frame.getvalue()) - frame.tell()

    def load_frame(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._avail():
            raise CheckpointError(f"pickle frame of {n} bytes; only {self._avail()} remain (truncated or corrupt)")
        if self._whole is None:  # frames inside an in-memory pickle are already in the one frame
            self._unframer.load_frame(n)

    def load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._avail():
            raise CheckpointError(
                f"pickle asks for a {n}-byte bytearray; only {self._avail()} bytes remain (truncated or corrupt)"
            )
        b = bytearray(n)
        self.readinto(b)
        self.append(b)

    def load_next_buffer(self) -> None:
        raise CheckpointError(
            "the pickle refers to an out-of-band buffer (protocol 5 with buffer_callback): that data is not in the file; "
            "re-save it in-band"
        )

    def load_readonly_buffer(self) -> None:
        self.load_next_buffer()

    def load_long1(self) -> None:
        n = self.read(1)[0]
        self.append(pickle.decode_long(self.read(n)))

    def load_long4(self) -> None:
        (n,) = struct.unpack("<i", self.read(4))
        if n < 0 or n > MAX_INT_BYTES:
            raise CheckpointError(f"pickle integer of {n} bytes (limit {MAX_INT_BYTES})")
        self.append(pickle.decode_long(self.read(n)))

    # -- storages ----------------------------------------------------------------------------------

    def persistent_load(self, pid: Any) -> Any:
        if self.refused and isinstance(pid, tuple) and any(isinstance(x, _Refused) for x in pid):
            return next(x for x in pid if isinstance(x, _Refused))
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {short(pid)} in pickle")
        storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
        if len(pid) > 5 and pid[5] is not None:
            raise CheckpointError("legacy storage views are not supported")
        if isinstance(storage_type, _StorageType):
            dt = storage_type.dtype
        elif isinstance(storage_type, _TorchDtype):
            dt = lookup_dtype(storage_type).name
        else:
            raise CheckpointError(f"storage of unknown type: {_kind(storage_type)}")
        if not isinstance(numel, int) or isinstance(numel, bool) or not 0 <= numel < MAX_DIM:
            raise CheckpointError(f"storage {short(key)} has a bad size {short(numel)}")
        if not isinstance(key, (str, int)) or (isinstance(key, str) and len(key) > 256):
            raise CheckpointError(f"storage key {short(key)} is not a short name")
        key = str(key)
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = StorageRef(key, dt, numel, location[:64] if isinstance(location, str) else "cpu")
        elif ref.dtype != dt or ref.numel != numel:
            raise CheckpointError(f"storage {key!r} is named twice with different types or sizes")
        return ref


for _op, _meth in (
    (pickle.REDUCE, "load_reduce"),
    (pickle.NEWOBJ, "load_newobj"),
    (pickle.NEWOBJ_EX, "load_newobj_ex"),
    (pickle.INST, "load_inst"),
    (pickle.OBJ, "load_obj"),
    (pickle.BUILD, "load_build"),
    (pickle.BYTEARRAY8, "load_bytearray8"),
    (pickle.FRAME, "load_frame"),
    (pickle.NEXT_BUFFER, "load_next_buffer"),
    (pickle.READONLY_BUFFER, "load_readonly_buffer"),
    (pickle.LONG1, "load_long1"),
    (pickle.LONG4, "load_long4"),
):
    SafeUnpickler.dispatch[_op[0]] = getattr(SafeUnpickler, _meth)


def _callable_name(func: Any) -> str:
    names = {
        _rebuild_tensor: "torch._utils._rebuild_tensor_v2",
        _rebuild_tensor_v3: "torch._utils._rebuild_tensor_v3",
        _rebuild_parameter: "torch._utils._rebuild_parameter",
        _rebuild_from_type_v2: "torch._tensor._rebuild_from_type_v2",
        _torch_device: "torch.device",
        _torch_size: "torch.Size",
        _np_reconstruct: "numpy's _reconstruct",
        _np_frombuffer: "numpy's _frombuffer",
        _np_scalar: "numpy's scalar",
        _np_dtype: "numpy.dtype",
    }
    return names.get(func, "a constructor")


_INTERNAL = (
    "statemap",
    "_NpArray",
    "_NpDtype",
    "_Refused",
    "_Marker",
    "_StorageType",
    "_TorchDtype",
    "_np_",
    "_rebuild",
    "Opaque",
)


def safe_load(data: bytes | Any, source: str) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle ``data`` (bytes or a seekable binary file) with the allowlist; return (object, storages).

    Example::

        >>> import zipfile
        >>> pkl = zipfile.ZipFile("model.pt").read("deltalm-tiny/data.pkl")   # a torch.save archive's pickle
        >>> obj, storages = safe_load(pkl, "model.pt")
        >>> sorted(obj)[:2], len(storages)
        (['args', 'cfg'], ...)
    """
    up = SafeUnpickler(data, source)
    try:
        obj = up.load()
        obj = finish(obj, up.refused)
    except _RefusedFound as e:
        raise UnsafeCheckpointError(
            f"{source}: refused to load {e.name!r}: statemap never runs code from a checkpoint (at {e.path})"
        ) from None
    except StatemapError as e:
        if up.refused:
            raise _unsafe(source, up.refused[0]) from None
        msg = str(e)
        if msg.startswith(source):
            raise
        cls = type(e) if isinstance(e, CheckpointError) else CheckpointError
        raise cls(f"{source}: {msg} (pickle byte {up.position()})") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RecursionError,
        MemoryError,
        UnicodeDecodeError,
        OverflowError,
        struct.error,
        SystemError,  # numpy on invalid unicode code points in a string array
    ) as e:
        if up.refused:
            raise _unsafe(source, up.refused[0]) from None
        detail = str(e)[:200]
        if any(w in detail for w in _INTERNAL) or "<class" in detail:
            detail = ""
        raise CheckpointError(
            f"{source}: corrupt or unsupported pickle at byte {up.position()}: {type(e).__name__}{': ' + detail if detail else ''}"
        ) from None
    if up.refused:  # named but unreachable from the loaded object
        raise _unsafe(source, up.refused[0])
    return obj, up.storages


def _unsafe(source: str, r: _Refused) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{source}: refused to load {r.written!r}: statemap never runs code from a checkpoint")


class _RefusedFound(Exception):
    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path


def _values(cur: Any) -> Any:
    """The children of a container (no path text: the shape check visits every edge)."""
    if isinstance(cur, dict):
        return cur.values()
    if isinstance(cur, (list, tuple, set, frozenset)):
        return cur
    if isinstance(cur, Opaque):
        d = cur.__dict__
        return [*d["args"], *d["kwargs"].values(), d["state"], *d["items"].values(), *d["list"]]
    return ()


def _key(k: Any) -> str:
    return short(k) if isinstance(k, (str, int, bytes)) else _kind(k)


_CONTAINERS = (dict, list, tuple, set, frozenset, Opaque)


def finish(obj: Any, refused: list[_Refused] | None = None) -> Any:
    """Replace numpy stand-ins by arrays, in place, walking each container once (pickles may hold
    cycles and shared containers); check the graph's depth and expanded size; find refused names."""
    seen: set[int] = set()
    parent: dict[int, tuple[int, Any]] = {}  # id -> (owner id, step); steps are formatted only for a message
    rebuilt: dict[int, tuple[Any, ...]] = {}  # tuples holding numpy stand-ins, rebuilt once
    stack: list[Any] = []
    budget = MAX_OPS

    def fix(v: Any, owner: int, step: Any) -> Any:
        if isinstance(v, _NpArray):
            if not hasattr(v, "value"):
                raise CheckpointError("numpy array without data in pickle")
            return v.value
        if isinstance(v, _INTERNAL_TYPES) or (callable(v) and not isinstance(v, type) and v in _OUR_CALLABLES):
            return _as_data(v)  # no internal object leaves the unpickler
        if isinstance(v, _Refused):
            raise _RefusedFound(v.written, _path(parent, owner, step))
        if isinstance(v, (dict, list, Opaque, set, frozenset)) and id(v) not in seen:
            parent.setdefault(id(v), (owner, step))
            stack.append(v)
        elif isinstance(v, tuple) and v:
            if id(v) in rebuilt:
                return rebuilt[id(v)]
            if id(v) not in seen:
                parent.setdefault(id(v), (owner, step))
                seen.add(id(v))
                if any(isinstance(x, (_NpArray, _Refused, *_INTERNAL_TYPES)) or callable(x) for x in v):
                    new = tuple(fix(x, id(v), i) for i, x in enumerate(v))
                    rebuilt[id(v)] = new
                    return new
                for i, x in enumerate(v):
                    fix(x, id(v), i)
        return v

    top = fix(obj, 0, None)
    while stack:
        budget -= 1
        if budget < 0:
            raise CheckpointError(f"pickle holds more than {MAX_OPS} containers; refusing")
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        me = id(cur)
        if isinstance(cur, dict):
            for k in list(cur):
                cur[k] = fix(cur[k], me, k)
        elif isinstance(cur, list):
            for i, v in enumerate(cur):
                cur[i] = fix(v, me, i)
        elif isinstance(cur, (set, frozenset)):
            for v in cur:
                fix(v, me, _SET_MEMBER)
        elif isinstance(cur, Opaque):
            d = cur.__dict__
            d["args"] = tuple(fix(v, me, (".args", i)) for i, v in enumerate(d["args"]))
            for k in list(d["kwargs"]):
                d["kwargs"][k] = fix(d["kwargs"][k], me, (".", k))
            d["state"] = fix(d["state"], me, (".state",))
            for k in list(d["items"]):
                d["items"][k] = fix(d["items"][k], me, k)
            d["list"][:] = [fix(v, me, i) for i, v in enumerate(d["list"])]
    if refused:  # named, but not reachable from the object
        raise _RefusedFound(refused[0].written, "a value the file builds but does not keep")
    _check_shape(top)
    return top


_INTERNAL_TYPES = (_NpDtype, _StorageType, _Marker, StorageRef)


def _as_data(v: Any) -> Any:
    """Internal stand-ins found as plain values (a numpy dtype, a storage type, ``torch.Size`` itself ...) -> text."""
    if isinstance(v, _NpDtype):
        try:
            import numpy as np

            return str(np.dtype(v.spec)) if not v.structured else v.spec
        except TypeError:
            return v.spec
    if isinstance(v, _StorageType):
        return f"torch storage type ({v.dtype})"
    if isinstance(v, _Marker):
        return v.what
    if isinstance(v, StorageRef):
        return f"<torch storage of {v.numel} {v.dtype}>"
    return _callable_name(v)


_SET_MEMBER = object()


def _step_text(step: Any) -> str:
    if step is None:
        return ""
    if step is _SET_MEMBER:
        return "{...}"
    if isinstance(step, tuple):  # a placeholder's field: (".args", i), (".", keyword), (".state",)
        if step[0] == ".args":
            return f".args[{step[1]}]"
        return f".{step[1]}" if step[0] == "." else step[0]
    return f"[{_key(step)}]"


def _path(parent: dict[int, tuple[int, Any]], owner: int, step: Any) -> str:
    steps = [_step_text(step)]
    seen = set()
    while owner in parent and owner not in seen and len(steps) < 64:
        seen.add(owner)
        owner, s = parent[owner]
        steps.append(_step_text(s))
    return "".join(reversed(steps)) or "the top level"


def _check_shape(top: Any) -> None:
    """Depth and expanded size of the object graph, each container visited once (cycles cut)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[Any, bool]] = [(top, False)]
    while stack:
        node, post = stack.pop()
        i = id(node)
        if post:
            total, d = 1, 0
            for c in _values(node):
                if isinstance(c, _CONTAINERS):
                    total += size.get(id(c), 1)
                    d = max(d, depth.get(id(c), 0) + 1)
                else:
                    total += 1
            size[i], depth[i] = total, d
            if d > MAX_DEPTH:
                raise CheckpointError(f"pickle nests objects {d} levels deep (limit {MAX_DEPTH})")
            if total > MAX_EXPANDED:
                raise CheckpointError(
                    f"pickle's objects expand to more than {MAX_EXPANDED} values (shared containers used many times); refusing"
                )
            continue
        if not isinstance(node, _CONTAINERS) or i in size or i in entered:
            continue
        entered.add(i)
        stack.append((node, True))
        for c in _values(node):
            if isinstance(c, _CONTAINERS) and id(c) not in size and id(c) not in entered:
                stack.append((c, False))


# -- plain data ---------------------------------------------------------------------------------


def to_plain(obj: Any, _depth: int = 0, _path: frozenset[int] = frozenset()) -> Any:
    """Placeholders -> plain data: ``argparse.Namespace`` and omegaconf configs become dicts,
    paths strings, ``functools.partial`` a dict, ``io.BytesIO`` bytes, datetimes ISO text.
    Cycles come back as ``"<cycle>"``; nothing deeper than 100 levels is expanded.

    Example::

        >>> import argparse, pickle
        >>> obj, _ = safe_load(pickle.dumps({"args": argparse.Namespace(lr=0.0005)}), "ckpt.pt")
        >>> to_plain(obj["args"])["lr"]
        0.0005
    """
    if _depth > 100:
        return "..."
    if isinstance(obj, _CONTAINERS) and id(obj) in _path:
        return "<cycle>"
    if isinstance(obj, Opaque):
        sub = _path | {id(obj)}
        special = _special_plain(obj, _depth, sub)
        if special is not _NOTHING:
            return special
        d = obj.__dict__
        state = d["state"]
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]} if isinstance(state[0], dict) else state[1]
        if isinstance(state, dict):
            if "_content" in state:  # omegaconf DictConfig / ListConfig
                return to_plain(state["_content"], _depth + 1, sub)
            if "_val" in state:  # omegaconf value node
                return to_plain(state["_val"], _depth + 1, sub)
            return {k: to_plain(v, _depth + 1, sub) for k, v in state.items() if not str(k).startswith("_")}
        if d["items"]:
            return {k: to_plain(v, _depth + 1, sub) for k, v in d["items"].items()}
        if d["list"]:
            return [to_plain(v, _depth + 1, sub) for v in d["list"]]
        if d["args"] and state is None and all(isinstance(a, (int, float, str, bool)) or a is None for a in d["args"]):
            return f"{obj.qualname}({', '.join(short(a) for a in d['args'])})"  # enum members, simple values
        if d["args"] or state is not None:
            plain = {"class": obj.qualname, "args": to_plain(list(d["args"]), _depth + 1, sub)}
            return plain if state is None else {**plain, "state": to_plain(state, _depth + 1, sub)}
        return f"<{obj.qualname}>"
    if isinstance(obj, dict):
        sub = _path | {id(obj)}
        return {k: to_plain(v, _depth + 1, sub) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        sub = _path | {id(obj)}
        return [to_plain(v, _depth + 1, sub) for v in obj]
    if isinstance(obj, type) and issubclass(obj, Opaque):
        return f"{obj._module}.{obj._name}"
    if isinstance(obj, (_StorageType, _Marker, _NpDtype, StorageRef)) or (
        callable(obj) and not isinstance(obj, type) and obj in _OUR_CALLABLES
    ):
        return f"<{_kind(obj)}>"
    return obj


_NOTHING = object()


def _special_plain(obj: Opaque, depth: int, path: frozenset[int]) -> Any:  # noqa: C901 - one case per class
    import pathlib

    mod, name = obj._module, obj._name
    d = obj.__dict__
    args, state = d["args"], d["state"]
    if mod == "pathlib" and all(isinstance(a, str) for a in args):
        return str((pathlib.PureWindowsPath if "Windows" in name else pathlib.PurePosixPath)(*args))
    if (mod, name) == ("functools", "partial"):
        parts = state if isinstance(state, tuple) and len(state) == 4 else (args[0] if args else None, args[1:], {}, None)
        return {
            "partial": to_plain(parts[0], depth + 1, path),
            "args": to_plain(list(parts[1] or ()), depth + 1, path),
            "keywords": to_plain(parts[2] or {}, depth + 1, path),
        }
    if name == "BytesIO" and mod in ("io", "_io"):
        if isinstance(state, tuple) and state and isinstance(state[0], (bytes, bytearray)):
            return bytes(state[0])
        if args and isinstance(args[0], (bytes, bytearray)):
            return bytes(args[0])
        return b""
    if mod == "datetime" and args and isinstance(args[0], (bytes, str)):
        return _datetime_text(name, args[0])
    if (mod, name) == ("datetime", "timedelta") and all(isinstance(a, int) for a in args):
        days, secs, us = (list(args) + [0, 0, 0])[:3]
        return f"{days} days, {secs}.{us:06d} s"
    if mod == "collections" and name == "deque" and args and isinstance(args[0], list):
        return to_plain(args[0], depth + 1, path)
    if mod == "collections" and name == "Counter" and args and isinstance(args[0], dict):
        return to_plain(args[0], depth + 1, path)
    if (mod, name) == ("numpy", "ndarray") and isinstance(state, dict) and state.get("values") is not None:
        return to_plain(state["values"], depth + 1, path)
    return _NOTHING


def _datetime_text(name: str, raw: bytes | str) -> str:
    b = raw.encode("latin1") if isinstance(raw, str) else raw
    if name == "date" and len(b) == 4:
        return f"{b[0] * 256 + b[1]:04d}-{b[2]:02d}-{b[3]:02d}"
    if name == "datetime" and len(b) == 10:
        us = (b[7] << 16) | (b[8] << 8) | b[9]
        return f"{b[0] * 256 + b[1]:04d}-{b[2]:02d}-{b[3]:02d}T{b[4]:02d}:{b[5]:02d}:{b[6]:02d}.{us:06d}"
    if name == "time" and len(b) == 6:
        us = (b[3] << 16) | (b[4] << 8) | b[5]
        return f"{b[0]:02d}:{b[1]:02d}:{b[2]:02d}.{us:06d}"
    return f"<datetime.{name}>"
