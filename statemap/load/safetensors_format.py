"""safetensors headers, read and validated without touching tensor bytes.

Format: 8-byte little-endian header length N, N bytes of JSON, then the data buffer.
Each entry: ``{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}`` relative to
the buffer; entries must tile the buffer exactly (no gaps, no overlaps).
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import struct
from collections.abc import Sequence
from typing import Any

from ..dtypes import dtype as lookup_dtype
from ..dtypes import st_shape, torch_shape
from ..errors import CheckpointError, OutputError
from ..gcpause import paused
from ..meta import TensorMeta
from .checkpoint import ByteTensor

MAX_HEADER = 100 << 20  # same bound as the safetensors library
MAX_HEADER_ITEMS = 2_000_000  # JSON items (counted as commas) parsed from one header: bounds parse time and memory
MAX_TENSORS = 200_000  # tensors in one file (real checkpoints hold a few thousand per file)
MAX_DIMS = 64  # dimensions of one tensor (numpy's limit)


def read_header(path: str) -> tuple[dict[str, TensorMeta], dict[str, ByteTensor], dict[str, str]]:
    """Return (metas, byte locations, __metadata__) for a .safetensors file, all validated.

    Example::

        >>> metas, locs, meta = read_header("model.safetensors")
        >>> metas["final_logits_bias"].shape, locs["final_logits_bias"].dtype
        ((1, 64), 'float32')
    """
    metas, locs, meta, _ = read_header_ids(path)
    return metas, locs, meta


Header = tuple[dict[str, TensorMeta], dict[str, ByteTensor], dict[str, str], dict[str, str]]


def read_header_ids(path: str) -> Header:
    """:func:`read_header` plus each tensor's storage id (``{path}@{begin}``, for tie detection)."""
    raw, n, size = _read_raw(path)
    with paused():  # many small objects, no cycles (see statemap.gcpause)
        if b"\\" not in raw and b"true" not in raw and b"false" not in raw:
            try:
                return _fast(path, raw, n, size)
            except Exception:  # anything unusual: the checked path below decides, and names the problem
                pass
        return _slow(path, raw, n, size)


def _read_raw(path: str) -> tuple[bytes, int, int]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the {MAX_HEADER >> 20} MiB limit (corrupt or hostile file)"
                )
            if 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw.count(b",") > MAX_HEADER_ITEMS or raw.count(b'"data_offsets"') > MAX_TENSORS:
        raise CheckpointError(
            f"{path}: header holds more than {MAX_HEADER_ITEMS:,} JSON items or {MAX_TENSORS:,} tensors; "
            "refusing to parse it (corrupt or hostile file)"
        )
    return raw, n, size


class _Unusual(Exception):
    """The fast path met something it does not handle: the checked path takes over."""


def _no_float(text: str) -> Any:
    raise _Unusual(text)


def _plain(raw: bytes) -> tuple[dict[str, Any], dict[str, str], int, int]:
    """The header parsed (no float), without ``__metadata__``; that metadata (``{}`` if none); the
    object members counted and the colons inside names and metadata strings (see :func:`_fast`).
    Raises :class:`_Unusual` for a header that is not an object or metadata that is not strings."""
    header = json.loads(raw.decode("utf-8"), parse_float=_no_float)
    if type(header) is not dict:
        raise _Unusual
    members = len(header)
    colons = "\0".join(header).count(":")
    meta_raw = header.pop("__metadata__", None)
    if meta_raw is None:
        return header, {}, members, colons
    if type(meta_raw) is not dict or not all(type(v) is str for v in meta_raw.values()):
        raise _Unusual
    members += len(meta_raw)
    colons += "\0".join(meta_raw).count(":") + "\0".join(meta_raw.values()).count(":")
    return header, meta_raw, members, colons


