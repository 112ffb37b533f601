"""kernel_copy.copy_range: the bytes arrive exactly, through splice where it works and through
copy_file_range or pread / write where it does not, and a copy that fails half way leaves no
bytes behind for the next one."""

from __future__ import annotations

import errno
import os
import sys

import numpy as np
import pytest

import statemap
from statemap import kernel_copy
from statemap.kernel_copy import Sources, copy_range

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="splice is Linux only")

RANGES = [(4097, 3 << 20), (0, 5), (123, (256 << 10) + 7), (9, 0)]  # unaligned, tiny, just over the pipe, empty


@pytest.fixture
def src(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 6 << 20, dtype=np.uint8).tobytes()
    p = tmp_path / "in.bin"
    p.write_bytes(data)
    return p, data


def _copy_all(src_path, out_path, sources: Sources) -> bytes:
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off, n in RANGES:
            copy_range(fd, sources, str(src_path), off, n)
    finally:
        os.close(fd)
    return out_path.read_bytes()


def _expected(data: bytes) -> bytes:
    return b"".join(data[off : off + n] for off, n in RANGES)


def _spy(monkeypatch, name: str, fail=None) -> list[tuple]:
    calls: list[tuple] = []
    real = getattr(os, name)

    def spy(*a, **k):
        calls.append(a)
        if fail is not None:
            fail(*a)
        return real(*a, **k)

    monkeypatch.setattr(os, name, spy)
    return calls


@linux
def test_ranges_go_through_one_large_pipe_with_splice(tmp_path, src, monkeypatch):
    path, data = src
    splices, cfrs = _spy(monkeypatch, "splice"), _spy(monkeypatch, "copy_file_range")
    with Sources() as s:
        assert _copy_all(path, tmp_path / "out", s) == _expected(data)
        assert s.pipe() is not None and s.pipe().size >= kernel_copy.PIPE_MIN
    assert splices and not cfrs
    assert max(a[2] for a in splices) == kernel_copy.PIPE_BYTES  # a full pipe per step (it got its size)


def _refuse_into_pipe(src, dst, count, *a):
    if not os.readlink(f"/proc/self/fd/{src}").startswith("pipe:"):
        raise OSError(errno.EINVAL, "Invalid argument")


def _refuse_out_of_pipe(src, dst, count, *a):
    if os.readlink(f"/proc/self/fd/{src}").startswith("pipe:"):
        raise OSError(errno.EINVAL, "Invalid argument")


def _small_pipe(monkeypatch):
    monkeypatch.setattr(kernel_copy, "PIPE_BYTES", 4096)  # as when the user's pipe quota is spent


def _no_splice_no_cfr(monkeypatch):
    monkeypatch.delattr(os, "splice")

    def cfr(*a, **k):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "copy_file_range", cfr)


@linux
@pytest.mark.parametrize(
    ("setup", "cfr"),
    [
        (lambda mp: _spy(mp, "splice", _refuse_into_pipe), True),  # input file system without splice
        (lambda mp: _spy(mp, "splice", _refuse_out_of_pipe), True),  # output without: the pipe's bytes are written
        (_small_pipe, True),
        (_no_splice_no_cfr, False),  # pread / write
    ],
    ids=["input-refuses-splice", "output-refuses-splice", "small-pipe", "neither"],
)
def test_every_fallback_copies_the_same_bytes(tmp_path, src, monkeypatch, setup, cfr):
    path, data = src
    setup(monkeypatch)
    seen = _spy(monkeypatch, "copy_file_range") if cfr else []
    with Sources() as s:
        assert _copy_all(path, tmp_path / "out", s) == _expected(data)
        assert s.splice is False
    assert bool(seen) == cfr


@linux
@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_copy_that_fails_half_way_leaves_nothing_in_the_pipe(tmp_path, src, monkeypatch, exc):
    """The pipe holds bytes of the failed copy: it is dropped, so the next copy starts clean."""
    path, data = src
    real = os.splice
    state = {"failed": False}

    def once(a, b, count, *rest, **k):
        if not state["failed"] and os.readlink(f"/proc/self/fd/{a}").startswith("pipe:"):
            state["failed"] = True
            raise exc
        return real(a, b, count, *rest, **k)

    monkeypatch.setattr(os, "splice", once)
    with Sources() as s:
        fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
        with pytest.raises(type(exc)):
            copy_range(fd, s, str(path), 10, 1000)
        assert s._pipe is None and s.splice
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        copy_range(fd, s, str(path), 5000, 3000)
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == data[5000:8000]


def test_a_source_shorter_than_the_range_is_an_error_naming_it(tmp_path, src):
    path, data = src
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    with Sources() as s, pytest.raises(statemap.OutputError, match=r"in\.bin: ended early while copying tensor bytes"):
        copy_range(fd, s, str(path), len(data) - 10, 20)
    os.close(fd)


@linux
def test_sources_release_every_descriptor(tmp_path, src):
    path, _ = src
    before = set(os.listdir("/proc/self/fd"))
    s = Sources()
    _copy_all(path, tmp_path / "out", s)
    assert len(set(os.listdir("/proc/self/fd")) - before) == 3  # the input and the pipe's two ends
    s.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_write_fully_writes_everything_in_steps_and_survives_short_writes(tmp_path, monkeypatch):
    data = np.random.default_rng(1).integers(0, 256, 3 * kernel_copy.WRITE_STEP + 11, dtype=np.uint8)
    sizes: list[int] = []
    real = os.pwrite

    def short(fd, view, at):  # the kernel may take less than asked: every third call takes half
        sizes.append(len(view))
        return real(fd, view[: len(view) // 2] if len(sizes) % 3 == 0 else view, at)

    monkeypatch.setattr(os, "pwrite", short)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert kernel_copy.write_fully(fd, data, 5) == data.nbytes
    finally:
        os.close(fd)
    assert sizes == [kernel_copy.WRITE_STEP] * 3 + [kernel_copy.WRITE_STEP // 2 + 11]  # the short third write resumed
    assert (tmp_path / "out").read_bytes() == b"\0" * 5 + data.tobytes()
