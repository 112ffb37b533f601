"""The attack corpus: hostile and broken inputs through the CLI, each in a child process.

Every hostile input (checkpoints of every format, indexes, specs, configs, expected-key
listings, non-regular files) is run through ``statemap inspect``, ``statemap diff --values``
and ``statemap apply`` under a 2 GiB address-space limit and a 20 s timeout. Each run must:
exit 2; print exactly one line, ``statemap: error: ...``, naming the file and the problem (a
per-case regex); print no traceback and nothing on stdout; leave no output or temp file; leave
every input byte-identical; and not hang. The text cases (markup, terminal escapes in names,
metadata and paths) must succeed and show that text escaped and literal.

The runs are forked from one pre-imported process (tests/attack_runner.py), so the whole
corpus takes seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import pytest
from attack_runner import run_batch

MEM = 2 << 30
TIMEOUT = 20.0
# the unpickler bounds (memo, bytearray, strides, zip methods, BUILD) land with the `reader` branch; its
# MAX_OPS constant says they are here, and then these cases must pass (strict xfail until then)
NEEDS_READER = None if hasattr(__import__("statemap.load.unpickle").load.unpickle, "MAX_OPS") else "needs reader branch"

# -- byte builders -----------------------------------------------------------------------------


def _st(header: dict | None = None, data: bytes = b"", raw: bytes | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _ent(dtype: str = "F32", shape: list | None = None, off: list | None = None) -> dict:
    shape = [1] if shape is None else shape
    return {"dtype": dtype, "shape": shape, "data_offsets": off if off is not None else [0, 4]}


def _pstr(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _pint(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def _ptuple(items: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_pint(i) for i in items) + b"t"


def _glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor(size=(4,), stride=(1,), numel=4, offset=0, storage="FloatStorage") -> bytes:
    pid = b"(" + _pstr("storage") + _glob("torch", storage) + _pstr("0") + _pstr("cpu") + _pint(numel) + b"tQ"
    return (
        _glob("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + pid
        + _pint(offset)
        + _ptuple(size)
        + _ptuple(stride)
        + b"\x89"
        + _glob("collections", "OrderedDict")
        + b")R"
        + b"tR"
    )


def _sd(value: bytes, key: str = "w") -> bytes:
    return b"\x80\x02}" + _pstr(key) + value + b"s."


def _zip(
    pkl: bytes, storage: bytes | None = b"\0" * 16, extra: dict | None = None, byteorder=(b"little", zipfile.ZIP_STORED)
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", *byteorder)
        if storage is not None:
            z.writestr("archive/data/0", storage)
        z.writestr("archive/version", b"3\n")
        for name, (data, m) in (extra or {}).items():
            z.writestr(name, data, m)
    return buf.getvalue()


def _zip_entries(entries: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, (data, m) in entries.items():
            z.writestr(name, data, m)
    return buf.getvalue()


GOOD_PT = _zip(_sd(_tensor()))
GOOD_ST = _st({"a.0.w": _ent(shape=[2], off=[0, 8]), "b": _ent()}, b"\0" * 12)


def _dag(levels: int) -> bytes:
    """A list that holds the list below it twice, ``levels`` deep: 2**levels paths, ``levels`` objects."""
    out = b"]q\x00"
    for i in range(1, levels):
        out += b"0](h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"eq" + bytes([i])  # POP the last (it is memoized)
    return out


def _msgpack_array(shape: list, dtype: bytes, buf: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([shape, dtype, buf]))


def _mp(tree: object) -> bytes:
    return msgpack.packb(tree)


def _items_bomb(n: int) -> bytes:
    return _st(
        raw=b'{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[' + b",".join([b"1"] * n) + b'],"data_offsets":[0,4]}}'
    )


def _many_tensors(total: int) -> bytes:
    parts, size, i = [], 2, 0
    while size < total:
        e = b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
        parts.append(e)
        size += len(e) + 1
        i += 1
    return _st(raw=b"{" + b",".join(parts) + b"}")


def _np_pickle() -> bytes:
    return pickle.dumps({"w": np.arange(4, dtype="f4")}, protocol=2)


# -- the corpus -------------------------------------------------------------------------------------

SPECIAL = {"fifo", "zero", "null", "dangling", "dir"}  # non-regular inputs, made on disk


@dataclass(frozen=True)
class Bad:
    """One hostile input file: its name, how to make it, and the problem the error must name."""

    name: str
    make: bytes | str | Callable[[], bytes]  # bytes, a SPECIAL kind, or a builder
    match: str
    xfail: str | None = None
    commands: tuple[str, ...] = ("inspect", "diff", "apply")
    ok_rc: dict[str, tuple[int, ...]] = field(default_factory=dict)  # command -> also-acceptable exit codes
    names: str | None = None  # the file the error names, when it is not this one (a shard, the spec)
    seconds: float | None = None  # a tighter time limit than TIMEOUT
    xfail_commands: tuple[str, ...] = ("inspect", "diff", "apply")


SAFETENSORS = [
    Bad("empty.safetensors", b"", r"too short for a safetensors header"),
    Bad("short.safetensors", b"\x01\x00", r"too short"),
    Bad("hdrlen.safetensors", struct.pack("<Q", 10**6) + b"{}", r"runs past the end"),
    Bad("hdrlen-huge.safetensors", struct.pack("<Q", 1 << 40), r"exceeds the 100 MiB limit"),
    Bad("hdrlen-max.safetensors", struct.pack("<Q", 2**64 - 1) + b"{}", r"exceeds the 100 MiB limit"),
    Bad("badjson.safetensors", _st(raw=b"{not json"), r"not valid JSON"),
    Bad("notobject.safetensors", _st(raw=b"[1, 2]"), r"must be a JSON object"),
    Bad("null.safetensors", _st(raw=b"null"), r"must be a JSON object"),
    Bad("notutf8.safetensors", _st(raw=b'{"\xff\xfe": 1}'), r"not valid JSON"),
    Bad(
        "dup.safetensors",
        _st(raw=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
        + b"\0" * 4,
        r"appears twice",
    ),
    Bad(
        "overlap.safetensors", _st({"a": _ent(shape=[2], off=[0, 8]), "b": _ent(shape=[2], off=[4, 12])}, b"\0" * 12), r"overlaps"
    ),
    Bad("range.safetensors", _st({"a": _ent(shape=[4], off=[0, 16])}, b"\0" * 8), r"data ends at byte 16"),
    Bad("size.safetensors", _st({"a": _ent(shape=[3], off=[0, 8])}, b"\0" * 8), r"needs 12"),
    Bad("dtype.safetensors", _st({"a": _ent(dtype="F33")}, b"\0" * 4), r"unknown dtype 'F33'"),
    Bad("dtype-list.safetensors", _st({"a": _ent(dtype=["F32"])}, b"\0" * 4), r"unknown dtype"),
    Bad("negshape.safetensors", _st({"a": _ent(shape=[-1])}, b"\0" * 4), r"non-negative integers"),
    Bad("floatshape.safetensors", _st({"a": _ent(shape=[1.0])}, b"\0" * 4), r"non-negative integers"),
    Bad("boolshape.safetensors", _st({"a": _ent(shape=[True])}, b"\0" * 4), r"non-negative integers"),
    Bad("strshape.safetensors", _st({"a": _ent(shape="4")}, b"\0" * 4), r"non-negative integers"),
    Bad("gap.safetensors", _st({"a": _ent(off=[4, 8])}, b"\0" * 8), r"unaccounted bytes"),
    Bad("trailing.safetensors", _st({"a": _ent()}, b"\0" * 12), r"file holds 12"),
    Bad("order.safetensors", _st({"a": _ent(off=[8, 4])}, b"\0" * 8), r"out of order"),
    Bad("offstr.safetensors", _st({"a": _ent(off=["0", "4"])}, b"\0" * 4), r"must be two integers"),
    Bad("offhuge.safetensors", _st({"a": _ent(shape=[2**62], off=[0, 2**64])}, b"\0" * 4), r"data ends at byte|needs"),
    Bad("extrafield.safetensors", _st({"a": {**_ent(), "x": 1}}, b"\0" * 4), r"exactly dtype, shape, data_offsets"),
    Bad("meta-notstr.safetensors", _st({"__metadata__": {"k": 1}, "a": _ent()}, b"\0" * 4), r"__metadata__ must map strings"),
    Bad("meta-list.safetensors", _st({"__metadata__": [1], "a": _ent()}, b"\0" * 4), r"__metadata__ must map strings"),
    Bad("notensors.safetensors", _st({}), r"holds no tensors", ok_rc={"inspect": (0,), "diff": (1,)}),
    Bad("dims65.safetensors", _st({"a": _ent(shape=[1] * 65)}, b"\0" * 4), r"65 dimensions"),
    Bad("deepjson.safetensors", _st(raw=b"[" * 100_000 + b"]" * 100_000), r"safetensors|JSON|nested|unreadable"),
    Bad("items-bomb.safetensors", lambda: _items_bomb(2_100_000), r"more than 2,000,000 JSON items"),
    Bad("99mb-header.safetensors", lambda: _many_tensors(99_000_000), r"more than 2,000,000 JSON items"),
    Bad(
        "longname.safetensors",
        _st({"n" * 200_000: _ent(shape=[-1])}, b"\0" * 4),
        r"non-negative integers",
    ),
    Bad(
        "zero-huge.safetensors",  # [0, 2**70] holds no bytes: metadata is fine; reading it must not crash
        _st({"a": _ent(shape=[0, 2**70], off=[0, 0]), "b": _ent()}, b"\0" * 4),
        r"2\*\*70|1180591620717411303424|too large|dimension|shape",
        ok_rc={"inspect": (0,), "diff": (1,), "apply": (0,)},
    ),
]

KINDS = ("safetensors", "msgpack", "index.json", "pt", "bin", "pdparams")
NONREGULAR = [
    *(Bad(f"fifo.{k}", "fifo", r"FIFO \(named pipe\), not a regular file") for k in KINDS),
    *(Bad(f"zero.{k}", "zero", r"character device, not a regular file") for k in KINDS),
    *(Bad(f"devnull.{k}", "null", r"character device, not a regular file") for k in ("safetensors", "pt")),
    Bad("dangling.safetensors", "dangling", r"no such file"),
    Bad("fifodir", "dir", r"no single checkpoint"),
]


def _index(wm: object, raw: bytes | None = None) -> bytes:
    return raw if raw is not None else json.dumps({"metadata": {}, "weight_map": wm}).encode()


SHARD = _st({"x": _ent()}, b"\0" * 4)
SHARD_Y = _st({"y": _ent()}, b"\0" * 4)
INDEXES = [  # (index name, its bytes, extra files {name: bytes | SPECIAL}, match)
    ("badjson", _index(None, raw=b"{nope"), {}, r"index is not valid JSON"),
    ("notutf8", _index(None, raw=b'{"weight_map": {"\xff": 1}}'), {}, r"index is not valid JSON"),
    ("nomap", _index(None, raw=b'{"metadata": {}}'), {}, r"no 'weight_map'"),
    ("maplist", _index([["x", "s.safetensors"]]), {}, r"no 'weight_map'"),
    ("absolute", _index({"x": "/etc/passwd"}), {}, r"points outside the checkpoint folder"),
    ("dotdot", _index({"x": "../s.safetensors"}), {}, r"points outside the checkpoint folder"),
    ("backslash", _index({"x": "..\\s.safetensors"}), {}, r"points outside the checkpoint folder"),
    ("notstr", _index({"x": 5}), {}, r"must be a shard file name"),
    ("missing", _index({"x": "s.safetensors"}), {}, r"shard 's\.safetensors' is missing"),
    (
        "twoshards",
        _index({"x": "s.safetensors", "y": "t.safetensors"}),
        {"s.safetensors": SHARD, "t.safetensors": SHARD},
        r"in two shards",
    ),
    ("elsewhere", _index({"x": "s.safetensors", "y": "s.safetensors"}), {"s.safetensors": SHARD}, r"s\.safetensors|'y'"),
    ("unlisted", _index({"x": "s.safetensors"}), {"s.safetensors": SHARD_Y}, r"s\.safetensors|'x'|'y'"),
    ("fifoshard", _index({"x": "s.safetensors"}), {"s.safetensors": "fifo"}, r"s\.safetensors"),
    ("zeroshard", _index({"x": "s.safetensors"}), {"s.safetensors": "zero"}, r"s\.safetensors"),
    ("selfshard", _index({"x": "selfshard.index.json"}), {}, r"is an index, not a shard file"),
    ("deep", _index(None, raw=b"[" * 100_000 + b"]" * 100_000), {}, r"index|JSON|nested|unreadable"),
    ("huge", b"", {}, r"larger than"),  # made sparse, 65 MiB
    ("badshard", _index({"x": "s.safetensors"}), {"s.safetensors": b"\x01"}, r"too short"),
]
INDEX_BAD = [Bad(f"{n}.index.json", raw, m, names="s.safetensors" if n == "badshard" else None) for n, raw, _, m in INDEXES]
INDEX_EXTRA = {f"{n}.index.json": extra for n, _, extra, _ in INDEXES}

MSGPACK = [
    Bad("garbage.msgpack", b"\xc1\xc1\xc1", r"not a valid Flax msgpack file"),
    Bad("truncated.msgpack", _mp({"a": {"b": 1}})[:-1], r"not a valid Flax msgpack file"),
    Bad("list.msgpack", _mp([1, 2]), r"not a map of parameters"),
    Bad("deep.msgpack", b"\x91" * 100_000 + b"\xc0", r"msgpack|nested|deep"),
    Bad("deepmap.msgpack", b"\x81\xa1a" * 10_000 + b"\xc0", r"msgpack|nested|deep"),
    Bad("arr32.msgpack", b"\xdd\xff\xff\xff\xff", r"not a valid Flax msgpack file"),
    Bad("map32.msgpack", b"\xdf\xff\xff\xff\xff", r"not a valid Flax msgpack file"),
    Bad("bin32.msgpack", b"\xc6\xff\xff\xff\xff", r"not a valid Flax msgpack file"),
    Bad("badext.msgpack", _mp({"a": msgpack.ExtType(9, b"x")}), r"unsupported msgpack extension type 9"),
    Bad("badarray.msgpack", _mp({"a": msgpack.ExtType(1, b"\xc1")}), r"malformed array record"),
    Bad("arrshape.msgpack", _mp({"a": _msgpack_array([-1], b"float32", b"")}), r"not a list of non-negative integers"),
    Bad("arrsize.msgpack", _mp({"a": _msgpack_array([2**40], b"float32", b"\0" * 4)}), r"needs \d+ bytes, has 4"),
    Bad("arrdtype.msgpack", _mp({"a": _msgpack_array([1], b"object", b"\0" * 8)}), r"dtype b'object' is not supported"),
    Bad("arrdims.msgpack", _mp({"a": _msgpack_array([1] * 65, b"float32", b"\0" * 4)}), r"dimension|65|shape|msgpack"),
    Bad("noparams.msgpack", _mp({"a": "x"}), r"no tensors|empty|not a state dict|msgpack"),
]

PICKLES = [
    Bad("garbage.pt", b"\x00\x01garbage" * 10, r"corrupt or unsupported pickle"),
    Bad("text.bin", b"hello world", r"not a checkpoint: looks like a text file"),
    Bad("empty.pt", b"", r"file is empty"),
    Bad("badop.pt", b"\x80\x02}\xff", r"corrupt or unsupported pickle"),
    Bad("truncated.bin", _np_pickle()[:-3], r"corrupt|truncated|unsupported"),
    Bad("notdict.pt", pickle.dumps([1, 2, 3]), r"holds a list, not a state dict"),
    Bad("strings.pt", pickle.dumps({"a": "x", "b": 3}), r"no tensors found"),
    Bad("emptydict.pt", pickle.dumps({}), r"state dict is empty"),
    Bad("osystem.pt", _zip(_sd(_glob("os", "system") + b"(" + _pstr("true") + b"tR")), r"refused to load 'os\.system'"),
    Bad("osystem.bin", _sd(_glob("os", "system") + b"(" + _pstr("true") + b"tR"), r"refused to load 'os\.system'"),
    Bad("osystem.pdparams", _sd(_glob("os", "system") + b"(" + _pstr("true") + b"tR"), r"refused to load 'os\.system'"),
    Bad("deeplist.pt", b"\x80\x02" + b"]" * 100_000 + b".", r"nests too deeply|corrupt or unsupported pickle|not a state dict"),
    Bad("deepmark.bin", b"\x80\x02" + b"(" * 100_000 + b".", r"nest|corrupt|unsupported"),
    # a LONG_BINPUT index of 2**26 / 1.17e9 must cost nothing (C's unpickler allocates 1 / 19 GB for it)
    Bad("memo26.bin", _sd(b"Nr" + struct.pack("<I", 2**26)), r"no tensors found|memo", NEEDS_READER, ("apply",), seconds=5),
    Bad("memo1e9.bin", _sd(b"Nr" + struct.pack("<I", 1_170_000_000)), r"no tensors found|memo", NEEDS_READER, seconds=5),
    Bad(
        "memo26.pt", _zip(_sd(b"Nr" + struct.pack("<I", 2**26))), r"no tensors found|memo", NEEDS_READER, ("inspect",), seconds=5
    ),
    Bad(
        "bytearray.bin",
        _sd(_glob("builtins", "bytearray") + b"(" + _pint(2**40) + b"tR"),
        r"bytearray|too large|limit",
        xfail=NEEDS_READER,
    ),
    Bad("bytes.bin", _sd(_glob("builtins", "bytes") + b"(" + _pint(2**40) + b"tR"), r"bytes|too large|limit", xfail=NEEDS_READER),
    Bad("range.bin", _sd(_glob("builtins", "range") + b"(" + _pint(2**62) + b"tR"), r"range|too large|limit|no tensors"),
    Bad("dag.bin", _sd(_dag(60)), r"shared|visited|too many|limit|no tensors"),
    Bad("dag.pt", _zip(_sd(_dag(60))), r"shared|visited|too many|limit|no tensors"),
    Bad("dims65.pt", _zip(_sd(_tensor(size=(1,) * 65, stride=(1,) * 65, numel=1))), r"65|dimension", xfail=NEEDS_READER),
    Bad(  # metadata of a stride-0 tensor is fine to show; materialising it (16 GiB) is not
        "stride0.pt",
        _zip(_sd(_tensor(size=(2**16, 2**16), stride=(0, 0), numel=1))),
        r"stride|too large|limit|bytes",
        ok_rc={"inspect": (0,), "diff": (1,)},
        xfail=NEEDS_READER,
        xfail_commands=("apply",),
    ),
    Bad("pastend.pt", _zip(_sd(_tensor(size=(100,), numel=4))), r"past|storage|reach"),
    Bad(
        "zero-huge.pt",
        _zip(_sd(_tensor(size=(0, 2**70), stride=(1, 1), numel=4))),
        r"2\*\*70|too large|dimension|shape|stride",
        ok_rc={"inspect": (0,), "diff": (1,)},
        xfail=NEEDS_READER,
        xfail_commands=("apply",),
    ),
    Bad(
        "build-shape.pt",  # BUILD after the tensor: its recorded shape must not change after the bounds check
        _zip(b"\x80\x02}" + _pstr("w") + _tensor() + b"}" + _pstr("size") + _ptuple((10**6,)) + b"sbs."),
        r"BUILD|build|state|refus|unsupported",
        xfail=NEEDS_READER,
    ),
    Bad("nodatapkl.pt", _zip_entries({"archive/version": (b"3\n", zipfile.ZIP_STORED)}), r"data\.pkl|zip archive of other files"),
    Bad(
        "twodatapkl.pt",
        _zip_entries({"archive/data.pkl": (_sd(b"N"), zipfile.ZIP_STORED), "other/data.pkl": (_sd(b"N"), zipfile.ZIP_STORED)}),
        r"data\.pkl",
    ),
    Bad("truncated-zip.pt", GOOD_PT[:-60], r"zip|truncated|corrupt"),
    Bad("truncated-zip-data.pt", GOOD_PT[:200], r"zip|truncated|corrupt|pickle"),
    Bad(
        "zipbomb.pt",
        lambda: _zip_entries({"archive/data.pkl": (b"\x80\x02" + b"N" * (50 << 20) + b".", zipfile.ZIP_DEFLATED)}),
        r"zip bomb",
    ),
    Bad(
        "bzip2bomb.pt",
        lambda: _zip_entries({"archive/data.pkl": (b"\x80\x02" + b"N" * (16 << 20) + b".", zipfile.ZIP_BZIP2)}),
        r"zip bomb|compress|bzip2|method",
    ),
    Bad(
        "lzmabomb.pt",
        lambda: _zip_entries({"archive/data.pkl": (b"\x80\x02" + b"N" * (16 << 20) + b".", zipfile.ZIP_LZMA)}),
        r"zip bomb|compress|lzma|method",
    ),
    Bad(
        "byteorder-bomb.pt",
        lambda: _zip(_sd(_tensor()), byteorder=(b"l" * (32 << 20), zipfile.ZIP_BZIP2)),
        r"byteorder|zip bomb|compress",
        xfail=NEEDS_READER,
    ),
    Bad(
        "compressed-storage.pt",
        _zip(_sd(_tensor()), storage=None, extra={"archive/data/0": (b"\0" * 16, zipfile.ZIP_DEFLATED)}),
        r"compressed",
    ),
    Bad("nostorage.pt", _zip(_sd(_tensor()), storage=None), r"storage|missing|data/0"),
    Bad("shortstorage.pt", _zip(_sd(_tensor()), storage=b"\0" * 2), r"storage|short|past|data/0"),
    Bad("bigendian.pt", _zip(_sd(_tensor()), byteorder=(b"big", zipfile.ZIP_STORED)), r"big-endian|byteorder"),
    Bad("byteorder-junk.pt", _zip(_sd(_tensor()), byteorder=(b"middle", zipfile.ZIP_STORED)), r"byteorder|big-endian"),
]

KEYS = [  # checkpoints that are valid but whose keys attack the spec engine (spec: arithmetic on a capture)
    Bad(
        "digits.safetensors",
        _st({"l." + "9" * 5000 + ".w": _ent()}, b"\0" * 4),
        r"i='9999.*5,000 long.*|too large",
        commands=("apply",),
        names="spec.yaml:4",
    ),
    Bad(
        "superscript.safetensors",
        _st({"l.\u00b2.w": _ent()}, b"\0" * 4),
        r"not a plain integer \(i='\u00b2'\)|not a plain integer \(i='²'\)",
        commands=("apply",),
        names="spec.yaml:4",
    ),
]
ARITH_SPEC = "name: arith\nversion: 1\nrules:\n  - rename: 'l.{i}.w -> m.{i+1}.w'\n"

CHECKPOINTS = SAFETENSORS + NONREGULAR + INDEX_BAD + MSGPACK + PICKLES + KEYS

# -- hostile specs: `statemap apply SPEC good.safetensors out.safetensors` ----------------------------

H = "name: t\nversion: 1\nstrict: false\nrules:\n"
LONG = "a" * 300


def _rule(pattern: str, target: str = "x.{z}") -> str:
    return H + f"  - rename: {{from: {json.dumps(pattern)}, to: {json.dumps(target)}}}\n"


SPECS: list[tuple[str, bytes | str | Callable[[], bytes], str]] = [
    ("timestamp.yaml", b"name: 2001-02-30\nversion: 1\nrules: []\n", r"timestamp|day is out of range"),
    ("badint.yaml", b"name: t\nversion: !!int abc\nrules: []\n", r"cannot read 'abc' as int"),
    ("badfloat.yaml", b"name: t\nversion: !!float abc\nrules: []\n", r"cannot read 'abc' as float"),
    ("badbinary.yaml", b"name: !!binary '@@@'\nversion: 1\nrules: []\n", r"binary|base64|cannot read|'name' must be"),
    (
        "pyobject.yaml",
        b"name: !!python/object/apply:os.system ['true']\nversion: 1\nrules: []\n",
        r":1: YAML tag .*python/object/apply:os\.system.* is not allowed",
    ),
    ("pyobject-map.yaml", b"name: t\nversion: 1\nrules: !!python/object:os.X {a: 1}\n", r"YAML tag .* is not allowed"),
    ("omap.yaml", b"name: t\nversion: 1\nrules: !!omap [a: 1]\n", r"YAML tag .*omap.* is not allowed"),
    ("pyname.yaml", b"name: !!python/name:os.system ''\nversion: 1\nrules: []\n", r"constructor|tag"),
    ("badtimestamp-key.yaml", b"name: t\nversion: 1\n2001-02-30: x\nrules: []\n", r"timestamp|day is out of range"),
    ("deepflow.yaml", lambda: b"name: t\nversion: 1\nrules: " + b"[" * 5000 + b"]" * 5000 + b"\n", r"nested"),
    ("deepflowmap.yaml", lambda: b"name: t\nversion: 1\nrules: " + b"{a: " * 5000 + b"b" + b"}" * 5000 + b"\n", r"nested"),
    (
        "deepblock.yaml",
        lambda: b"name: t\nversion: 1\nx:\n" + b"".join(b" " * (i + 1) + b"- \n" for i in range(200)) + b"rules: []\n",
        r"nested|YAML",
    ),
    (
        "aliasbomb.yaml",
        lambda: (
            b"a: &a [x,x,x,x,x,x,x,x,x,x]\n"
            + b"".join(
                b"%s: &%s [*%s,*%s,*%s,*%s,*%s,*%s,*%s,*%s,*%s,*%s]\n"
                % ((chr(98 + i).encode(),) * 2 + (chr(97 + i).encode(),) * 10)
                for i in range(8)
            )
            + b"name: t\nversion: 1\nrules: []\n"
        ),
        r"alias bomb",
    ),
    (
        "toolarge.yaml",
        lambda: b"name: t\nversion: 1\nrules: []\n#" + b"x" * (5 << 20) + b"\n",
        r"spec is larger than 4,194,304 bytes",
    ),
    ("notutf8.yaml", b"name: \xff\xfe\nversion: 1\nrules: []\n", r"not UTF-8"),
    ("nul.yaml", b"name: t\x00\nversion: 1\nrules: []\n", r"invalid YAML|special characters|cannot read"),
    ("fifo.yaml", "fifo", r"FIFO \(named pipe\)"),
    ("zero.yaml", "zero", r"character device"),
    ("devnull.yaml", "null", r"character device"),
    ("dangling.yaml", "dangling", r"no such spec file"),
    ("backref.yaml", _rule("re:(?P<z>a)(?P=z)"), r"back-reference"),
    ("lookahead.yaml", _rule("re:(?=a)(?P<z>a)"), r"look-around"),
    ("wordboundary.yaml", _rule("re:\\b(?P<z>a)"), r"word-boundary"),
    ("ignorecase.yaml", _rule("re:(?i)(?P<z>a)"), r"inline flag"),
    ("badregex.yaml", _rule("re:(?P<z>a"), r"invalid regex"),
    ("longregex.yaml", _rule("re:" + "a" * 1001), r"longer than 1000"),
    ("bigrepeat.yaml", _rule("re:(?P<z>(a{1000}){1000})"), r"too large"),
    # linear-time matching: each matches nothing in good.safetensors (a 300-character key), fast
    ("redos-nested.yaml", _rule("re:(?P<z>.+){30}Z"), r"matched no key"),
    ("redos-alt.yaml", _rule("re:(?P<z>a|aa)+b"), r"matched no key"),
    ("redos-stars.yaml", _rule("re:" + "a*" * 30 + "(?P<z>c)"), r"matched no key"),
    ("redos-paths.yaml", _rule(".".join(f"{{p{i}:path}}" for i in range(12)) + ".{z}.Z", "x.{z}"), r"matched no key"),
    ("redos-segs.yaml", _rule("_".join(f"{{p{i}}}" for i in range(12)) + ".{z}", "x.{z}"), r"matched no key"),
    ("badtype.yaml", _rule("a.{z:float}"), r"unknown capture type"),
    ("divzero.yaml", H + "  - rename: 'b -> x.{1//0}'\n", r"division by zero"),
    ("unknownname.yaml", H + "  - rename: 'b -> x.{q}'\n", r"target 'x\.\{q\}' uses \['q'\], not captured"),
    ("longexpr.yaml", H + "  - rename: 'b -> x.{" + "1+" * 150 + "1}'\n", r"longer than 200"),
    (  # 4 TiB: refused up front (disk space) or when allocated (memory): either way one line, nothing written
        "injecthuge.yaml",
        H + "  - inject: {to: z, shape: [1099511627776], value: 0}\n",
        r"inject|too large|bytes|limit|memory|needs [\d.]+ TB",
    ),
    (
        "injecthuge2.yaml",
        H + "  - inject: {to: z, shape: [1000000000000000000000000000000], value: 0}\n",
        r"inject|too large|shape|limit",
    ),
    ("unknownop.yaml", H + "  - explode: b\n", r"unknown op|explode"),
    ("rules-notlist.yaml", b"name: t\nversion: 1\nrules: 5\n", r"rules"),
    ("empty.yaml", b"", r"spec is empty"),
    ("scalar.yaml", b"just text\n", r"mapping|spec"),
    ("controlchars.yaml", H + '  - rename: "b -> \\e]0;pwned\\a.\\e[2J"\n  - rename: {from: nope, to: x}\n', r"matched no key"),
    ("markup.yaml", H + "  - rename: {from: '[/bold]nope', to: '[/]'}\n", r"\[/bold\]nope"),
]

# -- other inputs: expected-key listings and hf configs ------------------------------------------------

OTHER: list[tuple[str, list[str], dict[str, bytes | str], str]] = [
    (
        "expect-fifo",
        ["apply", "spec.yaml", "good.safetensors", "out.safetensors", "--expect", "e.json"],
        {"e.json": "fifo"},
        r"expected key listing is a FIFO",
    ),
    (
        "expect-zero",
        ["apply", "spec.yaml", "good.safetensors", "out.safetensors", "--expect", "e.yaml"],
        {"e.yaml": "zero"},
        r"expected key listing is a character device",
    ),
    (
        "expect-badshape",
        ["apply", "spec.yaml", "good.safetensors", "out.safetensors", "--expect", "e.json"],
        {"e.json": b'{"a.0.w": ["x"]}'},
        r"entry 'a\.0\.w'.*shape",
    ),
    (
        "expect-badyaml",
        ["apply", "spec.yaml", "good.safetensors", "out.safetensors", "--expect", "e.yaml"],
        {"e.yaml": b"a: 2001-02-30\n"},
        r"cannot read expected key listing: day is out of range",
    ),
    (
        "hf-config-layers",
        ["diff", "hf:BertModel", "good.safetensors", "--config", "c.json"],
        {"c.json": json.dumps({"model_type": "bert", "num_hidden_layers": 100_000}).encode()},
        r"num_hidden_layers = 100000 \(more than 1024\)",
    ),
    (
        "hf-config-fifo",
        ["diff", "hf:BertModel", "good.safetensors", "--config", "c.json"],
        {"c.json": "fifo"},
        r"config is a FIFO",
    ),
    (
        "hf-config-zero",
        ["apply", "spec.yaml", "good.safetensors", "out.safetensors", "--expect", "hf:BertModel", "--config", "c.json"],
        {"c.json": "zero"},
        r"config is a character device",
    ),
]

GOOD_SPEC = "name: good\nversion: 1\nstrict: false\nrules:\n  - rename: {from: 'zz.{x}', to: 'yy.{x}', optional: true}\n"


def _good_st() -> bytes:
    return _st({"a.0.w": _ent(shape=[2], off=[0, 8]), "b": _ent(off=[8, 12]), LONG: _ent(off=[12, 16])}, b"\0" * 16)


# -- cases ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: list[str]
    files: dict[str, bytes | str]  # name -> bytes or SPECIAL kind
    names: str  # the file the one error line must name
    match: str
    ok_rc: tuple[int, ...] = (2,)
    xfail: str | None = None
    seconds: float | None = None
    shows: tuple[str, ...] = ()  # a text case: it succeeds, and its output holds these strings literally
    creates: tuple[str, ...] = ()  # files a successful text case writes


# -- text: names, metadata, paths and spec strings are shown as text ---------------------------------

ESC_KEY = "x\x1b]0;pwned\x07.\x1b[2Jw"
MARKUP_ST = _st(
    {
        "__metadata__": {"k": "[/]", "e": "\x1b[31mred", "smile": ":smile:"},
        "enc.[/bold].w": _ent(off=[0, 4]),
        ESC_KEY: _ent(off=[4, 8]),
        "rtl.\u202egnp.w": _ent(off=[8, 12]),
        "nl.a\nb.w": _ent(off=[12, 16]),
    },
    b"\0" * 16,
)
MARKUP_SPEC = (
    "name: '[/b]x'\nversion: 1\nstrict: false\nrules:\n"
    "  - rename: {from: 'enc.{m}.w', to: \"dec.{m}.\\e[31m[/i]\"}\n"
    "  - drop: {from: 'nope.[/x]', optional: true}\n"
)
SHOWN = ("enc.[/bold].w", "x\\x1b]0;pwned\\x07.\\x1b[2Jw", "rtl.\\u202egnp.w", "nl.a\\nb.w")
TEXT: list[tuple[str, list[str], tuple[int, ...], tuple[str, ...], tuple[str, ...]]] = [
    ("inspect-keys", ["inspect", "--keys", "m.safetensors"], (0,), (*SHOWN, "k=[/]", "e=\\x1b[31mred", ":smile:"), ()),
    ("inspect-json", ["inspect", "--json", "m.safetensors"], (0,), ("enc.[/bold].w", "\\u001b]0;pwned\\u0007"), ()),
    ("inspect-path", ["inspect", "exp[/x]/ck.safetensors"], (0,), ("exp[/x]/ck.safetensors",), ()),
    ("diff-values", ["diff", "--values", "m.safetensors", "m.safetensors"], (0,), ("m.safetensors", "same"), ()),
    ("diff-keys", ["diff", "m.safetensors", "exp[/x]/ck.safetensors"], (1,), (*SHOWN, "exp[/x]/ck.safetensors"), ()),
    ("diff-json", ["diff", "--json", "m.safetensors", "good.safetensors"], (1,), ("enc.[/bold].w",), ()),
    (
        "apply-markup",
        ["apply", "ms.yaml", "m.safetensors", "exp[/x]/out.safetensors", "-v"],
        (0,),
        ("[/b]x", "dec.[/bold].\\x1b[31m[/i]", "exp[/x]/out.safetensors", *SHOWN[1:]),
        ("exp[/x]/out.safetensors",),
    ),
    ("apply-json", ["apply", "--json", "ms.yaml", "m.safetensors", "--dry-run"], (0,), ("[/b]x", "\\u001b[31m[/i]"), ()),
    ("check-against", ["check", "ms.yaml", "--against", "m.safetensors"], (0,), ("[/b]x",), ()),
    ("lint-against", ["lint", "ms.yaml", "--against", "m.safetensors"], (0, 1), ("finding",), ()),
    ("suggest", ["suggest", "m.safetensors", "exp[/x]/ck.safetensors"], (0,), ("# source: m.safetensors",), ()),
    ("list", ["list"], (0,), ("bart",), ()),
]


def _cases() -> list[Case]:
    out: list[Case] = []
    base: dict[str, bytes | str] = {"good.safetensors": _good_st(), "spec.yaml": GOOD_SPEC.encode()}
    for b in CHECKPOINTS:
        files = dict(base)
        files[b.name] = b.make if isinstance(b.make, (bytes, str)) else b"@" + b.name.encode()  # builders run lazily
        files.update(INDEX_EXTRA.get(b.name, {}))
        if b in KEYS:
            files["spec.yaml"] = ARITH_SPEC.encode()
        for cmd in b.commands:
            argv = {
                "inspect": ["inspect", b.name],
                "diff": ["diff", "--values", b.name, "good.safetensors"],
                "apply": ["apply", "spec.yaml", b.name, "out.safetensors"],
            }[cmd]
            xfail = b.xfail if cmd in b.xfail_commands else None
            out.append(
                Case(f"{cmd}:{b.name}", argv, files, b.names or b.name, b.match, (2, *b.ok_rc.get(cmd, ())), xfail, b.seconds)
            )
    for name, make, match in SPECS:
        files = dict(base)
        named = name + ("|out.safetensors" if name == "injecthuge.yaml" else "")
        if isinstance(make, str) and make not in SPECIAL:
            make = make.encode()
        files[name] = make if isinstance(make, (bytes, str)) else b"@" + name.encode()
        out.append(Case(f"spec:{name}", ["apply", name, "good.safetensors", "out.safetensors"], files, named, match))
    for cid, argv, extra, match in OTHER:
        files = {**base, **extra}
        named = next(n for n in extra)
        out.append(Case(f"other:{cid}", argv, files, named, match))
    text_files = {**base, "m.safetensors": MARKUP_ST, "ms.yaml": MARKUP_SPEC.encode(), "exp[/x]/ck.safetensors": SHARD}
    for cid, argv, rc, shows, creates in TEXT:
        out.append(Case(f"text:{cid}", argv, text_files, "", "", rc, shows=shows, creates=creates))
    return out


CASES = _cases()
BUILDERS: dict[str, Callable[[], bytes]] = {
    **{b.name: b.make for b in CHECKPOINTS if callable(b.make)},
    **{n: m for n, m, _ in SPECS if callable(m)},
}
SHARED = Path(os.environ.get("STATEMAP_ATTACK_CACHE", "")) if os.environ.get("STATEMAP_ATTACK_CACHE") else None


def _place(d: Path, name: str, content: bytes | str, shared: Path) -> None:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if content == "fifo":
        os.mkfifo(p)
    elif content == "zero":
        p.symlink_to("/dev/zero")
    elif content == "null":
        p.symlink_to("/dev/null")
    elif content == "dangling":
        p.symlink_to(d / "no-such-target")
    elif content == "dir":
        p.mkdir()
        os.mkfifo(p / "model.safetensors")
    elif name == "huge.index.json":
        with open(p, "wb") as f:
            f.truncate(65 << 20)  # sparse: 65 MiB of zeros, over the 64 MiB index limit
    elif isinstance(content, bytes) and content.startswith(b"@") and content[1:].decode() in BUILDERS:
        src = shared / content[1:].decode()
        if not src.exists():
            src.write_bytes(BUILDERS[content[1:].decode()]())
        os.link(src, p)  # big inputs are built once and hard-linked into each case
    else:
        assert isinstance(content, bytes)
        p.write_bytes(content)


def _snapshot(d: Path) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = Path(root) / n
            st = os.lstat(p)
            rel = str(p.relative_to(d))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                out[rel] = h.hexdigest()
            else:
                out[rel] = f"mode:{stat.S_IFMT(st.st_mode)}"
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("attacks")
    shared = root / "_shared"
    shared.mkdir()
    todo, before = [], {}
    for n, c in enumerate(CASES):
        d = root / f"c{n:04d}"
        d.mkdir()
        for name, content in c.files.items():
            _place(d, name, content, shared)
        before[c.id] = _snapshot(d)
        todo.append((c.id, c.argv, str(d)))
    res = run_batch(todo, str(root), MEM, TIMEOUT, jobs=4)
    for n, c in enumerate(CASES):
        d = root / f"c{n:04d}"
        r = res[c.id]
        r["before"], r["after"] = before[c.id], _snapshot(d)
    return res


def test_no_markup_left_in_the_package():
    """Consoles render no markup (textsafe.console), so a markup tag in a message would print literally."""
    import re

    pkg = Path(__file__).parents[1] / "statemap"
    tag = re.compile(r"(?<![\w)\].])\[/?(bold|dim|red|green|yellow|blue|cyan|magenta|italic|underline)\]")  # not x[dim]
    files = [p for p in pkg.glob("*.py") if p.name != "textsafe.py"]
    hits = [f"{p.name}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1) if tag.search(line)]
    assert hits == [], hits


def test_corpus_size():
    assert len([c for c in CASES if not c.shows]) >= 150
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []) for c in CASES]
)
def test_attack(results, case):
    r = results[case.id]
    assert not r["timeout"], f"hung (killed after {TIMEOUT} s)"
    if case.seconds is not None:
        assert r["seconds"] < case.seconds, f"took {r['seconds']:.1f} s"
    assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    assert r["rc"] in case.ok_rc, f"exit {r['rc']}: {r['stderr'][-2000:]}"
    after = dict(r["after"])
    if r["rc"] == 0 and case.argv[0] == "apply":  # a legitimate success writes its output
        for name in ("out.safetensors", *case.creates):
            after.pop(name, None)
    assert after == r["before"], "an input changed or a file was left behind"
    if case.shows:
        text = r["stdout"] + r["stderr"]
        assert all(c.isprintable() or c == "\n" for c in text), [c for c in text if not (c.isprintable() or c == "\n")][:5]
        for want in case.shows:
            assert want in text, f"{want!r} not shown literally in:\n{text[-3000:]}"
        if "--json" in case.argv:
            json.loads(r["stdout"])
        if case.argv[0] == "suggest":  # comment lines stay comments: the draft parses and names no injected rule
            import yaml

            assert isinstance(yaml.safe_load(r["stdout"]), dict)
        return
    if r["rc"] == 2:
        lines = r["stderr"].splitlines()
        assert len(lines) == 1, r["stderr"][-3000:]
        line = lines[0]
        assert line.startswith("statemap: error: "), line
        assert any(n in line for n in case.names.split("|")), line
        assert len(line) < 5000, f"message of {len(line)} characters"
        assert all(c.isprintable() for c in line), repr(line)
        assert "please report this as a bug" not in line, line  # an unexpected exception, caught only by the CLI
        import re

        problem = line
        for n in case.names.split("|"):
            problem = problem.replace(n, "<FILE>")
        assert re.search(case.match, problem), line  # the problem, not the file's name
        assert r["stdout"] == "", r["stdout"][-2000:]
