"""Unpickler v2: protocol-2 names, harmless classes as placeholders, every dtype, numpy of any
protocol, and resource bounds. Good inputs are real ``torch.save`` files compared value by value
against ``torch.load(weights_only=False)`` on files this test generated itself."""

from __future__ import annotations

import _compat_pickle
import functools
import json
import pickle
import struct
import zipfile
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
    (
        "string array with an invalid code point",
        _sd(
            _call(
                _g("numpy._core.numeric", "_frombuffer"),
                b"C\x04\xff\xff\xff\xff",
                _call(_g("numpy", "dtype"), _s("U1")),
                b"(K\x01t",
                _s("C"),
            )
        ),
        r"corrupt or unsupported pickle at byte \d+: SystemError",
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


# -- bounds that must NOT refuse: memo indexes, budgets, shared containers -------------------------


@pytest.mark.parametrize("index", [2**26, 1_170_000_000, 2**32 - 1])
def test_huge_memo_index_costs_one_entry(tmp_path, index):
    """C's unpickler sizes its memo array by the index (1 GiB / ~19 GB); ours is a dict."""
    import tracemalloc

    data = b"\x80\x02}" + _s("w") + _s("v") + b"r" + struct.pack("<I", index) + b"s."  # LONG_BINPUT
    tracemalloc.start()
    obj, _ = safe_load(data, "x.pkl")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert obj == {"w": "v"} and peak < 1 << 20


def test_opcode_budget(monkeypatch):
    from statemap.load import unpickle

    data = b"\x80\x02]" + b"(" + b"N" * 5000 + b"e."
    assert len(safe_load(data, "x.pkl")[0]) == 5000
    monkeypatch.setattr(unpickle, "MAX_OPS", 1000)
    with pytest.raises(CheckpointError, match=r"x\.pkl: pickle runs more than 1000 opcodes"):
        safe_load(data, "x.pkl")


def test_truncated_in_memory_pickle():
    with pytest.raises(CheckpointError, match=r"x\.pkl: corrupt or unsupported pickle at byte 10: EOFError"):
        safe_load(b"\x80\x03B\xff\xff\xff\x7fabc", "x.pkl")


def test_zip_entry_count_and_decompressed_size_bounds(tmp_path, monkeypatch):
    from statemap.load import torch_format

    ok = _zip_with(tmp_path, "deflated.pt", method=8)  # deflate data.pkl: other zip tools write this; read
    with open_checkpoint(ok) as ck:
        assert ck.read("w").tolist() == [0.0, 1.0, 2.0, 3.0]
    monkeypatch.setattr(torch_format, "MAX_DECOMPRESSED", 100)
    with pytest.raises(CheckpointError, match=r"data\.pkl' is \d+ bytes; refusing \(limit 100\)"):
        open_checkpoint(ok)
    monkeypatch.setattr(torch_format, "MAX_ZIP_ENTRIES", 3)
    with pytest.raises(CheckpointError, match=r"zip file lists \d+ entries \(limit 3\)"):
        open_checkpoint(ok)


def test_shared_containers_and_cycles_walk_once():
    """A DAG within the bound (20**4 = 160,000 leaves) and a cycle: finish and to_plain terminate."""
    out = b"\x80\x02]K\x01ar\x00\x00\x00\x00"
    for lv in range(1, 5):
        out += b"](" + (b"j" + struct.pack("<I", lv - 1)) * 20 + b"er" + struct.pack("<I", lv)
    obj, _ = safe_load(out + b".", "x.pkl")
    assert len(obj) == 20 and obj[0] is obj[1]
    cyc = b"\x80\x02}r\x00\x00\x00\x00" + _s("self") + b"j\x00\x00\x00\x00s."  # d = {}; d['self'] = d
    d, _ = safe_load(cyc, "x.pkl")
    assert d["self"] is d and to_plain(d) == {"self": "<cycle>"}


# -- 2. known-harmless classes come back as inert placeholders --------------------------------------


class _Color(__import__("enum").Enum):
    RED = 1


def _harmless_objects() -> dict:
    import collections
    import datetime
    import functools
    import io
    import pathlib
    import types

    return {
        "partial": functools.partial(json.dumps, 1, indent=2),
        "path": pathlib.PosixPath("/data/run1/ckpt.pt"),
        "wpath": pathlib.PureWindowsPath("C:/data/x"),
        "extra_state": io.BytesIO(b"transformer-engine fp8 meta"),
        "ns": types.SimpleNamespace(lr=0.1, name="adam"),
        "rng": np.random.RandomState(0),
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, 6),
        "day": datetime.date(2020, 5, 6),
        "enum": _Color.RED,
        "dd": collections.defaultdict(list, {"a": [1]}),
        "dq": collections.deque([1, 2]),
        "counts": collections.Counter("aab"),
        "device": torch.device("cuda", 0),
        "cpu": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "err": ValueError("bad"),
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_harmless_classes_are_placeholders(tmp_path, protocol):
    objs = _harmless_objects()
    path = tmp_path / "h.pt"
    model = {"w": torch.randn(2, 3)}
    torch.save({"model": model, "extra": objs}, path, pickle_protocol=protocol)
    back = torch.load(path, weights_only=False)  # our own file
    _assert_same_tensors(path, back["model"])
    with open_checkpoint(path) as ck:
        got = ck.extras["extra"]
    ref = back["extra"]
    assert got["partial"] == {"partial": "json.dumps", "args": [1], "keywords": {"indent": 2}}
    assert got["path"] == str(ref["path"]) and got["wpath"] == str(ref["wpath"])
    assert got["extra_state"] == ref["extra_state"].getvalue()
    assert got["ns"] == vars(ref["ns"])
    assert got["rng"]["state"]["pos"] == ref["rng"].get_state(legacy=False)["state"]["pos"]
    assert got["when"] == ref["when"].isoformat() and got["day"] == ref["day"].isoformat()
    assert got["enum"].endswith("_Color(1)")
    assert got["dd"] == dict(ref["dd"]) and got["dq"] == list(ref["dq"]) and got["counts"] == dict(ref["counts"])
    assert got["device"] == str(ref["device"]) == "cuda:0" and got["cpu"] == "cpu"
    assert got["size"] == list(ref["size"]) and got["dtype"] == "bfloat16"
    assert "ValueError" in str(got["err"])


def test_placeholders_are_never_called_or_imported(tmp_path):
    import subprocess
    import sys
    import zipfile

    from statemap.load.unpickle import Opaque

    path = tmp_path / "h.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _harmless_objects()}, path)
    with zipfile.ZipFile(path) as z:
        raw, _ = safe_load(z.read("h/data.pkl"), str(path))
    for k in ("partial", "path", "extra_state", "ns", "rng", "when", "enum", "dd", "dq", "err"):
        assert isinstance(raw["extra"][k], Opaque), k  # a record, not the real class
    code = "import sys, statemap; statemap.open_checkpoint(sys.argv[1]); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"  # torch itself was not imported to read a torch file


# -- 3. every dtype torch and safetensors define ------------------------------------------------------


def _torch_dtypes() -> list:
    return sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def test_every_torch_dtype_is_known_with_its_itemsize():
    from statemap.dtypes import dtype

    names = []
    for d in _torch_dtypes():
        name = str(d).removeprefix("torch.")
        assert dtype(name).itemsize == d.itemsize, name
        names.append(name)
    assert len(names) >= 45  # complex32/64/128, float8 x5, float4, bits, quantized, sub-byte ints ...


def _sample(d, n: int = 6):
    if d.is_complex:
        return torch.arange(n, dtype=torch.float32).to(d) * (1 + 2j)
    if d == torch.bool:
        return torch.arange(n) % 2 == 0
    if d.is_floating_point and d.itemsize > 1:
        return torch.linspace(-2, 3, n).to(d)
    return torch.arange(7, 7 + n * d.itemsize, dtype=torch.uint8).view(d)  # raw bits for 1-byte / exotic types


def test_torch_save_of_every_savable_dtype(tmp_path):
    model = {}
    for d in _torch_dtypes():
        try:
            t = _sample(d)
            torch.save({"t": t}, tmp_path / "probe.pt")
        except Exception:  # int1..int7, uint1..uint7: torch names them but cannot save them
            continue
        model[str(d).removeprefix("torch.")] = t
    assert {
        "complex32",
        "complex64",
        "complex128",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "qint8",
    } <= set(model)
    path = tmp_path / "all.pt"
    torch.save({"model": model}, path)
    back = torch.load(path, weights_only=False)["model"]
    with open_checkpoint(path) as ck:
        for k, t in back.items():
            if k in ("quint4x2", "quint2x4"):  # .view()-built, no quantizer: torch cannot use them; listed, not read
                assert k in ck.skipped and k not in ck.metas
                continue
            assert ck.metas[k].dtype == k and ck.metas[k].shape == tuple(t.shape), k
            assert np.array(ck.read(k)).tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes(), k
    # the comparison can fail: a different tensor has different bytes
    assert _sample(torch.float32).numpy().tobytes() != (_sample(torch.float32) + 1).numpy().tobytes()


def test_every_safetensors_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    from statemap.cli import main

    names = [
        "C64",
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "F8_E8M0",
        "F4",
        "F8_E4M3",
        "F8_E5M2",
        "BF16",
        "U16",
        "U32",
        "U64",
        "BOOL",
        "F64",
    ]
    from statemap.dtypes import dtype

    tensors = {n: _sample(getattr(torch, dtype(n).name), 8).reshape(2, 4) for n in names}
    src = tmp_path / "all.safetensors"
    save_file(tensors, src)
    header = json.loads(src.read_bytes()[8 : 8 + struct.unpack("<Q", src.read_bytes()[:8])[0]])
    assert header["F4"]["shape"] == [2, 8] and header["C64"]["dtype"] == "C64"  # F4 counts 4-bit values
    ref = load_file(src)
    with open_checkpoint(src) as ck:
        for k, t in ref.items():
            assert ck.metas[k].shape == tuple(t.shape) and ck.metas[k].dtype == str(t.dtype).removeprefix("torch."), k
            assert np.array(ck.read(k)).tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes(), k
    # written back by statemap: safetensors reads the same tensors (F4 shapes doubled again)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nversion: 1\nrules:\n  - keep: '{k:path}'\n")
    out = tmp_path / "out.safetensors"
    assert main(["apply", str(spec), str(src), str(out)]) == 0
    again = load_file(out)
    for k, t in ref.items():
        assert again[k].dtype == t.dtype and torch.equal(again[k].view(torch.uint8), t.view(torch.uint8)), k


def test_types_safetensors_lacks_are_refused_clearly(tmp_path, capsys):
    from statemap.cli import main

    src = tmp_path / "c.pt"
    torch.save({"z": torch.ones(2, dtype=torch.complex128)}, src)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nversion: 1\nrules:\n  - keep: '{k:path}'\n")
    assert main(["apply", str(spec), str(src), str(tmp_path / "o.safetensors")]) == 2
    assert "tensor 'z' is complex128, which safetensors cannot hold" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_packed_shapes():
    from statemap.dtypes import StatemapError, dtype, st_shape, torch_shape

    f4, f6 = dtype("F4"), dtype("F6_E2M3")
    assert (f4.name, f4.itemsize, f4.per_item) == ("float4_e2m1fn_x2", 1, 2)
    assert (f6.itemsize, f6.per_item, f6.np.itemsize) == (3, 4, 3)
    assert st_shape(f4, (3, 8)) == (3, 16) and torch_shape(f4, (3, 16)) == (3, 8)
    assert torch_shape(f6, (2, 8)) == (2, 2)
    with pytest.raises(StatemapError, match=r"F4 shape \[3\]: the last dimension must be a multiple of 2"):
        torch_shape(f4, (3,))
    with pytest.raises(StatemapError, match=r"safetensors has no qint8 type"):
        dtype("qint8").st  # noqa: B018
    with pytest.raises(StatemapError, match=r"unknown dtype 'x{40}\.\.\.'"):
        dtype("x" * 5000)


# -- 4. numpy arrays of any protocol ---------------------------------------------------------------------


def _np_model() -> dict:
    return {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, -2], dtype=np.int64),
        "h": np.linspace(0, 1, 4).astype(np.float16),
        "m": np.array([True, False]),
        "f": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "be": np.arange(3, dtype=">f4"),
        "c": np.array([1 + 2j], dtype=np.complex64),
    }


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_in_torch_save_are_tensors(tmp_path, protocol):
    path = tmp_path / f"np{protocol}.pt"
    torch.save({"model": _np_model()}, path, pickle_protocol=protocol)
    back = torch.load(path, weights_only=False)["model"]  # our own file
    with open_checkpoint(path) as ck:
        assert set(ck.metas) == set(back) and not ck.skipped  # nothing dropped
        for k, a in back.items():
            assert ck.metas[k].shape == a.shape
            got = np.asarray(ck.read(k))
            assert got.dtype == a.dtype.newbyteorder("<") and np.array_equal(got, a), k
    assert not np.array_equal(back["a"], back["a"] + 1)  # the comparison can fail


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_numpy_pickles(tmp_path, protocol):
    """.pdparams-style plain pickles; protocol 5 puts the bytes in-band (BYTEARRAY8 + _frombuffer)."""
    path = tmp_path / "m.pdparams"
    model = _np_model()
    data = pickle.dumps(model, protocol=protocol)
    if protocol == 5:
        assert b"_frombuffer" in data and b"\x96" in data
    path.write_bytes(data)
    with open_checkpoint(path) as ck:
        assert set(ck.metas) == set(model)
        for k, a in model.items():
            assert np.array_equal(np.asarray(ck.read(k)), a), k


