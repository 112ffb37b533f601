"""Input files are regular files: refuse FIFOs, devices and sockets by type, before reading.

A FIFO named ``model.safetensors`` blocks a reader forever; a symlink to ``/dev/zero`` named
``spec.yaml`` feeds it bytes without end. :func:`check_regular` looks at what a path *is*
(following symlinks) without opening it; :func:`read_regular` opens without blocking, checks
the open file itself (so a path swapped after the check is caught too) and reads at most
``limit`` bytes.

Example::

    >>> check_regular("spec.yaml", "spec")            # a regular file: returns its size
    45
    >>> check_regular("/dev/zero", "spec")
    Traceback (most recent call last):
    statemap.errors.CheckpointError: /dev/zero: spec is a character device, not a regular file; refusing to read it
"""

from __future__ import annotations

import os
import stat

from .errors import CheckpointError, StatemapError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike[str], what: str = "file", error: type[StatemapError] = CheckpointError) -> int:
    """Raise ``error`` unless ``path`` is a regular file (after symlinks); return its size."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"{os.fspath(path)}: cannot read {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{os.fspath(path)}: {what} is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    return st.st_size


def read_regular(
    path: str | os.PathLike[str], limit: int, what: str = "file", error: type[StatemapError] = CheckpointError
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``error`` otherwise (never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{os.fspath(path)}: cannot read {what}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{os.fspath(path)}: {what} is {_kind(st.st_mode)}, not a regular file; refusing to read it")
        if st.st_size > limit:
            raise error(f"{os.fspath(path)}: {what} is larger than {limit:,} bytes ({st.st_size:,}); refusing to read it")
        chunks: list[bytes] = []
        total = 0
        while True:
            b = os.read(fd, min(1 << 20, limit + 1 - total))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > limit:
                raise error(f"{os.fspath(path)}: {what} is larger than {limit:,} bytes; refusing to read it")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{os.fspath(path)}: cannot read {what}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def write_text_new(
    path: str | os.PathLike[str], text: str, force: bool = False, error: type[StatemapError] = StatemapError
) -> None:
    """Write ``text`` to ``path`` whole or not at all; never over an existing file unless ``force``.

    The text goes to a uniquely named temporary file beside ``path`` (``O_EXCL``: two runs never
    share one), is flushed, and is then linked into place (refused if ``path`` appeared meanwhile)
    or, with ``force``, renamed over it.

    Example::

        >>> write_text_new("draft.yaml", "version: 1\\n")
        >>> write_text_new("draft.yaml", "version: 1\\n")
        Traceback (most recent call last):
        statemap.errors.StatemapError: draft.yaml: already exists; pass --force to replace it
    """
    import tempfile

    out = os.fspath(path)
    if os.path.lexists(out) and not force:
        raise error(f"{out}: already exists; pass --force to replace it")
    folder = os.path.dirname(out) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".statemap.tmp", dir=folder)
    except OSError as e:
        raise error(f"{out}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails if `out` appeared since the check: nothing replaced
            except FileExistsError:
                raise error(f"{out}: already exists; pass --force to replace it") from None
    except OSError as e:
        raise error(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["check_regular", "read_regular", "write_text_new"]
