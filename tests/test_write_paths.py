"""The fast paths of the writer: adjacent byte ranges joined into one kernel copy, header padding
that keeps large copies page-aligned with their source, and the next tensors produced on a thread
while the current one is written (at most LIMIT bytes ahead)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import statemap
import statemap.kernel_copy as kernel_copy
import statemap.write as w
from statemap.apply import Segments
from statemap.meta import TensorMeta


def _count_copies(monkeypatch) -> list[tuple[int, int]]:
    """(bytes, source offset) of each kernel copy the writers start."""
    calls: list[tuple[int, int]] = []
    real = kernel_copy.copy_range

    def spy(fd_out, sources, src, offset, n, wb=None, at=None):
        calls.append((n, offset))
        return real(fd_out, sources, src, offset, n, wb, at)

    monkeypatch.setattr(kernel_copy, "copy_range", spy)
    return calls


def test_adjacent_ranges_are_one_kernel_copy(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    sd = {f"l.{i}.w": rng.random((64, 64), dtype=np.float32) for i in range(10)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    calls = _count_copies(monkeypatch)
    spec = {"name": "t", "version": 1, "rules": [{"rename": "l.{i}.w -> m.{i}.w"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    assert len(calls) == 1 and calls[0][0] == 10 * 64 * 64 * 4  # ten adjacent tensors: one copy
    got = load_file(str(tmp_path / "o.safetensors"))
    assert all(np.array_equal(got[f"m.{i}.w"], sd[f"l.{i}.w"]) for i in range(10))


def test_a_transpose_between_ranges_splits_the_copy(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    sd = {"a": rng.random((8, 4), dtype=np.float32), "b": rng.random((4, 2), dtype=np.float32)}
    sd["c"] = rng.random(5, dtype=np.float32)
    save_file(sd, str(tmp_path / "s.safetensors"))
    calls = _count_copies(monkeypatch)
    spec = {"name": "t", "version": 1, "rules": [{"transpose": "b"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    got = load_file(str(tmp_path / "o.safetensors"))
    assert np.array_equal(got["b"], sd["b"].T) and np.array_equal(got["a"], sd["a"]) and np.array_equal(got["c"], sd["c"])
    assert len(calls) == 2  # a, then c (b is computed in between)


def test_header_padding_page_aligns_the_largest_copy(tmp_path):
    """The output header is padded so the 2 MiB tensor sits at its source's offset within a page;
    the file is still a valid safetensors file (the header a multiple of 8 bytes)."""
    rng = np.random.default_rng(2)
    sd = {"small": rng.random(3, dtype=np.float32), "big": rng.random((512, 1024), dtype=np.float32)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    spec = {"name": "t", "version": 1, "rules": [{"rename": "big -> renamed.with.a.long.name.big"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    with statemap.open_checkpoint(tmp_path / "s.safetensors") as a, statemap.open_checkpoint(tmp_path / "o.safetensors") as b:
        src_off = a.locations["big"].offset
        out_off = b.locations["renamed.with.a.long.name.big"].offset
    assert (src_off - out_off) % 4096 == 0
    header_len = int.from_bytes((tmp_path / "o.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0
    got = load_file(str(tmp_path / "o.safetensors"))
    assert np.array_equal(got["renamed.with.a.long.name.big"], sd["big"]) and np.array_equal(got["small"], sd["small"])


def test_aligned_header_without_ranges_is_the_plain_header():
    metas = [TensorMeta("w", (3,), "float32")]
    from statemap.load.safetensors_format import encode_header

    assert w.aligned_header(metas, {}, None) == encode_header(metas, {})
    assert w.aligned_header(metas, {}, [None]) == encode_header(metas, {})


class _Big(np.ndarray):
    pass


def test_ahead_keeps_order_and_at_most_limit_bytes_ahead(monkeypatch):
    """The thread runs ahead of a slow writer, but holds at most LIMIT bytes for later: with
    16-byte tensors and LIMIT 48, the one being written plus three ahead."""
    import time

    monkeypatch.setattr(w._Ahead, "LIMIT", 48)
    alive: list[weakref.ref] = []
    peak = 0

    def produce():
        nonlocal peak
        for i in range(12):
            gc.collect()
            n_alive = sum(r() is not None for r in alive)
            peak = max(peak, n_alive + 1)
            a = np.full(4, i, np.float32).view(_Big)
            alive.append(weakref.ref(a))
            yield a

    metas = [TensorMeta(f"t{i}", (4,), "float32") for i in range(12)]
    ahead = w._Ahead(produce(), metas)
    got = []
    for i in range(12):
        a = next(ahead)
        got.append(int(a[0]))
        del a
        deadline = time.monotonic() + 10  # a slow writer: wait until the thread has filled its budget
        while time.monotonic() < deadline:
            with ahead.cv:
                if len(ahead.ready) >= min(3, 11 - i):
                    break
            time.sleep(0.001)
        time.sleep(0.01)  # and a moment more, in which a thread ignoring the budget would go further
    ahead.close()
    assert got == list(range(12))
    assert 3 <= peak <= 4, peak  # three ahead (plus, at moments, the one being written); never more


def test_ahead_makes_large_tensors_wait_and_passes_errors_on(monkeypatch):
    monkeypatch.setattr(w._Ahead, "LIMIT", 8)
    order: list[str] = []

    def produce():
        for i in range(3):
            order.append(f"produce {i}")
            yield i
        raise ValueError("cannot read tensor 3")

    metas = [TensorMeta(f"t{i}", (4,), "float32") for i in range(4)]  # 16 bytes each: over the limit
    ahead = w._Ahead(produce(), metas)
    for i in range(3):
        assert next(ahead) == i
        order.append(f"write {i}")
    with pytest.raises(ValueError, match="cannot read tensor 3"):
        next(ahead)
    ahead.close()
    assert order == ["produce 0", "write 0", "produce 1", "write 1", "produce 2", "write 2"]  # never ahead


# -- .pt outputs: CRC-32 of copied storages; early writeback before fsync ----------------------


def _stored_entries(path) -> dict[str, tuple[int, int, int]]:
    """name -> (data offset, size, CRC) of each entry, from Python's zipfile and the local headers."""
    import struct
    import zipfile

    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        for info in z.infolist():
            f.seek(info.header_offset)
            nlen, xlen = struct.unpack("<HH", f.read(30)[26:30])
            out[info.filename] = (info.header_offset + 30 + nlen + xlen, info.file_size, info.CRC)
    return out


