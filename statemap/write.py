"""write: stream planned tensors into safetensors (single or sharded), a torch .pt or a Flax .msgpack file.

Before a byte is written, every file the write creates (the file, or each shard and the index) is
checked against the inputs (by device and inode) and against existing files, and the tensors
against free disk space and memory. Each output name is locked while it is written, so a second
concurrent writer fails instead of replacing the first one's work. Every file is written to a
temporary name in the target folder (``.NAME.statemap-PID-RANDOM.tmp``), flushed and fsynced,
its header re-read and checked against the plan, and only then published (without ``force``, by
``link``, which never replaces a file that appeared meanwhile). On any failure (an exception,
disk full, Ctrl-C, SIGTERM, SIGHUP) the temporary files are removed: no partial output. Temporary
files of a writer that was killed (SIGKILL) are removed by the next write into that folder.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import kernel_copy
from .apply import Zeros
from .dtypes import dtype as lookup_dtype
from .errors import OutputError
from .load.safetensors_format import encode_header
from .meta import TensorMeta
from .process import one_blas_thread

if TYPE_CHECKING:
    import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class Written:
    files: tuple[str, ...]
    n_tensors: int
    n_bytes: int
    removed: tuple[str, ...] = ()  # with force: files of an earlier output at this name that this one replaced


def output_format(path: str | os.PathLike[str]) -> str:
    name = os.fspath(path)
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    if name.endswith(".msgpack"):
        return "flax"
    raise OutputError(f"{name}: unknown output format; name it *.safetensors, *.pt / *.bin, or *.msgpack (Flax)")


def parse_size(text: str | int | None) -> int | None:
    """'5GB' / '500MB' / '2GiB' / 1000000 -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.I)
    if not m:
        raise OutputError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


# -- what an apply will create, checked before anything is written --------------------------------

TMP_RE = re.compile(r"\.(?P<name>.+)\.statemap-(?P<pid>\d+)-[0-9A-Za-z]+\.tmp")
LOCK_SUFFIX = ".statemap.lock"
MAX_INPUT_INDEX = 64 << 20  # an input index larger than this is not parsed for its shard names


def output_files(
    path: str | os.PathLike[str], metas: Sequence[TensorMeta], max_shard_size: int | str | None = None
) -> list[Path]:
    """Every file a write of ``metas`` to ``path`` creates: the file, or each shard and the index.

    Example::

        >>> metas = [TensorMeta(f"w{i}", (1000, 1000, 1000), "float32") for i in range(3)]   # 12 GB of tensors
        >>> [p.name for p in output_files("model.safetensors", metas, "5GB")]
        ['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors',
         'model.safetensors.index.json']
    """
    out = Path(path)
    limit = parse_size(max_shard_size)
    if not limit or output_format(out) != "safetensors" or sum(m.nbytes for m in metas) <= limit:
        return [out]
    return [out.with_name(name) for name in _shard_names(out, len(shard_groups(metas, limit)))] + [_index_path(out)]


