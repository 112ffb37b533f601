"""Byte layouts of the streamed ``.pt`` and Flax ``.msgpack`` outputs, computed from metadata alone.

Everything but the tensor bytes is known before the first tensor is read: names, shapes and
dtypes come from the plan. So the writers emit each file front to back, one tensor at a time,
and memory holds one computed tensor, never the checkpoint.

``.pt`` (torch.save's zip format, as torch 2.x writes it): ``<root>/data.pkl`` (a protocol-2
pickle emitted here, opcode for opcode what torch's pickler writes for a dict of contiguous
tensors), ``.format_version``, ``.storage_alignment``, ``byteorder``, one stored entry
``data/<key>`` per storage (tied names share one), ``version`` and ``.data/serialization_id``.
Every entry's data starts on a 64-byte boundary (an ``FB`` padding extra field, as torch pads),
sizes and CRC-32 follow each entry in a data descriptor, and zip64 records are used where sizes
or offsets need them. Nothing here runs a pickler over objects: the pickle is written from
names, shapes and dtypes.

``.msgpack`` (flax.serialization): a nested map; each array is an extension of type 1 whose
payload is ``[shape, dtype name, raw bytes]``; arrays over 1 GiB are split into chunks as flax
splits them. The headers are computed from shapes, so the raw bytes are streamed in between.

Example::

    >>> pkl = torch_pickle([TensorMeta("w", (2, 3), "float32")], {"w": "0"})
    >>> pkl[:2]
    b'\\x80\\x02'
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .dtypes import dtype as lookup_dtype
from .errors import OutputError
from .load.flax_format import CHUNKED, MAX_CHUNK, nest
from .meta import TensorMeta

# -- torch data.pkl -------------------------------------------------------------------------------

# dtypes torch pickles with a typed storage class (``_rebuild_tensor_v2``); others use
# ``UntypedStorage`` + the dtype (``_rebuild_tensor_v3``), their storage size counted in bytes.
LEGACY_STORAGE = {
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
    "complex128": "ComplexDoubleStorage",
    "complex64": "ComplexFloatStorage",
    # quantized types without their quantizer (statemap reads their integer representation):
    # pickled as torch.save pickles such a tensor, with the typed storage of its type
    "qint8": "QInt8Storage",
    "quint8": "QUInt8Storage",
    "qint32": "QInt32Storage",
}
BATCHSIZE = 1000  # pickle writes dict items in batches of this many


def torch_dtype_ok(name: str) -> str | None:
    """Why a tensor of dtype ``name`` cannot be written to a ``.pt`` file, or None when it can."""
    dt = lookup_dtype(name)
    if dt.value_bits:
        return f"{name} (packed values): statemap reads it, but cannot convert or write it"
    if dt.name in _SUB_BYTE_INTS:
        return f"torch cannot save {name} tensors"
    if dt.name.startswith("float6_"):
        return f"torch has no {name} type; write .safetensors"
    return None


_SUB_BYTE_INTS = frozenset(f"{u}int{n}" for u in ("", "u") for n in range(1, 8))


class _Pickle:
    """A protocol-2 pickle written opcode by opcode, with the memo torch's (C) pickler keeps."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo: dict[object, int] = {}

    def put(self, key: object | None = None) -> int:
        """Memoize the object just written (``key`` names it for a later :meth:`memoized`)."""
        i = len(self.memo)
        self.memo[key if key is not None else ("anon", i)] = i
        self.out += b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)
        return i

    def get(self, i: int) -> None:
        self.out += b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)

    def memoized(self, key: object) -> bool:
        if key in self.memo:
            self.get(self.memo[key])
            return True
        return False

    def string(self, s: str, key: object | None) -> None:
        """A str; ``key`` names it for the memo when the same object recurs (None: a new object)."""
        if key is not None and self.memoized(key):
            return
        b = s.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(b)) + b
        self.put(key)

    def integer(self, x: int) -> None:
        if 0 <= x <= 0xFF:
            self.out += b"K" + bytes([x])
        elif 0 <= x <= 0xFFFF:
            self.out += b"M" + struct.pack("<H", x)
        elif -(1 << 31) <= x < 1 << 31:
            self.out += b"J" + struct.pack("<i", x)
        else:
            n = (x.bit_length() >> 3) + 1
            self.out += b"\x8a" + bytes([n]) + x.to_bytes(n, "little", signed=True)

    def global_(self, module: str, name: str) -> None:
        if self.memoized(("global", module, name)):
            return
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self.put(("global", module, name))

    def int_tuple(self, t: Sequence[int]) -> None:
        if not t:
            self.out += b")"
            return
        if len(t) > 3:
            self.out += b"("
        for x in t:
            self.integer(x)
        self.out += b"\x85\x86\x87"[len(t) - 1 : len(t)] if len(t) <= 3 else b"t"
        self.put()


