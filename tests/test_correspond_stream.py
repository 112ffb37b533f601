"""`diff --values` hashes large float32 tensors (embeddings) from their file a piece at a time
(statemap.correspond._quick_stream) when nothing else needs the array: the identity must be the one
of the tensor in memory, and every explanation the same as when each tensor is read whole."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

import statemap.correspond as corr
from statemap.correspond import _quick_parts, _quick_stream, explain
from statemap.diff import _FileRanges, diff_checkpoints
from statemap.load import open_checkpoint
from statemap.meta import TensorMeta

RNG = np.random.default_rng(5)


def _ranges(raw: bytes):
    """A byte-range reader over ``raw``, as a file's would read it."""

    def rr(off: int, count: int, out: np.ndarray) -> np.ndarray:
        out[:] = np.frombuffer(raw[off : off + count], dtype=np.uint8)
        return out

    return rr


@pytest.mark.parametrize("n", [3, 16_383, 16_385, (1 << 18) + 1, 3 * (1 << 20) + 7])  # under 64 KB, odd, over 1 MB
def test_streamed_identity_is_the_in_memory_one(n):
    x = RNG.standard_normal(n, dtype=np.float32)
    rr = _ranges(x.tobytes())

    meta = TensorMeta("w", (n,), "float32")
    assert _quick_stream(meta, rr)[0] == _quick_parts(meta, x)
    y = x.copy()
    y[n // 3] = -y[n // 3]
    assert _quick_stream(meta, rr)[0] != _quick_parts(meta, y)  # one element negated: another identity


@pytest.mark.parametrize("shape", [(70_001, 3), (4099, 1024), (1500, 257)])  # rows across the 2 MB pieces (odd lengths too)
def test_streamed_row_starts_are_every_rows_first_two_values(shape):
    x = RNG.standard_normal(shape, dtype=np.float32)
    rr = _ranges(x.tobytes())

    meta = TensorMeta("w", shape, "float32")
    q, first = _quick_stream(meta, rr, shape[1] * 4)
    assert q == _quick_parts(meta, x)
    np.testing.assert_array_equal(first, x[:, :2])


def _explained(a_path, b_path, stream: bool) -> dict:
    with open_checkpoint(str(a_path)) as a, open_checkpoint(str(b_path)) as b:
        with _FileRanges(a, _Bar()) as ra, _FileRanges(b, _Bar()) as rb:
            ex = explain(a.metas, a.read, b.metas, b.read, a_ranges=ra if stream else None, b_ranges=rb if stream else None)
    return ex.to_json()


class _Bar:
    def advance(self, tensors: int = 1, nbytes: int = 0) -> None:
        pass


def test_streamed_tensors_explain_as_when_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(corr, "_BIG_ONE", 1 << 12)  # every tensor over 4 KB counts as an embedding here
    emb = RNG.standard_normal((300, 40), dtype=np.float32)
    w = RNG.standard_normal((40, 24), dtype=np.float32)
    changed = emb.copy()
    changed[123, 5] = np.nextafter(changed[123, 5], np.float32(np.inf))
    a = {"embed.weight": emb, "w": w, "zeros": np.zeros((64, 40), np.float32)}
    b = {
        "model.embed.weight": emb.copy(),  # renamed: held whole by A (not read whole)
        "lm_head.weight": emb.copy(),  # tied copy
        "model.embed2.weight": changed,  # one ulp off: not a copy (read whole for its fingerprint)
        "w": np.ascontiguousarray(w.T),
        "injected": np.zeros((64, 40), np.float32),  # a constant A also holds: read whole to check
    }
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    streamed = _explained(tmp_path / "a.safetensors", tmp_path / "b.safetensors", True)
    whole = _explained(tmp_path / "a.safetensors", tmp_path / "b.safetensors", False)
    assert streamed == whole
    kinds = {c["b"]: c["kind"] for c in streamed["b"]}
    assert kinds["model.embed.weight"] == "renamed" and kinds["lm_head.weight"] == "tied"
    assert kinds["model.embed2.weight"] != "renamed" and kinds["w"] == "transposed"
    assert kinds["injected"] == "constant"
    r = diff_checkpoints(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), values=True)
    assert r.explanation.to_json() == whole  # diff --values takes the streamed path with the same result


