"""Streamed .pt and Flax .msgpack outputs, compared byte for byte with what torch.save and flax write.

The .pt writer emits torch's zip format itself (pickle, 64-byte aligned stored entries, data
descriptors, zip64 end records); for a dict of contiguous tensors its file is torch.save's file,
byte for byte, once both use the same random serialization id. The Flax writer computes every
msgpack header from shapes; its file is ``flax.serialization.msgpack_serialize``'s, byte for byte.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

import statemap
import statemap.write as w
from statemap.meta import TensorMeta
from statemap.stream_formats import storage_keys, torch_pickle
from statemap.torch_adapter import to_numpy


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(2, 3, generator=g).to(torch.float8_e5m2),
        "bool": torch.tensor([True, False, True]),
        "i64": torch.arange(5),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([250, 1], dtype=torch.uint8),
        "u16": torch.tensor([1, 65535], dtype=torch.int32).to(torch.uint16),
        "c64": torch.randn(2, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "deep": torch.randn(1, 2, 3, 4, 2, generator=g),
    }
    sd["tied"] = sd["f32"]  # one tensor under two names: one storage
    return sd


def _write_ours(path, sd, ties=(), monkeypatch=None, sid=None):
    metas = [TensorMeta(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]
    if sid is not None:
        monkeypatch.setattr(w, "_serialization_id", lambda: sid)
    return w.write_checkpoint(path, metas, (to_numpy(v)[0] for v in sd.values()), ties=ties, fsync=False)


def _sid(path) -> str:
    with zipfile.ZipFile(path) as z:
        return next(z.read(n) for n in z.namelist() if n.endswith(".data/serialization_id")).decode()


def test_pt_output_is_torch_save_byte_for_byte(tmp_path, monkeypatch):
    sd = _state()
    (tmp_path / "ref").mkdir()
    (tmp_path / "ours").mkdir()
    torch.save(sd, tmp_path / "ref" / "model.pt")
    ref = (tmp_path / "ref" / "model.pt").read_bytes()
    written = _write_ours(tmp_path / "ours" / "model.pt", sd, [["f32", "tied"]], monkeypatch, _sid(tmp_path / "ref" / "model.pt"))
    ours = (tmp_path / "ours" / "model.pt").read_bytes()
    assert ours == ref
    assert written.n_bytes == sum(v.numel() * v.element_size() for k, v in sd.items() if k != "tied")  # the tie once

    got = torch.load(tmp_path / "ours" / "model.pt", weights_only=True)
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and _bits(got[k]) == _bits(v), k
    assert got["tied"].untyped_storage().data_ptr() == got["f32"].untyped_storage().data_ptr()  # one storage
    mine = statemap.load_state_dict(tmp_path / "ours" / "model.pt")  # statemap's own reader
    assert all(_bits(mine[k]) == _bits(v) for k, v in sd.items())


def test_pt_byte_comparison_can_fail(tmp_path, monkeypatch):
    """The same file with one tensor value changed is not torch.save's file (the test above can fail)."""
    sd = _state()
    torch.save(sd, tmp_path / "model.pt")
    sid = _sid(tmp_path / "model.pt")
    changed = dict(sd)
    changed["i64"] = sd["i64"] + 1
    (tmp_path / "o").mkdir()
    _write_ours(tmp_path / "o" / "model.pt", changed, [["f32", "tied"]], monkeypatch, sid)
    assert (tmp_path / "o" / "model.pt").read_bytes() != (tmp_path / "model.pt").read_bytes()
    assert not torch.equal(torch.load(tmp_path / "o" / "model.pt", weights_only=True)["i64"], sd["i64"])


def test_pt_data_is_64_byte_aligned(tmp_path):
    sd = _state()
    _write_ours(tmp_path / "m.pt", sd, [["f32", "tied"]])
    with open(tmp_path / "m.pt", "rb") as f, zipfile.ZipFile(f) as z:
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            n_name, n_extra = np.frombuffer(f.read(4), "<u2")
            assert (info.header_offset + 30 + int(n_name) + int(n_extra)) % 64 == 0, info.filename