def test_numpy_1_names_read_too(tmp_path):
    data = pickle.dumps({"w": np.arange(3, dtype=np.float32)}, protocol=2).replace(b"numpy._core", b"numpy.core")
    assert b"numpy.core.multiarray" in data
    obj, _ = safe_load(data, "x.pkl")
    assert obj["w"].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy_string_and_object_arrays_are_kept_as_data(tmp_path, protocol):
    path = tmp_path / "s.pt"
    names = np.array(["enc", "dec"])
    torch.save(
        {
            "model": {"w": torch.ones(2), "names": names},
            "vocab": names,
            "objs": np.array([1, "x"], dtype=object),
            "s": np.str_("hi"),
        },
        path,
        pickle_protocol=protocol,
    )
    with open_checkpoint(path) as ck:
        assert list(ck.metas) == ["w"] and ck.skipped == ["names"]  # listed, not silently dropped, not refused
        assert ck.extras["vocab"] == ["enc", "dec"] and ck.extras["objs"] == [1, "x"] and ck.extras["s"] == "hi"


def test_numpy_scalars_and_rng_state(tmp_path):
    data = pickle.dumps({"x": np.float32(1.5), "n": np.int64(7), "rng": np.random.RandomState(3)}, protocol=4)
    obj, _ = safe_load(data, "x.pkl")
    plain = to_plain(obj)
    assert plain["x"] == 1.5 and plain["n"] == 7
    key = np.random.RandomState(3).get_state(legacy=False)["state"]["key"]
    assert np.array_equal(plain["rng"]["state"]["key"], key)