def test_streaming_is_used_and_reads_stay_in_the_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(corr, "_BIG_ONE", 1 << 12)
    emb = RNG.standard_normal((300, 40), dtype=np.float32)
    save_file({"e": emb}, str(tmp_path / "a.safetensors"))
    save_file({"f": emb.copy()}, str(tmp_path / "b.safetensors"))
    read_whole: list[str] = []
    with open_checkpoint(str(tmp_path / "a.safetensors")) as a, open_checkpoint(str(tmp_path / "b.safetensors")) as b:

        def spy(ck):
            def read(k: str) -> np.ndarray:
                read_whole.append(k)
                return ck.read(k)

            return read

        with _FileRanges(a, _Bar()) as ra, _FileRanges(b, _Bar()) as rb:
            ex = explain(a.metas, spy(a), b.metas, spy(b), a_ranges=ra, b_ranges=rb)
            rr = rb("f")
            with pytest.raises(ValueError, match="outside the tensor"):
                rr(emb.nbytes - 4, 8, np.empty(8, np.uint8))
    assert [c.kind for c in ex.b] == ["renamed"] and read_whole == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(37, 5), (300, 40), (3, 9000)])  # one chunk; many chunks; rows wider than 2**13
def test_streamed_fingerprint_is_the_in_memory_one(monkeypatch, dtype, shape):
    """Rows read a few at a time and hashed as they come give exactly the hashes of the tensor in
    memory (rows, columns, full), and every row's first two values."""
    from statemap.correspond import _Hasher

    monkeypatch.setattr(corr, "_STREAM", 1 << 12)  # 4 KB of rows at a time: many chunks, and one row per chunk for (3, 9000)
    x = RNG.standard_normal(shape, dtype=np.float32)
    if dtype == "float16":
        x = x.astype(np.float16)
    elif dtype == "bfloat16":
        x = (x.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits, as readers hold them
    meta = TensorMeta("w", shape, dtype)
    h = _Hasher(9000)
    whole = h.fingerprint("w", meta, x)
    fp, first = h.fingerprint_stream("w", meta, _ranges(x.tobytes()), starts=True)
    assert np.array_equal(fp.rows, whole.rows) and np.array_equal(fp.cols, whole.cols) and fp.full == whole.full
    np.testing.assert_array_equal(first, x[:, :2])
    cols_only, none = h.fingerprint_stream("w", meta, _ranges(x.tobytes()), with_rows=False)
    assert cols_only.rows is None and np.array_equal(cols_only.cols, whole.cols) and none is None
    y = x.copy()
    y.view(np.uint8 if y.itemsize == 1 else f"u{y.itemsize}")[shape[0] // 2, shape[1] - 1] ^= 1  # the last bit of one element
    changed, _ = h.fingerprint_stream("w", meta, _ranges(y.tobytes()))  # the comparison can fail: one element changed
    assert list(np.nonzero(changed.rows != whole.rows)[0]) == [shape[0] // 2]
    assert list(np.nonzero(changed.cols != whole.cols)[0]) == [shape[1] - 1]
    assert h.fingerprint_stream("w", TensorMeta("w", shape, "float64"), _ranges(x.tobytes())) is None  # float64: read whole


def test_transposes_hashed_from_their_files_explain_as_when_read_whole(tmp_path, monkeypatch):
    """diff --values on files: A's rows and B's columns of transposed pairs are hashed as they are
    read (neither is read whole), and every explanation is the one of the whole-tensor path,
    including a pair with one element changed (differs, naming the column) and one whose B rows
    an A tensor also holds (the full matching's answer)."""
    monkeypatch.setattr(corr, "_STREAM", 1 << 12)
    a = {f"l{i}.w": RNG.standard_normal((64, 96), dtype=np.float32) for i in range(4)}
    a["h16"] = RNG.standard_normal((30, 20), dtype=np.float32).astype(np.float16)
    a["copy.w"] = RNG.standard_normal((8, 16), dtype=np.float32)
    a["stack"] = np.concatenate([RNG.standard_normal((3, 8), dtype=np.float32), a["copy.w"].T.copy()])  # holds B:copy.w's rows
    b = {k: np.ascontiguousarray(v.T) for k, v in a.items() if k != "stack"}
    b["l2.w"] = b["l2.w"].copy()
    b["l2.w"][10, 7] += np.float32(1.0)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    read_whole: list[str] = []
    with open_checkpoint(str(tmp_path / "a.safetensors")) as ca, open_checkpoint(str(tmp_path / "b.safetensors")) as cb:

        def b_read(k: str) -> np.ndarray:
            read_whole.append(k)
            return cb.read(k)

        with _FileRanges(ca, _Bar()) as ra, _FileRanges(cb, _Bar()) as rb:
            streamed = explain(ca.metas, ca.read, cb.metas, b_read, a_ranges=ra, b_ranges=rb).to_json()
    assert set(read_whole) == {"copy.w", "l2.w"}  # the changed pair and the B rows A holds: read whole
    whole = _explained(tmp_path / "a.safetensors", tmp_path / "b.safetensors", False)
    assert streamed == whole
    by = {c["b"]: c for c in streamed["b"]}
    assert {k for k, c in by.items() if c["kind"] == "transposed"} == {"l0.w", "l1.w", "l3.w", "h16"}
    assert by["l2.w"]["kind"] == "differs" and by["l2.w"]["rows_differ"] == "[7] (1 of 64 columns)"
    assert by["copy.w"]["kind"] == "split"


def test_square_transposes_checked_from_a_file_explain_as_the_full_matching(tmp_path, monkeypatch):
    """A square B that is not A's values is checked against A transposed (A's rows hashed from A's
    file, B's columns): "transposed" exactly where the full matching says so; one element changed
    is not; B rows an A tensor holds keep the full matching's answer. `diff --values` says a square
    transpose is one instead of comparing it element by element; the changed one is compared."""
    sq = {f"l{i}.sq": RNG.standard_normal((24, 24), dtype=np.float32) for i in range(3)}
    held = RNG.standard_normal((24, 24), dtype=np.float32)
    a = {**sq, "held.sq": held, "copy": np.ascontiguousarray(held.T), "same.sq": RNG.standard_normal((24, 24), dtype=np.float32)}
    b = {k: np.ascontiguousarray(v.T) for k, v in a.items() if k.endswith(".sq")}
    b["same.sq"] = a["same.sq"].copy()
    b["l1.sq"] = b["l1.sq"].copy()
    b["l1.sq"][5, 9] = np.nextafter(b["l1.sq"][5, 9], np.float32(np.inf))
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    rows_hashed: list[str] = []  # B keys whose rows were hashed
    real = corr._Hasher.fingerprint

    def spy(self, key, meta, x, variant="", cols=True, with_rows=True):
        if with_rows and x.shape == (24, 24) and x.flags.c_contiguous and key in b and np.array_equal(x, b[key]):
            rows_hashed.append(key)
        return real(self, key, meta, x, variant, cols, with_rows)

    with monkeypatch.context() as mp:
        mp.setattr(corr._Hasher, "fingerprint", spy)
        streamed = _explained(tmp_path / "a.safetensors", tmp_path / "b.safetensors", True)
    assert "l1.sq" in rows_hashed and not {"l0.sq", "l2.sq"} & set(rows_hashed)  # transposes: B's columns alone
    with open_checkpoint(str(tmp_path / "a.safetensors")) as ca, open_checkpoint(str(tmp_path / "b.safetensors")) as cb:
        full = explain(ca.metas, ca.read, cb.metas, cb.read, transposes=False).to_json()
    assert streamed == full
    by = {c["b"]: (c["kind"], c["detail"]) for c in streamed["b"]}
    assert by["l0.sq"] == by["l2.sq"] == ("transposed", "B = A transposed")
    assert by["l1.sq"][0] == "differs" and by["same.sq"] == ("same", "")
    assert by["held.sq"] == ("renamed", "A:copy")  # A:copy holds B's values whole: the full matching's answer
    r = diff_checkpoints(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), values=True)
    assert r.explanation.to_json() == full and not r.same
    values = {v.name: v for v in r.values}
    assert values["l0.sq"].max_abs is None and values["l0.sq"].note == "B = A transposed" and not values["l0.sq"].allclose
    assert values["l1.sq"].max_abs is not None and values["l1.sq"].max_abs > 0.1 and not values["l1.sq"].note
    assert values["same.sq"].allclose and values["same.sq"].max_abs == 0.0
    as_json = {v["name"]: v for v in r.to_json()["values"]}
    assert as_json["l0.sq"] == {"name": "l0.sq", "max_abs": None, "allclose": False, "note": "B = A transposed"}
    assert "note" not in as_json["l1.sq"]