def torch_pickle(metas: Sequence[TensorMeta], keys: dict[str, str]) -> bytes:
    """``data.pkl`` for a dict ``{name: tensor}`` in the order of ``metas``; ``keys[name]`` is the
    storage key of each name. Names sharing a key are one tensor (a tie): pickled once, then
    referenced, as torch pickles one tensor object stored under several names.

    Each tensor is contiguous, at offset 0 of a storage of exactly its size, on ``cpu``.
    """
    p = _Pickle()
    p.out += b"}"
    p.put(("dict",))
    tensor_memo: dict[str, int] = {}
    n = len(metas)
    start = 0
    while n:  # items in batches (MARK ... SETITEMS), one item alone as SETITEM; as pickle does
        batch = metas[start : start + BATCHSIZE]
        start += len(batch)
        if n > 1:
            p.out += b"("
        for m in batch:
            p.string(m.name, None)
            key = keys[m.name]
            if key in tensor_memo:
                p.get(tensor_memo[key])
                continue
            legacy = LEGACY_STORAGE.get(m.dtype)
            p.global_("torch._utils", "_rebuild_tensor_v2" if legacy else "_rebuild_tensor_v3")
            p.out += b"(("
            p.string("storage", ("str", "storage"))
            if legacy:
                p.global_("torch", legacy)
            else:
                p.global_("torch.storage", "UntypedStorage")
            p.string(key, ("key", key))
            p.string("cpu", ("str", "cpu"))
            numel = math.prod(m.shape)
            p.integer(numel if legacy else lookup_dtype(m.dtype).nbytes(numel))
            p.out += b"t"
            p.put()
            p.out += b"Q"  # BINPERSID
            p.integer(0)  # storage offset
            p.int_tuple(m.shape)
            p.int_tuple(contiguous_strides(m.shape))
            p.out += b"\x89"  # requires_grad=False
            p.global_("collections", "OrderedDict")
            p.out += b")R"
            p.put()
            if not legacy:
                p.global_("torch", m.dtype)
            p.out += b"t"
            p.put()
            p.out += b"R"
            tensor_memo[key] = p.put()
        p.out += b"s" if n == 1 else b"u"
        if n == 1 or len(batch) < BATCHSIZE:  # a full batch is followed by another (maybe empty) one
            break
    p.out += b"."
    return bytes(p.out)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


# -- torch zip records ----------------------------------------------------------------------------

ALIGN = 64  # torch.save aligns every entry's data to 64 bytes
U32 = 0xFFFFFFFF
U16 = 0xFFFF


@dataclass
class ZipEntry:
    name: bytes
    offset: int  # of the local header
    size: int
    crc: int = 0


def local_header(name: bytes, offset: int, size: int) -> bytes:
    """A stored entry's local header (sizes and CRC in the data descriptor that follows the data),
    padded with an ``FB`` extra field so the data starts on a 64-byte boundary."""
    extra = b""
    if size >= U32 or offset >= U32:
        fields = (struct.pack("<QQ", size, size) if size >= U32 else b"") + (struct.pack("<Q", offset) if offset >= U32 else b"")
        extra = struct.pack("<HH", 1, len(fields)) + fields
    start = offset + 30 + len(name) + len(extra) + 4
    pad = -start % ALIGN
    extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
    flags = 0x0808 if size else 0x0800  # data descriptor follows; names are UTF-8
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra


def data_descriptor(e: ZipEntry) -> bytes:
    if not e.size:
        return b""
    if e.size >= U32 or e.offset >= U32:
        return struct.pack("<4sIQQ", b"PK\x07\x08", e.crc, e.size, e.size)
    return struct.pack("<4sIII", b"PK\x07\x08", e.crc, e.size, e.size)


def central_directory(entries: Sequence[ZipEntry], cd_offset: int) -> bytes:
    """Central directory, zip64 end record and locator, and the end record."""
    out = bytearray()
    for e in entries:
        fields = b""
        size32 = e.size
        off32 = e.offset
        if e.size >= U32:
            fields += struct.pack("<QQ", e.size, e.size)
            size32 = U32
        if e.offset >= U32:
            fields += struct.pack("<Q", e.offset)
            off32 = U32
        extra = struct.pack("<HH", 1, len(fields)) + fields if fields else b""
        flags = 0x0808 if e.size else 0x0800
        out += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            0,
            0,
            flags,
            0,
            0,
            0,
            e.crc,
            size32,
            size32,
            len(e.name),
            len(extra),
            0,
            0,
            0,
            0,
            off32,
        )
        out += e.name + extra
    cd_size = len(out)
    eocd64 = cd_offset + cd_size
    n = len(entries)
    out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_offset)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(n, U16), min(n, U16), min(cd_size, U32), min(cd_offset, U32), 0)
    return bytes(out)


def storage_keys(metas: Sequence[TensorMeta], ties: Sequence[Sequence[str]]) -> tuple[dict[str, str], list[int]]:
    """Storage key of each name (``"0"``, ``"1"``, ... in order of first use; tied names share
    their group's key), and the indices of ``metas`` whose bytes are written (one per key)."""
    group_of = {n: i for i, g in enumerate(ties) for n in g}
    keys: dict[str, str] = {}
    group_key: dict[int, str] = {}
    stored: list[int] = []
    for i, m in enumerate(metas):
        g = group_of.get(m.name)
        if g is not None and g in group_key:
            keys[m.name] = group_key[g]
            continue
        keys[m.name] = str(len(stored))
        stored.append(i)
        if g is not None:
            group_key[g] = keys[m.name]
    return keys, stored


def check_torch_output(metas: Sequence[TensorMeta], where: str) -> None:
    """Refuse, before anything is written, a tensor whose type a ``.pt`` file cannot hold."""
    for m in metas:
        why = torch_dtype_ok(m.dtype)
        if why:
            raise OutputError(f"{where}: cannot write tensor {m.name!r} to a .pt file: {why}")


def check_flax_output(metas: Sequence[TensorMeta], where: str) -> None:
    """Refuse packed sub-byte types (quint4x2, quint2x4) in a Flax file, before anything is written."""
    for m in metas:
        if lookup_dtype(m.dtype).value_bits:
            raise OutputError(
                f"{where}: cannot write tensor {m.name!r}: {m.dtype} (packed values): statemap reads it, but cannot convert or write it"
            )


# -- Flax msgpack ---------------------------------------------------------------------------------

EXT_NDARRAY = 1


def _mp_str(s: str) -> bytes:
    b = s.encode("utf-8")
    n = len(b)
    if n < 32:
        return bytes([0xA0 | n]) + b
    if n < 256:
        return b"\xd9" + bytes([n]) + b
    if n < 1 << 16:
        return b"\xda" + struct.pack(">H", n) + b
    return b"\xdb" + struct.pack(">I", n) + b


def _mp_uint(x: int) -> bytes:
    if x < 128:
        return bytes([x])
    if x < 256:
        return b"\xcc" + bytes([x])
    if x < 1 << 16:
        return b"\xcd" + struct.pack(">H", x)
    if x < 1 << 32:
        return b"\xce" + struct.pack(">I", x)
    return b"\xcf" + struct.pack(">Q", x)


def _mp_container(n: int, fix: int, head16: bytes, head32: bytes) -> bytes:
    """A msgpack map or array header for ``n`` entries: fix form, 16-bit or 32-bit count."""
    if n < 16:
        return bytes([fix | n])
    if n < 1 << 16:
        return head16 + struct.pack(">H", n)
    return head32 + struct.pack(">I", n)


