"""Unpickler v2: protocol-2 names, harmless classes as placeholders, every dtype, numpy of any
protocol, and resource bounds. Good inputs are real ``torch.save`` files compared value by value
against ``torch.load(weights_only=False)`` on files this test generated itself."""

from __future__ import annotations

import _compat_pickle
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from statemap import CheckpointError, UnsafeCheckpointError, open_checkpoint
from statemap.load.unpickle import compat_name, safe_load, to_plain

FIX = Path(__file__).parent / "fixtures" / "unpickle"


def _values(ck, name: str) -> list:
    return ck.read(name).flatten().tolist()


def _assert_same_tensors(path: Path, expected: dict) -> None:
    """Every tensor torch.load returned is in statemap's view with equal dtype, shape and values."""
    with open_checkpoint(path) as ck:
        assert set(ck.metas) == set(expected), (sorted(ck.metas), sorted(expected))
        for k, t in expected.items():
            assert ck.metas[k].dtype == str(t.dtype).removeprefix("torch."), k
            assert ck.metas[k].shape == tuple(t.shape), k
            got = torch.from_numpy(np.array(ck.read(k))).view(t.dtype).reshape(t.shape)
            assert torch.equal(got, t), k


# -- 1. protocol-2 compatibility names -----------------------------------------------------------


def test_compat_names_follow_the_stdlib_table_exactly():
    for (m, n), want in _compat_pickle.NAME_MAPPING.items():
        assert compat_name(m, n, 2) == want
    for m, want in _compat_pickle.IMPORT_MAPPING.items():
        if not any(k[0] == m for k in _compat_pickle.NAME_MAPPING):
            assert compat_name(m, "X", 2) == (want, "X")
    assert compat_name("__builtin__", "long", 3) == ("__builtin__", "long")  # protocol >= 3: no mapping, as in Python


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_torch_save_protocols_read_like_torch_load(tmp_path, protocol):
    torch.manual_seed(protocol)
    model = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3).double(), "n": torch.tensor([1, 2], dtype=torch.int64)}
    meta = {"types": [int, str, range], "r": range(3), "big": 2**70, "text": "größe", "raw": b"\x00\xff", "e": ValueError("x")}
    path = tmp_path / f"p{protocol}.pt"
    torch.save({"model": model, "meta": meta}, path, pickle_protocol=protocol)
    back = torch.load(path, weights_only=False)  # our own file, written just above
    _assert_same_tensors(path, back["model"])
    with open_checkpoint(path) as ck:
        got = ck.extras["meta"]
    assert got["big"] == back["meta"]["big"] and got["text"] == back["meta"]["text"]
    assert got["types"] == [int, str, range] and got["r"] == range(3)


@pytest.mark.parametrize("protocol", [2, 4])
def test_omegaconf_dictconfig_written_by_torch_save(protocol):
    """omegaconf configs (fairseq, NeMo, Hydra) pickled by torch.save; expected values from torch.load."""
    path = FIX / f"omegaconf_p{protocol}.pt"
    expected = json.loads((FIX / f"omegaconf_p{protocol}.expected.json").read_text())
    with open_checkpoint(path) as ck:
        assert ck.container == "model"
        assert set(ck.metas) == set(expected["tensors"])
        for k, t in expected["tensors"].items():
            assert (ck.metas[k].dtype, list(ck.metas[k].shape)) == (t["dtype"], t["shape"])
            assert _values(ck, k) == t["values"]
        assert ck.extras["cfg"] == expected["cfg"]
        assert ck.extras["lst"] == expected["lst"]
        assert ck.extras["n"] == expected["n"] == 2**70
    # the comparison can fail: a changed value is noticed
    assert {**expected["cfg"], "big": 1} != expected["cfg"]


def test_protocol2_code_names_are_still_refused(tmp_path):
    data = b"\x80\x02}X\x01\x00\x00\x00wc__builtin__\neval\nX\x01\x00\x00\x001\x85Rs."
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load '__builtin__\.eval'"):
        safe_load(data, "x.pkl")
    data = b"\x80\x02}X\x01\x00\x00\x00wc__builtin__\nreduce\nX\x01\x00\x00\x001\x85Rs."  # -> functools.reduce
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load '__builtin__\.reduce'"):
        safe_load(data, "x.pkl")


