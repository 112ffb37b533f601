"""Flax ``flax_model.msgpack`` files, read and written without jax or flax.

The format (flax.serialization): a msgpack map of maps (module tree); each array leaf is a
msgpack extension of type 1 whose payload is itself msgpack ``(shape, dtype name, raw C-order
bytes)``; type 3 is a numpy scalar in the same encoding. Arrays over 1 GiB are stored as
``{"__msgpack_chunked_array__": True, "shape": {"0": .., ...}, "chunks": {"0": flat array, ...}}``.
Nested names are joined with ``.`` (``model.encoder.layers.0.self_attn.q_proj.kernel``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..dtypes import dtype as lookup_dtype
from ..errors import CheckpointError
from .checkpoint import TypedArray

if TYPE_CHECKING:
    import numpy as np

EXT_NDARRAY, EXT_COMPLEX, EXT_NPSCALAR = 1, 2, 3
CHUNKED = "__msgpack_chunked_array__"
MAX_CHUNK = 1 << 30  # flax.serialization.MAX_CHUNK_SIZE
MAX_DEPTH = 64


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:  # pragma: no cover - msgpack is a dependency
        raise CheckpointError(
            "reading or writing Flax .msgpack files needs the 'msgpack' package (pip install msgpack)"
        ) from None
    return msgpack


def _array(payload: bytes, path: str) -> np.ndarray | TypedArray:
    import numpy as np

    msgpack = _msgpack()
    try:
        shape, name, buf = msgpack.unpackb(payload, raw=True)
    except Exception as e:
        raise CheckpointError(f"{path}: malformed array record: {e}") from None
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: array shape {shape!r:.60} is not a list of non-negative integers")
    if not isinstance(name, bytes) or not isinstance(buf, bytes):
        raise CheckpointError(f"{path}: malformed array record")
    try:
        dt = lookup_dtype(name.decode("ascii", "replace"))
    except Exception:
        raise CheckpointError(f"{path}: array dtype {name!r} is not supported") from None
    n = 1
    for d in shape:
        n *= d
    if n * dt.itemsize != len(buf):
        raise CheckpointError(f"{path}: array of shape {shape} {dt.name} needs {n * dt.itemsize} bytes, has {len(buf)}")
    a = np.frombuffer(buf, dtype=dt.np).reshape(tuple(shape))
    return a if dt.native else TypedArray(a, dt.name)


def read_msgpack(path: str) -> dict[str, Any]:
    """Parse a Flax msgpack file into a nested dict of numpy arrays (storage form)."""
    msgpack = _msgpack()

    def ext_hook(code: int, data: bytes) -> Any:
        if code in (EXT_NDARRAY, EXT_NPSCALAR):
            return _array(data, path)
        raise CheckpointError(f"{path}: unsupported msgpack extension type {code}")

    try:
        with open(path, "rb") as f:
            data = f.read()
        tree = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid Flax msgpack file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: top level is a {type(tree).__name__}, not a map of parameters")
    return _unchunk(tree, path, 0)


def _unchunk(node: Any, path: str, depth: int) -> Any:
    import numpy as np

    if depth > MAX_DEPTH:
        raise CheckpointError(f"{path}: parameter tree nests deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict):
        return node
    if node.get(CHUNKED) is True:
        try:
            shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
            chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
            dt = chunks[0].dtype if isinstance(chunks[0], TypedArray) else None
            flat = np.concatenate([(c.array if isinstance(c, TypedArray) else c).reshape(-1) for c in chunks]).reshape(shape)
            return TypedArray(flat, dt) if dt else flat
        except Exception as e:
            raise CheckpointError(f"{path}: malformed chunked array: {e}") from None
    return {str(k): _unchunk(v, path, depth + 1) for k, v in node.items()}


def nest(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Dotted names -> the nested map Flax stores (``a.b.c`` -> ``{"a": {"b": {"c": value}}}``);
    a name that is both a tensor and a module is refused, naming it."""
    tree: dict[str, Any] = {}
    for name, value in items:
        parts = name.split(".")
        node = tree
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise CheckpointError(f"cannot write {name!r}: {p!r} is both a tensor and a module")
            node = nxt
        if parts[-1] in node:
            raise CheckpointError(f"cannot write {name!r}: the name is both a tensor and a module")
        node[parts[-1]] = value
    return tree


def pack_msgpack(items: list[tuple[str, np.ndarray, str]]) -> bytes:
    """(dotted name, array in storage form, dtype name) -> Flax msgpack bytes."""
    import numpy as np

    msgpack = _msgpack()
    tree = nest((name, _Leaf(np.asarray(a, order="C"), dt_name)) for name, a, dt_name in items)

    def default(obj: Any) -> Any:
        if isinstance(obj, _Leaf):
            a = obj.array
            if a.nbytes > MAX_CHUNK:
                flat = a.reshape(-1)
                step = max(1, MAX_CHUNK // a.dtype.itemsize)
                return {
                    CHUNKED: True,
                    "shape": {str(i): d for i, d in enumerate(a.shape)},
                    "chunks": {str(i): _Leaf(flat[j : j + step], obj.dtype) for i, j in enumerate(range(0, flat.size, step))},
                }
            payload = msgpack.packb((list(a.shape), obj.dtype, a.tobytes("C")), use_bin_type=True)
            return msgpack.ExtType(EXT_NDARRAY, payload)
        raise TypeError(f"cannot serialize {type(obj).__name__}")

    return msgpack.packb(tree, default=default, use_bin_type=True, strict_types=True)


class _Leaf:
    __slots__ = ("array", "dtype")

    def __init__(self, array: np.ndarray, dtype: str) -> None:
        self.array, self.dtype = array, dtype