def test_out_of_band_buffers_are_refused_clearly(tmp_path):
    data = pickle.dumps({"w": np.arange(4, dtype=np.float32)}, protocol=5, buffer_callback=lambda b: False)
    assert b"\x97" in data  # NEXT_BUFFER
    (tmp_path / "oob.pkl").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"oob\.pkl: the pickle refers to an out-of-band buffer .* re-save it in-band"):
        open_checkpoint(tmp_path / "oob.pkl")


# -- anything torch.load(weights_only=True) reads, statemap reads ----------------------------------------


def _weights_only_payloads() -> dict:
    import collections

    base = torch.randn(4, 5)
    sd = collections.OrderedDict(w=base, b=torch.arange(3), view=base[1:3, ::2], t=base.t(), e=torch.zeros(1).expand(4))
    sd._metadata = collections.OrderedDict({"": {"version": 1}})  # what nn.Module.state_dict() carries
    return {
        "state_dict": sd,
        "wrapped": {"model": sd, "epoch": 3, "best": 0.5, "name": "run", "flags": (True, None), "ids": {1, 2}, "raw": b"\x00"},
        "typed": {
            "model": {"x": torch.ones(2)},
            "dtype": torch.float16,
            "size": torch.Size([2]),
            "device": torch.device("cuda", 1),
        },
        "dtypes": {
            "model": {str(d): _sample(d) for d in (torch.bfloat16, torch.complex64, torch.float8_e5m2, torch.uint16, torch.bool)}
        },
        "params": {
            "model": {"p": torch.nn.Parameter(torch.ones(3)), "q": torch.nn.Parameter(torch.ones(2), requires_grad=False)}
        },
        "optim": {"model": {"w": base}, "optimizer": torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]).state_dict()},
        "big_int": {"model": {"w": base}, "seed": 2**70, "neg": -(2**65)},
    }