@pytest.mark.parametrize("n", [1, 2, 300, 1000, 1001, 2345])
def test_pickle_is_torch_pickle(n):
    """data.pkl for n keys (memo indices past 255, item batches of 1000) is the pickle torch writes."""
    sd = {f"layers.{i}.w": torch.zeros(i % 3, 2) for i in range(n)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    ref = zipfile.ZipFile(buf).read("archive/data.pkl")
    metas = [TensorMeta(k, tuple(v.shape), "float32") for k, v in sd.items()]
    assert torch_pickle(metas, storage_keys(metas, ())[0]) == ref


def test_convert_to_pt_from_non_contiguous_views(tmp_path, monkeypatch):
    """A .pt source holding a transposed view and a slice of a bigger storage converts to the file
    torch.save writes for the renamed, contiguous tensors; values bitwise equal to torch.load's."""
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    src = {"enc.w": base.t(), "enc.b": base.reshape(-1)[5:13], "emb": torch.randn(4, 3).to(torch.bfloat16)}
    src["head"] = src["emb"]
    torch.save(src, tmp_path / "src.pt")
    spec = {"name": "t", "version": 1, "rules": [{"rename": "enc.{x} -> encoder.{x}"}]}
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(w, "_serialization_id", lambda: "1" * 40)
    statemap.convert(spec, tmp_path / "src.pt", tmp_path / "out" / "model.pt", fsync=False)
    loaded = torch.load(tmp_path / "src.pt", weights_only=True)
    want = {"encoder.w": loaded["enc.w"], "encoder.b": loaded["enc.b"], "emb": loaded["emb"], "head": loaded["head"]}
    got = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and _bits(got[k]) == _bits(v), k
    assert got["head"].untyped_storage().data_ptr() == got["emb"].untyped_storage().data_ptr()
    ref = {k: want[k].contiguous().clone() for k in got}  # in the output's order
    ref["head"] = ref["emb"]
    (tmp_path / "ref").mkdir()
    torch.save(ref, tmp_path / "ref" / "model.pt")
    ref_bytes = (tmp_path / "ref" / "model.pt").read_bytes().replace(_sid(tmp_path / "ref" / "model.pt").encode(), b"1" * 40)
    ours = (tmp_path / "out" / "model.pt").read_bytes()
    # same layout and pickle; only the serialization id's CRC differs
    assert len(ours) == len(ref_bytes)
    assert sum(a != b for a, b in zip(ours, ref_bytes)) <= 8


def test_pt_from_torch_save_takes_whole_storage_crcs_from_the_source(tmp_path, monkeypatch):
    """Storages copied whole from a torch.save file keep the CRC-32 torch recorded for them (read
    from its central directory); a slice of a storage gets its own; zipfile and torch.load agree."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(64, 33, generator=g)
    src = {"a": torch.randn(100, 7, generator=g), "b": big, "part": torch.randn(50, generator=g)[10:30]}
    torch.save(src, tmp_path / "src.pt")
    found: list[int | None] = []
    real = w._SourceCRCs.lookup
    monkeypatch.setattr(w._SourceCRCs, "lookup", lambda self, *a: found.append(real(self, *a)) or found[-1])
    spec = {"name": "t", "version": 1, "rules": [{"rename": "{x} -> m.{x}"}]}
    statemap.convert(spec, tmp_path / "src.pt", tmp_path / "o.pt", fsync=False)
    assert len(found) == 3 and found[0] is not None and found[1] is not None and found[2] is None  # part: a slice
    with zipfile.ZipFile(tmp_path / "src.pt") as z:
        torch_crcs = {i.CRC for i in z.infolist()}
    assert {found[0], found[1]} <= torch_crcs
    with zipfile.ZipFile(tmp_path / "o.pt") as z:
        assert z.testzip() is None
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    assert all(torch.equal(got[f"m.{k}"], v) for k, v in src.items())


# -- Flax ------------------------------------------------------------------------------------------


def _flax_state():
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "encoder.layer_0.kernel": rng.random((3, 4), dtype=np.float32),
        "encoder.layer_0.bias": rng.random(4, dtype=np.float32),
        "decoder.embed.embedding": rng.random((5, 2)).astype(ml_dtypes.bfloat16),
        "encoder.layer_1.kernel": rng.random((4, 4), dtype=np.float32),  # interleaved: grouped under encoder
        "decoder.steps": np.array(7, dtype=np.int32),
        "decoder.mask": np.array([True, False]),
        "decoder.empty": np.zeros((0, 3), np.float16),
        "decoder.fp8": rng.random(3).astype(ml_dtypes.float8_e4m3fn),
    }


def _nest(flat):
    tree: dict = {}
    for k, v in flat.items():
        node = tree
        *mods, leaf = k.split(".")
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = v
    return tree


def _write_flax(path, flat):
    metas = []
    arrays = []
    for k, v in flat.items():
        name = v.dtype.name
        metas.append(TensorMeta(k, tuple(v.shape), name))
        arrays.append(v.view(np.uint16) if name == "bfloat16" else v.view(np.uint8) if name.startswith("float8") else v)
    w.write_checkpoint(path, metas, arrays, fsync=False)


@pytest.mark.parametrize("chunk", [None, 24])
def test_msgpack_output_is_flax_serialize_byte_for_byte(tmp_path, monkeypatch, chunk):
    from flax import serialization

    import statemap.stream_formats as sf

    flat = _flax_state()
    if chunk:  # arrays over the chunk size are split as flax splits them (1 GiB in real files)
        monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", chunk)
        monkeypatch.setattr(sf, "MAX_CHUNK", chunk)
    _write_flax(tmp_path / "m.msgpack", flat)
    ref = serialization.msgpack_serialize(_nest(flat))
    assert (tmp_path / "m.msgpack").read_bytes() == ref
    back = serialization.msgpack_restore(ref)
    assert back["encoder"]["layer_1"]["kernel"].tobytes() == flat["encoder.layer_1.kernel"].tobytes()
    flat2 = dict(flat)
    flat2["decoder.steps"] = np.array(8, dtype=np.int32)
    _write_flax(tmp_path / "m2.msgpack", flat2)  # the comparison can fail
    assert (tmp_path / "m2.msgpack").read_bytes() != ref


def test_convert_to_msgpack_streams_byte_ranges(tmp_path):
    """A rename-only conversion to .msgpack copies byte ranges (Segments) and reads back equal."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    sd = {f"l.{i}.w": rng.random((8, 4), dtype=np.float32) for i in range(3)} | {"top": rng.random((3, 2), dtype=np.float32)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    spec = {"name": "t", "version": 1, "rules": [{"rename": "l.{i}.w -> model.l{i}.kernel"}, {"transpose": "top"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.msgpack", fsync=False)
    got = statemap.load_state_dict(tmp_path / "o.msgpack")
    for i in range(3):
        assert np.array_equal(got[f"model.l{i}.kernel"].numpy(), sd[f"l.{i}.w"])
    assert np.array_equal(got["top"].numpy(), sd["top"].T)