def _mp_map(n: int) -> bytes:
    return _mp_container(n, 0x80, b"\xde", b"\xdf")


def _mp_array(n: int) -> bytes:
    return _mp_container(n, 0x90, b"\xdc", b"\xdd")


def _mp_bin_head(n: int) -> bytes:
    if n < 256:
        return b"\xc4" + bytes([n])
    if n < 1 << 16:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)


def _mp_ext_head(code: int, n: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code])
    if n < 256:
        return b"\xc7" + bytes([n, code])
    if n < 1 << 16:
        return b"\xc8" + struct.pack(">H", n) + bytes([code])
    return b"\xc9" + struct.pack(">I", n) + bytes([code])


def _leaf_head(shape: Sequence[int], dtype_name: str, nbytes: int) -> bytes:
    """Everything of one array extension before its raw bytes."""
    payload_head = _mp_array(3) + _mp_array(len(shape)) + b"".join(_mp_uint(d) for d in shape)
    payload_head += _mp_str(dtype_name) + _mp_bin_head(nbytes)
    return _mp_ext_head(EXT_NDARRAY, len(payload_head) + nbytes) + payload_head


@dataclass(frozen=True)
class Piece:
    """One piece of a streamed msgpack file: literal bytes, or ``length`` bytes of tensor ``index``
    starting at byte ``start``."""

    data: bytes = b""
    index: int = -1
    start: int = 0
    length: int = 0


def flax_tree_order(metas: Sequence[TensorMeta]) -> list[int]:
    """The order in which a nested Flax map holds ``metas`` (each module's members together, keys
    sorted at every level, as flax writes them): the order the streamed file is written in."""
    tree = nest((m.name, i) for i, m in enumerate(metas))
    order: list[int] = []

    def walk(node: dict[str, object]) -> None:
        for _, v in sorted(node.items()):
            if isinstance(v, dict):
                walk(v)
            else:
                order.append(v)  # type: ignore[arg-type]

    walk(tree)
    return order


def flax_layout(metas: Sequence[TensorMeta]) -> Iterator[Piece]:
    """The pieces of a Flax msgpack file holding ``metas`` (as :func:`pack_msgpack` / flax's
    ``to_bytes`` would write them), tensor bytes referenced, not held."""
    tree = nest((m.name, i) for i, m in enumerate(metas))

    def leaf(i: int) -> Iterator[Piece]:
        m = metas[i]
        dt = lookup_dtype(m.dtype)
        nbytes = m.nbytes
        if nbytes <= MAX_CHUNK:
            yield Piece(_leaf_head(m.shape, m.dtype, nbytes))
            yield Piece(index=i, start=0, length=nbytes)
            return
        numel = math.prod(m.shape)
        step = max(1, MAX_CHUNK // dt.itemsize)
        n_chunks = -(-numel // step)
        head = _mp_map(3) + _mp_str(CHUNKED) + b"\xc3" + _mp_str("shape") + _mp_map(len(m.shape))
        head += b"".join(_mp_str(str(k)) + _mp_uint(d) for k, d in enumerate(m.shape))
        head += _mp_str("chunks") + _mp_map(n_chunks)
        yield Piece(head)
        for c in range(n_chunks):
            count = min(step, numel - c * step)
            yield Piece(_mp_str(str(c)) + _leaf_head((count,), m.dtype, count * dt.itemsize))
            yield Piece(index=i, start=c * step * dt.itemsize, length=count * dt.itemsize)

    def walk(node: dict[str, object]) -> Iterator[Piece]:
        yield Piece(_mp_map(len(node)))
        for k, v in sorted(node.items()):  # flax (through jax's tree functions) writes keys sorted
            yield Piece(_mp_str(k))
            if isinstance(v, dict):
                yield from walk(v)
            else:
                yield from leaf(v)  # type: ignore[arg-type]

    yield from walk(tree)


__all__ = ["torch_pickle", "storage_keys", "local_header", "central_directory", "flax_layout", "flax_tree_order"]
