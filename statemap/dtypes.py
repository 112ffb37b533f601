"""Element types, named as torch names them, with their numpy storage types.

statemap moves tensors as numpy arrays. Types numpy lacks (bfloat16, float8) travel
as unsigned integers of the same width: renames, splits, merges, transposes, slices
and pads only move bits, so they are exact for every type. Only ``cast`` interprets
values, and it implements bfloat16 itself (round to nearest even).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import StatemapError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type. ``itemsize`` is the bytes of one torch element; ``bits`` the width of one
    safetensors element (differs only for packed types: safetensors ``F4`` counts 4-bit values,
    torch ``float4_e2m1fn_x2`` counts bytes holding two of them)."""

    name: str  # torch spelling: "float32", "bfloat16", ...
    st_name: str  # safetensors spelling: "F32", "BF16", ...; "" when safetensors has none
    storage: str  # numpy dtype the bytes are held in
    kind: str  # "float", "int", "uint", "bool", "complex", "bits", "quantized"
    itemsize: int
    bits: int = 0  # bits of one safetensors element; 0 = itemsize * 8
    is_native: bool = False  # numpy computes with it directly (not a bit container)
    value_bits: int = 0  # torch packs several values per byte (quint4x2: 4, quint2x4: 2); 0 = whole bytes

    def nbytes(self, numel: int) -> int:
        """Bytes ``numel`` elements take (packed sub-byte types round up to whole bytes)."""
        return -(-numel * self.value_bits // 8) if self.value_bits else numel * self.itemsize

    @property
    def np(self) -> Any:
        import numpy

        return numpy.dtype(self.storage)

    @property
    def native(self) -> bool:
        """True when numpy computes with this type directly (not a bit container)."""
        return self.is_native

    @property
    def st(self) -> str:
        """The safetensors name; an error for types safetensors cannot hold (complex128, qint8, ...)."""
        if not self.st_name:
            raise StatemapError(f"safetensors has no {self.name} type; cast it (op 'cast') or write a .pt file")
        return self.st_name

    @property
    def per_item(self) -> int:
        """Safetensors elements per torch element: 2 for float4_e2m1fn_x2, 4 for the float6 x4 packs, else 1."""
        return self.itemsize * 8 // self.bits if self.bits else 1


def _d(
    name: str, st: str, storage: str, kind: str, itemsize: int, bits: int = 0, native: bool = False, value_bits: int = 0
) -> DType:
    return DType(name, st, storage, kind, itemsize, bits, native, value_bits)


# Every dtype torch 2.13 defines, and every safetensors dtype. Types numpy lacks travel as
# unsigned integers (or raw bytes) of the same width.
_ALL = [
    _d("float64", "F64", "<f8", "float", 8, native=True),
    _d("float32", "F32", "<f4", "float", 4, native=True),
    _d("float16", "F16", "<f2", "float", 2, native=True),
    _d("bfloat16", "BF16", "<u2", "float", 2),
    _d("float8_e4m3fn", "F8_E4M3", "u1", "float", 1),
    _d("float8_e5m2", "F8_E5M2", "u1", "float", 1),
    _d("float8_e4m3fnuz", "F8_E4M3FNUZ", "u1", "float", 1),
    _d("float8_e5m2fnuz", "F8_E5M2FNUZ", "u1", "float", 1),
    _d("float8_e8m0fnu", "F8_E8M0", "u1", "float", 1),
    _d("float4_e2m1fn_x2", "F4", "u1", "float", 1, bits=4),
    # safetensors F6 types have no torch dtype: 4 values packed in 3 bytes
    _d("float6_e2m3fn_x4", "F6_E2M3", "V3", "float", 3, bits=6),
    _d("float6_e3m2fn_x4", "F6_E3M2", "V3", "float", 3, bits=6),
    _d("complex128", "", "<c16", "complex", 16, native=True),
    _d("complex64", "C64", "<c8", "complex", 8, native=True),
    _d("complex32", "", "<u4", "complex", 4),
    _d("int64", "I64", "<i8", "int", 8, native=True),
    _d("int32", "I32", "<i4", "int", 4, native=True),
    _d("int16", "I16", "<i2", "int", 2, native=True),
    _d("int8", "I8", "i1", "int", 1, native=True),
    _d("uint64", "U64", "<u8", "uint", 8, native=True),
    _d("uint32", "U32", "<u4", "uint", 4, native=True),
    _d("uint16", "U16", "<u2", "uint", 2, native=True),
    _d("uint8", "U8", "u1", "uint", 1, native=True),
    _d("bool", "BOOL", "?", "bool", 1, native=True),
    _d("bits8", "", "u1", "bits", 1),
    _d("bits16", "", "<u2", "bits", 2),
    _d("bits1x8", "", "u1", "bits", 1),
    _d("bits2x4", "", "u1", "bits", 1),
    _d("bits4x2", "", "u1", "bits", 1),
    _d("qint8", "", "i1", "quantized", 1),
    _d("quint8", "", "u1", "quantized", 1),
    _d("qint32", "", "<i4", "quantized", 4),
    # quantize_per_tensor packs their values, several per byte: a [4] quint4x2 tensor is 2 bytes
    _d("quint4x2", "", "u1", "quantized", 1, value_bits=4),
    _d("quint2x4", "", "u1", "quantized", 1, value_bits=2),
    # sub-byte integers: torch names them (one per byte) but cannot save them yet
    *(_d(f"int{n}", "", "i1", "int", 1) for n in range(1, 8)),
    *(_d(f"uint{n}", "", "u1", "uint", 1) for n in range(1, 8)),
]
_BY_NAME = {d.name: d for d in _ALL}
_BY_ST = {d.st_name: d for d in _ALL if d.st_name}
_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "double": "float64",
    "fp64": "float64",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
    "bit": "uint1",
}
# numpy type codes -> our name, for arrays that arrive as numpy (Paddle, Flax, user dicts)
_FROM_NUMPY = {
    "f8": "float64",
    "f4": "float32",
    "f2": "float16",
    "c16": "complex128",
    "c8": "complex64",
    "i8": "int64",
    "i4": "int32",
    "i2": "int16",
    "i1": "int8",
    "u8": "uint64",
    "u4": "uint32",
    "u2": "uint16",
    "u1": "uint8",
    "b1": "bool",
}