def _fast(path: str, raw: bytes, n: int, size: int) -> Header:
    """The common, valid header in one pass over plain tuples: the same result as :func:`_slow`,
    which runs instead (and names the problem) whenever anything here is unusual.

    Why it is equivalent: the raw bytes hold no backslash (every JSON string is literal), no
    ``true``/``false`` token and (``parse_float``) no float, so every JSON number is an int and a
    shape tuple equal to one already checked holds the same ints. JSON has a colon per object
    member plus those inside strings, so ``raw.count(b":")`` equals the members and string colons
    found in the parsed header exactly when no object repeats a name (a repeat is dropped by
    ``json.loads``: the counts then differ and :func:`_slow` reports it). Every entry must be the
    plain ``{dtype, shape, data_offsets}`` form; the buffer must be tiled exactly.
    """
    header, meta_raw, members, colons = _plain(raw)
    data_start = 8 + n
    buffer_len = size - data_start
    dtypes: dict[str, Any] = {}
    # (dtype, shape) -> (torch dtype, bytes, the shape tuple every equal entry then shares)
    checked: dict[tuple[str, tuple[int, ...]], tuple[str, int, tuple[int, ...]]] = {}
    metas: dict[str, TensorMeta] = {}
    locs: dict[str, ByteTensor] = {}
    ids: dict[str, str] = {}
    begins: list[int] = []
    ends: list[int] = []
    keys = _ENTRY_KEYS
    pos = 0
    in_order = True
    for name, info in header.items():
        if type(info) is not dict or info.keys() != keys:
            raise _Unusual
        dts, shape, off = info["dtype"], info["shape"], info["data_offsets"]
        if type(shape) is not list or type(off) is not list or len(off) != 2:
            raise _Unusual
        shape_t = tuple(shape)
        got = checked.get((dts, shape_t))
        if got is None:
            dt = dtypes.get(dts)
            if dt is None:
                dt = dtypes[dts] = lookup_dtype(dts)
            if dt.per_item != 1 or len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
                raise _Unusual
            got = checked[(dts, shape_t)] = (dt.name, math.prod(shape) * dt.itemsize, shape_t)
        torch_name, need, shape_t = got
        begin, end = off
        if not (0 <= begin <= end and end - begin == need and end <= buffer_len):
            raise _Unusual
        if begin != pos:
            in_order = False
        pos = end
        begins.append(begin)
        ends.append(end)
        metas[name] = TensorMeta(name, shape_t, torch_name)
        ids[name] = sid = f"{path}@{begin}"
        locs[name] = ByteTensor(path, data_start + begin, torch_name, shape_t, None, sid)
    if raw.count(b":") != members + 3 * len(metas) + colons:
        raise _Unusual  # a repeated name somewhere
    if not in_order:
        pos = 0
        for begin, end in sorted(zip(begins, ends)):
            if begin != pos:
                raise _Unusual
            pos = end
    if pos != buffer_len:
        raise _Unusual
    return metas, locs, dict(meta_raw), ids


class HeaderColumns:
    """One shard header as parallel lists (see :func:`read_columns`)."""

    __slots__ = ("names", "pairs", "begins", "data_start", "kinds")

    def __init__(
        self,
        names: list[str],
        pairs: list[tuple[str, tuple[int, ...]]],
        begins: list[int],
        data_start: int,
        kinds: dict[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...], int]],
    ) -> None:
        self.names, self.pairs, self.begins, self.data_start, self.kinds = names, pairs, begins, data_start, kinds


def read_columns(path: str) -> HeaderColumns | None:
    """The common, valid header as parallel lists (names, ``(dtype, shape)`` per key, data
    offsets), checked with whole-list operations and no object per key; None when anything is
    unusual (out-of-order entries, an entry of another form, a float, an escape, a repeated
    name, an empty header, ...): :func:`read_header_ids` then reads it and names any problem.
    Bounds (header size, item and tensor counts) are those of :func:`read_header_ids`.

    Example::

        >>> cols = read_columns("model.safetensors")
        >>> cols.names[0], cols.kinds[cols.pairs[0]]     # (torch dtype, shape, bytes)
        ('model.shared.weight', ('float32', (64, 16), 4096))
    """
    try:
        raw, n, size = _read_raw(path)
    except CheckpointError:
        return None
    if b"\\" in raw:  # an escape: a name's colons are not the raw text's (see _fast)
        return None
    try:  # (a `true` / `false` parses to a bool, which the exact type checks below decline)
        with paused():
            return _columns_text(raw, n, size) or _columns(raw, n, size)
    except Exception:  # anything unusual: the per-key readers decide
        return None