@pytest.mark.parametrize("fmt", ["p2", "p4", "p5", "legacy"])
def test_everything_weights_only_reads_statemap_reads(tmp_path, fmt):
    read = 0
    for name, obj in _weights_only_payloads().items():
        path = tmp_path / f"{name}.pt"
        if fmt == "legacy":
            torch.save(obj, path, _use_new_zipfile_serialization=False)
        else:
            torch.save(obj, path, pickle_protocol=int(fmt[1]))
        try:
            ref = torch.load(path, weights_only=True)
        except Exception:
            continue
        read += 1
        model = ref["model"] if "model" in ref else ref
        model = {k: (v.data if isinstance(v, torch.nn.Parameter) else v) for k, v in model.items()}
        _assert_same_tensors(path, model)
    if fmt == "p2":  # torch.save's default protocol: torch reads every payload here, and so must we (not vacuous)
        assert read == len(_weights_only_payloads())


@pytest.mark.parametrize(
    "payload,where",
    [
        (
            _sd(
                _call(
                    _g("torch._utils", "_rebuild_tensor_v2"),
                    _call(_g("os", "system"), _s("x")),
                    _i(0),
                    b"(t",
                    b"(t",
                    b"\x89",
                    b"}",
                )
            ),
            r"\['w'\]",
        ),
        (_sd(_tup(_s("storage"), _g("os", "system"), _s("0"), _s("cpu"), _i(1)) + b"Q"), r"\['w'\]"),
        (
            b"\x80\x02}" + _s("opt") + b"}" + _s("groups") + b"](}" + _s("foo") + _g("subprocess", "Popen") + b"sess.",
            r"\['opt'\]\['groups'\]\[0\]\['foo'\]",
        ),
    ],
)
def test_refusals_name_the_object_path(tmp_path, payload, where):
    (tmp_path / "x.pkl").write_bytes(payload)
    with pytest.raises(
        UnsafeCheckpointError, match=r"x\.pkl: refused to load '[\w.]+': statemap never runs code .*\(at " + where + r"\)"
    ):
        open_checkpoint(tmp_path / "x.pkl")


