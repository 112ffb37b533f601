"""correspond: explain every tensor of checkpoint B by the content of checkpoint A.

Each side is read once, by two threads that each hold one tensor at a time (and the A tensors that
could explain what is left again; float32 embeddings are hashed from their file, never read
whole); only fingerprints are kept: per-row and per-column hashes of the tensor seen as a matrix
``[first dim, rest]`` (size-1 dims dropped), over its values (bfloat16 / float16 / float32
compare as float32 values, so a lossless cast hashes the same), plus the same hashes of A rounded
to each narrower float type B holds (so a lossy cast still matches). The hashes are linear and
exact (integer sums of random 8-bit coefficients times element bits, computed as float64
matrix products; see :class:`_Hasher`), so a row of A and a column of B compare directly:
that is how transposes, splits and merges along a dim, and row reorders are found. A name A
holds as ``[m, n]`` and B as ``[n, m]`` has only B's columns hashed (:func:`_transpose_pairs`).

Every B key gets one :class:`Correspondence`:

=============  ==================================================================
kind           meaning
=============  ==================================================================
``same``       same name, value, shape and dtype in A
``renamed``    equal to one A tensor of another name (``cast`` says if rounded)
``tied``       a further copy of an A tensor another B key already holds
``swapped``    both names exist in A and B, and B holds A's other tensor (both ways)
``cast``       same name, B is A's values in another dtype (rounded if narrower)
``reshaped``   same bytes as an A tensor, another shape
``transposed`` B is an A matrix transposed (all of it, or a block of its columns)
``split``      B is a block of rows (dim 0) or columns (dim 1) of one A tensor
``merged``     B is whole A tensors concatenated along dim 0 or 1
``permuted``   B is an A tensor with its rows reordered (the permutation is given)
``gathered``   B's rows come from several A tensors, in pieces
``differs``    same name and shape, values differ (max abs / rel diff, which rows)
``constant``   no counterpart; every element is one value (e.g. injected zeros)
``unmatched``  no counterpart in A
=============  ==================================================================

A keys nobody explains are listed as ``dropped`` (or ``duplicate`` of one that is used).
numpy is imported lazily; nothing here knows a framework.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .dtypes import DType
from .dtypes import cast as cast_values
from .dtypes import dtype as lookup_dtype
from .errors import CheckpointError
from .meta import TensorMeta
from .report import _ranges as _brace_ranges

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Correspondence", "Dropped", "Explanation", "Piece", "explain", "render_explanation"]

_CHUNK = 1 << 20  # elements hashed at a time: bounds the temporaries
_MAX_ROWS = 1 << 21  # longer dims are hashed whole (no row index; bounds the coefficient tables)
_ALIAS_LIMIT = 1 << 30  # bytes a stride-0 (repeated) view may expand to when compared
_MAX_CANDIDATES = 32  # candidate positions tried per row (constant rows match everywhere)
_K_LEN, _K_M, _K_N = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK = (1 << 64) - 1
_WIDTH = {"float64": 3, "float32": 2, "bfloat16": 1, "float16": 1}
PROBLEMS = ("swapped", "cast", "reshaped", "transposed", "split", "merged", "permuted", "gathered", "differs", "unmatched")


@dataclass(frozen=True)
class Piece:
    """B's rows (or columns) ``b`` are A key ``a``'s rows (or columns) ``a_range``."""

    b: tuple[int, int]
    a: str
    a_range: tuple[int, int]
    b_axis: str = "rows"  # "rows" (dim 0 of B) or "cols" (the rest)
    a_axis: str = "rows"  # "cols": transposed
    cast: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"b": list(self.b), "b_axis": self.b_axis, "a": self.a, "a_range": list(self.a_range), "a_axis": self.a_axis}


@dataclass(frozen=True)
class Correspondence:
    """How one B key relates to A (see the module docstring for ``kind``)."""

    b: str
    kind: str
    a: tuple[str, ...] = ()
    detail: str = ""
    pieces: tuple[Piece, ...] = ()
    cast: str = ""  # B's dtype when B is A rounded to it
    max_abs: float | None = None
    max_rel: float | None = None
    rows_differ: str = ""  # e.g. "[8:16] (8 of 32 rows)"
    rule: str = ""  # with a spec: file:line of the rule that produced the key

    @property
    def ok(self) -> bool:
        return self.kind in ("same", "renamed", "tied", "constant") and not self.cast

    def to_json(self) -> dict[str, Any]:
        return {
            "b": self.b,
            "kind": self.kind,
            "a": list(self.a),
            "detail": self.detail,
            "pieces": [p.to_json() for p in self.pieces],
            "cast": self.cast or None,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "rows_differ": self.rows_differ or None,
            "rule": self.rule or None,
        }


@dataclass(frozen=True)
class Dropped:
    """An A key no B key holds: ``kind`` is ``dropped``, or ``duplicate`` (of ``of``, which is used)."""

    a: str
    kind: str = "dropped"
    of: str = ""
    rule: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "kind": self.kind, "of": self.of or None, "rule": self.rule or None}


@dataclass
class Explanation:
    """Every B key explained, and the A keys left over."""

    b: list[Correspondence] = field(default_factory=list)
    a_left: list[Dropped] = field(default_factory=list)
    equal: set[str] = field(default_factory=set)  # names with equal values on both sides

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.b:
            out[c.kind] = out.get(c.kind, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"b": [c.to_json() for c in self.b], "a_left": [d.to_json() for d in self.a_left], "counts": self.counts}


# -- fingerprints ------------------------------------------------------------------------------


@dataclass
class _FP:
    key: str
    meta: TensorMeta
    m: int
    n: int
    rows: Any  # uint64 [m]; None when too long to index
    cols: Any  # uint64 [n]
    full: int
    variant: str = ""  # "" = own values; else the dtype A's values were rounded to
    orig: str = ""  # with a variant: the dtype the values had


def _view2d(shape: tuple[int, ...]) -> tuple[int, int]:
    s = [d for d in shape if d != 1]
    if not s:
        return (1, 1) if all(d == 1 for d in shape) else (0, 0)
    if len(s) == 1:
        return s[0], 1
    return s[0], math.prod(s[1:])


def _canon(a: np.ndarray, dt: DType, f64_as_f32: bool) -> np.ndarray:
    """Element values as uint64 bits: floats up to 32 bits as float32 bits (lossless)."""
    import numpy as np

    if dt.name == "bfloat16":
        return a.astype(np.uint64) << np.uint64(16)
    if dt.name == "float16":
        return a.astype(np.float32).view(np.uint32).astype(np.uint64)
    if dt.name == "float32":
        return a.view(np.uint32).astype(np.uint64)
    if dt.name == "float64":
        return a.astype(np.float32).view(np.uint32).astype(np.uint64) if f64_as_f32 else a.view(np.uint64).copy()
    if not dt.native:  # float8: the bits, tagged so they never equal another type's
        return a.astype(np.uint64) | np.uint64(1 << 62)
    return a.astype(np.int64).view(np.uint64)


_PIECE_K = (1, _K_LEN, _K_M, _K_N)  # weights of (32-bit piece, coefficient set) sums
_EXACT = 1 << 13  # positions summed at a time in float64: 2**13 * 2**32 * 2**8 = 2**53, exact
_BLOCK = 1 << 18  # elements per work block (reused buffers of 2 MB: no page faults per block)
_STREAM = 1 << 20  # bytes of rows read at a time by _Hasher.fingerprint_stream (measured: 0.5-2 MB equally fast)
_STREAMED = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}  # dtype -> stored form, hashed as read
RangeReader = Callable[[int, int, "np.ndarray"], "np.ndarray"]  # (byte offset, count, uint8 out) -> out filled


class _Hasher:
    """Linear hashes of every row and column: for a vector ``v`` of canonical values (32 or 64
    bits, cut in 32-bit pieces ``v_p``), ``H(v) = sum_{p,s} K_ps * sum_j c_s[j] * v_p[j] + len * K``
    mod 2**64, with two sets of random 8-bit coefficients ``c_s``. The inner sums are float64
    matrix products (BLAS; both coefficient sets in one pass over a block: ``[k, w] @ [w, 2]`` for
    rows, ``[2, k] @ [k, w]`` for columns) over at most 2**13 positions at a time, where every
    partial sum is an integer below 2**53 and so exact in any order: a row of A and a column of B
    hash equal exactly when their values are equal (up to the hash), and no transpose is ever made."""

    def __init__(self, length: int, workers: int = 2) -> None:
        import numpy as np

        rng = np.random.default_rng(0x5747E)
        n = max(length, 1)
        self.c = rng.integers(1, 1 << 8, size=(2, n)).astype(np.float64)
        self.c16 = self.c * 65536.0  # bfloat16: its bits times 2**16 are its canonical value
        self.ct, self.ct16 = np.ascontiguousarray(self.c.T), np.ascontiguousarray(self.c16.T)  # [n, 2]: rows' GEMM
        self.d = rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.workers = max(1, workers)

    def fingerprint(
        self, key: str, meta: TensorMeta, a: np.ndarray, variant: str = "", cols: bool = True, with_rows: bool = True
    ) -> _FP:
        """Row and column hashes of ``a`` (``with_rows=False``: the columns alone; ``full`` is then 0)."""
        import numpy as np

        dt = lookup_dtype(meta.dtype)
        m, n = _view2d(meta.shape)
        x = np.ascontiguousarray(a).reshape(m, n) if m * n else a.reshape(0, 0)
        f64_as_f32 = False
        if dt.name == "float64" and m * n:
            f64_as_f32 = bool(np.array_equal(x.astype(np.float32).astype(np.float64), x, equal_nan=True))
        big = dt.kind == "complex" and dt.native and dt.itemsize > 8  # complex128: 16 bytes a value, hashed whole
        if big or m > _MAX_ROWS or m * n == 0 or m > self.c.shape[1] or n > self.c.shape[1]:
            h = hashlib.blake2b(digest_size=8, person=str((m, n)).encode()[:16])
            for buf in _canon_bytes(x, dt):
                h.update(buf)
            return _FP(key, meta, m, n, None, None, int.from_bytes(h.digest(), "little"), variant)
        rows = np.zeros(m, dtype=np.uint64)
        step = max(1, min(_EXACT, _BLOCK // min(n, _EXACT)))
        spans = [(r0, min(m, r0 + step)) for r0 in range(0, m, step)]
        if self.workers > 1 and m * n >= 4 * _BLOCK and len(spans) > 1:
            from concurrent.futures import ThreadPoolExecutor

            half = (len(spans) + 1) // 2
            with ThreadPoolExecutor(2) as pool:  # numpy and BLAS release the GIL
                parts = list(
                    pool.map(lambda sp: self._part(x, dt, f64_as_f32, sp, rows, cols, with_rows), (spans[:half], spans[half:]))
                )
            col = parts[0] + parts[1] if cols else None
        else:
            part = self._part(x, dt, f64_as_f32, spans, rows, cols, with_rows)
            col = part if cols else None
        if col is not None:
            col += np.uint64((m * _K_LEN) & _MASK)
        if not with_rows:
            return _FP(key, meta, m, n, None, col, 0, variant)
        rows += np.uint64((n * _K_LEN) & _MASK)
        full = (int((rows * self.d[:m]).sum()) + m * _K_M + n * _K_N) & _MASK
        return _FP(key, meta, m, n, rows, col, full, variant)

    def _part(
        self,
        x: np.ndarray,
        dt: DType,
        f64_as_f32: bool,
        spans: list[tuple[int, int]],
        rows: np.ndarray,
        with_cols: bool = True,
        with_rows: bool = True,
        at: int = 0,
        cols: np.ndarray | None = None,
        work: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Add the hashes of rows ``spans`` of ``x`` to ``rows`` (in place) and return their column
        sums (added to ``cols`` when given). ``at``: the row of the whole tensor that is ``x``'s row 0
        (``x`` is then a block of rows read from the file); ``work``: the float64 and canonical
        buffers of :meth:`_work` to reuse."""
        import numpy as np

        m, n = x.shape
        if cols is None:
            cols = np.zeros(n, dtype=np.uint64)
        wide = _canon_wide(dt, f64_as_f32)
        piece, tmp = work if work is not None else self._work(spans[0][1] - spans[0][0], n, wide)
        coef = self.c16 if dt.name == "bfloat16" else self.c
        coef_t = self.ct16 if dt.name == "bfloat16" else self.ct
        for r0, r1 in spans:
            k = r1 - r0
            for j0 in range(0, n, _EXACT):
                j1 = min(n, j0 + _EXACT)
                w = j1 - j0
                buf = piece[:k, :w]
                block = x[r0:r1, j0:j1]
                if dt.name in ("bfloat16", "float32"):
                    src = block.view(np.uint32) if dt.name == "float32" else block
                else:
                    src = tmp[:k, :w]
                    _canon_into(block, dt, f64_as_f32, src)
                for p in range(2 if wide else 1):
                    if wide:
                        if p == 0:
                            np.bitwise_and(src, np.uint64(0xFFFFFFFF), out=buf, casting="unsafe")
                        else:
                            np.right_shift(src, np.uint64(32), out=buf, casting="unsafe")
                    else:
                        np.copyto(buf, src, casting="unsafe")
                    # both coefficient sets in one pass over the block: [k, w] @ [w, 2] and [2, k] @ [k, w]
                    k0, k1 = np.uint64(_PIECE_K[2 * p]), np.uint64(_PIECE_K[2 * p + 1])
                    if with_rows:
                        rr = (buf @ coef_t[j0:j1]).astype(np.uint64)
                        rows[at + r0 : at + r1] += rr[:, 0] * k0 + rr[:, 1] * k1
                    if with_cols:
                        cc = (coef[:, at + r0 : at + r1] @ buf).astype(np.uint64)
                        cols[j0:j1] += cc[0] * k0 + cc[1] * k1
        return cols

    @staticmethod
    def _work(step: int, n: int, wide: bool) -> tuple[np.ndarray, np.ndarray]:
        """The float64 block and the canonical-values block :meth:`_part` works in (``step`` rows)."""
        import numpy as np

        width = min(n, _EXACT)
        return np.empty((step, width), dtype=np.float64), np.empty((step, width), dtype=np.uint64 if wide else np.uint32)

    def fingerprint_stream(
        self, key: str, meta: TensorMeta, rr: RangeReader, cols: bool = True, with_rows: bool = True, starts: bool = False
    ) -> tuple[_FP, np.ndarray | None] | None:
        """:meth:`fingerprint` of a tensor read from its file by ``rr`` (see :data:`RangeReader`) a
        few rows at a time (~:data:`_STREAM` bytes, into one reused buffer, hashed while in cache):
        exactly the same hashes (integer sums, in any order), without the tensor in memory or a
        second pass over it. With ``starts``, also every row's first two values (``[m, 2]``, in the
        stored form, for :func:`_row_starts`; ``n >= 2``). None when the tensor is not of a type
        hashed this way (float32, float16, bfloat16) or is hashed whole: read it and call
        :meth:`fingerprint`."""
        import numpy as np

        dt = lookup_dtype(meta.dtype)
        m, n = _view2d(meta.shape)
        store = _STREAMED.get(dt.name)
        if store is None or m * n == 0 or m > _MAX_ROWS or m > self.c.shape[1] or n > self.c.shape[1] or (starts and n < 2):
            return None
        row_bytes = n * dt.itemsize
        per = max(1, min(m, _STREAM // row_bytes))  # rows read at a time
        step = max(1, min(_EXACT, _BLOCK // min(n, _EXACT)))
        raw, work = _stream_work(per * row_bytes, min(step, per), min(n, _EXACT))
        rows = np.zeros(m, dtype=np.uint64)
        col = np.zeros(n, dtype=np.uint64) if cols else None
        first = np.empty((m, 2), dtype=store) if starts else None
        for r0 in range(0, m, per):
            k = min(per, m - r0)
            x = rr(r0 * row_bytes, k * row_bytes, raw[: k * row_bytes]).view(store).reshape(k, n)
            if first is not None:
                first[r0 : r0 + k] = x[:, :2]
            spans = [(s, min(k, s + step)) for s in range(0, k, step)]
            self._part(x, dt, False, spans, rows, cols, with_rows, r0, col, work)
        if col is not None:
            col += np.uint64((m * _K_LEN) & _MASK)
        if not with_rows:
            return _FP(key, meta, m, n, None, col, 0), first
        rows += np.uint64((n * _K_LEN) & _MASK)
        full = (int((rows * self.d[:m]).sum()) + m * _K_M + n * _K_N) & _MASK
        return _FP(key, meta, m, n, rows, col, full), first


def _canon_wide(dt: DType, f64_as_f32: bool) -> bool:
    """The canonical value of ``dt`` takes 64 bits (else 32)."""
    if dt.name in ("bfloat16", "float16", "float32"):
        return False
    if dt.name == "float64":
        return not f64_as_f32
    return True


def _canon_into(x: np.ndarray, dt: DType, f64_as_f32: bool, out: np.ndarray) -> None:
    """The canonical values of :func:`_canon` of block ``x``, written into ``out`` (uint32 for
    values that fit 32 bits, else uint64)."""
    import numpy as np

    if dt.name == "float32":
        np.copyto(out, x.view(np.uint32))
    elif dt.name == "bfloat16":
        np.left_shift(x, 16, out=out, casting="unsafe")
    elif dt.name == "float16" or (dt.name == "float64" and f64_as_f32):
        np.copyto(out, x.astype(np.float32).view(np.uint32))
    elif dt.name == "float64" or (dt.kind == "complex" and dt.native):  # complex64: both parts, 64 bits
        np.copyto(out, x.view(np.uint64))
    elif not dt.native:  # float8: the bits, tagged so they never equal another type's
        np.bitwise_or(x.astype(np.uint64), np.uint64(1 << 62), out=out)
    else:
        np.copyto(out, x.astype(np.int64).view(np.uint64))


def _narrower(src: str, dst: str) -> bool:
    """Rounding ``src`` values to ``dst`` can lose something (both floats, ``dst`` not wider)."""
    return src != dst and src in _WIDTH and dst in _WIDTH and _WIDTH[dst] <= _WIDTH[src]


def _fingerprints(
    metas: Mapping[str, TensorMeta],
    read: Callable[[str], np.ndarray],
    hasher: _Hasher,
    round_to: Callable[[TensorMeta], list[str]] = lambda m: [],
    cols: bool = True,
) -> list[_FP]:
    """The fingerprints of every tensor (and of its rounded variants), in ``metas`` order; read and
    hashed on two threads as :func:`_quick_all` does (one read at a time, one tensor per thread)."""
    import copy
    import threading
    from contextlib import nullcontext

    one = copy.copy(hasher)
    one.workers = 1
    got: dict[str, list[_FP]] = {}
    reading, big = threading.Lock(), threading.Lock()

    def work(k: str) -> None:
        meta = metas[k]
        with big if meta.nbytes > _BIG_ONE else nullcontext():
            with reading:
                x = read(k)
            got[k] = _fingerprint_one(k, meta, x, one, round_to, cols)
            del x

    keys = [k for k, m in metas.items() if m.numel]
    _each(keys, work, 2 if len(keys) > 1 else 1)
    return [fp for k in keys for fp in got[k]]


def _fingerprint_one(
    k: str, meta: TensorMeta, a: np.ndarray, hasher: _Hasher, round_to: Callable[[TensorMeta], list[str]], cols: bool = True
) -> list[_FP]:
    """The fingerprint of ``a``, and of ``a`` rounded to each dtype ``round_to`` names."""
    out = [hasher.fingerprint(k, meta, a, cols=cols)]
    for x in round_to(meta):
        r = cast_values(a, lookup_dtype(meta.dtype), lookup_dtype(x))
        fp = hasher.fingerprint(k, TensorMeta(k, meta.shape, x), r, variant=x, cols=cols)
        fp.orig = meta.dtype
        out.append(fp)
    return out


def _canon_bytes(a: np.ndarray, dt: DType) -> Iterable[Any]:
    """The tensor's values in the canonical form of :func:`_canon`, as buffers of at most ~8 MB
    (float32 tensors without a copy)."""
    import numpy as np

    flat = np.ascontiguousarray(a).reshape(-1)
    if dt.name == "float32" or dt.kind == "complex" or (not dt.native and dt.name != "bfloat16"):
        yield flat.data  # float32 as is; complex as is (both parts); float8 bits as is (tagged by the caller)
        return
    if dt.name == "float64":
        as32 = bool(np.array_equal(flat.astype(np.float32).astype(np.float64), flat, equal_nan=True))
        if not as32:
            yield flat.data
            return
    step = 1 << 21
    for i in range(0, len(flat), step):
        part = flat[i : i + step]
        if dt.kind == "float":
            part = (
                (part.astype(np.uint32) << np.uint32(16)).view(np.float32) if dt.name == "bfloat16" else part.astype(np.float32)
            )
        else:
            part = part.astype(np.int64)
        yield part.data


_ID_WORDS = 1 << 13  # 64-bit words per block of the whole-tensor identity
_ID_CHUNK = 32  # blocks multiplied at a time (2 MB of reused temporaries)
_ID_SMALL = 1 << 16  # bytes: shorter buffers take zlib's CRC-32 (fewer numpy calls)
_id_tables: list[Any] = []  # [K, D, K']: the identity's position, block and high-half multipliers, made once


def _id_keys(blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Odd multipliers: random, one per word position in a block (K); one per block index (D: a
    fixed mix of the index, so a longer table keeps the earlier entries)."""
    import numpy as np

    if not _id_tables:
        rng = np.random.default_rng(0x1DE7)
        k = rng.integers(0, 2**63, size=_ID_WORDS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        k_hi = rng.integers(0, 2**63, size=_ID_WORDS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        _id_tables[:] = [k, None, k_hi]
    d = _id_tables[1]
    if d is None or len(d) < blocks:
        z = np.arange(max(blocks, 2 * (0 if d is None else len(d))), dtype=np.uint64) + np.uint64(_K_LEN)  # splitmix64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_K_M)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_K_N)
        d = _id_tables[1] = (z ^ (z >> np.uint64(31))) | np.uint64(1)
    return _id_tables[0], d


def _word_hash(mv: memoryview) -> tuple[int, int]:
    """Identity of one buffer: a 64-bit hash that depends on every word's value and position, and
    the wrapping sum of the 64-bit words (tail bytes included). The hash is
    ``len * C + sum_b D_b * sum_i (K_i * w + K'_i * (w >> 32))[b * 2**13 + i] + tail * C'`` mod 2**64
    with random odd multipliers: each 32-bit half of a word has an odd multiplier of its own
    (``K`` for the low half, ``2**32 * K + K'`` for the high one), so changing one word always
    changes the hash, and any other change does with probability ~2**-32 or less (a change of
    under 2**32 times an odd number cannot have more than 31 trailing zero bits). With ``K * w``
    alone the high half's multiplier would be ``2**32 * K``: flipping the sign bit of the high
    float32 of two words (negating two odd-indexed elements) added ``2**63`` twice and went unseen.
    Memory speed (numpy, 2 MB at a time), ~2x zlib's CRC-32. Buffers under 64 KB take zlib's CRC-32
    instead (less overhead per call; the choice depends on the length only, so equal buffers
    still hash alike)."""
    return _word_hash_from(len(mv), lambda off, n: mv[off : off + n])


def _word_hash_from(nbytes: int, get: Callable[[int, int], Any]) -> tuple[int, int]:
    """:func:`_word_hash` of ``nbytes`` bytes that ``get(offset, count)`` hands over a piece at a
    time (at most 2 MB; a piece is used before the next is asked for): the same result whether
    the bytes are in memory or read from a file piece by piece."""
    import numpy as np

    n8 = nbytes // 8
    if nbytes < _ID_SMALL:
        import zlib

        mv = memoryview(get(0, nbytes)).cast("B")
        words = np.frombuffer(mv, dtype=np.uint64, count=n8) if n8 else np.zeros(0, np.uint64)
        tail = int.from_bytes(bytes(mv[n8 * 8 :]), "little")
        return zlib.crc32(mv), (int(np.add.reduce(words)) + tail) & _MASK
    tail = int.from_bytes(bytes(get(n8 * 8, nbytes - n8 * 8)), "little") if nbytes > n8 * 8 else 0
    full = n8 // _ID_WORDS
    k, d = _id_keys(full + 1)
    k_hi = _id_tables[2]
    h, total = nbytes * _K_LEN + tail * _K_N, tail
    tmp = np.empty((2, min(_ID_CHUNK, max(full, 1)), _ID_WORDS), dtype=np.uint64)
    shift = np.uint64(32)
    for b0 in range(0, full, _ID_CHUNK):
        b1 = min(full, b0 + _ID_CHUNK)
        t, u = tmp[0, : b1 - b0], tmp[1, : b1 - b0]
        w = np.frombuffer(get(b0 * _ID_WORDS * 8, (b1 - b0) * _ID_WORDS * 8), dtype=np.uint64).reshape(b1 - b0, _ID_WORDS)
        total += int(np.add.reduce(w, axis=None))
        np.multiply(w, k, out=t)
        np.right_shift(w, shift, out=u)
        np.multiply(u, k_hi, out=u)
        np.add(t, u, out=t)
        h += int(np.multiply(t.sum(axis=1), d[b0:b1]).sum())
    r = n8 - full * _ID_WORDS
    if r:
        rest = np.frombuffer(get(full * _ID_WORDS * 8, r * 8), dtype=np.uint64)
        total += int(np.add.reduce(rest))
        h += int((np.multiply(rest, k[:r]) + np.multiply(rest >> shift, k_hi[:r])).sum()) * int(d[full])
    return h & _MASK, total & _MASK


def _quick_parts(meta: TensorMeta, a: np.ndarray) -> tuple[Any, ...]:
    """Whole-tensor identity of the values at memory speed: per ~8 MB piece of the canonical bytes
    (two halves for a float32 tensor of 1 MB or more) a 64-bit hash of the words and their
    positions (:func:`_word_hash`) and a 64-bit word sum.
    The shape is left out: reshapes match. Returns the parts, after the element count and the tag."""
    dt = lookup_dtype(meta.dtype)
    parts: list[Any] = []
    for buf in _canon_bytes(a, dt):
        mv = memoryview(buf).cast("B")
        if len(mv) >= 1 << 20:
            half = (len(mv) // 2) & ~7
            parts += [_word_hash(mv[:half]), _word_hash(mv[half:])]
        else:
            parts.append(_word_hash(mv))
    tag = dt.name if (not dt.native and dt.name != "bfloat16") else ""  # float8 bits equal only float8 bits
    return (meta.numel, tag, *parts)


_BIG_ONE = 1 << 26  # bytes: tensors larger than this (embeddings) are read and hashed one at a time
_A_STREAM_FROM = 1 << 20  # bytes: larger A tensors whose array nothing needs are hashed as read from the file


def _each(keys: list[str], work: Callable[[str], None], workers: int = 2) -> None:
    """``work(key)`` for every key, on ``workers`` threads (the caller's and helpers), each taking
    the next key as it goes; the first exception stops the others and is raised here."""
    import threading

    it = iter(keys)
    take = threading.Lock()
    err: list[BaseException] = []

    def loop() -> None:
        try:
            while not err:
                with take:
                    k = next(it, None)
                if k is None:
                    return
                work(k)
        except BaseException as e:  # raised in the caller's thread below
            err.append(e)

    helpers = [threading.Thread(target=loop, name="statemap-explain", daemon=True) for _ in range(max(0, workers - 1))]
    for t in helpers:
        t.start()
    try:
        loop()
    finally:
        for t in helpers:
            t.join()
    if err:
        raise err[0]


_stream_bufs = threading.local()


def _stream_work(nbytes: int, step: int, width: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """This thread's reused buffers for :meth:`_Hasher.fingerprint_stream`: ``nbytes`` of raw rows, and
    the float64 / uint32 ``[step, width]`` blocks of :meth:`_Hasher._part` (``step * width <= _BLOCK``):
    no pages faulted in and zeroed per tensor."""
    import numpy as np

    raw = getattr(_stream_bufs, "raw", None)
    if raw is None or raw.nbytes < nbytes:
        raw = _stream_bufs.raw = np.empty(max(nbytes, _STREAM), dtype=np.uint8)
    if getattr(_stream_bufs, "f64", None) is None:
        _stream_bufs.f64, _stream_bufs.u32 = np.empty(_BLOCK, dtype=np.float64), np.empty(_BLOCK, dtype=np.uint32)
    size = step * width
    return raw[:nbytes], (_stream_bufs.f64[:size].reshape(step, width), _stream_bufs.u32[:size].reshape(step, width))


def _quick_stream(meta: TensorMeta, rr: RangeReader, row_bytes: int = 0) -> tuple[tuple[Any, ...], np.ndarray | None]:
    """:func:`_quick_parts` of a float32 tensor read from its file 2 MB at a time into one reused
    buffer (``rr(offset, count, out)``: ``count`` bytes at ``offset`` of the tensor's data): the
    same identity, without the tensor ever being in memory (no pages faulted in for it). With
    ``row_bytes``, also the first two values of every row (rows of that many bytes) as a float32
    ``[rows, 2]`` array, taken from the pieces as they pass (for :func:`_row_starts`)."""
    import numpy as np

    buf = getattr(_stream_bufs, "buf", None)
    if buf is None:  # one per thread, reused: no pages faulted in and zeroed per tensor
        buf = _stream_bufs.buf = np.empty(_ID_CHUNK * _ID_WORDS * 8, dtype=np.uint8)
    nbytes = meta.nbytes
    rows = nbytes // row_bytes if row_bytes else 0
    first = np.zeros((rows, 8), dtype=np.uint8)
    done = np.zeros(rows, dtype=bool)
    lane = np.arange(8)

    def get(at: int, n: int) -> np.ndarray:
        got = rr(at, n, buf[:n])
        if rows:
            r0, r1 = -(-at // row_bytes), max(0, (at + n - 8) // row_bytes + 1)  # rows whose first 8 bytes are in this piece
            if r1 > r0:
                first[r0:r1] = got[(np.arange(r0, r1) * row_bytes - at)[:, None] + lane]
                done[r0:r1] = True
        return got

    def part(lo: int, hi: int) -> tuple[int, int]:
        return _word_hash_from(hi - lo, lambda off, n: get(lo + off, n))

    half = (nbytes // 2) & ~7
    parts = [part(0, half), part(half, nbytes)] if nbytes >= 1 << 20 else [part(0, nbytes)]
    if not rows:
        return (meta.numel, "", *parts), None
    for r in np.nonzero(~done)[0]:  # first values across two pieces: read on their own
        rr(int(r) * row_bytes, 8, first[r])
    return (meta.numel, "", *parts), first.view(np.float32).reshape(rows, 2)


def _first_middle_last(meta: TensorMeta, rr: RangeReader) -> bool:
    """Whether the first, middle and last elements of a tensor read by ``rr`` are equal (bytewise):
    if not, it is not a constant (:func:`_constant_value`'s first test, without reading it)."""
    import numpy as np

    size = lookup_dtype(meta.dtype).itemsize
    got = [bytes(rr(i * size, size, np.empty(size, dtype=np.uint8))) for i in (0, meta.numel // 2, meta.numel - 1)]
    return got[0] == got[1] == got[2]


def _quick_all(
    metas: Mapping[str, TensorMeta],
    read: Callable[[str], np.ndarray],
    then: Callable[[str, TensorMeta, np.ndarray | None, tuple[Any, ...]], None] | None = None,
    skip: Callable[[str, TensorMeta], bool] = lambda k, m: False,
    workers: int = 2,
    ranges: Callable[[str], RangeReader | None] | None = None,
    needs: Callable[[str, TensorMeta], bool] = lambda k, m: True,
    reading: Any = None,
    row_starts: Callable[[str, TensorMeta], int] = lambda k, m: 0,
    starts_of: Callable[[str, TensorMeta, np.ndarray], None] = lambda k, m, first: None,
    stream: Callable[[str, TensorMeta, RangeReader], bool] | None = None,
    stream_from: int | None = None,
) -> dict[str, tuple[Any, ...]]:
    """The whole-tensor identity of every tensor, on two threads that each read a tensor, hash
    it and run ``then(key, meta, array, identity)`` on it while it is in memory (to fingerprint it
    without reading it again). ``read`` is called by one thread at a time (a checkpoint's reader
    need not be thread-safe), so one thread reads while the other hashes. At most one tensor per
    thread is in memory, and at most one larger than :data:`_BIG_ONE` bytes. Tensors ``skip`` names
    get an identity that matches nothing (no whole hash: they are fingerprinted by ``then``).

    ``ranges(key)``: a reader of byte ranges of the tensor's data in its file (None: none). A
    float32 tensor larger than :data:`_BIG_ONE` whose array ``then`` does not need (``needs``) is
    hashed from its file 2 MB at a time (:func:`_quick_stream`), and ``then`` gets None for it.
    ``reading``: the lock that keeps reads one at a time (``then`` may read under it too). For a
    tensor hashed from its file, ``row_starts(key, meta)``: the length in bytes of the rows whose
    first two values ``starts_of(key, meta, first)`` gets (``[rows, 2]``), 0 for none.

    ``stream(key, meta, rr)``: for a tensor ``skip`` names that has a reader of byte ranges, takes
    what it needs from the file (e.g. :meth:`_Hasher.fingerprint_stream`) and returns True, or
    returns False to have it read whole and passed to ``then`` as usual."""
    import threading
    from contextlib import nullcontext

    out: dict[str, tuple[Any, ...]] = {}
    reading, big = reading or threading.Lock(), threading.Lock()
    stream_from = _BIG_ONE if stream_from is None else stream_from

    def one(k: str) -> None:
        meta = metas[k]
        if meta.numel == 0:  # no values (and nothing to read: its claimed dims may be absurd)
            out[k] = (0, "", "empty")
            return
        large = meta.nbytes > _BIG_ONE
        with big if large else nullcontext():
            if stream is not None and ranges is not None and skip(k, meta):
                rs = ranges(k)
                if rs is not None and stream(k, meta, rs):
                    out[k] = (meta.numel, "skipped", id(metas), k)
                    return
            rr = ranges(k) if ranges is not None and meta.nbytes > stream_from and meta.dtype == "float32" else None
            if rr is not None and not skip(k, meta) and not needs(k, meta):
                q, first = _quick_stream(meta, rr, row_starts(k, meta))
                out[k] = q
                if first is not None:
                    starts_of(k, meta, first)
                if then is not None:
                    then(k, meta, None, q)
                return
            with reading:
                a = read(k)
            q = (meta.numel, "skipped", id(metas), k) if skip(k, meta) else _quick_parts(meta, a)
            out[k] = q
            if then is not None:
                then(k, meta, a, q)
            del a

    _each(list(metas), one, workers)
    return {k: out[k] for k in metas}


# -- transposes by name -------------------------------------------------------------------------

_START_K = 0x9E3779B97F4A7C15  # mixes a row's first two canonical values into one key


def _transpose_pairs(a_metas: Mapping[str, TensorMeta], b_metas: Mapping[str, TensorMeta]) -> dict[str, tuple[int, int]]:
    """Names A holds as a matrix ``[m, n]`` and B as ``[n, m]`` (as :func:`_view2d` sees them;
    ``m != n``, both > 1 and short enough to hash by rows; same dtype): most likely B is A
    transposed. Name -> A's ``(m, n)``.

    Both sides leave such a tensor out of the whole-tensor pass (another shape under the same
    name), and A's rows are hashed in A's pass. B's columns alone are hashed while B is read:
    when they equal A's rows, B is A transposed -- provided no A tensor has a row that starts as
    B's row 0 (:func:`_row_starts`), for then B's rows could be found whole or as a block of an A
    tensor, which the matcher prefers. That is the explanation the full row / column matching
    gives, for half of B's hashing."""
    return {
        k: (m, n)
        for k, (m, n), b in _same_name_2d(a_metas, b_metas)
        if m != n and 1 < m <= _MAX_ROWS and 1 < n <= _MAX_ROWS and b == (n, m)
    }


def _square_pairs(a_metas: Mapping[str, TensorMeta], b_metas: Mapping[str, TensorMeta]) -> dict[str, int]:
    """Names both sides hold as the same square matrix ``[m, m]`` (``m > 1``, short enough to hash
    by rows; same dtype): name -> ``m``. When B's values are not A's (its whole identity differs),
    B may be A transposed: B's columns are then compared with A's rows, hashed from A's file at that
    moment, under the same condition as :func:`_transpose_pairs` (no A row starts as B's row 0).
    The explanation is the one the full row / column matching gives, without B's rows, a second
    read of A, or the matching."""
    return {k: m for k, (m, n), b in _same_name_2d(a_metas, b_metas) if m == n and 1 < m <= _MAX_ROWS and b == (m, m)}


def _same_name_2d(
    a_metas: Mapping[str, TensorMeta], b_metas: Mapping[str, TensorMeta]
) -> Iterator[tuple[str, tuple[int, int], tuple[int, int]]]:
    """Names both sides hold, non-empty and of one dtype: (name, A as a matrix, B as a matrix)."""
    for k, am in a_metas.items():
        bm = b_metas.get(k)
        if bm is not None and am.dtype == bm.dtype and am.numel:
            yield k, _view2d(am.shape), _view2d(bm.shape)


def _row_starts(x: np.ndarray, meta: TensorMeta, m: int, n: int, round_to: Iterable[str] = ()) -> list[np.ndarray]:
    """A key (uint64) of the first two values of every row of ``x`` seen as ``[m, n]``, in every
    canonical form the row hashes may give those values (float64: as float64 bits and as float32
    bits; also rounded to each dtype of ``round_to`` narrower than the tensor's): two rows whose
    hashes can be equal have equal keys (the converse need not hold)."""
    import numpy as np

    dt = lookup_dtype(meta.dtype)
    s = np.ascontiguousarray(x.reshape(m, n)[:, :2])
    if dt.kind == "complex":
        forms = [s.view(np.uint64)] if dt.native and dt.itemsize == 8 else []  # complex128 has no row hashes
    else:
        forms = [_canon(s, dt, False)] + ([_canon(s, dt, True)] if dt.name == "float64" else [])
        for to in round_to:
            if _narrower(dt.name, to):
                forms.append(_canon(cast_values(s, dt, lookup_dtype(to)), lookup_dtype(to), False))
    return [f[:, 0] * np.uint64(_START_K) + f[:, 1] for f in forms]


def _sorted_has(sorted_keys: np.ndarray, keys: np.ndarray) -> bool:
    """Whether any of ``keys`` is in the sorted array ``sorted_keys`` (a binary search each: ``np.isin``
    would sort ``sorted_keys`` again on every call)."""
    import numpy as np

    if not len(sorted_keys) or not len(keys):
        return False
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return bool((sorted_keys[at] == keys).any())


# -- matching ----------------------------------------------------------------------------------

_TOKENS = re.compile(r"[._/-]+")
_GENERIC = frozenset({"weight", "bias", "model", "module", "encoder", "decoder", "layer", "layers", "h", "blocks", "block"})


def _names_related(a: str, b: str) -> bool:
    """The two names share a token other than digits and a few that every layout uses."""
    ta = {t.lower() for t in _TOKENS.split(a) if t and not t.isdigit()} - _GENERIC
    tb = {t.lower() for t in _TOKENS.split(b) if t and not t.isdigit()} - _GENERIC
    return bool(ta & tb)


def _constant_value(x: np.ndarray, dtype: str) -> float | None:
    """The one value every element of ``x`` holds, or None (also for a single element). Three
    samples decide most tensors at once; a full check compares 1M elements at a time (no
    tensor-sized temporary)."""
    import numpy as np

    flat = np.asarray(x).reshape(-1)
    n = flat.size
    if n < 2 or not (flat[0] == flat[n // 2] and flat[0] == flat[-1]):
        return None
    for i in range(0, n, 1 << 20):
        if not bool((flat[i : i + (1 << 20)] == flat[0]).all()):
            return None
    return float(_as_float(flat[:1], dtype)[0])


_INT = re.compile(r"(?<![^.])\d+(?![^.])")


def _ints(name: str) -> tuple[str, ...]:
    return tuple(_INT.findall(name))


class _Scorer:
    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], float] = {}

    def __call__(self, a: str, b: str) -> float:
        k = (a, b)
        s = self._cache.get(k)
        if s is None:
            s = difflib.SequenceMatcher(None, _TOKENS.split(a), _TOKENS.split(b), autojunk=False).ratio()
            s += difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() / 10  # tie-break: characters
            s += (1.0 if _ints(a) == _ints(b) else 0.0) + (3.0 if a == b else 0.0)
            self._cache[k] = s
        return s


class _Index:
    """Every row and column hash of A's fingerprints, sorted for lookup."""

    def __init__(self, fps: list[_FP]) -> None:
        import numpy as np

        hs, fs, os_, ps = [], [], [], []
        for i, fp in enumerate(fps):
            if fp.rows is None:
                continue
            for o, arr in ((0, fp.rows), (1, fp.cols)):
                if o == 1 and (fp.n == 1 or arr is None):
                    continue  # a vector's one column is the whole vector: the full hash covers it; or not taken
                hs.append(arr)
                fs.append(np.full(len(arr), i, dtype=np.int32))
                os_.append(np.full(len(arr), o, dtype=np.int8))
                ps.append(np.arange(len(arr), dtype=np.int64))
        if hs:
            h = np.concatenate(hs)
            order = np.argsort(h, kind="stable")
            self.h, self.f, self.o, self.p = (
                h[order],
                np.concatenate(fs)[order],
                np.concatenate(os_)[order],
                np.concatenate(ps)[order],
            )
        else:
            self.h = np.zeros(0, np.uint64)
            self.f = np.zeros(0, np.int32)
            self.o = np.zeros(0, np.int8)
            self.p = np.zeros(0, np.int64)


@dataclass(frozen=True)
class _Run:
    b0: int
    b1: int
    f: int  # A fingerprint index; -1 = no match
    o: int  # 0 rows, 1 cols of A
    p: int  # start in A


def _runs(h: np.ndarray, idx: _Index, fps: list[_FP], ok: Callable[[_FP], bool], score: Callable[[_FP], float]) -> list[_Run]:
    """Cover B's hash sequence ``h`` with the longest runs of consecutive A rows / columns."""
    import numpy as np

    lo = np.searchsorted(idx.h, h, "left")
    hi = np.searchsorted(idx.h, h, "right")
    out: list[_Run] = []
    i, n = 0, len(h)
    prev: tuple[int, int, int] | None = None
    while i < n:
        if lo[i] == hi[i]:
            j = i + 1
            while j < n and lo[j] == hi[j]:
                j += 1
            out.append(_Run(i, j, -1, 0, 0))
            i, prev = j, None
            continue
        cands = [(int(idx.f[e]), int(idx.o[e]), int(idx.p[e])) for e in range(int(lo[i]), int(hi[i]))]
        cands = [c for c in cands if ok(fps[c[0]])]
        if prev is not None and prev in cands:  # continue where the last run stopped
            cands.remove(prev)
            cands.insert(0, prev)
        elif len(cands) > _MAX_CANDIDATES:
            cands.sort(key=lambda c: -score(fps[c[0]]))
        best: tuple[Any, ...] | None = None
        for f, o, p in cands[:_MAX_CANDIDATES]:
            fp = fps[f]
            arr = fp.rows if o == 0 else fp.cols
            length = min(n - i, len(arr) - p)
            eq = h[i : i + length] == arr[p : p + length]
            run = length if bool(eq.all()) else int(np.argmin(eq))
            rank = (run, fp.variant == "", (f, o, p) == prev, score(fp))
            if best is None or rank > best[0]:
                best = (rank, f, o, p, run)
        if best is None:
            out.append(_Run(i, i + 1, -1, 0, 0))
            i, prev = i + 1, None
            continue
        _, f, o, p, run = best
        out.append(_Run(i, i + run, f, o, p))
        i += run
        prev = (f, o, p + run)
    return out


def _ranges(idx: Iterable[int]) -> str:
    vs = sorted(set(idx))
    parts: list[str] = []
    if not vs:
        return ""
    start = prev = vs[0]
    for v in [*vs[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"[{start}]" if start == prev else f"[{start}:{prev + 1}]")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def _progressions(seq: list[int]) -> str:
    """Up to 16 items as a list; longer ones as arithmetic runs ``start:stop:step`` (slice notation),
    e.g. the rotary interleave of a 128-row head: ``[0:127:2, 1:128:2]``."""
    if len(seq) <= 16:
        return "[" + ", ".join(map(str, seq)) + "]"
    parts, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq):
            step = seq[i + 1] - seq[i]
            j = i + 1
            while j + 1 < len(seq) and seq[j + 1] - seq[j] == step:
                j += 1
        else:
            step, j = 1, i
        a, b = seq[i], seq[j]
        if j == i:
            parts.append(str(a))
        elif step == 1:
            parts.append(f"{a}:{b + 1}")
        elif step > 0:
            parts.append(f"{a}:{b + 1}:{step}")
        else:
            parts.append(f"{a}:{'' if b == 0 else b - 1}:{step}")
        i = j + 1
    return "[" + ", ".join(parts) + "]"


def describe_permutation(perm: list[int]) -> str:
    """B row i = A row ``perm[i]``, said compactly: moved blocks, or a reorder within blocks.

    Example::

        >>> describe_permutation([0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15])
        'rows reordered within each block of 4 (blocks 0-3 of 4): order [0, 2, 1, 3]'
    """
    m = len(perm)
    runs: list[tuple[int, int, int]] = []
    for i, p in enumerate(perm):
        if runs and runs[-1][2] + (i - runs[-1][0]) == p:
            continue
        runs.append((i, i, p))
    spans = [(b0, (runs[k + 1][0] if k + 1 < len(runs) else m), p) for k, (b0, _, p) in enumerate(runs)]
    moved = [(b0, b1, p) for b0, b1, p in spans if b0 != p]
    if len(spans) <= 6:
        return "rows " + ", ".join(f"[{b0}:{b1}] = A[{p}:{p + b1 - b0}]" for b0, b1, p in moved)
    for k in range(2, m):
        if m % k:
            continue
        if all(perm[i] // k == i // k for i in range(m)):
            blocks = [b for b in range(m // k) if any(perm[b * k + j] != b * k + j for j in range(k))]
            pats = {tuple(perm[b * k + j] - b * k for j in range(k)) for b in blocks}
            where = _brace_ranges(blocks).strip("{}")
            if len(blocks) == 1:
                b = blocks[0]
                return f"rows [{b * k}:{(b + 1) * k}] reordered: order {_progressions(list(next(iter(pats))))}"
            if len(pats) == 1:
                return f"rows reordered within each block of {k} (blocks {where} of {m // k}): order {_progressions(list(next(iter(pats))))}"
            return f"rows reordered within blocks of {k} (blocks {where} of {m // k}), differently per block"
        if all(perm[b * k] % k == 0 and all(perm[b * k + j] == perm[b * k] + j for j in range(k)) for b in range(m // k)):
            order = [perm[b * k] // k for b in range(m // k)]
            return f"row blocks of {k} reordered: order {_progressions(order)}"
    return "rows " + _progressions(perm)


class _Matcher:
    def __init__(self, afps: list[_FP], a_names: set[str]) -> None:
        self.afps = afps
        self.idx = _Index(afps)
        self.by_full: dict[int, list[int]] = {}
        for i, fp in enumerate(afps):
            self.by_full.setdefault(fp.full, []).append(i)
        self.score = _Scorer()
        self.a_names = a_names

    def ok_for(self, b: _FP) -> Callable[[_FP], bool]:
        return lambda fp: fp.variant in ("", b.meta.dtype)

    def full_candidates(self, b: _FP) -> list[int]:
        return [i for i in self.by_full.get(b.full, []) if self.afps[i].variant in ("", b.meta.dtype)]

    def structural(self, b: _FP) -> Correspondence | None:
        """Explain B by row / column pieces of A tensors; None when nothing fits."""
        if b.rows is None or b.m * b.n == 0:
            return None
        ok = self.ok_for(b)

        def score(fp: _FP) -> float:
            return self.score(fp.key, b.key)

        best: tuple[list[_Run], str] | None = None
        axes = [("rows", b.rows)] + ([("cols", b.cols)] if b.n > 1 else [])
        for axis, h in axes:
            runs = _runs(h, self.idx, self.afps, ok, score)
            if all(r.f >= 0 for r in runs) and (best is None or len(runs) < len(best[0])):
                best = (runs, axis)
            if best is not None and len(best[0]) == 1:
                break
        if best is None:
            return None
        return self._classify(b, *best)

    def _classify(self, b: _FP, runs: list[_Run], axis: str) -> Correspondence:
        afps = self.afps
        pieces = []
        for r in runs:
            fp = afps[r.f]
            pieces.append(Piece((r.b0, r.b1), fp.key, (r.p, r.p + r.b1 - r.b0), axis, "rows" if r.o == 0 else "cols", fp.variant))
        keys = tuple(dict.fromkeys(p.a for p in pieces))
        variants = {afps[r.f].variant for r in runs}
        cast = b.meta.dtype if variants == {b.meta.dtype} else ""
        cast_note = (
            f"; B is A rounded to {cast}" if cast else ("; some pieces rounded to " + b.meta.dtype if len(variants) > 1 else "")
        )
        dim = "dim 0" if axis == "rows" else "dim 1"
        if len(runs) == 1:
            r, fp = runs[0], afps[runs[0].f]
            length = r.b1 - r.b0
            a_axis = "rows" if r.o == 0 else "columns"
            total = fp.m if r.o == 0 else fp.n
            block = f"{a_axis} [{r.p}:{r.p + length}] of {_a(fp.key, b.key)}"
            if (axis == "rows") != (r.o == 0):  # B's rows are A's columns, or B's columns A's rows
                if r.p == 0 and length == total and (b.m, b.n) == (fp.n, fp.m):
                    return Correspondence(
                        b.key, "transposed", keys, f"B = {_a(fp.key, b.key)} transposed{cast_note}", tuple(pieces), cast
                    )
                what = f"B = ({block}) transposed"
                return Correspondence(b.key, "transposed", keys, what + cast_note, tuple(pieces), cast)
            what = f"{block} (split along dim {r.o} of {total})"
            return Correspondence(b.key, "split", keys, what + cast_note, tuple(pieces), cast)
        fs = {(r.f, r.o) for r in runs}
        if len(fs) == 1:
            fp, o = afps[runs[0].f], runs[0].o
            perm = [r.p + j for r in runs for j in range(r.b1 - r.b0)]
            if sorted(perm) == list(range(fp.m if o == 0 else fp.n)):
                what = _a(fp.key, b.key) + (" transposed" if (o == 0) != (axis == "rows") else "")
                how = describe_permutation(perm)
                if axis == "cols":
                    how = how.replace("rows", "columns")
                return Correspondence(b.key, "permuted", keys, f"{what}, with {how}{cast_note}", tuple(pieces), cast)
        whole = all(r.p == 0 and r.b1 - r.b0 == (afps[r.f].m if r.o == 0 else afps[r.f].n) for r in runs)
        straight = all((r.o == 0) == (axis == "rows") for r in runs)
        if whole and straight and len(keys) == len(runs):
            return Correspondence(
                b.key,
                "merged",
                keys,
                f"concat along {dim} of " + ", ".join(f"A:{k}" for k in keys) + cast_note,
                tuple(pieces),
                cast,
            )
        shown = "; ".join(
            f"[{p.b[0]}:{p.b[1]}] = A:{p.a} {p.a_axis} [{p.a_range[0]}:{p.a_range[1]}]"
            + (" (transposed)" if p.a_axis != axis else "")
            for p in pieces[:8]
        )
        more = f"; ... {len(pieces) - 8} more pieces" if len(pieces) > 8 else ""
        return Correspondence(b.key, "gathered", keys, f"B {axis} {shown}{more}{cast_note}", tuple(pieces), cast)


def _a(ak: str, bk: str) -> str:
    """How an A key is named in a B key's row: just ``A`` when the names are the same."""
    return "A" if ak == bk else f"A:{ak}"


def _describe_same(bk: str, bm: TensorMeta, ak: str, am: TensorMeta, kind: str, rounded: str = "") -> Correspondence:
    """B holds A's values whole: same / renamed / tied, noting a cast (``rounded``: B's dtype, when
    B is A rounded to it) and a reshape."""
    notes = []
    if rounded:
        notes.append(f"B is A in {rounded} (rounded from {am.dtype})")
    elif am.dtype != bm.dtype:
        notes.append(f"B is A in {bm.dtype} (from {am.dtype}, exact)")
    if tuple(am.shape) != tuple(bm.shape):
        notes.append(f"reshaped {list(am.shape)} -> {list(bm.shape)}")
    if kind == "same" and notes:
        kind = "cast" if (rounded or am.dtype != bm.dtype) else "reshaped"
    if kind == "same":
        detail = ""
    elif kind in ("cast", "reshaped"):
        detail = "; ".join(notes)
    else:
        detail = f"A:{ak}" + ("; " + "; ".join(notes) if notes else "")
    return Correspondence(bk, kind, (ak,), detail, cast=rounded)


_BLAS_PREFIXES = ("scipy_", "")  # numpy's wheels bundle scipy-openblas (symbols prefixed "scipy_", suffixed "64_")
_BLAS_SUFFIXES = ("64_", "")


@contextmanager
def _blas_one_thread() -> Iterator[None]:
    """OpenBLAS on one thread while hashing: our own threads already keep the cores busy, and
    OpenBLAS's threads (spinning, then waiting on futexes) fighting them cost more than they gain on
    the narrow products of :class:`_Hasher` (measured: GPT-2 medium pair, wall 2.5-3.9 s -> 1.9-2.7 s
    on 2 cores). The loaded library is found as threadpoolctl finds it (``/proc/self/maps``); when it
    is not (another BLAS, another OS), nothing changes. Only in the statemap command's own process
    (:mod:`statemap.process`): a library call leaves the host's thread count alone."""
    from .process import is_command_process

    set_n = get_n = None
    if not is_command_process():  # a library call: the host's BLAS settings are the host's
        yield
        return
    try:
        import ctypes

        with open("/proc/self/maps") as f:
            libs = {ln.split()[-1] for ln in f if "openblas" in ln.lower()}
        for path in sorted(x for x in libs if ".so" in x):
            lib = ctypes.CDLL(path)
            for pre in _BLAS_PREFIXES:
                for suf in _BLAS_SUFFIXES:
                    s, g = f"{pre}openblas_set_num_threads{suf}", f"{pre}openblas_get_num_threads{suf}"
                    if set_n is None and hasattr(lib, s) and hasattr(lib, g):
                        set_n, get_n = getattr(lib, s), getattr(lib, g)
    except (OSError, AttributeError):
        set_n = None
    if set_n is None or get_n is None:
        yield
        return
    before = int(get_n())
    set_n(1)
    try:
        yield
    finally:
        set_n(before)


def explain(
    a_metas: Mapping[str, TensorMeta],
    a_read: Callable[[str], np.ndarray],
    b_metas: Mapping[str, TensorMeta],
    b_read: Callable[[str], np.ndarray],
    rule_of: Mapping[str, str] | None = None,
    names: tuple[str, str] = ("A", "B"),
    transposes: bool = True,
    a_ranges: Callable[[str], RangeReader | None] | None = None,
    b_ranges: Callable[[str], RangeReader | None] | None = None,
) -> Explanation:
    """Read both sides once (one tensor per thread at a time) and explain every B key by A's content.

    ``rule_of``: for a planned A (``diff --spec``), the rule (file:line) that produced each A key;
    it is attached to every B key's correspondence, and to A keys left over. ``names``: the two
    files, for error messages. ``transposes``: hash only the columns of B tensors whose A namesake
    has the transposed shape (see :func:`_transpose_pairs`; the same explanations, faster); False
    hashes their rows and columns like any other. ``a_ranges`` / ``b_ranges``: key -> a reader of
    byte ranges of that tensor's data in its file, or None (see :func:`_quick_all`): embeddings are
    then hashed from the file without being read into memory whole.

    Example::

        >>> from statemap import open_checkpoint
        >>> with open_checkpoint("model.pt") as a, open_checkpoint("model.safetensors") as b:
        ...     ex = explain(a.metas, a.read, b.metas, b.read)
        ...     print(ex.counts)
        {'renamed': 392, 'constant': 1}
    """
    import numpy as np  # noqa: F401  (loads OpenBLAS, for _blas_one_thread to find)

    with _blas_one_thread():
        try:
            return _explain(a_metas, a_read, b_metas, b_read, rule_of, names, transposes, a_ranges, b_ranges)
        finally:
            _stream_bufs.__dict__.clear()  # the caller's thread keeps no read buffers (the helpers' end with them)


def _explain(
    a_metas: Mapping[str, TensorMeta],
    a_read: Callable[[str], np.ndarray],
    b_metas: Mapping[str, TensorMeta],
    b_read: Callable[[str], np.ndarray],
    rule_of: Mapping[str, str] | None,
    names: tuple[str, str],
    transposes: bool,
    a_ranges: Callable[[str], RangeReader | None] | None = None,
    b_ranges: Callable[[str], RangeReader | None] | None = None,
) -> Explanation:
    import numpy as np

    rule_of = rule_of or {}
    a_read, b_read = _bounded(a_read, names[0]), _bounded(b_read, names[1])
    length = 1
    for m in (*a_metas.values(), *b_metas.values()):
        length = max(length, *(d for d in _view2d(m.shape) if d <= _MAX_ROWS), 1)
    hasher = _Hasher(length)

    def narrower_in(bm: Iterable[TensorMeta]) -> Callable[[TensorMeta], list[str]]:
        b_dtypes: dict[str, set[int]] = {}
        for m in bm:
            b_dtypes.setdefault(m.dtype, set()).update({m.numel, *_view2d(m.shape)})

        def round_to(meta: TensorMeta) -> list[str]:
            sizes = {meta.numel, *_view2d(meta.shape)}
            return [x for x, have in b_dtypes.items() if _narrower(meta.dtype, x) and sizes & have]

        return round_to

    # Both sides are read on two threads (one read at a time, see _quick_all); rows and columns are
    # taken by the thread that read the tensor, while it is in memory: of A tensors whose name B
    # holds with another shape or dtype (a transpose, a cast: B cannot hold them whole under that
    # name), and of B tensors no A tensor holds whole.
    import copy
    import threading

    a_early: dict[str, list[_FP]] = {}
    b_early: dict[str, _FP] = {}
    one = copy.copy(hasher)  # within a pass each thread hashes its own tensor: no further threads
    one.workers = 1
    lock = threading.Lock()

    tpairs = _transpose_pairs(a_metas, b_metas) if transposes else {}  # B's columns may be A's rows
    squares = _square_pairs(a_metas, b_metas) if transposes else {}  # B may be A transposed: checked if B is not A
    lengths = {m for m, _ in tpairs.values()} | set(squares.values())  # B's rows have A's first dim as length
    starts: dict[int, list[np.ndarray]] = {}  # such a length -> keys of the starts of A's rows
    pair_dtypes = {a_metas[k].dtype for k in (*tpairs, *squares)}
    verified: set[str] = set()  # B keys whose columns are A's rows: A transposed
    b_constant: dict[str, float] = {}  # B keys an A tensor holds whole, every element one value
    round_all = narrower_in(b_metas.values())

    def transposed(k: str, meta: TensorMeta, other: Mapping[str, TensorMeta]) -> bool:
        """The other side holds this name with another shape of as many elements and the same
        dtype (a transpose, most likely): its whole identity is left out, its fingerprint is
        taken instead (``full`` still finds an equal tensor of the same shape under another name)."""
        o = other.get(k)
        return o is not None and tuple(o.shape) != tuple(meta.shape) and o.numel == meta.numel and o.dtype == meta.dtype

    def a_needs(k: str, meta: TensorMeta) -> bool:
        """changed_in_b fingerprints the array (else an A tensor may be hashed from its file, unread)."""
        bm = b_metas.get(k)
        return bm is not None and (bm.shape != meta.shape or bm.dtype != meta.dtype)

    def a_row_bytes(k: str, meta: TensorMeta) -> int:
        """Bytes per row of an A tensor whose row starts changed_in_b takes (0: none)."""
        m, n = _view2d(meta.shape)
        return n * lookup_dtype(meta.dtype).itemsize if n in lengths and m * n == meta.numel else 0

    def a_starts(k: str, meta: TensorMeta, first: np.ndarray) -> None:
        found = _row_starts(first, meta, len(first), 2, pair_dtypes)
        with lock:
            starts.setdefault(_view2d(meta.shape)[1], []).extend(found)

    def changed_in_b(k: str, meta: TensorMeta, x: np.ndarray | None, q: tuple[Any, ...]) -> None:
        if x is None:  # hashed from its file, its row starts taken as it passed (a_starts); not fingerprinted (a_needs)
            return
        m, n = _view2d(meta.shape)
        if n in lengths and x.size == m * n:
            found = _row_starts(x, meta, m, n, pair_dtypes)
            with lock:
                starts.setdefault(n, []).extend(found)
        bm = b_metas.get(k)
        if bm is not None and meta.numel and (tuple(bm.shape) != tuple(meta.shape) or bm.dtype != meta.dtype):
            fps = _fingerprint_one(k, meta, x, one, round_all, False)
            with lock:
                a_early[k] = fps

    def a_stream(k: str, meta: TensorMeta, rr: RangeReader) -> bool:
        """changed_in_b for an A tensor B holds with another shape, hashed from its file as read
        (no array, no second pass over it); False when rounded variants need the array."""
        if round_all(meta):
            return False
        m, n = _view2d(meta.shape)
        got = one.fingerprint_stream(k, meta, rr, cols=False, starts=n in lengths)
        if got is None:
            return False
        fp, first = got
        if first is not None:
            found = _row_starts(first, meta, m, 2, pair_dtypes)
            with lock:
                starts.setdefault(n, []).extend(found)
        with lock:
            a_early[k] = [fp]
        return True

    a_ranges = a_ranges or (lambda k: None)
    b_ranges = b_ranges or (lambda k: None)
    qa = _quick_all(
        a_metas,
        a_read,
        changed_in_b,
        lambda k, m: transposed(k, m, b_metas),
        2,
        a_ranges,
        a_needs,
        None,
        a_row_bytes,
        a_starts,
        a_stream,
        min(_A_STREAM_FROM, _BIG_ONE),
    )
    a_early = {k: a_early[k] for k in a_metas if k in a_early}  # in A's order, whichever thread finished first
    a_quick = set(qa.values())
    have = {
        n: np.sort(np.concatenate(v)) for n, v in starts.items() if v
    }  # sorted keys (no Python ints per row; repeats are harmless)

    checked: set[str] = set()  # transpose pairs found not transposed while B was hashed from its file

    def b_stream(k: str, meta: TensorMeta, rr: RangeReader) -> bool:
        """transposed_or_fingerprint's check for a B tensor read from its file as it is hashed: True
        when B is A's transposed; False (read it whole) when not, or when the check does not apply."""
        a = a_early.get(k)
        if k not in tpairs or not a or a[0].rows is None:
            return False
        m, n = tpairs[k]
        first = have.get(m)
        if first is not None:
            size = lookup_dtype(meta.dtype).itemsize
            store = _STREAMED.get(meta.dtype)
            if store is None:
                return False
            row0 = rr(0, 2 * size, np.empty(2 * size, dtype=np.uint8)).view(store).reshape(1, 2)
            if any(_sorted_has(first, s) for s in _row_starts(row0, meta, 1, 2)):
                checked.add(k)
                return False
        got = one.fingerprint_stream(k, meta, rr, with_rows=False)
        if got is None:
            return False
        cols = got[0].cols
        if cols is not None and np.array_equal(cols, a[0].rows):
            with lock:
                verified.add(k)
            return True
        with lock:
            checked.add(k)
        return False

    def transposed_or_fingerprint(k: str, meta: TensorMeta, x: np.ndarray) -> list[_FP]:
        """[] when B's ``k`` is A's transposed (see _transpose_pairs), else B's fingerprint."""
        a = a_early.get(k)
        m, n = tpairs[k]
        if a and a[0].rows is not None and k not in checked:
            first = have.get(m)
            if first is None or not any(_sorted_has(first, s) for s in _row_starts(x.reshape(n, m)[:1], meta, 1, m)):
                cols = one.fingerprint(k, meta, x, with_rows=False).cols
                if cols is not None and np.array_equal(cols, a[0].rows):
                    with lock:
                        verified.add(k)
                    return []
        return _fingerprint_one(k, meta, x, one, lambda m: [])

    def square_or_fingerprint(k: str, meta: TensorMeta, x: np.ndarray) -> list[_FP]:
        """[] when B's square ``k`` (not A's values) is A's transposed: B's columns against A's rows,
        hashed from A's file now (see _square_pairs); else B's fingerprint."""
        m = squares[k]
        rr = a_ranges(k)
        first = have.get(m)
        if rr is not None and (
            first is None or not any(_sorted_has(first, s) for s in _row_starts(x.reshape(m, m)[:1], meta, 1, m))
        ):
            got = one.fingerprint_stream(k, a_metas[k], rr, cols=False)
            if got is not None:
                cols = one.fingerprint(k, meta, x, with_rows=False).cols
                if cols is not None and got[0].rows is not None and np.array_equal(cols, got[0].rows):
                    with lock:
                        verified.add(k)
                    return []
        return _fingerprint_one(k, meta, x, one, lambda m: [])

    b_reading = threading.Lock()

    def fingerprint_misses(k: str, meta: TensorMeta, x: np.ndarray | None, q: tuple[Any, ...]) -> None:
        if x is None:  # hashed from its file: read it only if a constant is possible or it is needed whole
            rr = b_ranges(k)
            if (q in a_quick and rr is not None and not _first_middle_last(meta, rr)) or not meta.numel:
                return
            with b_reading:
                x = b_read(k)
        if q in a_quick:  # held whole by an A tensor: note a constant now (no second read later)
            v = _constant_value(x, meta.dtype)
            if v is not None:
                with lock:
                    b_constant[k] = v
        if q not in a_quick and meta.numel:  # no A tensor holds these values whole
            if k in tpairs:
                fps = transposed_or_fingerprint(k, meta, x)
            elif k in squares:
                fps = square_or_fingerprint(k, meta, x)
            else:
                fps = _fingerprint_one(k, meta, x, one, lambda m: [])
            if fps:  # else a transpose pair whose B columns are A's rows
                with lock:
                    b_early[k] = fps[0]

    qb = _quick_all(
        b_metas,
        b_read,
        fingerprint_misses,
        lambda k, m: transposed(k, m, a_metas),
        2,
        b_ranges,
        lambda k, m: False,
        b_reading,
        stream=b_stream,
    )
    score = _Scorer()
    ex = Explanation()
    out: dict[str, Correspondence] = {}

    # 1. whole-tensor matches, paired by name where several A tensors hold the same values
    a_by_quick: dict[tuple[Any, ...], list[str]] = {}
    for k, q in qa.items():
        a_by_quick.setdefault(q, []).append(k)
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k, q in qb.items():
        if q in a_by_quick:
            groups.setdefault(q, []).append(k)
    used: dict[str, str] = {}  # A key -> first B key holding it
    for q, bs in groups.items():
        cands = a_by_quick[q]
        # a name both sides hold scores above any other pair (+3), so the greedy pairing below takes
        # those first whatever the rest: paired up front, without scoring every pair (a group of
        # equal values -- LayerNorm ones, zero biases -- is often hundreds of keys each side)
        in_a = set(cands)
        taken_b: dict[str, str] = {bk: bk for bk in bs if bk in in_a}
        taken_a: set[str] = set(taken_b)
        pairs = sorted(
            ((score(ak, bk), ak, bk) for ak in cands if ak not in taken_a for bk in bs if bk not in taken_b), reverse=True
        )
        for _, ak, bk in pairs:
            if bk in taken_b or ak in taken_a:
                continue
            taken_a.add(ak)
            taken_b[bk] = ak
        for bk in bs:
            if bk in taken_b:
                ak = taken_b[bk]
                out[bk] = _describe_same(bk, b_metas[bk], ak, a_metas[ak], "same" if ak == bk else "renamed")
                used.setdefault(ak, bk)
        for bk in bs:
            if bk not in taken_b:
                ak = max(cands, key=lambda k, bk=bk: (k in used, score(k, bk)))  # type: ignore[misc]
                c = _describe_same(bk, b_metas[bk], ak, a_metas[ak], "tied")
                also = used.get(ak, "")
                out[bk] = Correspondence(bk, "tied", c.a, f"A:{ak}, also held by B:{also}" if also else c.detail)
                used.setdefault(ak, bk)
    # a constant B tensor (injected zeros, ones) equal to an A tensor whose name has nothing in
    # common with it: values alone carry no evidence of a rename, a constant is likelier
    for bk, c in list(out.items()):
        if c.kind in ("renamed", "tied") and not _names_related(c.a[0], bk):
            v = b_constant.get(bk)
            if v is not None:
                out[bk] = Correspondence(
                    bk,
                    "constant",
                    (),
                    f"every element {v:g} (A:{c.a[0]} holds the same values; nothing in the names relates them)",
                )
    # transposes found while B was read (see _transpose_pairs)
    for k in (k for k in b_metas if k in verified):
        span = (0, tpairs[k][0] if k in tpairs else squares[k])  # all of B's columns are all of A's rows
        out[k] = Correspondence(k, "transposed", (k,), "B = A transposed", (Piece(span, k, span, "cols", "rows"),))
    # swapped: B:x holds A:y while both names exist on both sides, and B:y holds A:x
    for bk, c in list(out.items()):
        if c.kind == "renamed" and bk in a_metas and c.a[0] in b_metas:
            other = out.get(c.a[0])
            if other is not None and other.a == (bk,):
                out[bk] = Correspondence(bk, "swapped", c.a, f"B holds A:{c.a[0]}; B:{c.a[0]} holds A:{bk}", cast=c.cast)

    # 2. the rest: row / column fingerprints of B's unexplained keys (taken while B was read) and of
    # the A tensors that could explain them (a dim in common), read again; A also rounded to B's
    # narrower float types. A tensors B holds whole are left out unless something stays unexplained.
    rest = {k: m for k, m in b_metas.items() if k not in out and m.numel}
    own: dict[str, _FP] = {}
    bfps: list[_FP] = [b_early[k] for k in rest if k in b_early]
    bfps += _fingerprints({k: m for k, m in rest.items() if k not in b_early}, b_read, hasher)
    if rest:
        dims = {d for m in rest.values() for d in _view2d(m.shape)}
        cand = {k: m for k, m in a_metas.items() if m.numel and (dims & set(_view2d(m.shape)) or k in rest)}
        whole = {k for k in cand if k in used and k not in rest and k not in a_early}
        round_to = narrower_in(rest.values())
        afps = [fp for k, fps in a_early.items() for fp in fps]
        # A's rows only: B's rows and columns against A's rows find copies, splits and merges along
        # dim 0, reorders and transposes; A's columns only when something is left (below)
        afps += _fingerprints(
            {k: m for k, m in cand.items() if k not in whole and k not in a_early}, a_read, hasher, round_to, cols=False
        )
        todo = bfps
        for attempt in (0, 1):
            own = {fp.key: fp for fp in afps if not fp.variant}
            mt = _Matcher(afps, set(a_metas))
            mt.score = score
            left = []
            for b in todo:
                full = mt.full_candidates(b)
                if full:  # B is A rounded to B's dtype
                    i = max(full, key=lambda j: score(afps[j].key, b.key))
                    a = afps[i]
                    out[b.key] = _describe_same(
                        b.key, b.meta, a.key, a_metas[a.key], "same" if a.key == b.key else "renamed", rounded=a.variant
                    )
                    continue
                found = mt.structural(b)
                if found is not None and found.kind == "gathered" and b.m > 1 and bool((b.rows == b.rows[0]).all()):
                    found = None  # repeated rows (e.g. all zeros) gathered from anywhere: a constant is likelier
                if found is not None and (found.kind != "gathered" or attempt):
                    out[b.key] = found
                else:
                    left.append(b)
            if attempt or not left:
                break
            # something is unexplained (or only gathered): A's columns (B's columns may be A's columns:
            # a split along dim 1), and the A tensors B also holds whole, for the A tensors that could
            # explain what is left, read again
            dims_left = {d for b in left for d in (b.m, b.n)}
            again = {k: m for k, m in cand.items() if dims_left & set(_view2d(m.shape))}
            afps = [fp for fp in afps if fp.key not in again]
            afps += _fingerprints(again, a_read, hasher, round_to, cols=True)
            todo = left

    # 3. values that differ (same name and shape, or nearly A transposed), constants, nothing
    for b in bfps:
        if b.key in out or b.key not in own:
            continue
        if (own[b.key].m, own[b.key].n) == (b.n, b.m) and b.m != b.n:
            near = _nearly_transposed(own[b.key], b, a_read, b_read)
            if near is not None:
                out[b.key] = near
            continue
        if (own[b.key].m, own[b.key].n) != (b.m, b.n):
            continue
        a = own[b.key]
        max_abs, max_rel = _value_diff(a_read(b.key), a.meta.dtype, b_read(b.key), b.meta.dtype)
        rows = []
        if a.rows is not None and b.rows is not None:
            rows = [int(i) for i in np.nonzero(a.rows != b.rows)[0]]
        rd = f"{_ranges(rows)} ({len(rows)} of {b.m} rows)" if rows else ""
        detail = f"max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}" + (f"; rows {rd}" if rd else "")
        out[b.key] = Correspondence(b.key, "differs", (b.key,), detail, max_abs=max_abs, max_rel=max_rel, rows_differ=rd)
    for bk, bm in b_metas.items():
        if bk in out:
            continue
        if bk in a_metas:
            am = a_metas[bk]
            out[bk] = Correspondence(
                bk, "differs", (bk,), f"shape {list(am.shape)} in A, {list(bm.shape)} in B; no content match"
            )
            continue
        if bm.numel == 0:
            out[bk] = Correspondence(bk, "unmatched", (), "an empty tensor (no values); A has none")
            continue
        x = b_read(bk)
        flat = np.asarray(x).reshape(-1)
        if flat.size and bool((flat == flat[0]).all()):
            v = float(_as_float(flat[:1], bm.dtype)[0])
            out[bk] = Correspondence(bk, "constant", (), f"every element {v:g} (no counterpart in A)")
        else:
            close = difflib.get_close_matches(bk, list(a_metas), n=1, cutoff=0.6)
            out[bk] = Correspondence(
                bk, "unmatched", (), f"no counterpart in A (closest name: A:{close[0]})" if close else "no counterpart in A"
            )
        del x, flat

    ex.b = [_with_rule(out[k], rule_of) for k in b_metas]
    ex.equal = {c.b for c in ex.b if c.kind == "same"}
    referenced = {k for c in ex.b for k in c.a}
    for k in a_metas:
        if k in referenced:
            continue
        twins = [t for t in a_by_quick.get(qa[k], []) if t in referenced]
        ex.a_left.append(Dropped(k, "duplicate" if twins else "dropped", twins[0] if twins else "", rule_of.get(k, "")))
    return ex


def _nearly_transposed(
    a: _FP, b: _FP, a_read: Callable[[str], np.ndarray], b_read: Callable[[str], np.ndarray]
) -> Correspondence | None:
    """B (``[n, m]``) is A (``[m, n]``, same name) transposed except some columns of B (rows of A):
    ``differs``, naming them, with the max differences against A transposed; None when no column
    of B is a row of A (nothing says it is a transpose)."""
    import numpy as np

    if a.rows is None or b.cols is None:
        return None
    bad = np.nonzero(a.rows != b.cols)[0]
    if len(bad) == len(b.cols):
        return None
    xa = np.ascontiguousarray(np.asarray(a_read(a.key)).reshape(a.m, a.n).T)  # one tensor's copy, this case only
    max_abs, max_rel = _value_diff(xa, a.meta.dtype, b_read(b.key), b.meta.dtype)
    where = _ranges(int(i) for i in bad)
    cols = f"{where} ({len(bad)} of {b.n} columns)"
    detail = (
        f"B = A transposed except B's columns {where} (A's rows; {len(bad)} of {b.n}): "
        f"max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g}"
    )
    return Correspondence(b.key, "differs", (a.key,), detail, max_abs=max_abs, max_rel=max_rel, rows_differ=cols)


def _bounded(read: Callable[[str], np.ndarray], name: str) -> Callable[[str], np.ndarray]:
    """``read``, refusing a view whose elements repeat (stride 0) when it would take more than
    :data:`_ALIAS_LIMIT` bytes to compare: its storage is small, its values are not."""
    import numpy as np

    def checked(k: str) -> np.ndarray:
        a = read(k)
        if not a.flags.c_contiguous and a.nbytes > _ALIAS_LIMIT:
            lo, hi = np.lib.array_utils.byte_bounds(a)
            if a.nbytes > 2 * (hi - lo):
                raise CheckpointError(
                    f"{name}: tensor {k!r}: a view with repeated elements (stride 0) claims {a.nbytes:,} bytes over "
                    f"{hi - lo:,} bytes of storage; more than {_ALIAS_LIMIT:,} bytes is too large to compare by value"
                )
        return a

    return checked


def _with_rule(c: Correspondence, rule_of: Mapping[str, str]) -> Correspondence:
    if not rule_of:
        return c
    rule = rule_of.get(c.b) or next((rule_of[k] for k in c.a if k in rule_of), "")
    if not rule:
        return c
    return Correspondence(c.b, c.kind, c.a, c.detail, c.pieces, c.cast, c.max_abs, c.max_rel, c.rows_differ, rule)


def _value_diff(xa: np.ndarray, da: str, xb: np.ndarray, db: str) -> tuple[float, float]:
    """Max abs diff and max abs diff / max |A|, in row blocks (bounded temporaries)."""
    import numpy as np

    fa, fb = np.ascontiguousarray(xa).reshape(-1), np.ascontiguousarray(xb).reshape(-1)
    max_abs, ref, step = 0.0, 0.0, 1 << 20
    for i in range(0, len(fa), step):
        ca, cb = _as_float(fa[i : i + step], da), _as_float(fb[i : i + step], db)
        d = np.abs(ca - cb)
        if d.size and not np.isnan(d).all():
            max_abs = max(max_abs, float(np.nanmax(d)))
        if ca.size and not np.isnan(ca).all():
            ref = max(ref, float(np.nanmax(np.abs(ca))))
    return max_abs, (max_abs / ref if ref > 0 else (0.0 if max_abs == 0 else math.inf))


def _as_float(a: np.ndarray, dt_name: str) -> np.ndarray:
    import numpy as np

    dt = lookup_dtype(dt_name)
    if dt.name == "bfloat16":
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


# -- text output -------------------------------------------------------------------------------


def _template(text: str, b_ints: tuple[str, ...]) -> str:
    """Replace dotted integer segments of ``text`` equal to B's layer indices by placeholders."""
    if not b_ints:
        return text
    pos = {v: i for i, v in reversed(list(enumerate(b_ints)))}

    def sub(mo: re.Match[str]) -> str:
        i = pos.get(mo.group(0))
        return mo.group(0) if i is None else f"\x00{i}\x00"

    return _INT.sub(sub, text)


def _untemplate(tmpl: str, labels: list[str]) -> str:
    return re.sub("\x00(\\d+)\x00", lambda mo: labels[int(mo.group(1))], tmpl)


def fold_correspondences(items: Iterable[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str, int]]:
    """(key, kind, detail, rule) -> folded rows (key, kind, detail, rule, count): keys whose layer
    indices differ fold when the rest, with those indices substituted, agree.

    Example::

        >>> fold_correspondences([("b.0.w", "renamed", "A:a.0.w", ""), ("b.1.w", "renamed", "A:a.1.w", "")])
        [('b.{0-1}.w', 'renamed', 'A:a.{0-1}.w', '', 2)]
    """
    from .report import _split_key

    groups: dict[tuple[str, str, str, str], list[tuple[int, ...]]] = {}
    first: dict[tuple[str, str, str, str], tuple[str, str, str]] = {}
    for key, kind, detail, rule in items:
        pattern, idx = _split_key(key)
        ints = tuple(str(i) for i in idx)
        g = (pattern, kind, _template(detail, ints), rule)
        groups.setdefault(g, []).append(idx)
        first.setdefault(g, (key, detail, rule))
    rows = []
    for g, idxs in groups.items():
        pattern, kind, tmpl, rule = g
        if len(idxs) == 1:
            key, detail, rule = first[g]
            rows.append((key, kind, detail, rule, 1))
            continue
        cols = list(zip(*idxs))
        labels = [_brace_ranges(list(c)) if len(set(c)) > 1 else str(c[0]) for c in cols]
        pieces = pattern.split("{}")
        key = "".join(p + (labels[i] if i < len(labels) else "") for i, p in enumerate(pieces))
        detail = _untemplate(tmpl, labels)
        rows.append((key, kind, detail, rule, len(idxs)))
    return rows


def render_explanation(ex: Explanation, console: Any, verbose: bool = False) -> None:
    """Print B's keys by kind, folded by layer index; problems first, then (with ``verbose``, or
    when few) the keys that are the same or only renamed."""
    from .report import table

    counts = ex.counts
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    console.print(f"content: {summary}" if summary else "content: B has no tensors")
    problems = [c for c in ex.b if c.kind in PROBLEMS or c.cast]
    fine = [c for c in ex.b if c not in problems]
    sections = [("B keys not equal to an A tensor", problems, "red")]
    if verbose or len(fine) <= 400:
        sections.append(("B keys equal to an A tensor (or constant)", fine, "green"))
    for title, cs, style in sections:
        if not cs:
            continue
        cells: list[tuple[str, ...]] = [
            (key, kind, detail, rule or "", f"x{n}" if n > 1 else "")
            for key, kind, detail, rule, n in fold_correspondences((c.b, c.kind, c.detail, c.rule) for c in cs)
        ]
        console.print(table(f"{title} ({len(cs)})", ("B key", "kind", "from A", "rule", "count"), cells, style))
    if ex.a_left:
        cells = [
            (key, kind + (f" ({detail})" if detail else ""), rule or "", f"x{n}" if n > 1 else "")
            for key, kind, detail, rule, n in fold_correspondences(
                (d.a, d.kind, f"same values as A:{d.of}" if d.of else "", d.rule) for d in ex.a_left
            )
        ]
        console.print(table(f"A keys with no counterpart in B ({len(ex.a_left)})", ("A key", "kind", "rule", "count"), cells))


# -- diff --spec -------------------------------------------------------------------------------


def planned_checkpoint(
    spec: Any, a: Any, vars: Mapping[str, Any] | None = None, *, like: Iterable[str] | None = None
) -> tuple[Any, dict[str, str]]:
    """What ``spec`` makes of the opened checkpoint ``a``, as a checkpoint whose tensors are
    computed on demand (one at a time, nothing written), and the rule (file:line) behind each key.

    ``like``: the names of the checkpoint this will be compared with. A spec with ``tied: dedupe``
    writes each tied group once and leaves the other names to the loader; the names it leaves out
    that ``like`` does not hold are left out here too (a file ``apply`` wrote is then the same),
    and their ``rule_of`` entry says so (``... re-tied on load``).

    Example::

        >>> from statemap import open_checkpoint
        >>> with open_checkpoint("model.pt") as a:
        ...     planned, rule_of = planned_checkpoint("deltalm-fairseq-to-hf", a)
        ...     rule_of["lm_head.weight"]
        '.../deltalm-fairseq-to-hf.yaml:22 (rename)'
    """
    from .apply import run_node
    from .load.checkpoint import Checkpoint
    from .plan import make_plan
    from .spec import load_spec

    sp = load_spec(spec, vars)
    plan = make_plan(sp, a.metas.values(), a.tied_groups())
    nodes = {o.name: o.node for o in plan.outputs}

    rule_of = {
        o.name: f"{o.rule.loc} ({o.rule.op})" if o.rule is not None else f"{sp.path}: kept unchanged" for o in plan.outputs
    }

    def read(k: str) -> np.ndarray:
        return run_node(nodes[k], a.read)

    metas = {o.name: o.meta for o in plan.outputs}
    if like is not None and sp.tied == "dedupe":  # as apply writes it: each group once, the rest re-tied on load
        held = set(like)
        for g in (*plan.same, *plan.ties):
            for n in g[1:]:
                if n in metas and n not in held and g[0] in held:
                    del metas[n]
                    rule_of[n] += f"; written once as {g[0]} (tied: dedupe), re-tied on load"
    label = f"{sp.name} applied to {a.path}"
    return Checkpoint(label, "planned", metas, read), rule_of
