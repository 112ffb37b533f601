"""numpy ``.npz`` archives (``np.savez`` / ``np.savez_compressed``), read without pickle.

An ``.npz`` is a zip of ``<name>.npy`` entries. Each ``.npy`` is the magic ``\\x93NUMPY``, a
version, a header length and a Python-literal header ``{'descr': '<f4', 'fortran_order': False,
'shape': (3, 4), }``, then the raw array bytes. The header is matched as text (never
evaluated); object arrays (``descr`` ``'|O'``, which numpy pickles) are refused, as
``np.load(allow_pickle=False)`` refuses them. Stored entries are read in place (one ``pread``);
compressed entries are inflated when read, bounded by the size the header declares.
"""

from __future__ import annotations

import math
import re
import struct
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..meta import TensorMeta
from .checkpoint import ByteTensor, Checkpoint, FileReader

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"\x93NUMPY"
# numpy writes the header dict with sorted keys; it is matched as text, never evaluated
_HEADER = re.compile(r"^\{\s*'descr':\s*'([^']*)',\s*'fortran_order':\s*(True|False),\s*'shape':\s*\(([0-9,\s]*)\),?\s*\}\s*$")
MAX_HEADER = 1 << 20
MAX_RATIO = 1000  # deflated zeros compress ~1000x; refuse more (zip bombs)

__all__ = ["is_npz", "open_npz"]


def is_npz(names: list[str]) -> bool:
    return bool(names) and all(n.endswith(".npy") for n in names)


def _header(raw: bytes, entry: str, path: str) -> tuple[int, Any, bool, tuple[int, ...]]:
    """(header size, numpy dtype, fortran order, shape) of a .npy entry's first bytes."""
    import numpy as np

    if raw[:6] != MAGIC or len(raw) < 10:
        raise CheckpointError(f"{path}: entry {entry!r} is not a .npy array (bad magic)")
    major = raw[6]
    if major == 1:
        (n,), start = struct.unpack("<H", raw[8:10]), 10
    elif major in (2, 3) and len(raw) >= 12:
        (n,), start = struct.unpack("<I", raw[8:12]), 12
    else:
        raise CheckpointError(f"{path}: entry {entry!r} has .npy version {major}, which statemap does not know")
    if n > MAX_HEADER or start + n > len(raw):
        raise CheckpointError(f"{path}: entry {entry!r} has a bad .npy header length {n}")
    text = raw[start : start + n].decode("latin1" if major < 3 else "utf-8")
    m = _HEADER.match(text)
    if m is None:
        raise CheckpointError(f"{path}: entry {entry!r} is not a plain array (structured dtype or unreadable .npy header)")
    descr, fortran = m.group(1), m.group(2) == "True"
    shape = tuple(int(x) for x in m.group(3).replace(",", " ").split())
    if "O" in descr:
        raise CheckpointError(
            f"{path}: entry {entry!r} is an object array (numpy pickles those); statemap reads .npz without pickle"
        )
    try:
        dt = np.dtype(descr)
    except TypeError:
        raise CheckpointError(f"{path}: entry {entry!r} has an unknown dtype {descr!r}") from None
    if dt.kind in "USVMm":
        raise CheckpointError(f"{path}: entry {entry!r} is a {dt} array, not a tensor")
    return start + n, dt, fortran, shape


def open_npz(path: str) -> Checkpoint:
    """Open an ``.npz``: one tensor per ``.npy`` entry, named by the entry without ``.npy``.

    Example::

        >>> ck = open_npz("weights.npz")     # np.savez("weights.npz", w=..., b=...)
        >>> sorted(ck.metas)
        ['b', 'w']
    """

    from ..dtypes import from_numpy

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file: {e}") from None
    metas: dict[str, TensorMeta] = {}
    locations: dict[str, ByteTensor] = {}
    inflate: dict[str, Callable[[], np.ndarray]] = {}
    with zf, open(path, "rb") as f:
        for info in zf.infolist():
            entry = info.filename
            if info.is_dir():
                continue
            if not entry.endswith(".npy"):
                raise CheckpointError(f"{path}: entry {entry!r} is not a .npy array; not an .npz file")
            name = entry[: -len(".npy")]
            if info.compress_type == zipfile.ZIP_STORED:
                f.seek(info.header_offset)
                local = f.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{path}: bad local header for {entry!r} (corrupt file)")
                n_name, n_extra = struct.unpack("<HH", local[26:30])
                data_start = info.header_offset + 30 + n_name + n_extra
                f.seek(data_start)
                head = f.read(min(info.file_size, MAX_HEADER + 12))
            else:
                if info.compress_size and info.file_size / info.compress_size > MAX_RATIO:
                    raise CheckpointError(f"{path}: entry {entry!r} expands more than {MAX_RATIO}x; refusing a likely zip bomb")
                with zf.open(info) as member:
                    head = member.read(MAX_HEADER + 12)
                data_start = -1
            hsize, dt, fortran, shape = _header(head, entry, path)
            need = math.prod(shape) * dt.itemsize
            if info.file_size != hsize + need:
                raise CheckpointError(
                    f"{path}: entry {entry!r} holds {info.file_size - hsize} data bytes, {dt} x {list(shape)} needs {need}"
                )
            sdt = from_numpy(dt)
            metas[name] = TensorMeta(name, shape, sdt.name)
            if data_start >= 0 and dt.byteorder in "<|=" and dt.isnative:
                stride = None
                if fortran and len(shape) > 1:
                    acc, st = 1, []
                    for d in shape:
                        st.append(acc)
                        acc *= d
                    stride = tuple(st)
                locations[name] = ByteTensor(path, data_start + hsize, sdt.name, shape, stride, storage=f"{path}:{entry}")
            else:
                inflate[name] = _reader(path, entry, hsize, dt, fortran, shape)
    if not metas:
        raise CheckpointError(f"{path}: .npz archive holds no arrays")
    files = FileReader()

    def read(k: str) -> np.ndarray:
        if k in inflate:
            return inflate[k]()
        return files.read(locations[k])

    return Checkpoint(
        path,
        "npz",
        metas,
        read,
        locations=locations,
        storage_ids={k: v.storage for k, v in locations.items()},
        closer=files.close,
    )


def _reader(path: str, entry: str, hsize: int, dt: Any, fortran: bool, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        import numpy as np

        need = math.prod(shape) * dt.itemsize
        with zipfile.ZipFile(path) as zf, zf.open(entry) as e:
            e.read(hsize)
            raw = e.read(need)
        if len(raw) != need:
            raise CheckpointError(f"{path}: entry {entry!r} is truncated")
        a = np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")
        out = a.astype(dt.newbyteorder("<"), order="C", copy=True)
        out.flags.writeable = False
        return out

    return read