def test_unsupported_tensor_kinds_outside_the_weights_do_not_refuse_the_file(tmp_path):
    path = tmp_path / "s.pt"
    sparse = torch.eye(3).to_sparse()
    q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    torch.save({"model": {"w": torch.ones(2), "sp": sparse}, "stats": {"sparse": sparse, "q": q}}, path)
    with open_checkpoint(path) as ck:
        assert list(ck.metas) == ["w"] and ck.skipped == ["sp"]  # listed in the report, not dropped silently
        assert "_rebuild_sparse_tensor" in json.dumps(ck.extras["stats"]["sparse"])


def test_quantized_tensors_read_as_their_int_representation(tmp_path):
    path = tmp_path / "q.pt"
    model = {
        "qt": torch.quantize_per_tensor(torch.linspace(-1, 1, 6).reshape(2, 3), 0.05, 3, torch.qint8),
        "qu": torch.quantize_per_tensor(torch.linspace(0, 1, 4), 0.1, 2, torch.quint8),
        "qc": torch.quantize_per_channel(torch.randn(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0, torch.qint8),
        "q32": torch.quantize_per_tensor(torch.linspace(-1, 1, 3), 0.01, 0, torch.qint32),
    }
    torch.save({"model": model}, path)
    back = torch.load(path, weights_only=False)["model"]  # our own file
    with open_checkpoint(path) as ck:
        for k, q in back.items():
            assert ck.metas[k].dtype == str(q.dtype).removeprefix("torch.") and ck.metas[k].shape == tuple(q.shape), k
            assert np.array_equal(np.asarray(ck.read(k)), q.int_repr().numpy()), k
    with zipfile.ZipFile(path) as z:
        raw, _ = safe_load(z.read("q/data.pkl"), str(path))
    assert raw["model"]["qt"].quantizer == ("torch.per_tensor_affine", 0.05, 3)  # recorded, not dropped


def test_no_internal_object_leaves_the_unpickler(tmp_path):
    import http

    path = tmp_path / "x.pt"
    extra = {
        "np_dtype": np.dtype("float16"),
        "size_type": torch.Size,
        "storage_type": torch.FloatStorage,
        "status": http.HTTPStatus.OK,
        "fn": functools.partial(max, default=0),  # a builtin as a partial's function: data, never called
    }
    torch.save({"model": {"w": torch.ones(1)}, "extra": extra}, path)
    with open_checkpoint(path) as ck:
        text = json.dumps(ck.extras, default=str)
        got = ck.extras["extra"]
    assert got["np_dtype"] == "float16" and got["status"] == "http.HTTPStatus(200)"
    assert got["fn"] == {"partial": "builtins.max", "args": [], "keywords": {"default": 0}}
    for internal in ("statemap", "<class", "object at", "_Np", "_Storage", "_torch_size"):
        assert internal not in text, text


def test_text_line_and_data_pkl_bounds(tmp_path, monkeypatch):
    from statemap.load import torch_format, unpickle

    path = tmp_path / "p0.pkl"
    path.write_bytes(pickle.dumps({"w": np.zeros(2, dtype=np.float32), "name": "x" * 300}, protocol=0))
    with open_checkpoint(path) as ck:
        assert list(ck.metas) == ["w"]
    monkeypatch.setattr(unpickle, "MAX_LINE", 100)
    with pytest.raises(CheckpointError, match=r"p0\.pkl: pickle text line longer than 100 bytes"):
        open_checkpoint(path)
    zpath = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2)}, zpath)
    monkeypatch.setattr(torch_format, "MAX_PICKLE", 10)
    with pytest.raises(CheckpointError, match=r"m\.pt: entry 'm/data\.pkl' is \d+ bytes; refusing \(limit 10\)"):
        open_checkpoint(zpath)


