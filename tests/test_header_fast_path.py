"""The one-pass safetensors header reader agrees with the checked, entry-by-entry one.

`read_header` takes a fast path for plain headers and the checked path for anything unusual; both
must give the same metas, locations, storage ids and metadata, and every error must be the checked
path's own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from statemap.errors import CheckpointError
from statemap.load import safetensors_format as st


def write(path: Path, header: str | dict, data: int) -> str:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    return str(path)


def both(path: str) -> tuple[object, object]:
    raw, n, size = st._read_raw(path)
    return st._fast(path, raw, n, size), st._slow(path, raw, n, size)


VALID = [
    # in offset order, with metadata
    (
        {
            "__metadata__": {"format": "pt", "a:b": "c:d"},
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "BF16", "shape": [2, 1], "data_offsets": [8, 12]},
        },
        12,
    ),
    # out of offset order (as the safetensors library often lays entries out), names with colons
    (
        {
            "z:1": {"dtype": "I64", "shape": [1], "data_offsets": [4, 12]},
            "a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
        },
        12,
    ),
    # zero-size tensors sharing an offset
    (
        {
            "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
            "f": {"dtype": "U8", "shape": [], "data_offsets": [0, 1]},
            "g": {"dtype": "F32", "shape": [0], "data_offsets": [1, 1]},
        },
        1,
    ),
]


@pytest.mark.parametrize("header,data", VALID)
def test_fast_path_gives_what_the_checked_path_gives(tmp_path, header, data):
    fast, slow = both(write(tmp_path / "m.safetensors", header, data))
    assert fast == slow
    assert st.read_header_ids(str(tmp_path / "m.safetensors")) == slow


def test_a_changed_entry_changes_the_result(tmp_path):
    """Negative check: the comparison above sees a different shape."""
    a = both(write(tmp_path / "a.safetensors", VALID[0][0], 12))[0]
    other = json.loads(json.dumps(VALID[0][0]))
    other["b"]["shape"] = [1, 2]
    b = both(write(tmp_path / "b.safetensors", other, 12))[0]
    assert a != b


ENTRY = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
BAD = [
    # a repeated name: json.loads keeps one; the colon count sees it and the checked path names it
    ('{"w":' + ENTRY + ',"w":' + ENTRY + "}", 4, "appears twice"),
    # a repeat balanced by a colon hidden in an escape: the backslash sends it to the checked path
    ('{"w\\u003a":' + ENTRY + ',"x":' + ENTRY + ',"x":' + ENTRY + "}", 4, "appears twice"),
    ('{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4, "non-negative integers"),
    ('{"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', 4, "non-negative integers"),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"dtype":"F32"}}', 4, "appears twice"),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4, "needs 8"),
    (
        '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        4,
        "overlaps",
    ),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8, "unaccounted bytes"),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 8, "accounts for 4 data bytes"),
    ('{"w":{"dtype":"XX","shape":[1],"data_offsets":[0,4]}}', 4, "unknown dtype"),
    ('{"w":{"dtype":"F32","shape":[1],"data_offsets":["0",4]}}', 4, "must be two integers"),
]


@pytest.mark.parametrize("header,data,match", BAD)
def test_unusual_headers_get_the_checked_paths_error(tmp_path, header, data, match):
    path = write(tmp_path / "m.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match):
        st.read_header(path)
    raw, n, size = st._read_raw(path)
    with pytest.raises(Exception):  # noqa: B017 - the fast path declines; any exception hands over
        st._fast(path, raw, n, size)


def test_index_fast_path_gives_what_the_checked_path_gives(tmp_path):
    from statemap.load import formats
    from tests.test_index_outputs import keys, write_index

    entries = keys(layers=3, experts=4)
    index = write_index(tmp_path / "a", entries[::-1])  # index order differs from key order within shards
    fast = formats._open_index_fast(index)
    slow = formats._open_index_checked(index)
    assert fast is not None
    for attr in ("path", "format", "metadata", "locations", "storage_ids"):
        assert getattr(fast, attr) == getattr(slow, attr), attr
    assert list(fast.metas.items()) == list(slow.metas.items())  # same metas, in the index's order
    k = entries[5][0]
    assert (fast.read(k) == slow.read(k)).all()
    fast.close()
    slow.close()


@pytest.mark.parametrize(
    "change",
    [
        lambda wm: wm.update({"model.embed_tokens.weight": wm["lm_head.weight"]}),  # first shard's key mapped to the last
        lambda wm: wm.pop("model.norm.weight"),
        lambda wm: wm.update({"not.in.any.shard": next(iter(wm.values()))}),
    ],
)
def test_index_fast_path_declines_a_mismatch(tmp_path, change):
    from statemap.load import formats
    from tests.test_index_outputs import keys, write_index

    index = write_index(tmp_path / "a", keys(layers=3, experts=4))
    body = json.loads(index.read_text())
    change(body["weight_map"])
    index.write_text(json.dumps(body))
    assert formats._open_index_fast(index) is None
    with pytest.raises(CheckpointError, match="index maps|which the index maps to"):
        formats._open_index_checked(index)


def test_paused_collector_is_restored_and_nests():
    import gc

    from statemap.gcpause import paused

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with paused():
        assert not gc.isenabled()
        with paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block leaves it to the outer one
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen  # a small block freezes nothing
    with pytest.raises(ValueError), paused():
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()  # disabled by the caller: left as it was
    finally:
        gc.enable()


def test_a_library_call_never_freezes_the_host_process():
    """gc.freeze acts on every object of the process: only the statemap command's own process may
    freeze what a large block built; a call from Python (main(argv) included) never does."""
    import subprocess
    import sys

    code = (
        "import gc\n"
        "from statemap import gcpause, process\n"
        "def big():\n"
        "    with gcpause.paused():\n"
        "        return [[i] for i in range(300_000)]\n"
        "x = big(); print(gc.get_freeze_count())\n"
        "process.mark_command_process(); y = big(); print(gc.get_freeze_count() > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "True"]
