"""An allowlist unpickler: reads torch / numpy / fairseq pickles without running their code.

A pickle is a program; ``pickle.load`` runs whatever callables it names. This unpickler
never imports a module named by the file and never calls anything the file names, except
the handful of constructors below, which build inert data:

* torch tensors become :class:`TensorRef` (where the bytes are: storage key, dtype,
  offset, shape, stride); torch itself is not imported;
* containers and scalars (``dict``, ``OrderedDict``, ``list``, ``set``, ``slice`` ...) load;
* numpy arrays are rebuilt from their raw bytes by :func:`_np_reconstruct` (our own code);
* any other class (``argparse.Namespace``, omegaconf ``DictConfig``, fairseq meters ...)
  becomes an :class:`Opaque` placeholder that records its name, arguments and state;
  :func:`to_plain` turns those into plain data;
* names that can only mean code execution (``os.system``, ``builtins.eval``, ``subprocess``,
  ``importlib``, ...) are refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..dtypes import dtype as lookup_dtype
from ..errors import CheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    import numpy as np

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
    "UntypedStorage": "uint8",
    "Float8_e4m3fnStorage": "float8_e4m3fn",
    "Float8_e5m2Storage": "float8_e5m2",
    "UInt16Storage": "uint16",
    "UInt32Storage": "uint32",
    "UInt64Storage": "uint64",
}
TORCH_DTYPES = {
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "float8_e4m3fn",
    "float8_e5m2",
    "uint16",
    "uint32",
    "uint64",
    "double",
    "float",
    "half",
    "long",
    "int",
    "short",
}

# Modules and builtins whose only use in a pickle is to run code: refused outright.
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
    "object",
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


@dataclass(frozen=True)
class StorageRef:
    """A torch storage named by a pickle: which bytes, read later (never here)."""

    key: str
    dtype: str
    numel: int
    location: str = "cpu"


@dataclass(frozen=True)
class TensorRef:
    """A tensor found in a pickle: a view of a storage."""

    storage: StorageRef
    offset: int  # in elements of the storage dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    dtype: str = ""  # element type; differs from the storage's for _rebuild_tensor_v3 (byte storages)

    @property
    def element_dtype(self) -> str:
        return self.dtype or self.storage.dtype


class Opaque:
    """An object of a class statemap does not import. Inert: it records, it never runs."""

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

    def __reduce__(self) -> Any:
        raise TypeError("statemap placeholders cannot be pickled")

    @property
    def qualname(self) -> str:
        return f"{self._module}.{self._name}"

    def __repr__(self) -> str:
        return f"<{self.qualname} (not loaded)>"


_OPAQUE_TYPES: dict[tuple[str, str], type[Opaque]] = {}


def opaque_type(module: str, name: str) -> type[Opaque]:
    key = (module, name)
    if key not in _OPAQUE_TYPES:
        _OPAQUE_TYPES[key] = type(name, (Opaque,), {"_module": module, "_name": name})
    return _OPAQUE_TYPES[key]


# -- safe constructors the pickle may call --------------------------------------------------


def _as_storage(obj: Any) -> StorageRef:
    if not isinstance(obj, StorageRef):
        raise CheckpointError(f"tensor rebuild got {type(obj).__name__} instead of a storage")
    return obj


def _ints(obj: Any, what: str) -> tuple[int, ...]:
    if isinstance(obj, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) for x in obj):
        return tuple(obj)
    raise CheckpointError(f"tensor {what} must be a tuple of integers, got {obj!r:.80}")


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *_: Any
) -> TensorRef:
    """torch >= 2.1 writes dtypes without a typed storage (uint16, float8, ...) this way:
    a byte storage plus the element dtype; offset, size and stride count elements of that dtype."""
    st = _as_storage(storage)
    if not isinstance(dtype, _TorchDtype):
        raise CheckpointError(f"tensor rebuild names dtype {dtype!r:.40}, not a torch dtype")
    dt = lookup_dtype(dtype)
    if st.dtype != "uint8" or st.numel % dt.itemsize:
        raise CheckpointError(f"storage of {st.numel} {st.dtype} cannot hold {dt.name} elements")
    as_elems = StorageRef(st.key, dt.name, st.numel // dt.itemsize, st.location)
    ref = _rebuild_tensor(as_elems, offset, size, stride, requires_grad)
    return TensorRef(st, ref.offset, ref.shape, ref.stride, ref.requires_grad, dt.name)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any) -> TensorRef:
    st = _as_storage(storage)
    if not isinstance(offset, int) or offset < 0:
        raise CheckpointError(f"tensor storage offset must be a non-negative integer, got {offset!r:.40}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides) or any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise CheckpointError(f"tensor size {shape} and stride {strides} are inconsistent")
    if all(shape):
        last = offset + sum((d - 1) * s for d, s in zip(shape, strides))
        if last >= st.numel:
            raise CheckpointError(
                f"tensor of size {list(shape)} at offset {offset} reaches element {last} of a storage of {st.numel} elements"
            )
    return TensorRef(st, offset, shape, strides, bool(requires_grad))


def _rebuild_parameter(data: Any, requires_grad: Any = False, *_: Any) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        raise CheckpointError(f"refused to rebuild a tensor subclass through {func!r:.60}")
    return func(*args)


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> _NpArray:
    return _NpArray()


class _NpArray:
    """Stand-in for ``numpy.ndarray`` during unpickling; ``__setstate__`` builds the real array."""

    def __setstate__(self, state: Any) -> None:
        self.value = _array_from_state(state)


def _np_dtype(spec: Any, align: Any = False, copy: Any = False) -> _NpDtype:
    if not isinstance(spec, str) or len(spec) > 8:
        raise CheckpointError(f"numpy dtype {spec!r:.40} is not a plain type code")
    return _NpDtype(spec)


class _NpDtype:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.order = "|"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], str):
            self.order = state[1]
        if isinstance(state, tuple) and len(state) > 3 and state[3] is not None:
            raise CheckpointError("structured numpy dtypes are not supported in checkpoints")

    def resolve(self) -> np.dtype:
        import numpy as np

        if self.spec.startswith(("O", "V", "U", "S", "M", "m")):
            raise CheckpointError(f"numpy arrays of type {self.spec!r} are not tensors")
        try:
            d = np.dtype(self.spec)
            return d.newbyteorder("<") if self.order in ("|", "=", "<") else d.newbyteorder(">")
        except TypeError as e:
            raise CheckpointError(f"bad numpy dtype {self.spec!r}: {e}") from None


def _array_from_state(state: Any) -> np.ndarray:
    import numpy as np

    try:
        _version, shape, dt, fortran, raw = state
    except (TypeError, ValueError):
        raise CheckpointError("malformed numpy array state in pickle") from None
    if not isinstance(dt, _NpDtype):
        raise CheckpointError("numpy array without a plain dtype")
    dtype = dt.resolve()
    shape = _ints(shape, "numpy shape")
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise CheckpointError("numpy array data is not raw bytes (object arrays are not tensors)")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n * dtype.itemsize != len(raw):
        raise CheckpointError(
            f"numpy array of shape {list(shape)} {dtype} needs {n * dtype.itemsize} bytes, pickle has {len(raw)}"
        )
    arr = np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.asarray(arr.astype(dtype.newbyteorder("<"), copy=False), order="C")


def _np_scalar(dt: Any, raw: Any = b"") -> Any:
    import numpy as np

    if not isinstance(dt, _NpDtype):
        raise CheckpointError("numpy scalar without a plain dtype")
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    return np.frombuffer(bytes(raw), dtype=dt.resolve())[0].item()


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CheckpointError("refused _codecs.encode call with unexpected arguments")
    return text.encode(encoding)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    if isinstance(cls, type) and issubclass(cls, Opaque):
        obj = cls()
        return obj
    if cls in (collections.OrderedDict, dict):
        return cls()
    raise CheckpointError(f"refused copyreg._reconstructor for {cls!r:.60}")


def _ordered_dict(*args: Any) -> collections.OrderedDict[Any, Any]:
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


def compat_name(module: str, name: str, proto: int) -> tuple[str, str]:
    """Python 2 names -> Python 3 names, exactly as ``pickle.Unpickler.find_class`` maps them
    (``_compat_pickle``, for protocols < 3): ``__builtin__.long`` -> ``builtins.int``, ..."""
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            return _compat_pickle.NAME_MAPPING[(module, name)]
        if module in _compat_pickle.IMPORT_MAPPING:
            return _compat_pickle.IMPORT_MAPPING[module], name
    return module, name


def _is_builtin_exception(name: str) -> bool:
    obj = builtins.__dict__.get(name)
    return isinstance(obj, type) and issubclass(obj, BaseException)


class SafeUnpickler(pickle._Unpickler):
    """Unpickler with an allowlist; see the module docstring.

    Built on the pure-Python unpickler (its memo is a dict, and every opcode can be checked)."""

    def __init__(self, file: Any, source: str, storage_dtype_hook: Any = None) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        written = f"{module}.{name}"
        module, name = compat_name(module, name, self.proto)
        try:
            return self._find(module, name)
        except UnsafeCheckpointError:
            if written != f"{module}.{name}":
                raise UnsafeCheckpointError(
                    f"{self.source}: refused to load {written!r}: statemap never runs code from a checkpoint"
                ) from None
            raise

    def _find(self, module: str, name: str) -> Any:  # noqa: C901 - one table, read top-down
        full = f"{module}.{name}"
        root = module.split(".")[0]
        if module == "builtins":
            if name in SAFE_BUILTINS:
                return SAFE_BUILTINS[name]
            if _is_builtin_exception(name):
                return opaque_type(module, name)
            if name == "object":  # the base class argument of copyreg._reconstructor (protocols 0 and 1)
                return _OBJECT_BASE
            raise UnsafeCheckpointError(f"{self.source}: refused to load {full!r}: statemap never runs code from a checkpoint")
        if any(module == d or module.startswith(d + ".") for d in DENY_MODULES) or name.startswith("__"):
            raise UnsafeCheckpointError(f"{self.source}: refused to load {full!r}: statemap never runs code from a checkpoint")
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module == "_codecs" and name == "encode":
            return _codecs_encode
        if root == "torch":
            if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return _rebuild_tensor
            if module == "torch._utils" and name == "_rebuild_tensor_v3":
                return _rebuild_tensor_v3
            if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
            if module == "torch._tensor" and name == "_rebuild_from_type_v2":
                return _rebuild_from_type_v2
            if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
                return _StorageType(STORAGE_DTYPES[name])
            if module == "torch" and name in TORCH_DTYPES:
                return _TorchDtype(name)
            if module == "torch" and name == "Size":
                return tuple
            if module == "torch" and name == "device":
                return str
            if module == "torch._utils" and name.startswith("_rebuild"):
                raise CheckpointError(
                    f"{self.source}: tensors rebuilt by {full} (sparse, quantized or device tensors) are not supported"
                )
            if module == "torch.serialization" and name == "_get_layout":
                return str
            return opaque_type(module, name)
        if root == "numpy":
            if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
                return _np_reconstruct
            if name == "ndarray" and module == "numpy":
                return _NpArray
            if name == "dtype" and module == "numpy":
                return _np_dtype
            if name == "scalar" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
                return _np_scalar
            return opaque_type(module, name)
        return opaque_type(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unsupported persistent id {pid!r:.80} in pickle")
        storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
        if len(pid) > 5 and pid[5] is not None:
            raise CheckpointError(f"{self.source}: legacy storage views are not supported")
        if isinstance(storage_type, _StorageType):
            dt = storage_type.dtype
        elif isinstance(storage_type, _TorchDtype):
            dt = lookup_dtype(storage_type).name
        else:
            raise CheckpointError(f"{self.source}: storage of unknown type {storage_type!r:.60}")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.source}: storage {key!r} has a bad size {numel!r}")
        key = str(key)
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = StorageRef(key, dt, numel, str(location))
        return ref


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def __call__(self, *args: Any) -> Any:
        raise CheckpointError("refused to construct a torch storage from pickle arguments")


def safe_load(data: bytes | Any, source: str) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle ``data`` (bytes or a binary file) with the allowlist; return (object, storages)."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    up = SafeUnpickler(f, source)
    try:
        obj = up.load()
        obj = finish(obj)
    except CheckpointError as e:
        if str(e).startswith(source):
            raise
        raise type(e)(f"{source}: {e}") from None
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
    ) as e:
        raise CheckpointError(f"{source}: corrupt or unsupported pickle: {type(e).__name__}: {e}") from None
    return obj, up.storages


def finish(obj: Any) -> Any:
    """Replace numpy stand-ins by arrays, in place, walking each container once (pickles may hold cycles)."""
    seen: set[int] = set()
    stack: list[Any] = [obj]
    budget = 10_000_000

    def fix(v: Any) -> Any:
        if isinstance(v, _NpArray):
            if not hasattr(v, "value"):
                raise CheckpointError("numpy array without data in pickle")
            return v.value
        if isinstance(v, (dict, list, Opaque)) and id(v) not in seen:
            stack.append(v)
        elif isinstance(v, tuple) and any(isinstance(x, (_NpArray, dict, list, tuple, Opaque)) for x in v):
            return tuple(fix(x) for x in v)
        return v

    top = fix(obj)
    while stack:
        budget -= 1
        if budget < 0:
            raise CheckpointError("pickle holds more than 10 million containers; refusing")
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, dict):
            for k in list(cur):
                cur[k] = fix(cur[k])
        elif isinstance(cur, list):
            for i, v in enumerate(cur):
                cur[i] = fix(v)
        elif isinstance(cur, Opaque):
            d = cur.__dict__
            for key in ("args", "state", "kwargs"):
                d[key] = fix(d[key])
            for k in list(d["items"]):
                d["items"][k] = fix(d["items"][k])
            d["list"][:] = [fix(v) for v in d["list"]]
    return top


def to_plain(obj: Any, _depth: int = 0) -> Any:
    """Placeholders -> plain data: ``argparse.Namespace`` and omegaconf configs become dicts."""
    if _depth > 100:
        return "..."
    if isinstance(obj, Opaque):
        d = obj.__dict__
        state = d["state"]
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]} if isinstance(state[0], dict) else state[1]
        if isinstance(state, dict):
            if "_content" in state:  # omegaconf DictConfig / ListConfig
                return to_plain(state["_content"], _depth + 1)
            if "_val" in state:  # omegaconf value node
                return to_plain(state["_val"], _depth + 1)
            return {k: to_plain(v, _depth + 1) for k, v in state.items() if not str(k).startswith("_")}
        if d["items"]:
            return {k: to_plain(v, _depth + 1) for k, v in d["items"].items()}
        if d["list"]:
            return [to_plain(v, _depth + 1) for v in d["list"]]
        return f"<{obj.qualname}>"
    if isinstance(obj, dict):
        return {k: to_plain(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, _depth + 1) for v in obj]
    return obj