def _entry_forms() -> dict[str, tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str], int]]:
    """Per separator form (``""``: compact, as the safetensors library writes; ``" "``: after each
    ``:`` and ``,``, as ``json.dumps`` writes): the regex of one header entry with the separator
    before it, of a leading ``__metadata__`` member of plain strings, of one metadata pair, and
    the number of characters an entry's regex matches besides its four groups."""
    num = "(?:0|[1-9][0-9]*)"  # a JSON integer >= 0 (no sign, no leading zero, no fraction or exponent)
    chars = r'[^"\\\x00-\x1f]*'  # a JSON string's text without escapes (its text is its value)
    forms = {}
    for sp in ("", " "):
        entry = re.compile(
            rf',{sp}"({chars})":{sp}\{{"dtype":{sp}"([A-Z0-9_]+",{sp}"shape":{sp}\[(?:{num}(?:,{sp}{num})*)?)'
            rf'\],{sp}"data_offsets":{sp}\[({num}),{sp}({num})\]\}}'
        )
        pair = rf'"({chars})":{sp}"{chars}"'
        meta = re.compile(rf'\{{"__metadata__":{sp}\{{((?:{pair})(?:,{sp}{pair})*)?\}},{sp}')
        fixed = len(f',{sp}"":{sp}{{"dtype":{sp}"],{sp}"data_offsets":{sp}[,{sp}]}}')
        forms[sp] = (entry, meta, re.compile(pair), fixed)
    return forms


_FORMS = _entry_forms()


def _columns_text(raw: bytes, n: int, size: int) -> HeaderColumns | None:
    """The common header (plain entries in offset order, no escape, compact or ``json.dumps``
    spacing, an optional leading ``__metadata__`` of strings) read with one regex pass and no
    JSON object per entry; None for anything else (:func:`_columns` then tries).

    Why it reads what ``json.loads`` reads: the entries' matches are disjoint and in order, and
    their lengths (the groups plus the fixed text of each) add up to the whole text between the
    braces, so that text is exactly the entries one after another: a JSON object whose members
    are these names (strings without escapes: their text is their value) mapped to
    ``{"dtype": D, "shape": [ints], "data_offsets": [int, int]}``. A repeated name (which
    ``json.loads`` would drop) declines, and so does anything the checks of :func:`_columns`
    reject (an unknown dtype raises, which the caller treats alike)."""
    text = raw.decode("utf-8").rstrip(" ")  # the safetensors library pads the header with spaces
    colon = text.find('":')
    sp = " " if text.startswith(" ", colon + 2) else ""
    entry, meta, pair_rx, fixed = _FORMS[sp]
    if not (text.startswith("{") and text.endswith("}")):
        return None
    start = 1
    if text.startswith('{"__metadata__":'):
        m = meta.match(text)
        if m is None:
            return None
        keys = pair_rx.findall(m.group(1) or "")
        if len(set(keys)) != len(keys):
            return None  # a repeated metadata key: the checked reader names it
        start = m.end()
    body = f",{sp}{text[start:-1]}"
    found = entry.findall(body)
    if not found:
        return None
    names, kts, bs, es = (list(x) for x in zip(*found))
    covered = len(found) * fixed + sum(map(len, names)) + sum(map(len, kts)) + sum(map(len, bs)) + sum(map(len, es))
    unique = set(names)
    if covered != len(body) or len(unique) != len(names) or "__metadata__" in unique:
        return None  # (json.loads keeps one of two equal names; a later __metadata__ is not a tensor)
    pairs_of: dict[str, tuple[str, tuple[int, ...]]] = {}
    kinds: dict[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...], int]] = {}
    need: dict[str, int] = {}
    for kt in dict.fromkeys(kts):
        dts, _, dims = kt.partition('"')
        dims = dims[dims.index("[") + 1 :]
        shape_t = tuple(map(int, dims.split(","))) if dims else ()
        dt = lookup_dtype(dts)  # an unknown dtype raises: the per-key reader names it
        if dt.per_item != 1 or len(shape_t) > MAX_DIMS:
            return None
        pair = pairs_of[kt] = (dts, shape_t)
        kind = kinds.setdefault(pair, (dt.name, shape_t, math.prod(shape_t) * dt.itemsize))
        need[kt] = kind[2]
    data_start = 8 + n
    # tiled in order (as in _columns): equal JSON integers without leading zeros are equal strings
    last = int(es[-1])
    if bs[0] != "0" or bs[1:] != es[:-1] or last != size - data_start:
        return None
    begins = list(map(int, bs))
    ends = begins[1:]
    ends.append(last)
    if list(map(operator.sub, ends, begins)) != list(map(need.__getitem__, kts)):
        return None
    return HeaderColumns(names, list(map(pairs_of.__getitem__, kts)), begins, data_start, kinds)