def _shard_names(out: Path, n: int) -> list[str]:
    stem = out.name[: -len(".safetensors")]
    return [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def _index_path(out: Path) -> Path:
    return out.with_name(out.name + ".index.json")


def _input_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The inputs, plus every shard an input ``*.index.json`` names (those are inputs too)."""
    files: list[Path] = []
    for src in inputs:
        p = Path(src)
        files.append(p)
        if p.name.endswith(".index.json"):
            with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
                if p.is_file() and p.stat().st_size <= MAX_INPUT_INDEX:
                    wm = json.loads(p.read_text(encoding="utf-8")).get("weight_map")
                    if isinstance(wm, dict):
                        files += [p.parent / s for s in sorted({s for s in wm.values() if isinstance(s, str) and s})]
    return files


class _Inputs:
    """Inputs known by real identity (device + inode) as well as by resolved path."""

    def __init__(self, inputs: Sequence[str | os.PathLike[str]]) -> None:
        self.ids: set[tuple[int, int]] = set()
        self.paths: set[Path] = set()
        for p in _input_files(inputs):
            with contextlib.suppress(OSError, ValueError):
                self.paths.add(p.resolve())
                st = os.stat(p)
                self.ids.add((st.st_dev, st.st_ino))

    def holds(self, f: Path) -> bool:
        try:
            if f.resolve() in self.paths:
                return True
            st = os.stat(f)
        except (OSError, ValueError):
            return False
        return (st.st_dev, st.st_ino) in self.ids


def check_outputs(files: Sequence[Path], inputs: Sequence[str | os.PathLike[str]], force: bool) -> None:
    """Refuse, before anything is written, to create any of ``files`` over an input (never, even with
    ``force``), over an existing file (only with ``force``), as a directory, or in a missing folder."""
    known = _Inputs(inputs)
    for f in files:
        if known.holds(f):
            raise OutputError(
                f"{f}: is an input; statemap never writes over its inputs (not even with --force); "
                "name another output file or folder"
            )
        if f.is_dir():
            raise OutputError(f"{f}: is a directory; name an output file")
        if not f.parent.is_dir():
            raise OutputError(f"{f.parent}: output folder does not exist")
        if os.path.lexists(f) and not force:
            raise OutputError(f"{f}: already exists; pass --force to replace it")


_SHARD_RE = re.compile(r"(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors")


def earlier_output(out: Path, files: Sequence[Path]) -> list[Path]:
    """Files of an earlier safetensors output at ``out``'s name that writing ``files`` would not
    replace: ``out`` itself when the new output is sharded, the index when it is one file, and
    shards (``STEM-NNNNN-of-NNNNN.safetensors``, or named by the existing index) the new output
    does not have. Left beside the new output they would be taken for it: transformers loads
    ``model.safetensors`` before an index, and loaders that glob ``*.safetensors`` take every shard.

    Example::

        >>> earlier_output(Path("empty-folder/model.safetensors"), [Path("empty-folder/model.safetensors")])
        []
    """
    if output_format(out) != "safetensors":
        return []
    new = {f.name for f in files}
    stem = out.name[: -len(".safetensors")]
    names = {out.name, _index_path(out).name}
    try:
        names |= {e.name for e in os.scandir(out.parent) if (m := _SHARD_RE.fullmatch(e.name)) and m.group("stem") == stem}
    except OSError:
        return []
    index = _index_path(out)
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError, AttributeError):
        if index.is_file() and index.stat().st_size <= MAX_INPUT_INDEX:
            wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            if isinstance(wm, dict):
                names |= {v for v in wm.values() if isinstance(v, str) and v.endswith(".safetensors") and Path(v).name == v}
    return [out.parent / n for n in sorted(names - new) if os.path.lexists(out.parent / n)]


def check_earlier_output(out: Path, files: Sequence[Path], inputs: Sequence[str | os.PathLike[str]], force: bool) -> list[Path]:
    """Refuse to write ``files`` beside an earlier output at the same name (see :func:`earlier_output`)
    unless ``force``; return what ``force`` will remove once the new output is in place."""
    stale = earlier_output(out, files)
    if not stale:
        return []
    known = _Inputs(inputs)
    listed = ", ".join(f.name for f in stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
    for f in stale:
        if known.holds(f):
            raise OutputError(
                f"{out}: {f.name} in that folder is an input and belongs to a checkpoint of the same name; "
                "a loader could take one for the other: name another output file or folder"
            )
        if f.is_dir() or f.is_symlink():
            raise OutputError(
                f"{f}: is in the way of the output {out.name} (a directory or a link); remove it or name another output"
            )
    if not force:
        raise OutputError(
            f"{out}: the folder holds an earlier output of this name ({listed}) that this one would not replace, "
            "and a loader could take it for the new one; pass --force to replace that output (its files are removed) "
            "or name another output"
        )
    return stale


def check_output(path: str | os.PathLike[str], inputs: Sequence[str], force: bool) -> Path:
    """:func:`check_outputs` for one file."""
    check_outputs([Path(path)], inputs, force)
    return Path(path)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def memory_budget() -> int | None:
    """Bytes this process may allocate: physical memory, lowered by any address-space / data limit."""
    limits = []
    with contextlib.suppress(AttributeError, ValueError, OSError):
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    with contextlib.suppress(ImportError, AttributeError, ValueError, OSError):
        import resource

        for r in (resource.RLIMIT_AS, getattr(resource, "RLIMIT_DATA", resource.RLIMIT_AS)):
            soft = resource.getrlimit(r)[0]
            if soft != resource.RLIM_INFINITY and soft > 0:
                limits.append(soft)
    return min(limits) if limits else None


def check_resources(out: Path, metas: Sequence[TensorMeta], in_memory: Iterable[TensorMeta], *, together: bool) -> None:
    """Refuse, before anything is allocated or written, an output that cannot fit: all tensors
    against the free space of the output folder, the tensors computed in memory against
    :func:`memory_budget` (each one, or all ``together`` for formats built whole in memory)."""
    need = sum(m.nbytes for m in metas)
    with contextlib.suppress(OSError, AttributeError):
        st = os.statvfs(out.parent)
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise OutputError(
                f"{out}: the output needs {_fmt_bytes(need)} but only {_fmt_bytes(free)} is free in {out.parent}; "
                "nothing was written"
            )
    budget = memory_budget()
    if budget is None:
        return
    mem = list(in_memory)
    if together and sum(m.nbytes for m in mem) > budget:
        raise OutputError(
            f"{out}: this format is built in memory and needs {_fmt_bytes(sum(m.nbytes for m in mem))}, "
            f"more than the {_fmt_bytes(budget)} this process may use; write .safetensors instead (streamed)"
        )
    for m in mem:
        if m.nbytes > budget:
            raise OutputError(
                f"{out}: tensor {m.name!r} {list(m.shape)} would take {_fmt_bytes(m.nbytes)} in memory, "
                f"more than the {_fmt_bytes(budget)} this process may use; check the spec's shapes"
            )


# -- exclusive publication -----------------------------------------------------------------------


def _lock_path(f: Path) -> Path:
    return f.with_name(f".{f.name}{LOCK_SUFFIX}")


def _try_lock(lp: Path) -> int | None:
    """An fd holding an exclusive lock on ``lp``, or None when another process holds it.

    The kernel drops the lock when its holder dies (even by SIGKILL), so a lock is never stale.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the lock file's existence is the lock
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        os.write(fd, str(os.getpid()).encode())
        return fd
    for _ in range(20):
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file we opened: lock the one that is there
            same = os.path.samestat(os.fstat(fd), os.lstat(lp))
        except FileNotFoundError:
            same = False
        if same:  # the pid padded to 20 bytes overwrites any earlier one: no truncate (ext4 would flush the file on close)
            os.pwrite(fd, f"{os.getpid():<20}".encode(), 0)
            return fd
        os.close(fd)
    raise OutputError(f"{lp}: cannot take the output lock (it keeps being replaced)")


def _unlock(lp: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        lp.unlink()  # before closing: nobody can lock this file once it is gone from the folder
    os.close(fd)


def _holder(lp: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(lp.read_text()[:20] or "x")
        return f" (pid {pid})"
    return ""


class _OutputLock:
    """One lock per output file (``.NAME.statemap.lock`` beside it), held while writing and publishing."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = sorted(set(files))
        self.held: list[tuple[Path, int]] = []

    def __enter__(self) -> _OutputLock:
        try:
            for f in self.files:
                lp = _lock_path(f)
                try:
                    fd = _try_lock(lp)
                    for _ in range(4):  # another run's sweep may hold it for a moment
                        if fd is not None:
                            break
                        time.sleep(0.05)
                        fd = _try_lock(lp)
                except OSError as e:
                    raise OutputError(f"{f}: cannot create files in {f.parent}: {e.strerror or e}") from None
                if fd is None:
                    raise OutputError(
                        f"{f}: another statemap writer{_holder(lp)} is writing it right now; nothing was replaced. "
                        "Wait for it to finish, or write to another name"
                    )
                self.held.append((lp, fd))
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        while self.held:
            _unlock(*self.held.pop())

    def sweep(self, folder: Path, keep: _Inputs) -> list[Path]:
        """Remove temporary and lock files that a dead writer (SIGKILL, power loss) left in ``folder``.

        A temp file belongs to the writer holding the lock of its output name; when that lock is free
        (or ours), nobody is writing it: the file is stale. Never touches an input."""
        mine = {f.name for f in self.files}
        stale: dict[str, list[Path]] = {}
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return []
        for e in entries:
            m = TMP_RE.fullmatch(e.name)
            if m:
                stale.setdefault(m.group("name"), []).append(Path(e.path))
            elif e.name.startswith(".") and e.name.endswith(LOCK_SUFFIX) and len(e.name) > len(LOCK_SUFFIX) + 1:
                stale.setdefault(e.name[1 : -len(LOCK_SUFFIX)], [])
        removed: list[Path] = []
        for name, temps in stale.items():
            temps = [t for t in temps if not keep.holds(t) and t.is_file() and not t.is_symlink() and not _alive(t)]
            if name in mine:
                removed += _remove(temps)
                continue
            lp = folder / f".{name}{LOCK_SUFFIX}"
            if keep.holds(lp):
                continue
            try:
                fd = _try_lock(lp)
            except (OSError, OutputError):  # e.g. the lock name is a symlink: not ours to clean
                continue
            if fd is None:
                continue  # a live writer: leave its files alone
            try:
                removed += _remove(temps)
            finally:
                _unlock(lp, fd)
        return removed


def _alive(tmp: Path) -> bool:
    """Whether the process named in a temporary file's name still runs (another one than this).

    Belt and braces next to the lock: a file whose writer is alive is never removed, so a pid that
    was reused keeps a stale file until that process ends."""
    if os.name != "posix":
        return True  # no harmless liveness test there (os.kill would end the process): keep the file
    m = TMP_RE.fullmatch(tmp.name)
    if m is None:
        return False
    pid = int(m.group("pid"))
    if pid == os.getpid() or pid <= 0 or pid > 1 << 22:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove(paths: Iterable[Path]) -> list[Path]:
    done = []
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()
            done.append(p)
    return done


class _Staging:
    """Temporary files that become real only when every one of them is complete."""

    def __init__(self, force: bool = False, fsync: bool = True) -> None:
        self.force, self.fsync = force, fsync
        self.pending: list[tuple[Path, Path]] = []

    def reserve(self, final: Path) -> Path:
        """A temporary name for ``final`` (``.NAME.statemap-PID-RANDOM.tmp``), removed on abort, published on commit."""
        tmp = final.with_name(f".{final.name}.statemap-{os.getpid()}-{os.urandom(4).hex()}.tmp")
        self.pending.append((tmp, final))
        return tmp

    def open(self, final: Path) -> tuple[Path, Any]:
        tmp = self.reserve(final)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        return tmp, _FullWriter(fd)

    def commit(self) -> None:
        """Publish every file (in order: shards, then the index). Without ``force`` a file that
        appeared meanwhile is never replaced: ``link`` fails if the name exists."""
        published: list[Path] = []
        try:
            for tmp, final in self.pending:
                if self.force:
                    os.replace(tmp, final)
                    continue
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise OutputError(
                        f"{final}: appeared while statemap was writing; not replaced (pass --force to replace it)"
                    ) from None
                except OSError as e:  # a filesystem without hard links: check, then rename
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                    if os.path.lexists(final):
                        raise OutputError(f"{final}: appeared while statemap was writing; not replaced") from None
                    os.replace(tmp, final)
                else:
                    published.append(final)
                    os.unlink(tmp)
        except BaseException:
            for f in published:  # take back what this run published (without --force it was new)
                with contextlib.suppress(OSError):
                    f.unlink()
            raise
        if self.pending and self.fsync:  # --no-fsync leaves the folder's entry to the kernel too (ext4: ~0.2 s)
            _fsync_dir(self.pending[0][1].parent)
        self.pending.clear()

    def abort(self) -> None:
        for tmp, _ in self.pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.pending.clear()


class _FullWriter:
    """An unbuffered file that writes every byte or raises (a raw ``write`` may stop short at a size limit)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def write(self, data: Any) -> int:
        return kernel_copy.write_fully(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> _FullWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


CATCH = ("SIGTERM", "SIGHUP")  # SIGINT is Python's KeyboardInterrupt already
_BLOCK = [getattr(signal, s) for s in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, s)]


@contextlib.contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception while writing, so temporary files get removed.

    In the main thread only (Python runs signal handlers there); from other threads the caller's
    own handling applies."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise OutputError(f"interrupted by {signal.Signals(signum).name}; partial output removed")

    old = {s: signal.signal(getattr(signal, s), handler) for s in CATCH if hasattr(signal, s)}
    # a file-size limit (ulimit -f) would kill the process mid-write; make it an EFBIG error instead
    old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN) if hasattr(signal, "SIGXFSZ") else None
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(getattr(signal, s), h)
        if old_xfsz is not None:
            signal.signal(signal.SIGXFSZ, old_xfsz)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT / SIGTERM / SIGHUP while publishing or cleaning up, so neither stops half-way."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCK)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fill_safetensors(
    fd: int,
    head: bytes,
    metas: Sequence[TensorMeta],
    segments: Sequence[Any] | None,
    produce: Callable[[int], Any],
    fsync: bool,
    check: Callable[[], None] | None = None,
    beside: bool = False,
) -> int:
    """Write one safetensors file into ``fd``: ``head`` (for the tensors laid out as
    :func:`copies_first` says), then every tensor at its place; return the data bytes.

    The planned file ranges (``segments[i]``) are copied by a :class:`~statemap.kernel_copy.CopyJob`
    while this thread writes the computed tensors as they come, each at its offset: with
    ``beside`` (they are produced on another thread, :class:`_Ahead`) this thread copies a step
    whenever the next one is not ready yet, and the rest at the end; else the copy runs on a
    thread of its own. ``produce(i)`` gives tensor ``i`` (in plan order, each once): an array, or
    file ranges (``parts``), which for a planned copy must be the planned ones. ``check()`` runs
    before each."""
    segs: list[Any] = list(segments) if segments else [None] * len(metas)
    order = copies_first(segments) or list(range(len(metas)))
    at = [0] * len(metas)
    pos = len(head)
    for i in order:
        at[i] = pos
        pos += metas[i].nbytes
    end = pos
    kernel_copy.write_fully(fd, head, 0)
    planned = [i for i in order if segs[i] is not None]
    ranges = kernel_copy.join_ranges(
        (src, off, n, at[i] + k)
        for i in planned
        for (src, off, n), k in zip(segs[i].parts, itertools.accumulate((p[2] for p in segs[i].parts), initial=0))
    )
    copied = sum(metas[i].nbytes for i in planned)
    job = kernel_copy.CopyJob(fd, ranges, fsync)
    sources = kernel_copy.Sources()
    wb = kernel_copy.Writeback(fd, fsync, len(head) + copied if ranges else 0)
    total = copied
    waiting = _Waiting(job.step if beside else None)
    try:
        if len(planned) == len(metas):
            job.run()
        elif not beside:
            job.start()  # beside the computed tensors, made in this thread
        for i, m in enumerate(metas):
            if check is not None:
                check()
            job.check()
            with waiting:
                a = produce(i)
            if segs[i] is not None:
                if getattr(a, "parts", None) != segs[i].parts:
                    raise AssertionError(f"{m.name}: produced other bytes than the planned file ranges")
                continue
            if hasattr(a, "parts"):  # file ranges the plan did not announce
                if a.nbytes != m.nbytes:
                    raise AssertionError(f"{m.name}: {a.nbytes} bytes planned as {m.nbytes}")
                p = at[i]
                for src, off, n in a.parts:
                    kernel_copy.copy_range(fd, sources, src, off, n, wb, p)
                    p += n
            else:
                data = _as_bytes(a, m)
                if len(data) != m.nbytes:
                    raise AssertionError(f"{m.name}: {len(data)} bytes planned as {m.nbytes}")
                kernel_copy.write_fully(fd, data, at[i])
                wb.kick(at[i] + len(data))
            total += m.nbytes
        job.finish()
    except BaseException:
        job.cancel()
        raise
    finally:
        sources.close()
    if fsync:
        os.fsync(fd)
    if os.fstat(fd).st_size != end:
        raise OutputError(f"wrote {os.fstat(fd).st_size} bytes where the plan has {end} (bug); output removed")
    return total


PAGE = 4096
ALIGN_MIN = 1 << 20  # ranges smaller than this do not steer the header padding


def aligned_header(metas: Sequence[TensorMeta], metadata: dict[str, str], segments: Sequence[Any] | None) -> bytes:
    """The safetensors header, padded (spaces, a multiple of 8 bytes, under a page) so that the
    most bytes copied from input files land at the same offset within a page as in their source:
    the kernel then copies whole pages (measured 1.7x faster than misaligned ranges here).

    ``segments``: per tensor, its :class:`statemap.apply.Segments` (file ranges) or None."""
    head = encode_header(metas, metadata)
    if not segments:
        return head
    weight: dict[int, int] = {}
    rel = len(head)
    for m, seg in zip(metas, segments):
        if seg is not None:
            at = rel
            for _, off, n in seg.parts:
                if n >= ALIGN_MIN:
                    pad = (off - at) % PAGE
                    if pad % 8 == 0:
                        weight[pad] = weight.get(pad, 0) + n
                at += n
        rel += m.nbytes
    if not weight:
        return head
    pad = max(weight, key=lambda k: (weight[k], -k))
    raw = head[8:] + b" " * pad
    return struct.pack("<Q", len(raw)) + raw


# -- safetensors ---------------------------------------------------------------------------


def copies_first(segments: Sequence[Any] | None) -> list[int] | None:
    """The order in which a safetensors writer lays out tensors: those copied from input files
    (``segments[i]`` not None) first, then the computed ones, each in plan order; None when that
    is the plan's order (no computed tensor comes before a copied one).

    The copies then run while numpy loads and the producer thread starts on the first computed
    tensors, instead of after the last of them (GPT-2 -> nanoGPT: the 206 MB ``lm_head`` clone,
    planned last, was copied once every transpose was written). A safetensors header maps each
    name to its byte range, so readers find every tensor whatever the order of the data.

    Example::

        >>> copies_first([None, "ranges of b", None])   # per tensor: its file ranges, or None (computed)
        [1, 0, 2]
        >>> copies_first(["ranges of a", None]) is None
        True
    """
    if not segments:
        return None
    order = [i for i, s in enumerate(segments) if s is not None] + [i for i, s in enumerate(segments) if s is None]
    return None if order == list(range(len(order))) else order


def _write_safetensors(
    final: Path,
    stage: _Staging,
    metas: Sequence[TensorMeta],
    arrays: Iterator[Any],
    metadata: dict[str, str],
    fsync: bool = True,
    segments: Sequence[Any] | None = None,
) -> int:
    """One safetensors file; with ``segments`` (per tensor, its file ranges or None) the copied
    tensors are laid out first (:func:`copies_first`): their ranges come from ``segments``, and
    the ``arrays`` handed over for them (the same ranges) are only checked."""
    from .load.safetensors_format import read_header

    order = copies_first(segments)
    laid = [metas[i] for i in order] if order is not None else list(metas)
    tmp, f = stage.open(final)
    with f:
        head = aligned_header(laid, metadata, [segments[i] for i in order] if order is not None and segments else segments)
        kernel_copy.preallocate(f.fileno(), len(head) + sum(m.nbytes for m in metas))
        total = _fill_safetensors(f.fileno(), head, metas, segments, lambda i: next(arrays), fsync, beside=True)
    got, _, _ = read_header(str(tmp))  # re-read and check before it becomes real
    if [(g.name, g.shape, g.dtype) for g in got.values()] != [(m.name, m.shape, m.dtype) for m in laid]:
        raise OutputError(f"{final}: written header does not match the plan (bug); output removed")
    return total


def check_writer(path: str | os.PathLike[str]) -> None:
    """Refuse, before anything is read or written, an output format whose writer is not installed.

    Every format is written by statemap itself (``.pt`` too: torch's zip format is emitted
    without torch), so this only checks the name."""
    output_format(path)


def write_checkpoint(
    path: str | os.PathLike[str],
    metas: Sequence[TensorMeta],
    arrays: Iterable[Any],
    *,
    metadata: dict[str, str] | None = None,
    max_shard_size: int | str | None = None,
    ties: Sequence[Sequence[str]] = (),
    inputs: Sequence[str | os.PathLike[str]] = (),
    force: bool = False,
    on_tensor: Callable[[TensorMeta], None] | None = None,
    fsync: bool = True,
    workers: int = 1,
    get: Callable[[int], Any] | None = None,
    segments: Sequence[Any] | None = None,
) -> Written:
    """Write tensors, given in the order of ``metas``, atomically to ``path``.

    Before anything is written, every file this write creates (the file, or each shard and the
    index) is checked: never one of ``inputs`` (compared by device and inode; the shards an input
    index names count as inputs), an existing file only with ``force``; the tensors must fit the
    free disk space. Each output name is locked (``.NAME.statemap.lock``) so a second writer fails
    instead of replacing the first one's files; temporary files a killed writer left are removed.

    ``ties``: groups of names that are one tensor. In a .pt output they share storage;
    for safetensors the caller decides (clone: all listed in ``metas``; dedupe: only one).
    ``fsync=False`` skips flushing the file to disk before the rename and its folder after it
    (faster; a power loss right after may leave an empty file under the final name, or none).
    Still atomic against crashes of statemap.
    With ``fsync`` the disk starts writing each 32 MiB as soon as they are copied, so the final
    ``fsync`` has little left to wait for.
    ``workers > 1`` with a sharded safetensors output writes whole shards in parallel processes
    (started with ``spawn``); it needs a picklable ``get(i)`` that produces the i-th tensor.
    ``segments``: per tensor, the file ranges it will arrive as (or None), known from the plan;
    safetensors headers are padded so the largest of them are copied page-aligned.

    Example::

        >>> write_checkpoint("out.safetensors", [TensorMeta("w", (2,), "float32")], [np.zeros(2, "f4")], force=True)
        Written(files=('out.safetensors',), n_tensors=1, n_bytes=...)
    """
    fmt = output_format(path)
    out = Path(path)
    limit = parse_size(max_shard_size)
    if limit is not None and limit <= 0:
        raise OutputError(f"{out}: shard size {max_shard_size!r} is out of range: must be more than 0 bytes, e.g. 5GB")
    if fmt != "safetensors" and limit:
        raise OutputError(f"{out}: sharding is supported for safetensors outputs only")
    check_writer(out)
    files = output_files(out, metas, limit)
    check_outputs(files, inputs, force)
    check_earlier_output(out, files, inputs, force)
    # every format streams: one computed tensor in memory at a time (the caller checks which are computed)
    computed = [m for m, seg in zip(metas, segments) if seg is None] if segments else metas
    check_resources(out, metas, computed if fmt != "safetensors" else (), together=False)
    if fmt == "torch":
        from .stream_formats import check_torch_output

        check_torch_output(metas, str(out))
    if fmt == "flax":
        from .stream_formats import check_flax_output, flax_tree_order

        check_flax_output(metas, str(out))
        flax_tree_order(metas)  # a name that is both a tensor and a module: refused before anything is written
    stage = _Staging(force, fsync)
    if workers <= 1 and (segments is None or any(seg is None for seg in segments)):
        one_blas_thread()  # before the producer thread imports numpy: writing multiplies no matrices
    crc: list[int] = []
    if fmt == "torch":  # the CRC-32 of each stored computed tensor is taken by the producer thread
        from .stream_formats import storage_keys

        crc = storage_keys(metas, ties)[1]
    ahead = _Ahead(iter(arrays), metas, crc)
    # flax takes a module's members in file order, which convert produces them in; a writer that
    # pulls tensors early holds them itself, and the thread still keeps at most LIMIT bytes ahead
    it: Iterator[Any] = ahead

    def counted() -> Iterator[np.ndarray]:
        for m in metas:
            try:
                a = next(it)
            except StopIteration:
                raise AssertionError("fewer arrays than planned tensors") from None
            if on_tensor:
                on_tensor(m)
            yield a
            del a  # the writer is done with it: let it go before the next one is produced

    with _signals_as_exceptions(), _OutputLock(files) as lock, contextlib.closing(ahead):
        lock.sweep(out.parent, _Inputs(inputs))
        check_outputs(files, inputs, force)  # again, under the lock: another writer may have just finished
        stale = check_earlier_output(out, files, inputs, force)
        if fmt == "safetensors" and (workers <= 1 or get is None) and copies_first(segments) is not None:
            ahead.start()  # start on the computed tensors before the header is written and the copies start
        try:
            if fmt == "torch":
                nbytes = _write_torch(out, stage, metas, counted(), ties, fsync)
            elif fmt == "flax":
                nbytes = _write_flax(out, stage, metas, counted(), fsync)
            else:
                nbytes = _write_safetensors_maybe_sharded(
                    out, stage, metas, counted(), metadata or {}, limit, fsync, workers, get, on_tensor, segments
                )
            with _signals_held():
                stage.commit()
                removed = _remove(stale)  # the earlier output's other files (force): the new one is in place
                if removed and fsync:
                    _fsync_dir(out.parent)
        except OSError as e:
            with _signals_held():
                stage.abort()
            raise OutputError(f"{out}: write failed: {e.strerror or e}; no output left behind") from None
        except MemoryError:
            with _signals_held():
                stage.abort()
            raise OutputError(f"{out}: out of memory while producing the output; no output left behind") from None
        except BaseException:
            with _signals_held():
                stage.abort()
            raise
    return Written(tuple(str(f) for f in files), len(metas), nbytes, tuple(str(f) for f in removed))


_waiting = threading.local()


class _Waiting:
    """``with _Waiting(work):`` -- while this thread waits in :meth:`_Ahead.__next__` for a tensor
    the producer has not made yet, it calls ``work()`` (a step of copying, which returns False when
    there is nothing left to do) instead of sleeping. None: nothing to do."""

    def __init__(self, work: Callable[[], bool] | None) -> None:
        self.work = work

    def __enter__(self) -> None:
        _waiting.work = self.work

    def __exit__(self, *exc: object) -> None:
        _waiting.work = None


@dataclass(frozen=True)
class _Summed:
    """A computed tensor's bytes (as :func:`_as_bytes` gives them) with their CRC-32, taken by the
    producer thread right after computing them, while they are in cache (``.pt`` outputs)."""

    data: Any
    crc: int


class _Ahead:
    """The tensors of ``it``, produced on a thread ahead of the writer: reading and computing
    (transposes, casts) overlap the kernel's copying and writing. For the indices in ``crc``
    (``.pt`` outputs), a computed tensor is handed over as :class:`_Summed`: the zip entry's
    CRC-32 is taken on this thread, not the writer's (zlib: ~0.4 s for GPT-2 medium's 1.2 GB).

    The thread runs ahead while the computed tensors it holds for later (not the one being
    written) take at most :attr:`LIMIT` bytes together (byte ranges to copy take none); a tensor
    larger than that is produced only once the writer is done with every earlier one. So memory
    stays within the largest computed tensor plus ``LIMIT``. Started on the first ``next``;
    ``close`` stops the thread and waits for it (after a failure at most 2 s: it may be in the
    middle of one tensor, whose result is discarded)."""

    LIMIT = 32 << 20
    DEPTH = 64  # tensors produced ahead at most (many small ones: a bounded queue)

    def __init__(self, it: Iterator[Any], metas: Sequence[TensorMeta], crc: Iterable[int] = ()) -> None:
        self.it, self.metas = it, metas
        self.crc = frozenset(crc)
        self.cv = threading.Condition()
        self.ready: dict[int, tuple[bool, Any]] = {}
        self.held: dict[int, int] = {}  # produced, not yet written: index -> bytes in memory
        self.requested = 0  # index the writer asked for last: every earlier tensor is written
        self.handed = 0  # index the writer gets next
        self.stop = False
        self.thread: threading.Thread | None = None

    def _may_produce(self, i: int, nbytes: int) -> bool:
        if i <= self.requested:
            return True
        if i > self.requested + self.DEPTH:
            return False
        for k in [k for k in self.held if k < self.requested]:  # written: no longer held
            del self.held[k]
        ahead = sum(n for k, n in self.held.items() if k > self.requested)
        return ahead + nbytes <= self.LIMIT

    def _run(self) -> None:
        for i, m in enumerate(self.metas):
            with self.cv:
                while not self._may_produce(i, m.nbytes) and not self.stop:
                    self.cv.wait()
                if self.stop:
                    return
            try:
                item: tuple[bool, Any] = (True, self._summed(next(self.it), i))
            except BaseException as e:  # handed to the writer, raised there
                item = (False, e)
            with self.cv:
                self.ready[i] = item
                self.held[i] = 0 if hasattr(item[1], "parts") else m.nbytes
                self.cv.notify_all()
            if not item[0]:
                return
            del item

    def _summed(self, a: Any, i: int) -> Any:
        if i not in self.crc or hasattr(a, "parts"):
            return a
        import zlib

        data = _as_bytes(a, self.metas[i])
        return _Summed(data, zlib.crc32(data))

    def __iter__(self) -> _Ahead:
        return self

    def start(self) -> threading.Thread:
        """Start producing now (else on the first ``next``); the producing thread."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="statemap-produce", daemon=True)
            self.thread.start()
        return self.thread

    def __next__(self) -> Any:
        thread = self.start()
        work = getattr(_waiting, "work", None)
        with self.cv:
            k = self.requested = self.handed
            self.handed += 1
            self.cv.notify_all()
            while k not in self.ready:
                if not thread.is_alive() and k not in self.ready:
                    raise StopIteration
                if work is not None:  # the writer's own work while the producer is busy (_Waiting)
                    self.cv.release()
                    try:
                        more = work()
                    finally:
                        self.cv.acquire()
                    if more:
                        continue
                    work = None
                self.cv.wait(0.5)
            ok, value = self.ready.pop(k)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify_all()
        if self.thread is not None:  # after a failure, not for longer than a moment: the result is discarded
            self.thread.join(None if self.handed >= len(self.metas) else 2.0)


def shard_groups(metas: Sequence[TensorMeta], limit: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each at most ``limit`` bytes (a bigger tensor alone)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, m in enumerate(metas):
        if groups[-1] and size + m.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += m.nbytes
    return groups


_WRITING: list[Path] = []  # in a worker: the temporary file it is writing now


def _worker_init(parent: int) -> None:
    """Workers leave signals to the parent: Ctrl-C (SIGINT to the whole process group) and SIGHUP
    are ignored, so they print no traceback; the parent stops them with SIGTERM (Pool.terminate),
    which kills them, and then removes every temporary file. A worker whose parent is gone (killed
    by SIGKILL) removes the file it is writing and exits at once, silently (a write to the dead
    parent's pipe ends it by SIGPIPE instead of a traceback)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name, action in (("SIGHUP", signal.SIG_IGN), ("SIGXFSZ", signal.SIG_IGN), ("SIGPIPE", signal.SIG_DFL)):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), action)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        for tmp in list(_WRITING):
            with contextlib.suppress(OSError):
                tmp.unlink()
        os._exit(1)

    threading.Thread(target=watch, name="statemap-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _spawning() -> Iterator[None]:
    """Start worker (and multiprocessing's resource tracker) processes with SIGINT and SIGHUP blocked:
    the mask survives exec, so Ctrl-C or a closed terminal, which signal the whole process group,
    reach only the parent, which stops the workers and cleans up. Signals to the parent meanwhile
    wait and arrive right after."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    hold = [s for s in _BLOCK if s != signal.SIGTERM]
    old = signal.pthread_sigmask(signal.SIG_BLOCK, hold)
    try:
        with contextlib.suppress(Exception):
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()  # starting it unblocks SIGINT in this thread: block it again
        signal.pthread_sigmask(signal.SIG_BLOCK, hold)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _shard_task(
    job: tuple[Path, list[TensorMeta], list[int], dict[str, str], bool, Callable[[int], Any], int, list[Any] | None],
) -> int:
    """Worker: write one shard to its reserved temporary file; return its data bytes.

    Stops (and removes its file) when the parent is gone, e.g. killed by SIGKILL."""
    tmp, metas, idxs, md, fsync, get, parent, segments = job
    _WRITING[:] = [tmp]
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        order = copies_first(segments) or list(range(len(metas)))  # as _write_safetensors lays them out
        with _FullWriter(fd) as f:
            head = aligned_header([metas[k] for k in order], md, [segments[k] for k in order] if segments else None)
            kernel_copy.preallocate(f.fileno(), len(head) + sum(m.nbytes for m in metas))

            def alive() -> None:
                if os.getppid() != parent:
                    raise OutputError("the writing process is gone")

            total = _fill_safetensors(f.fileno(), head, metas, segments, lambda k: get(idxs[k]), fsync, alive)
    except BaseException:
        if os.getppid() != parent:  # nobody else will clean up
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    finally:
        _WRITING.clear()
    return total


def _write_safetensors_maybe_sharded(
    out: Path,
    stage: _Staging,
    metas: Sequence[TensorMeta],
    arrays: Iterator[Any],
    metadata: dict[str, str],
    limit: int | None,
    fsync: bool = True,
    workers: int = 1,
    get: Callable[[int], Any] | None = None,
    on_tensor: Callable[[TensorMeta], None] | None = None,
    segments: Sequence[Any] | None = None,
) -> int:
    """``on_tensor``: called for each tensor of a shard a worker has written (the workers path only;
    otherwise the caller counts the tensors it hands over in ``arrays``)."""
    from .load.safetensors_format import read_header

    md = {"format": "pt", **metadata}
    if not limit or sum(m.nbytes for m in metas) <= limit:
        return _write_safetensors(out, stage, metas, arrays, md, fsync, segments)
    groups = shard_groups(metas, limit)
    names = _shard_names(out, len(groups))
    total = 0
    if workers > 1 and get is not None and len(groups) > 1:
        import multiprocessing

        tmps = [stage.reserve(out.with_name(name)) for name in names]
        jobs = [
            (tmp, [metas[i] for i in idxs], idxs, md, fsync, get, os.getpid(), [segments[i] for i in idxs] if segments else None)
            for tmp, idxs in zip(tmps, groups)
        ]
        # spawn, not fork: a forked child can deadlock on locks held by the parent's threads
        with _spawning():
            pool = multiprocessing.get_context("spawn").Pool(
                min(workers, len(groups)), initializer=_worker_init, initargs=(os.getpid(),)
            )
        sizes = []
        with pool:
            for job, size in zip(jobs, pool.imap(_shard_task, jobs, chunksize=1)):  # in order, as each shard is done
                sizes.append(size)
                if on_tensor is not None:
                    for m in job[1]:
                        on_tensor(m)
        for tmp, idxs in zip(tmps, groups):  # re-read every shard header before anything is renamed
            got, _, _ = read_header(str(tmp))
            order = copies_first([segments[i] for i in idxs] if segments else None) or range(len(idxs))
            if [(g.name, g.shape, g.dtype) for g in got.values()] != [
                (metas[idxs[k]].name, metas[idxs[k]].shape, metas[idxs[k]].dtype) for k in order
            ]:
                raise OutputError(f"{out}: a written shard does not match the plan (bug); output removed")
        total = sum(sizes)
    else:
        for name, idxs in zip(names, groups):
            seg = [segments[i] for i in idxs] if segments else None
            total += _write_safetensors(out.with_name(name), stage, [metas[i] for i in idxs], arrays, md, fsync, seg)
    weight_map = {metas[i].name: name for name, idxs in zip(names, groups) for i in idxs}
    tmp, f = stage.open(_index_path(out))
    with f:
        f.write(json.dumps({"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}, indent=2).encode())
        if fsync:
            os.fsync(f.fileno())
    return total


def _zip_root(out: Path) -> str:
    """The folder name inside the zip: the file name without its extension, as torch.save names it."""
    stem = out.name.rpartition(".")[0] if "." in out.name else out.name
    return stem or "archive"


def _write_torch(
    out: Path,
    stage: _Staging,
    metas: Sequence[TensorMeta],
    arrays: Iterator[Any],
    ties: Sequence[Sequence[str]],
    fsync: bool = True,
    serialization_id: str | None = None,
) -> int:
    """torch.save's zip format, streamed: the pickle is written from the plan's metadata, then each
    storage (tied names share one) as a 64-byte-aligned stored entry, one tensor in memory at a time."""
    import zlib

    from .stream_formats import ZipEntry, central_directory, data_descriptor, local_header, storage_keys, torch_pickle

    keys, stored = storage_keys(metas, ties)
    is_stored = [False] * len(metas)
    for i in stored:
        is_stored[i] = True
    root = _zip_root(out).encode("utf-8")
    tmp, f = stage.open(out)
    entries: list[ZipEntry] = []
    pos = 0
    sources = kernel_copy.Sources()
    crcs = _SourceCRCs()
    wb = kernel_copy.Writeback(f.fileno(), fsync)
    kernel_copy.preallocate(f.fileno(), sum(metas[i].nbytes for i in stored))  # the storages; the zip records add a little
    total = 0

    def begin(name: str, size: int) -> ZipEntry:
        nonlocal pos
        e = ZipEntry(root + b"/" + name.encode("utf-8"), pos, size)
        head = local_header(e.name, pos, size)
        pos += f.write(head)
        entries.append(e)
        return e

    def end(e: ZipEntry) -> None:
        nonlocal pos
        pos += e.size + f.write(data_descriptor(e))

    def record(name: str, data: bytes) -> None:
        e = begin(name, len(data))
        f.write(data)
        e.crc = zlib.crc32(data)
        end(e)

    try:
        with f:
            record("data.pkl", torch_pickle(metas, keys))
            record(".format_version", b"1")
            record(".storage_alignment", b"64")
            record("byteorder", b"little")
            for i, m in enumerate(metas):
                a = next(arrays)
                if not is_stored[i]:
                    continue  # a tied name: its group's storage is written once
                e = begin(f"data/{keys[m.name]}", m.nbytes)
                n, e.crc = _write_crc(f, a, m, sources, crcs, wb)
                total += n
                end(e)
            record("version", b"3\n")
            record(".data/serialization_id", (serialization_id or _serialization_id()).encode())
            f.write(central_directory(entries, pos))
            if fsync:
                os.fsync(f.fileno())
    finally:
        sources.close()
    from .load import open_checkpoint

    with open_checkpoint(tmp, unwrap=(), strip_prefix=()) as ck:  # re-read with statemap's own reader
        if [(k, v.shape, v.dtype) for k, v in ck.metas.items()] != [(m.name, m.shape, m.dtype) for m in metas]:
            raise OutputError(f"{out}: written file does not match the plan (bug); output removed")
    return total


def _serialization_id() -> str:
    """40 random decimal digits, like the id torch.save records for each file it writes."""
    return str(int.from_bytes(os.urandom(17), "little")).zfill(40)[:40]


class _SourceCRCs:
    """CRC-32s of stored entries of zip inputs (a ``.pt`` source), read from their central
    directory, for a byte range that is exactly one whole entry's data: copying such a storage
    into a ``.pt`` output then needs no pass over its bytes.

    A CRC is used only when the entry is stored (not compressed), its local header sits right
    before the range (signature, name, sizes) and the CRC in the local header or the data
    descriptor after the data equals the central directory's. Anything else: None (the caller
    computes the CRC). Looked up lazily: one small read per candidate entry."""

    def __init__(self) -> None:
        self.by_size: dict[str, dict[int, list[Any]] | None] = {}

    def _entries(self, src: str) -> dict[int, list[Any]] | None:
        if src not in self.by_size:
            import zipfile

            table: dict[int, list[Any]] | None = None
            try:
                with zipfile.ZipFile(src) as z:
                    table = {}
                    for info in z.infolist():
                        if info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size:
                            table.setdefault(info.file_size, []).append(info)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
                table = None
            self.by_size[src] = table
        return self.by_size[src]

    def lookup(self, src: str, fd: int, off: int, n: int) -> int | None:
        """The CRC-32 of bytes ``off .. off + n`` of ``src`` if they are one whole stored entry."""
        table = self._entries(src)
        for info in (table or {}).get(n, ()):
            if not 0 < off - info.header_offset <= 30 + 2 * 0xFFFF:
                continue
            head = os.pread(fd, 30, info.header_offset)
            if len(head) < 30:
                continue
            sig, _, flags, method, _, _, crc, csize, usize, nlen, xlen = struct.unpack("<4sHHHHHIIIHH", head)
            if sig != b"PK\x03\x04" or method != 0 or info.header_offset + 30 + nlen + xlen != off:
                continue
            if os.pread(fd, nlen, info.header_offset + 30) != info.orig_filename.encode("utf-8" if flags & 0x800 else "cp437"):
                continue
            if flags & 0x08:  # sizes and CRC in a data descriptor right after the data
                desc = os.pread(fd, 8, off + n)
                if len(desc) < 8:
                    continue
                crc = struct.unpack("<I", desc[4:8] if desc[:4] == b"PK\x07\x08" else desc[:4])[0]
            elif csize != 0xFFFFFFFF and (csize != n or usize != n):
                continue
            if crc == info.CRC:
                return int(crc)
        return None


class _CRCThread:
    """The CRC-32 of file ranges, computed on a thread (reading the source in 8 MiB steps; zlib
    releases the GIL) while the kernel copies the same ranges into the output."""

    BUF = 8 << 20

    def __init__(self, parts: Sequence[tuple[str, int, int]]) -> None:
        self.parts = list(parts)
        self.crc = 0
        self.error: BaseException | None = None
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="statemap-crc", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import zlib

        try:
            buf = bytearray(min(self.BUF, max((n for _, _, n in self.parts), default=1)))
            view = memoryview(buf)
            crc = 0
            for src, off, n in self.parts:
                fd = os.open(src, os.O_RDONLY)
                try:
                    done = 0
                    while done < n and not self.stop:
                        k = os.preadv(fd, [view[: min(len(view), n - done)]], off + done)
                        if k <= 0:
                            raise OutputError(f"{src}: ended early while copying tensor bytes (file changed or truncated?)")
                        crc = zlib.crc32(view[:k], crc)
                        done += k
                finally:
                    os.close(fd)
            self.crc = crc
        except BaseException as e:  # raised in the writer by result()
            self.error = e

    def cancel(self) -> None:
        """Stop early (the copy failed) and wait for the thread."""
        self.stop = True
        self.thread.join()

    def result(self) -> int:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.crc


def _write_crc(
    f: Any, a: Any, want: TensorMeta, sources: kernel_copy.Sources, crcs: _SourceCRCs, wb: kernel_copy.Writeback | None = None
) -> tuple[int, int]:
    """Write one tensor's bytes (file ranges or an array) and return (bytes, CRC-32 of them).

    File ranges are copied in the kernel (:func:`statemap.kernel_copy.copy_range`); their CRC comes from the source's
    central directory when they are one whole stored entry of a zip input (checked against its
    local header), else it is computed on a thread while the kernel copies (reading through an
    8 MiB buffer, so memory stays bounded whatever their size)."""
    import zlib

    if hasattr(a, "parts"):
        if a.nbytes != want.nbytes:
            raise AssertionError(f"{want.name}: {a.nbytes} bytes planned as {want.nbytes}")
        parts = [p for p in a.parts if p[2]]
        known = crcs.lookup(parts[0][0], sources.fd(parts[0][0]), parts[0][1], parts[0][2]) if len(parts) == 1 else None
        if not parts:
            known = 0
        job = _CRCThread(parts) if known is None else None
        try:
            for src, off, n in parts:
                kernel_copy.copy_range(f.fileno(), sources, src, off, n, wb)
        except BaseException:
            if job is not None:
                job.cancel()
            raise
        crc = job.result() if job is not None else known
        assert crc is not None
        return int(a.nbytes), crc
    if isinstance(a, _Summed):  # bytes and CRC-32 taken by the producer thread (see _Ahead)
        data, crc = a.data, a.crc
    else:
        data = _as_bytes(a, want)
        crc = zlib.crc32(data)
    f.write(data)
    if wb is not None:
        wb.kick()
    return len(data), crc


def _as_bytes(a: Any, want: TensorMeta) -> Any:
    """An array's bytes in ``want``'s dtype, C order, checked against the planned shape
    (:class:`~statemap.apply.Zeros`: that many zero bytes, without numpy)."""
    if isinstance(a, Zeros):
        if a.nbytes != want.nbytes:
            raise AssertionError(f"{want.name}: writing {a.nbytes} zero bytes, planned {want.nbytes}")
        return bytes(a.nbytes)
    import numpy as np

    dt = lookup_dtype(want.dtype)
    if a.dtype != dt.np:
        a = a.astype(dt.np)
    a = np.asarray(a, order="C")
    if tuple(a.shape) != want.shape:
        raise AssertionError(f"{want.name}: writing {a.shape}, planned {want.shape}")
    return memoryview(a).cast("B") if a.size else b""


def _sub_ranges(parts: Iterable[tuple[str, int, int]], start: int, length: int) -> Iterator[tuple[str, int, int]]:
    """The file ranges holding bytes ``start .. start + length`` of the concatenation of ``parts``."""
    for f, off, n in parts:
        if length <= 0:
            return
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        yield f, off + start, take
        length -= take
        start = 0


def _write_flax(out: Path, stage: _Staging, metas: Sequence[TensorMeta], arrays: Iterator[Any], fsync: bool) -> int:
    """Flax msgpack, streamed: headers computed from the plan, tensor bytes written between them.

    The file holds each module's members together; tensors arriving in another order wait in
    memory until their turn (:func:`statemap.api.convert` produces them in file order)."""
    from .stream_formats import flax_layout

    pending: dict[int, Any] = {}
    produced = 0
    left = [m.nbytes for m in metas]
    literals: list[tuple[int, bytes]] = []
    pos = 0
    sources = kernel_copy.Sources()
    tmp, f = stage.open(out)
    wb = kernel_copy.Writeback(f.fileno(), fsync)
    kernel_copy.preallocate(f.fileno(), sum(m.nbytes for m in metas))  # the tensors; the msgpack headers add a little
    try:
        with f:
            for piece in flax_layout(metas):
                if piece.index < 0:
                    literals.append((pos, piece.data))
                    pos += f.write(piece.data)
                    continue
                while piece.index not in pending:
                    pending[produced] = next(arrays)
                    produced += 1
                a = pending[piece.index]
                if hasattr(a, "parts"):
                    if a.nbytes != metas[piece.index].nbytes:
                        raise AssertionError(
                            f"{metas[piece.index].name}: {a.nbytes} bytes planned as {metas[piece.index].nbytes}"
                        )
                    for src, off, n in _sub_ranges(a.parts, piece.start, piece.length):
                        kernel_copy.copy_range(f.fileno(), sources, src, off, n, wb)
                else:
                    data = _as_bytes(a, metas[piece.index])
                    f.write(data[piece.start : piece.start + piece.length])
                    wb.kick()
                pos += piece.length
                left[piece.index] -= piece.length
                if not left[piece.index]:
                    del pending[piece.index]
            while produced < len(metas):  # every planned tensor is consumed (the count is checked)
                next(arrays)
                produced += 1
            if fsync:
                os.fsync(f.fileno())
    finally:
        sources.close()
    # re-read: the file has exactly the planned size, and every header where the layout put it
    with open(tmp, "rb") as r:
        if os.fstat(r.fileno()).st_size != pos:
            raise OutputError(f"{out}: written file does not match the plan (bug); output removed")
        for at, data in literals:
            r.seek(at)
            if r.read(len(data)) != data:
                raise OutputError(f"{out}: written file does not match the plan (bug); output removed")
    return sum(m.nbytes for m in metas)
