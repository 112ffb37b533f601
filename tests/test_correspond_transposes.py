"""`diff --values`: a B tensor whose A namesake has the transposed shape is explained from B's
column hashes alone (statemap.correspond._transpose_pairs). The explanations must be exactly those
of the full row / column matching (``explain(..., transposes=False)``), including where the short
path must not apply: values that are not the transpose, and B rows that an A tensor also holds."""

from __future__ import annotations

import numpy as np
import pytest

from statemap.correspond import _Hasher, _row_starts, _transpose_pairs, explain
from statemap.dtypes import cast
from statemap.dtypes import dtype as dt
from statemap.meta import TensorMeta

RNG = np.random.default_rng(7)


def _meta(k: str, v: np.ndarray) -> TensorMeta:
    name = "bfloat16" if k.endswith("bf16") else str(v.dtype)
    return TensorMeta(k, tuple(v.shape), {"bool": "bool"}.get(name, name))


def _both(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(short path, full matching) explanations as JSON (B keys, A keys left, counts)."""
    ma, mb = {k: _meta(k, v) for k, v in a.items()}, {k: _meta(k, v) for k, v in b.items()}
    fast = explain(ma, a.__getitem__, mb, b.__getitem__).to_json()
    full = explain(ma, a.__getitem__, mb, b.__getitem__, transposes=False).to_json()
    return fast, full


@pytest.fixture
def hashed(monkeypatch) -> list[tuple[str, tuple[int, ...], bool]]:
    """(key, shape, rows hashed?) of every fingerprint taken."""
    calls: list[tuple[str, tuple[int, ...], bool]] = []
    real = _Hasher.fingerprint

    def spy(self, key, meta, a, variant="", cols=True, with_rows=True):
        calls.append((key, tuple(meta.shape), with_rows))
        return real(self, key, meta, a, variant, cols, with_rows)

    monkeypatch.setattr(_Hasher, "fingerprint", spy)
    return calls


def _kinds(ex: dict) -> dict[str, tuple[str, str]]:
    return {c["b"]: (c["kind"], c["detail"]) for c in ex["b"]}


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape, dtype=np.float32)


def test_transposes_found_from_columns_alone_as_the_full_matching_finds_them(hashed):
    w, u = _f32(6, 10), _f32(3, 7, 2)  # u: [3, 14] as a matrix
    h = cast(_f32(5, 9), dt("float32"), dt("bfloat16"))
    f16 = _f32(4, 6).astype(np.float16)
    i32 = RNG.integers(-(2**31), 2**31, size=(5, 3), dtype=np.int32)
    flags = RNG.integers(0, 2, size=(4, 3)).astype(bool)
    a = {"w": w, "u": u, "h_bf16": h, "f16": f16, "i32": i32, "flags": flags, "keep": _f32(4)}
    a |= {"z": (_f32(3, 6) + 1j).astype(np.complex128), "z64": (_f32(2, 6) + 1j).astype(np.complex64)}  # rows as long as B:w's
    b = {
        "w": np.ascontiguousarray(w.T),
        "u": np.ascontiguousarray(u.reshape(3, 14).T).reshape(14, 3),
        "h_bf16": np.ascontiguousarray(h.T),
        "f16": np.ascontiguousarray(f16.T),
        "i32": np.ascontiguousarray(i32.T),
        "flags": np.ascontiguousarray(flags.T),
        "keep": a["keep"].copy(),
    }
    ma, mb = {k: _meta(k, v) for k, v in a.items()}, {k: _meta(k, v) for k, v in b.items()}
    assert set(_transpose_pairs(ma, mb)) == {"w", "u", "h_bf16", "f16", "i32", "flags"}
    fast = explain(ma, a.__getitem__, mb, b.__getitem__).to_json()
    b_side = {(k, rows) for k, shape, rows in hashed if k in mb and shape == mb[k].shape}
    assert b_side == {(k, False) for k in _transpose_pairs(ma, mb)}  # B's columns only, once each
    hashed.clear()
    full = explain(ma, a.__getitem__, mb, b.__getitem__, transposes=False).to_json()
    assert {(k, rows) for k, shape, rows in hashed if k in mb and shape == mb[k].shape} == {
        (k, True) for k in _transpose_pairs(ma, mb)
    }
    assert fast == full
    kinds = _kinds(fast)
    assert kinds.pop("keep") == ("same", "")
    assert {d["a"] for d in fast["a_left"]} == {"z", "z64"}
    assert kinds == dict.fromkeys(kinds, ("transposed", "B = A transposed")) and len(kinds) == 6
    (piece,) = next(c for c in fast["b"] if c["b"] == "w")["pieces"]
    assert piece == {"b": [0, 6], "b_axis": "cols", "a": "w", "a_range": [0, 6], "a_axis": "rows"}


@pytest.mark.parametrize("what", ["one element", "two elements swapped", "rows reordered"])
def test_not_a_transpose_is_not_called_one(what):
    """Same multiset of values, or nearly the transpose: never "transposed"; the full matching's
    explanation (permuted, or differs) is kept."""
    w = _f32(8, 5)
    t = np.ascontiguousarray(w.T)
    if what == "one element":
        t[2, 3] = np.nextafter(t[2, 3], np.float32(np.inf))
    elif what == "two elements swapped":
        t[0, 1], t[4, 6] = t[4, 6], t[0, 1]
    else:
        t = t[[1, 0, 2, 3, 4]].copy()
    fast, full = _both({"w": w}, {"w": t})
    assert fast == full
    kind, detail = _kinds(fast)["w"]
    assert kind != "transposed", detail
    if what == "rows reordered":
        assert kind == "permuted" and "transposed" in detail  # the full matching's own words


def test_a_tensor_holding_b_rows_keeps_the_full_matching(monkeypatch):
    """B is A:w transposed, but A also holds B's values in B's layout (a copy, or a block of a
    larger tensor): the full matching explains B by those first, and so does the short path.
    Without the check of B's row 0 against the starts of A's rows, it would not."""
    import statemap.correspond as correspond

    w = _f32(4, 6)
    t = np.ascontiguousarray(w.T)
    for extra, kind in (({"w_t": t.copy()}, "renamed"), ({"stack": np.concatenate([_f32(2, 4), t, _f32(3, 4)])}, "split")):
        fast, full = _both({"w": w, **extra}, {"w": t})
        assert fast == full
        assert _kinds(fast)["w"][0] == kind, _kinds(fast)
        with monkeypatch.context() as mp:  # the comparison can fail: no starts, no check
            mp.setattr(correspond, "_row_starts", lambda *args, **kw: [])
            blind, _ = _both({"w": w, **extra}, {"w": t})
        assert _kinds(blind)["w"] == ("transposed", "B = A transposed")
    # rounded: A holds B's rows in float32, B is bfloat16 (a variant of A rounded to B's type)
    h = cast(_f32(4, 6), dt("float32"), dt("bfloat16"))
    wide = cast(h, dt("bfloat16"), dt("float32")) + np.float32(0)  # exact widening, rounds back to h
    fast, full = _both({"x_bf16": np.ascontiguousarray(h.T), "wide": np.ascontiguousarray(wide)}, {"x_bf16": h})
    assert fast == full


def test_square_and_vector_shapes_take_the_full_matching():
    """Square matrices (B may equal A) and 1-row / 1-column shapes (the same matrix as A's once
    size-1 dims are dropped) are not pairs; their explanations are the full matching's."""
    sq, row, col = _f32(5, 5), _f32(1, 7), _f32(7, 1)
    a = {"sq": sq, "row": row, "col": col, "v": _f32(1, 6)}
    b = {"sq": np.ascontiguousarray(sq.T), "row": row.reshape(7, 1).copy(), "col": col.reshape(1, 7).copy(), "v": a["v"].T.copy()}
    ma, mb = {k: _meta(k, v) for k, v in a.items()}, {k: _meta(k, v) for k, v in b.items()}
    assert _transpose_pairs(ma, mb) == {}
    fast, full = _both(a, b)
    assert fast == full
    kinds = _kinds(fast)
    assert kinds["sq"] == ("transposed", "B = A transposed")
    assert kinds["row"][0] == kinds["col"][0] == "reshaped"


def test_row_starts_match_whenever_row_hashes_can():
    """Two rows whose canonical values are equal have equal start keys, across dtypes that hash
    alike (bfloat16 and its float32 widening; float64 holding float32 values) and rounded."""
    h = _Hasher(64)
    x = _f32(6, 4)
    as64 = x.astype(np.float64)
    bf = cast(x, dt("float32"), dt("bfloat16"))
    s32 = _row_starts(x, TensorMeta("x", (6, 4), "float32"), 6, 4)
    s64 = _row_starts(as64, TensorMeta("x", (6, 4), "float64"), 6, 4)
    assert any(np.array_equal(s32[0], s) for s in s64)
    sbf = _row_starts(bf, TensorMeta("x", (6, 4), "bfloat16"), 6, 4)
    rounded = _row_starts(x, TensorMeta("x", (6, 4), "float32"), 6, 4, ["bfloat16"])
    assert any(np.array_equal(sbf[0], s) for s in rounded)
    # and the row hashes agree where the keys do
    r32 = h.fingerprint("x", TensorMeta("x", (6, 4), "float32"), x).rows
    r64 = h.fingerprint("x", TensorMeta("x", (6, 4), "float64"), as64).rows
    assert np.array_equal(r32, r64)
    # a different second value gives a different key
    y = x.copy()
    y[2, 1] += 1
    assert list(np.nonzero(_row_starts(y, TensorMeta("y", (6, 4), "float32"), 6, 4)[0] != s32[0])[0]) == [2]


def test_column_hashes_alone_equal_the_full_fingerprints():
    h = _Hasher(20000)
    x = _f32(300, 9000)  # two column blocks, rows split over two threads
    meta = TensorMeta("x", x.shape, "float32")
    full, cols = h.fingerprint("x", meta, x), h.fingerprint("x", meta, x, with_rows=False)
    assert cols.rows is None and np.array_equal(cols.cols, full.cols)
    assert np.array_equal(
        h.fingerprint("t", TensorMeta("t", (9000, 300), "float32"), np.ascontiguousarray(x.T), with_rows=False).cols, full.rows
    )


def test_sorted_has_finds_a_key_and_only_a_key():
    from statemap.correspond import _sorted_has

    keys = np.array([3, 9, 27, 2**63 + 5], dtype=np.uint64)
    assert _sorted_has(keys, np.array([27], dtype=np.uint64))
    assert _sorted_has(keys, np.array([1, 2**63 + 5], dtype=np.uint64))
    assert not _sorted_has(keys, np.array([0, 4, 2**64 - 1], dtype=np.uint64))  # before, between, after every key
    assert not _sorted_has(np.zeros(0, np.uint64), np.array([3], dtype=np.uint64))


def test_a_transpose_with_one_element_changed_names_the_column():
    """A transposed pair with one element changed is not "transposed" (nor a copy): it differs, and
    the column of B (A's row) that differs is named, with the max difference against A transposed."""
    a = {f"l{i}.w": _f32(64, 96) for i in range(6)}
    b = {k: np.ascontiguousarray(v.T) for k, v in a.items()}
    b["l3.w"] = b["l3.w"].copy()
    b["l3.w"][10, 7] += np.float32(1.0)
    b["l4.w"] = _f32(96, 64)  # nothing to do with A's
    fast, full = _both(a, b)
    assert fast == full
    by = {c["b"]: c for c in fast["b"]}
    assert {k for k, c in by.items() if c["kind"] == "transposed"} == {"l0.w", "l1.w", "l2.w", "l5.w"}
    bad = by["l3.w"]
    assert bad["kind"] == "differs" and bad["rows_differ"] == "[7] (1 of 64 columns)"
    assert "B = A transposed except B's columns [7]" in bad["detail"]
    assert bad["max_abs"] == pytest.approx(1.0, rel=1e-6)
    assert by["l4.w"]["kind"] == "differs" and "no content match" in by["l4.w"]["detail"]


def test_reads_never_overlap_and_a_read_error_stops_the_passes():
    """Both passes run on two threads, but a checkpoint's reader is never entered by two at once;
    an error raised by a read (or a hash) reaches the caller as itself."""
    import threading

    from statemap.errors import CheckpointError

    a = {f"t{i}": _f32(40, 30 + i) for i in range(24)}
    b = {k: np.ascontiguousarray(v.T) for k, v in a.items()}
    inside, overlaps = [0], []
    lock = threading.Lock()

    def guarded(src: dict[str, np.ndarray], fail: str = "") -> object:
        def read(k: str) -> np.ndarray:
            with lock:
                inside[0] += 1
                if inside[0] > 1:
                    overlaps.append(k)
            try:
                if k == fail:
                    raise CheckpointError(f"b.safetensors: tensor {k!r} is truncated")
                threading.Event().wait(0.001)  # let another thread try to enter meanwhile
                return src[k]
            finally:
                with lock:
                    inside[0] -= 1

        return read

    ma, mb = {k: _meta(k, v) for k, v in a.items()}, {k: _meta(k, v) for k, v in b.items()}
    ex = explain(ma, guarded(a), mb, guarded(b)).to_json()
    assert overlaps == []
    assert {c["kind"] for c in ex["b"]} == {"transposed"} and len(ex["b"]) == 24
    with pytest.raises(CheckpointError, match="'t5' is truncated"):
        explain(ma, guarded(a), mb, guarded(b, fail="t5"))