_GET_ENTRY = operator.itemgetter("dtype", "shape", "data_offsets")


def _columns(raw: bytes, n: int, size: int) -> HeaderColumns | None:
    """:func:`_fast`'s checks, each over whole lists (same conditions, same result)."""
    header, _, members, colons = _plain(raw)  # _Unusual: read_columns declines
    if not header:
        return None
    infos = list(header.values())
    if {*map(type, infos)} != {dict} or {*map(len, infos)} != {3}:
        return None
    dts, shapes, offs = zip(*map(_GET_ENTRY, infos))  # KeyError: another form
    if {*map(type, shapes)} != {list} or {*map(type, offs)} != {list} or {*map(len, offs)} != {2}:
        return None
    begins, ends = zip(*offs)
    if {*map(type, begins)} != {int} or {*map(type, ends)} != {int}:
        return None
    pairs = list(zip(dts, map(tuple, shapes)))
    kinds: dict[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...], int]] = {}
    for dts_, shape_t in dict.fromkeys(pairs):
        dt = lookup_dtype(dts_)  # an unknown dtype raises: the per-key reader names it
        if dt.per_item != 1 or len(shape_t) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape_t):
            return None
        kinds[(dts_, shape_t)] = (dt.name, shape_t, math.prod(shape_t) * dt.itemsize)
    need = {k: v[2] for k, v in kinds.items()}
    data_start = 8 + n
    # tiled in order: the first at 0, each where the one before ended, the last at the end of the
    # file, each spanning what its dtype and shape need (so none is negative or out of bounds)
    if begins[0] != 0 or begins[1:] != ends[:-1] or ends[-1] != size - data_start:
        return None
    if list(map(operator.sub, ends, begins)) != list(map(need.__getitem__, pairs)):
        return None
    if raw.count(b":") != members + 3 * len(infos) + colons:
        return None  # a repeated name somewhere
    return HeaderColumns(list(header), pairs, list(begins), data_start, kinds)


