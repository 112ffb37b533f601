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
    name: str  # torch spelling: "float32", "bfloat16", ...
    st: str  # safetensors spelling: "F32", "BF16", ...
    storage: str  # numpy dtype the bytes are held in
    kind: str  # "float", "int", "uint", "bool"
    itemsize: int

    @property
    def np(self) -> Any:
        import numpy

        return numpy.dtype(self.storage)

    @property
    def native(self) -> bool:
        """True when numpy computes with this type directly (not a bit container)."""
        return self.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


_ALL = [
    DType("float64", "F64", "<f8", "float", 8),
    DType("float32", "F32", "<f4", "float", 4),
    DType("float16", "F16", "<f2", "float", 2),
    DType("bfloat16", "BF16", "<u2", "float", 2),
    DType("float8_e4m3fn", "F8_E4M3", "u1", "float", 1),
    DType("float8_e5m2", "F8_E5M2", "u1", "float", 1),
    DType("int64", "I64", "<i8", "int", 8),
    DType("int32", "I32", "<i4", "int", 4),
    DType("int16", "I16", "<i2", "int", 2),
    DType("int8", "I8", "i1", "int", 1),
    DType("uint64", "U64", "<u8", "uint", 8),
    DType("uint32", "U32", "<u4", "uint", 4),
    DType("uint16", "U16", "<u2", "uint", 2),
    DType("uint8", "U8", "u1", "uint", 1),
    DType("bool", "BOOL", "?", "bool", 1),
]
_BY_NAME = {d.name: d for d in _ALL}
_BY_ST = {d.st: d for d in _ALL}
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
}
# numpy type codes -> our name, for arrays that arrive as numpy (Paddle, Flax, user dicts)
_FROM_NUMPY = {
    "f8": "float64",
    "f4": "float32",
    "f2": "float16",
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


def dtype(name: str) -> DType:
    """Look a type up by torch name, safetensors name or common alias."""
    key = str(name).strip()
    key = key.removeprefix("torch.")
    if key in _BY_NAME:
        return _BY_NAME[key]
    if key in _BY_ST:
        return _BY_ST[key]
    if key.lower() in _ALIASES:
        return _BY_NAME[_ALIASES[key.lower()]]
    raise StatemapError(f"unknown dtype {name!r}; known: {', '.join(NAMES)}")


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