NAMES = tuple(d.name for d in _ALL)
TORCH_NAMES = frozenset(n for n in NAMES if not n.startswith("float6")) | {a for a in _ALIASES if a.isalpha()}


def dtype(name: str) -> DType:
    """Look a type up by torch name, safetensors name or common alias."""
    found = _BY_NAME.get(name) if isinstance(name, str) else None  # the usual case, first
    if found is not None:
        return found
    key = name.strip() if isinstance(name, str) else str(name)[:80].strip()
    key = key.removeprefix("torch.")
    if key in _BY_NAME:
        return _BY_NAME[key]
    if key in _BY_ST:
        return _BY_ST[key]
    if key.lower() in _ALIASES:
        return _BY_NAME[_ALIASES[key.lower()]]
    shown = key[:40] + ("..." if len(key) > 40 else "")
    raise StatemapError(f"unknown dtype {shown!r}; known: {', '.join(NAMES[:24])}, ...")


def st_shape(dt: DType, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A torch shape -> the shape safetensors writes (packed types count their sub-byte values).

    Example::

        >>> st_shape(dtype("float4_e2m1fn_x2"), (3, 8))
        (3, 16)
    """
    if dt.per_item == 1:
        return tuple(shape)
    if not shape:
        raise StatemapError(f"a scalar {dt.name} has no safetensors shape")
    return (*shape[:-1], shape[-1] * dt.per_item)


def torch_shape(dt: DType, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A safetensors shape -> the torch shape (inverse of :func:`st_shape`); error if it does not divide."""
    if dt.per_item == 1:
        return tuple(shape)
    if not shape or shape[-1] % dt.per_item:
        raise StatemapError(f"{dt.st_name} shape {list(shape)}: the last dimension must be a multiple of {dt.per_item}")
    return (*shape[:-1], shape[-1] // dt.per_item)


def from_numpy(dt: Any) -> DType:
    import numpy

    d = numpy.dtype(dt)
    try:
        return _BY_NAME[_FROM_NUMPY[f"{d.kind}{d.itemsize}"]]
    except KeyError:
        raise StatemapError(f"numpy dtype {dt} has no tensor equivalent") from None


# -- value conversion ------------------------------------------------------------------


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:

    return (bits.astype("<u4") << 16).view("<f4")


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    import numpy as np  # noqa: F811

    x = np.asarray(x, dtype="<f4", order="C")
    u = x.view("<u4")
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype("<u2")


def to_compute(a: np.ndarray, dt: DType) -> np.ndarray:
    """Bits in storage form -> values numpy can compute with."""
    if dt.name == "bfloat16":
        return _bf16_to_f32(a)
    if not dt.native:
        raise StatemapError(f"cannot compute with {dt.name} values; only move them")
    return a


def from_compute(a: np.ndarray, dt: DType) -> np.ndarray:
    """Values -> bits in ``dt``'s storage form."""
    import numpy as np  # noqa: F811

    if dt.name == "bfloat16":
        return _f32_to_bf16(np.asarray(a, dtype="<f4"))
    if not dt.native:
        raise StatemapError(f"cannot produce {dt.name} values; only move them")
    return np.asarray(a).astype(dt.np, copy=False)


def cast(a: np.ndarray, src: DType, dst: DType) -> np.ndarray:
    if src == dst:
        return a
    return from_compute(to_compute(a, src), dst)