def _slow(path: str, raw: bytes, n: int, size: int) -> Header:
    """Every check, entry by entry, with the error that names the problem."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON: {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object")
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    buffer_len = size - data_start
    metas: dict[str, TensorMeta] = {}
    locs: dict[str, ByteTensor] = {}
    spans: list[tuple[int, int, str]] = []
    dtypes: dict[str, Any] = {}  # dtype spelling -> DType, looked up once per file
    for name, info in header.items():
        # the common, valid entry is checked with few operations; anything else takes _check_entry's
        # slow path, which names the problem
        if type(info) is not dict or len(info) != 3 or info.keys() != _ENTRY_KEYS:
            _check_entry(path, name, info)
        dts, shape, off = info["dtype"], info["shape"], info["data_offsets"]
        dt = dtypes.get(dts) if type(dts) is str else None
        if dt is None:
            dt = dtypes[dts] = _check_dtype(path, name, dts)
        if type(shape) is not list or len(shape) > MAX_DIMS or not ({*map(type, shape)} <= _INT and min(shape, default=0) >= 0):
            _check_entry(path, name, info)
        if type(off) is not list or len(off) != 2 or type(off[0]) is not int or type(off[1]) is not int:
            _check_entry(path, name, info)
        begin, end = off
        if dt.per_item != 1:
            try:
                shape = list(torch_shape(dt, tuple(shape)))  # F4 / F6 count packed values; torch counts bytes
            except Exception as e:
                raise CheckpointError(f"{path}: tensor {name!r}: {e}") from None
        need = math.prod(shape) * dt.itemsize
        if not 0 <= begin <= end:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {off} are out of order")
        if end - begin != need:
            raise CheckpointError(
                f"{path}: tensor {name!r}: data_offsets span {end - begin} bytes but {dt.st_name} x {info['shape']} needs {need}"
            )
        if end > buffer_len:
            raise CheckpointError(
                f"{path}: tensor {name!r}: data ends at byte {end} of a {buffer_len}-byte buffer (truncated file?)"
            )
        spans.append((begin, end, name))
        shape_t = tuple(shape)
        metas[name] = TensorMeta(name, shape_t, dt.name)
        locs[name] = ByteTensor(path, data_start + begin, dt.name, shape_t, storage=f"{path}@{begin}")
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise CheckpointError(f"{path}: tensor {name!r} overlaps the tensor before it (offset {begin} < {pos})")
        if begin > pos:
            raise CheckpointError(f"{path}: {begin - pos} unaccounted bytes before tensor {name!r}")
        pos = end
    if pos != buffer_len:
        raise CheckpointError(
            f"{path}: header accounts for {pos} data bytes but the file holds {buffer_len} (truncated or padded?)"
        )
    return metas, locs, dict(meta_raw), {k: v.storage for k, v in locs.items()}


def encode_header(metas: Sequence[TensorMeta], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header for tensors written back to back in ``metas`` order
    (padded with spaces to a multiple of 8, as the safetensors library pads).

    Example::

        >>> encode_header([TensorMeta("w", (2,), "float32")], {})[8:].rstrip()
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for m in metas:
        n = m.nbytes
        dt = lookup_dtype(m.dtype)
        if not dt.st_name:
            raise OutputError(
                f"tensor {m.name!r} is {dt.name}, which safetensors cannot hold; cast it (op 'cast') or write a .pt file"
            )
        header[m.name] = {"dtype": dt.st, "shape": list(st_shape(dt, m.shape)), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_INT = frozenset({int})


def _check_dtype(path: str, name: str, dts: Any) -> Any:
    try:
        return lookup_dtype(dts)
    except Exception:
        raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {dts!r}") from None


def _check_entry(path: str, name: str, info: Any) -> None:
    """Raise the error that names what is wrong with a header entry (the slow path)."""
    if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} or len(info) != 3:
        raise CheckpointError(f"{path}: tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    shape = info["shape"]
    if isinstance(shape, list) and len(shape) > MAX_DIMS:
        raise CheckpointError(f"{path}: tensor {name!r}: shape has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r}: shape {shape!r} must be a list of non-negative integers")
    off = info["data_offsets"]
    if not (isinstance(off, list) and len(off) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in off)):
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {off!r} must be two integers")
    raise AssertionError(f"{path}: tensor {name!r}: entry rejected without a reason (bug)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C; the per-key search runs only when a name repeats
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"tensor {k!r} appears twice in the header")
            seen.add(k)
    return out