def _pt_source(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    sd = {"a": rng.random((33, 7), dtype=np.float32), "b": rng.random(1000, dtype=np.float32)}
    metas = [TensorMeta(k, v.shape, "float32") for k, v in sd.items()]
    w.write_checkpoint(tmp_path / "src.pt", metas, iter(sd.values()), fsync=False)  # data descriptors, as torch.save
    return str(tmp_path / "src.pt"), sd


def test_source_crc_is_used_for_whole_stored_entries_only(tmp_path):
    import zipfile
    import zlib

    src, _ = _pt_source(tmp_path)
    plain = tmp_path / "plain.zip"  # CRC and sizes in the local header, no data descriptor
    with zipfile.ZipFile(plain, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x/data/0", os.urandom(5000))
    for path in (src, str(plain)):
        fd = os.open(path, os.O_RDONLY)
        try:
            crcs = w._SourceCRCs()
            data = open(path, "rb").read()
            for name, (off, n, crc) in _stored_entries(path).items():
                if n < 2:
                    continue
                assert crc == zlib.crc32(data[off : off + n]), name
                assert crcs.lookup(path, fd, off, n) == crc, name
                # not one whole entry: never the entry's CRC
                assert crcs.lookup(path, fd, off, n - 1) is None
                assert crcs.lookup(path, fd, off + 1, n - 1) is None
                assert crcs.lookup(path, fd, off - 1, n) is None
        finally:
            os.close(fd)


@pytest.mark.parametrize("where", ["descriptor", "central", "name"])
def test_source_crc_that_does_not_match_its_local_header_is_not_used(tmp_path, where):
    src, _ = _pt_source(tmp_path)
    off, n, crc = next(v for k, v in _stored_entries(src).items() if k.endswith("data/1"))
    data = bytearray(open(src, "rb").read())
    if where == "descriptor":
        assert data[off + n : off + n + 8] == b"PK\x07\x08" + crc.to_bytes(4, "little")
        data[off + n + 4] ^= 1
    elif where == "central":
        at = data.index(b"PK\x01\x02")  # the central directory: the entry whose CRC (at +16) it is
        while data[at + 16 : at + 20] != crc.to_bytes(4, "little"):
            at = data.index(b"PK\x01\x02", at + 4)
        data[at + 16] ^= 1
    else:
        at = data.rindex(b"data/1", 0, off)  # the local header's name, right before the data
        data[at + 5 : at + 6] = b"7"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    fd = os.open(bad, os.O_RDONLY)
    try:
        assert w._SourceCRCs().lookup(str(bad), fd, off, n) is None
    finally:
        os.close(fd)


def test_source_crc_of_a_file_that_is_not_a_zip_is_none(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(os.urandom(4096))
    fd = os.open(p, os.O_RDONLY)
    try:
        assert w._SourceCRCs().lookup(str(p), fd, 0, 4096) is None
    finally:
        os.close(fd)


def _segments_to_pt(tmp_path, name, parts_by_tensor, sd_meta, monkeypatch=None):
    from statemap.apply import Segments

    metas = [TensorMeta(k, shape, "float32") for k, shape in sd_meta]
    w.write_checkpoint(tmp_path / name, metas, iter(Segments(tuple(p)) for p in parts_by_tensor), fsync=False)
    return tmp_path / name


def test_pt_output_of_copied_ranges_has_right_crcs(tmp_path, monkeypatch):
    """Whole source entries (CRC from the source), parts of entries and ranges of two files (CRC
    computed on a thread): Python's zipfile checks every CRC, and the values are the source's."""
    import zipfile

    src, sd = _pt_source(tmp_path)
    ent = {k.rsplit("/", 1)[-1]: v for k, v in _stored_entries(src).items() if "/data/" in k}
    (oa, na, _), (ob, nb, _) = ent["0"], ent["1"]
    raw = tmp_path / "raw.bin"
    raw.write_bytes(os.urandom(256))
    looked: list[int | None] = []
    real = w._SourceCRCs.lookup
    monkeypatch.setattr(w._SourceCRCs, "lookup", lambda self, *a: looked.append(real(self, *a)) or looked[-1])
    out = _segments_to_pt(
        tmp_path,
        "o.pt",
        [[(src, oa, na)], [(src, ob, 400)], [(src, ob + 400, nb - 400), (str(raw), 0, 256), (str(raw), 0, 144)]],
        [("a", (33, 7)), ("b_head", (100,)), ("b_tail", (1000,))],
    )
    assert looked[0] is not None and looked[1] is None  # the whole entry's CRC came from the source
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    got = statemap.load_state_dict(out)
    assert np.array_equal(got["a"], sd["a"]) and np.array_equal(got["b_head"], sd["b"][:100])
    # compared as bytes: the random bytes may hold NaN patterns
    assert np.asarray(got["b_tail"]).tobytes() == sd["b"][100:].tobytes() + raw.read_bytes() + raw.read_bytes()[:144]


def test_pt_crc_check_can_fail(tmp_path, monkeypatch):
    """A wrong CRC is caught by zipfile: the test above would notice one."""
    import zipfile

    src, _ = _pt_source(tmp_path)
    off, n, _ = next(v for k, v in _stored_entries(src).items() if k.endswith("data/0"))
    monkeypatch.setattr(w._SourceCRCs, "lookup", lambda self, *a: 12345)
    out = _segments_to_pt(tmp_path, "o.pt", [[(src, off, n)]], [("a", (33, 7))])
    with zipfile.ZipFile(out) as z, pytest.raises(zipfile.BadZipFile, match="CRC"):
        z.read(next(x for x in z.namelist() if x.endswith("data/0")))


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "msgpack"])
@pytest.mark.parametrize("fsync", [True, False])
def test_writeback_hands_every_byte_to_the_disk_in_order_only_with_fsync(tmp_path, monkeypatch, fmt, fsync):
    rng = np.random.default_rng(6)
    sd = {f"m.{i}.w": rng.random((128, 64), dtype=np.float32) for i in range(6)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(kernel_copy, "sync_file_range", lambda: lambda fd, start, n, flags: calls.append((start, n, flags)) or 0)
    monkeypatch.setattr(kernel_copy.Writeback, "STEP", 16 << 10)
    spec = {"name": "t", "version": 1, "rules": [{"transpose": "m.2.w"}]}  # one computed tensor between copies
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / f"o.{fmt}", fsync=fsync)
    if not fsync:
        assert calls == []
        return
    size = os.path.getsize(tmp_path / f"o.{fmt}")
    assert len(calls) >= 6 and all(f == 2 for _, _, f in calls)  # SYNC_FILE_RANGE_WRITE: start, do not wait
    # each writer hands over its region in order, from where it starts: one region for .pt and
    # .msgpack; two for safetensors (the copied tensors, on a thread, then the computed one)
    chains: list[list[tuple[int, int]]] = []
    for start, n, _ in calls:
        chain = next((c for c in chains if c[-1][0] + c[-1][1] == start), None)
        (chain.append((start, n)) if chain is not None else chains.append([(start, n)]))
    # (the two are one chain when the copies' last step ends where the computed tensor starts)
    assert 1 <= len(chains) <= (2 if fmt == "safetensors" else 1)
    spans = sorted((c[0][0], c[-1][0] + c[-1][1]) for c in chains)
    assert spans[0][0] == 0 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= size
    left = size - sum(e - b for b, e in spans)  # not handed over: at most a step per region
    assert 0 <= left < len(chains) * ((16 << 10) + 4096)
    got = statemap.load_state_dict(tmp_path / f"o.{fmt}")
    assert np.array_equal(got["m.2.w"], sd["m.2.w"].T) and np.array_equal(got["m.5.w"], sd["m.5.w"])


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="sync_file_range is Linux only")
def test_sync_file_range_is_found_and_works_on_linux(tmp_path):
    fn = kernel_copy.sync_file_range()
    assert fn is not None
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 10000)
        f.flush()
        assert fn(f.fileno(), 0, 10000, 2) == 0
        assert fn(-1, 0, 10000, 2) == -1  # a bad descriptor is reported (and ignored by Writeback)