def test_safetensors_f6_packs_four_values_in_three_bytes(tmp_path):
    """No torch dtype and no writer for F6 in safetensors' Python API: a raw file (spec: 6 bits per value)."""
    from statemap.cli import main

    data = bytes(range(24))  # [2, 16] F6 values = 2 * 16 * 6 / 8 = 24 bytes
    head = json.dumps({"f6": {"dtype": "F6_E3M2", "shape": [2, 16], "data_offsets": [0, 24]}}).encode()
    head += b" " * (-len(head) % 8)
    src = tmp_path / "f6.safetensors"
    src.write_bytes(struct.pack("<Q", len(head)) + head + data)
    with open_checkpoint(src) as ck:
        assert ck.metas["f6"].dtype == "float6_e3m2fn_x4" and ck.metas["f6"].shape == (2, 4)
        assert np.asarray(ck.read("f6")).tobytes() == data
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nversion: 1\nrules:\n  - keep: '{k:path}'\n")
    out = tmp_path / "o.safetensors"
    assert main(["apply", str(spec), str(src), str(out)]) == 0
    raw = out.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert json.loads(raw[8 : 8 + n])["f6"] == {"dtype": "F6_E3M2", "shape": [2, 16], "data_offsets": [0, 24]}
    assert raw[8 + n :] == data