@pytest.mark.parametrize(
    "dtype, message",
    [
        ("quint4x2", r"cannot write tensor 'x' to a \.pt file: quint4x2 \(packed values\)"),
        ("float6_e2m3fn_x4", r"torch has no float6_e2m3fn_x4 type"),
        ("uint3", r"torch cannot save uint3 tensors"),
    ],
)
def test_pt_output_refuses_types_torch_cannot_load(tmp_path, dtype, message):
    with pytest.raises(statemap.OutputError, match=message):
        w.write_checkpoint(tmp_path / "o.pt", [TensorMeta("x", (3,), dtype)], [np.zeros(3, np.uint8)])
    assert list(tmp_path.iterdir()) == []


def test_quantized_without_quantizer_pickle_as_torch_saves_them():
    """qint8 / quint8 / qint32 read as their integer representation are written as torch.save
    writes such tensors (a typed QInt8Storage, ...), as the earlier torch.save-based writer did."""
    sd = {
        "q8": torch.zeros(3, dtype=torch.int8).view(torch.qint8),
        "u8": torch.zeros(2, dtype=torch.uint8).view(torch.quint8),
        "q32": torch.zeros(4, dtype=torch.int32).view(torch.qint32),
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    ref = zipfile.ZipFile(buf).read("archive/data.pkl")
    metas = [TensorMeta(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]
    assert torch_pickle(metas, storage_keys(metas, ())[0]) == ref