_CHILD = """
import sys, statemap
statemap.convert({spec!r}, {src!r}, {dst!r}, fsync=False)
print("numpy" in sys.modules)
"""


@pytest.mark.parametrize(
    ("extra", "numpy_used"),
    [
        ([], False),
        ([{"inject": {"to": "bias", "shape": [1, 3], "value": 0}}], False),  # zero bytes, written without numpy
        ([{"inject": {"to": "bias", "shape": [1, 3], "value": 0, "dtype": "bfloat16"}}], False),
        ([{"inject": {"to": "bias", "shape": [1, 3], "value": -0.0}}], True),  # -0.0 has its sign bit set
        ([{"inject": {"to": "bias", "shape": [1, 3], "value": 1.5}}], True),
        ([{"transpose": "n.1.w"}], True),
    ],
)
def test_numpy_is_imported_only_when_a_tensor_is_computed(tmp_path, extra, numpy_used):
    """A conversion that only copies bytes (and injects zeros) never imports numpy: its import is
    ~0.08 s of CPU holding the GIL the copying thread needs."""
    rng = np.random.default_rng(7)
    sd = {f"m.{i}.w": rng.random((16, 8), dtype=np.float32) for i in range(3)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    spec = {"name": "t", "version": 1, "rules": [{"rename": "m.{i:int}.w -> n.{i}.w"}, *extra]}
    code = _CHILD.format(spec=spec, src=str(tmp_path / "s.safetensors"), dst=str(tmp_path / "o.safetensors"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(numpy_used)]
    raw = (tmp_path / "o.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])

    def body(name: str) -> bytes:
        start, stop = header[name]["data_offsets"]
        return raw[8 + n + start : 8 + n + stop]

    transposed = bool(extra) and "transpose" in extra[0]
    for i in range(3):
        want = sd[f"m.{i}.w"].T if transposed and i == 1 else sd[f"m.{i}.w"]
        assert body(f"n.{i}.w") == np.ascontiguousarray(want).tobytes()
    if extra and "inject" in extra[0]:
        inj = extra[0]["inject"]
        if inj.get("dtype") == "bfloat16":
            assert header["bias"]["dtype"] == "BF16" and body("bias") == bytes(6)
        else:
            assert body("bias") == np.full((1, 3), inj["value"], "<f4").tobytes()  # bitwise: -0.0 keeps its sign


@pytest.mark.parametrize("out", ["o.safetensors", "o.pt", "o.msgpack", "sharded/model.safetensors"])
@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_of_the_file_and_its_folder_only_with_fsync(tmp_path, monkeypatch, out, fsync):
    """--no-fsync leaves the disk to the kernel: no fsync of the output, nor of its folder after the
    rename (that one alone cost ~0.2 s of a 0.8 s DeltaLM conversion on ext4)."""
    rng = np.random.default_rng(7)
    sd = {f"m.{i}.w": rng.random((64, 32), dtype=np.float32) for i in range(4)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(w.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    spec = {"name": "t", "version": 1, "rules": [{"transpose": "m.2.w"}]}
    (tmp_path / "sharded").mkdir()
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / out, fsync=fsync, max_shard_size="10KB" if "/" in out else None)
    folder = str((tmp_path / out).parent)
    if not fsync:
        assert synced == []
    else:
        assert folder in synced and any(s != folder for s in synced)  # the file(s) before the rename, the folder after
    got = statemap.load_state_dict(tmp_path / ("sharded" if "/" in out else out))
    assert np.array_equal(got["m.2.w"], sd["m.2.w"].T) and np.array_equal(got["m.3.w"], sd["m.3.w"])


def test_pt_crc_of_computed_tensors_is_taken_by_the_producer_thread(tmp_path, monkeypatch):
    """A .pt output's computed (transposed) tensors get their CRC-32 on the producer thread, the
    copied ones and the small records on the writer's; zipfile checks every CRC, and the values
    are right. A tied name is summed once."""
    import zipfile
    import zlib

    rng = np.random.default_rng(8)
    sd = {f"m.{i}.w": rng.random((32, 24), dtype=np.float32) for i in range(4)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    threads: list[tuple[str, int]] = []
    real = zlib.crc32
    monkeypatch.setattr(zlib, "crc32", lambda d, *a: threads.append((threading.current_thread().name, len(d))) or real(d, *a))
    spec = {"name": "t", "version": 1, "rules": [{"transpose": "m.1.w"}, {"transpose": "m.3.w"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.pt", fsync=False)
    monkeypatch.setattr(zlib, "crc32", real)
    tensor = 32 * 24 * 4
    assert [t for t, n in threads if n == tensor and t == "statemap-produce"] == ["statemap-produce"] * 2
    assert all(t != "MainThread" for t, n in threads if n == tensor)  # copied ones: a CRC thread; computed: the producer
    with zipfile.ZipFile(tmp_path / "o.pt") as z:
        assert z.testzip() is None
    got = statemap.load_state_dict(tmp_path / "o.pt")
    assert np.array_equal(got["m.1.w"], sd["m.1.w"].T) and np.array_equal(got["m.2.w"], sd["m.2.w"])


def test_ahead_sums_only_the_indices_asked_and_passes_ranges_through():
    metas = [TensorMeta(f"t{i}", (4,), "float32") for i in range(3)]
    seg = Segments((("f", 0, 16),))
    arrays = [np.arange(4, dtype=np.float32), seg, np.ones(4, dtype=np.float32)]
    with contextlib.closing(w._Ahead(iter(arrays), metas, crc=[1, 2])) as ahead:
        a, b, c = list(ahead)
    assert a is arrays[0] and b is seg
    assert isinstance(c, w._Summed) and bytes(c.data) == arrays[2].tobytes() and c.crc == zlib.crc32(arrays[2].tobytes())


@pytest.mark.parametrize(("command", "preset", "want"), [(True, None, "1"), (True, "3", "3"), (False, None, None)])
def test_blas_threads_are_one_only_in_the_command_process(monkeypatch, command, preset, want):
    import statemap.process

    monkeypatch.setattr(statemap.process, "_command", command)
    monkeypatch.delitem(sys.modules, "numpy")  # as before numpy is imported (restored after the test)
    if preset is None:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", preset)
    statemap.process.one_blas_thread()
    assert os.environ.get("OPENBLAS_NUM_THREADS") == want


def _data_offsets(path) -> dict[str, list[int]]:
    import json
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return {k: v["data_offsets"] for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def test_copied_tensors_are_laid_out_before_computed_ones(tmp_path):
    rng = np.random.default_rng(2)
    sd = {k: rng.random((6, 5), dtype=np.float32) for k in ("a", "b", "c", "d")}
    save_file(sd, str(tmp_path / "s.safetensors"))
    spec = {"name": "t", "version": 1, "rules": [{"transpose": "a"}, {"transpose": "c"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    offs = _data_offsets(tmp_path / "o.safetensors")
    assert max(offs["b"][1], offs["d"][1]) <= min(offs["a"][0], offs["c"][0])  # b, d copied first
    got = load_file(str(tmp_path / "o.safetensors"))
    for k in "ac":
        assert np.array_equal(got[k], sd[k].T), k
    for k in "bd":
        assert np.array_equal(got[k], sd[k]), k
    import torch
    from safetensors.torch import load_file as torch_load

    assert torch.equal(torch_load(str(tmp_path / "o.safetensors"))["c"], torch.from_numpy(sd["c"].T.copy()))
    assert not np.array_equal(got["a"], sd["a"])  # the check can fail: a transposed tensor differs


def test_copies_first_keeps_the_plan_order_when_nothing_moves():
    seg = Segments((("f", 0, 8),))
    assert w.copies_first([seg, seg, None]) is None and w.copies_first([None, None]) is None and w.copies_first(None) is None
    assert w.copies_first([None, seg, None, seg]) == [1, 3, 0, 2]


class _FakeFS:
    """libc's fallocate / fstatfs stand-ins: a file system of type ``magic``; calls recorded."""

    def __init__(self, magic: int) -> None:
        self.magic, self.calls = magic, []

    def fns(self):
        import ctypes

        def fallocate(fd, mode, off, n):
            self.calls.append((mode, off, n))
            return 0

        def fstatfs(fd, buf):
            ctypes.c_long.from_address(ctypes.addressof(buf)).value = self.magic
            return 0

        return fallocate, fstatfs


@pytest.mark.parametrize(("magic", "called"), [(0xEF53, True), (0x58465342, False)])  # ext4; XFS: not measured, left alone
def test_the_output_is_preallocated_on_ext4_only(tmp_path, monkeypatch, magic, called):
    fake = _FakeFS(magic)
    monkeypatch.setattr(kernel_copy, "libc_fallocate", fake.fns)
    sd = {"a": np.ones((64, 64), np.float32), "b": np.arange(10, dtype=np.float32)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    spec = {"name": "t", "version": 1, "rules": [{"transpose": "a"}]}
    statemap.convert(spec, tmp_path / "s.safetensors", tmp_path / "o.safetensors", fsync=False)
    size = os.path.getsize(tmp_path / "o.safetensors")
    assert fake.calls == ([(kernel_copy.FALLOC_FL_KEEP_SIZE, 0, size)] if called else [])
    assert np.array_equal(load_file(str(tmp_path / "o.safetensors"))["a"], sd["a"].T)


def _copies_and_transposes(tmp_path) -> tuple[Path, dict, dict]:
    rng = np.random.default_rng(9)
    sd = {f"m.{i}.w": rng.random((64, 48), dtype=np.float32) for i in range(8)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    spec = {"name": "t", "version": 1, "rules": [{"transpose": f"m.{i}.w"} for i in range(1, 8, 2)]}
    return tmp_path / "s.safetensors", sd, spec


def test_the_writer_copies_while_it_waits_for_computed_tensors_and_copies_land_in_place(tmp_path, monkeypatch):
    """One thread writes the file: copies are done a step at a time whenever the producer has not
    made the next computed tensor yet (no copy thread, no queueing on the output's inode lock)."""
    import statemap.apply as apply_mod

    src, sd, spec = _copies_and_transposes(tmp_path)
    events: list[tuple[str, str]] = []
    real_copy, real_write, real_run = kernel_copy.copy_range, kernel_copy.write_fully, apply_mod.run_node

    def copy_spy(*a, **k):
        events.append(("copy", threading.current_thread().name))
        return real_copy(*a, **k)

    def write_spy(*a, **k):
        events.append(("write", threading.current_thread().name))
        return real_write(*a, **k)

    def slow(node, *a, **k):  # the producer is the slow side, as transposes are
        time.sleep(0.05)
        return real_run(node, *a, **k)

    monkeypatch.setattr(kernel_copy, "copy_range", copy_spy)
    monkeypatch.setattr(kernel_copy, "write_fully", write_spy)
    monkeypatch.setattr(apply_mod, "run_node", slow)
    monkeypatch.setattr(kernel_copy.CopyJob, "STEP", 4096)  # several steps per range
    statemap.convert(spec, src, tmp_path / "o.safetensors", fsync=False)
    me = threading.current_thread().name
    assert {t for _, t in events} == {me}  # copies and writes in the writer's thread only
    kinds = [k for k, _ in events]
    assert kinds.count("copy") == 4 * 64 * 48 * 4 // 4096  # 4 copied tensors, a step each 4 KiB
    assert kinds.index("copy") < kinds.index("write", 1)  # copying began before the first computed tensor was written
    got = load_file(str(tmp_path / "o.safetensors"))
    for i in range(8):
        assert np.array_equal(got[f"m.{i}.w"], sd[f"m.{i}.w"].T if i % 2 else sd[f"m.{i}.w"]), i
    assert (
        os.path.getsize(tmp_path / "o.safetensors")
        == 8 + int.from_bytes((tmp_path / "o.safetensors").read_bytes()[:8], "little") + 8 * 64 * 48 * 4
    )


def test_a_shard_that_computes_in_its_own_thread_copies_on_a_thread(tmp_path, monkeypatch):
    """--workers: a shard's tensors are computed by the writer itself, so the copy runs beside it."""
    threads: list[str] = []
    real = kernel_copy.copy_range

    def spy(*a, **k):
        threads.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(kernel_copy, "copy_range", spy)
    data = np.arange(1024, dtype=np.float32)
    (tmp_path / "in.bin").write_bytes(b"x" * 100 + data.tobytes())
    metas = [TensorMeta("a", (1024,), "float32"), TensorMeta("b", (2, 3), "float32")]
    segs = [Segments(((str(tmp_path / "in.bin"), 100, 4096),)), None]
    computed = np.ones((2, 3), np.float32)
    head = w.aligned_header(metas, {}, segs)
    fd = os.open(tmp_path / "o.safetensors", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        w._fill_safetensors(fd, head, metas, segs, lambda i: segs[0] if i == 0 else computed, False)
    finally:
        os.close(fd)
    assert threads == ["statemap-copy"]
    got = load_file(str(tmp_path / "o.safetensors"))
    assert np.array_equal(got["a"], data) and np.array_equal(got["b"], computed)


@pytest.mark.parametrize("where", ["copy", "compute"])
def test_a_failure_on_either_side_stops_both_and_leaves_nothing(tmp_path, monkeypatch, where):
    """A copy fails (disk full): the writer stops there. A computed tensor fails: the copying
    stops. Either way no file and no copy thread are left."""
    import statemap.apply as apply_mod

    src, _, spec = _copies_and_transposes(tmp_path)
    made: list[int] = []
    if where == "copy":

        def full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(kernel_copy, "copy_range", full)
    else:
        real = apply_mod.run_node

        def broken(node, *a, **k):
            made.append(1)
            if len(made) == 2:
                raise OSError(5, "Input/output error")
            return real(node, *a, **k)

        monkeypatch.setattr(apply_mod, "run_node", broken)
    message = "No space left on device" if where == "copy" else "Input/output error"
    with pytest.raises(statemap.OutputError, match=f"{message}; no output left behind"):
        statemap.convert(spec, src, tmp_path / "o.safetensors", fsync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
    assert not [t for t in threading.enumerate() if t.name == "statemap-copy"]