@pytest.mark.parametrize("protocol", [0, 1])
def test_protocol0_pickle_with_copy_reg_names(protocol):
    import argparse

    obj = {"w": np.arange(4, dtype=np.float32), "args": argparse.Namespace(lr=0.5, name="x"), "n": 5}
    data = pickle.dumps(obj, protocol=protocol)
    assert b"copy_reg" in data and b"__builtin__" in data
    got, _ = safe_load(data, "x.pkl")
    assert to_plain(got)["args"] == {"lr": 0.5, "name": "x"}
    assert got["n"] == 5 and got["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


# -- helpers to assemble hostile pickles byte by byte (never defined as Python objects) -------------


def _s(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def _call(func: bytes, *args: bytes) -> bytes:
    return func + b"(" + b"".join(args) + b"tR"


def _i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _tup(*xs: bytes) -> bytes:
    return b"(" + b"".join(xs) + b"t"


def _storage(numel: int, key: str = "0", kind: str = "FloatStorage") -> bytes:
    return _tup(_s("storage"), _g("torch", kind), _s(key), _s("cpu"), _i(numel)) + b"Q"  # BINPERSID


def _tensor(numel: int, size: tuple, stride: tuple, offset: int = 0) -> bytes:
    big = lambda n: b"\x8a" + bytes([len(n.to_bytes(16, "little", signed=True))]) + n.to_bytes(16, "little", signed=True)  # noqa: E731
    ints = lambda xs: b"(" + b"".join(big(x) for x in xs) + b"t"  # noqa: E731
    return _call(_g("torch._utils", "_rebuild_tensor_v2"), _storage(numel), _i(offset), ints(size), ints(stride), b"\x89", b"}")


def _sd(value: bytes, key: str = "w") -> bytes:
    """{'w': value} in protocol 2."""
    return b"\x80\x02}" + _s(key) + value + b"s."


def _zip_with(tmp_path: Path, name: str, method: int = 0, byteorder: bytes | None = b"little", data: bytes | None = None) -> Path:
    """A real torch.save zip, its entries copied with data.pkl compressed by ``method`` (and a chosen byteorder)."""
    import zipfile

    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    out = tmp_path / name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            raw = zin.read(info)
            if info.filename.endswith("/byteorder"):
                if byteorder is None:
                    continue
                raw = byteorder
            if info.filename.endswith("/data.pkl"):
                zout.writestr(info.filename, data if data is not None else raw, compress_type=method)
            else:
                zout.writestr(info.filename, raw, compress_type=zipfile.ZIP_STORED)
    return out


def _nested_lists(depth: int) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


BAD: list[tuple[str, Any, str]] = [
    # name, bytes (or a builder taking tmp_path -> path), message regex
    ("bytearray(2**31)", _sd(_call(_g("__builtin__", "bytearray"), _i(2**31 - 1))), r"asks for more than \d+ bytes"),
    ("bytes(2**31)", _sd(_call(_g("builtins", "bytes"), _i(2**31 - 1))), r"asks for more than \d+ bytes"),
    ("range(2**31)", _sd(_call(_g("builtins", "range"), _i(2**31 - 1))), r"range of 2147483647 items \(limit"),
    ("list(range(2**31))", _sd(_call(_g("builtins", "list"), _call(_g("__builtin__", "xrange"), _i(2**31 - 1)))), r"range of"),
    ("set(range(2**30))", _sd(_call(_g("builtins", "set"), _call(_g("builtins", "range"), _i(2**30)))), r"range of"),
    ("str() of a container", _sd(_call(_g("builtins", "str"), b"]" + b"(" + _i(1) * 50 + b"e")), r"str\(\) of a list"),
    (
        "LONG4 of 1 MB",
        b"\x80\x02\x8b" + struct.pack("<i", 1 << 20) + b"\x01" * (1 << 20) + b".",
        r"pickle integer of 1048576 bytes",
    ),
    ("nesting 100000 deep", _nested_lists(100_000), r"nests objects \d+ levels deep \(limit 200\)"),
    ("shared containers, 50**6 expanded", None, r"expand to more than 10000000 values"),
    (
        "BUILD on a tensor record",
        _sd(_tensor(4, (4,), (1,)) + b"}" + _s("shape") + b"(J\x00\x00\x10\x00ts" + b"b"),
        r"BUILD tries to change a tensor record",
    ),
    ("BUILD on a string", _sd(_s("x") + b"}" + b"b"), r"BUILD on a str is not allowed"),
    ("NEWOBJ on a tensor", _sd(_tensor(4, (4,), (1,)) + b")\x81"), r"pickle calls a tensor, which is data"),
    ("65 dimensions", _sd(_tensor(1, (1,) * 65, (1,) * 65)), r"65 dimensions; at most 64"),
    ("size [0, 2**70]", _sd(_tensor(1, (0, 2**70), (1, 1))), r"does not fit in 62 bits"),
    (
        "stride-0 view of 2**40 elements",
        _sd(_tensor(1, (2**40,), (0,))),
        r"broadcast view \(stride \[0\]\) of 1 stored elements; .*limit",
    ),
    ("view past its storage", _sd(_tensor(4, (5,), (1,))), r"reaches element 4 of a storage of 4 elements"),
    ("out-of-band buffer", b"\x80\x05\x97.", r"out-of-band buffer"),
    (
        "huge object in a message",
        _sd(_call(_g("torch._utils", "_rebuild_tensor_v2"), _s("x" * 100_000), _i(0), b"(t", b"(t", b"\x89", b"}")),
        r"got a str instead",
    ),
    (
        "huge size list in a message",
        _sd(
            _call(
                _g("torch._utils", "_rebuild_tensor_v2"),
                _storage(1),
                _i(0),
                b"(" + _s("y" * 10_000) * 200 + b"t",
                b"(t",
                b"\x89",
                b"}",
            )
        ),
        r"must be a tuple of integers, got a tuple of 200 items",
    ),
    (
        "unknown torch storage type",
        _sd(
            _call(
                _g("torch._utils", "_rebuild_tensor_v2"),
                _storage(1, kind="ComplexHalfStorage"),
                _i(0),
                b"(K\x01t",
                b"(K\x01t",
                b"\x89",
                b"}",
            )
        ),
        r"storage of unknown type: the class torch\.ComplexHalfStorage",
    ),
    (
        "numpy shape 2**70",
        _sd(
            _call(
                _g("numpy._core.numeric", "_frombuffer"),
                b"C\x00",
                _call(_g("numpy", "dtype"), _s("f4")),
                b"(\x8a\x09" + (2**70).to_bytes(9, "little") + b"t",
                _s("C"),
            )
        ),
        r"numpy array shape .* out of bounds",
    ),
    ("truncated BINBYTES claim", b"\x80\x03B\xff\xff\xff\x7f" + b"abc", r"pickle asks for 2147483647 bytes; only 3 remain"),
    ("frame past the end", b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.", r"pickle frame of 1099511627776 bytes"),
    ("os.system deep inside", None, r"refused to load 'posix\.system'.*\['optimizer'\]\['param_groups'\]\[0\]\['foo'\]"),
    ("refused name never kept", b"\x80\x02" + _g("os", "system") + b"0N.", r"refused to load 'os\.system'"),
    ("zip: bzip2 data.pkl", lambda t: _zip_with(t, "bz.pt", method=12), r"compression method 12; torch writes stored"),
    ("zip: lzma data.pkl", lambda t: _zip_with(t, "lz.pt", method=14), r"compression method 14"),
    (
        "zip: deflate bomb",
        lambda t: _zip_with(t, "bomb.pt", method=8, data=b"\x80\x02N" + b"0" * 3_000_000 + b"N."),
        r"ratio > 200",
    ),
    ("zip: big-endian", lambda t: _zip_with(t, "be.pt", byteorder=b"big"), r"big-endian checkpoints are not supported"),
    ("zip: unknown byteorder", lambda t: _zip_with(t, "bo.pt", byteorder=b"middle"), r"byteorder entry says b'middle'"),
    (
        "zip: huge byteorder",
        lambda t: _zip_with(t, "hb.pt", byteorder=b"little" * 1000),
        r"byteorder' is 6000 bytes; refusing \(limit 16\)",
    ),
]


def _dag() -> bytes:
    out = b"\x80\x02]K\x01ar\x00\x00\x00\x00"  # L0 = [1], LONG_BINPUT 0
    for lv in range(1, 7):
        out += b"](" + (b"j" + struct.pack("<I", lv - 1)) * 50 + b"er" + struct.pack("<I", lv)
    return out + b"."


def _deep_refusal(tmp_path: Path) -> Path:
    import os

    p = tmp_path / "deep.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {"state": {}, "param_groups": [{"lr": 1.0, "foo": os.system}]}}, p)
    return p


@pytest.mark.parametrize("name,payload,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_one_clear_error(tmp_path, name, payload, message):
    if name.startswith("shared containers"):
        payload = _dag()
    if name == "os.system deep inside":
        payload = _deep_refusal
    if callable(payload):
        path = payload(tmp_path)
    else:
        path = tmp_path / "bad.pkl"
        path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=message) as e:
        open_checkpoint(path)
    text = str(e.value)
    assert str(path) in text and "\n" not in text and len(text) < 500, text
    for internal in ("statemap.", "<class", "_NpArray", "_Refused", "_StorageType", "Opaque", "_rebuild_tensor("):
        assert internal not in text, text
