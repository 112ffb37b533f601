"""Cyclic garbage collection paused while metadata for many keys is built.

Reading a 200k-key index or planning over it allocates millions of small, long-lived objects
(parsed JSON, metas, plan entries) and no reference cycles. CPython's collector would traverse
them again and again as they pile up (most of the wall time of ``inspect`` on such an index).
:func:`paused` switches it off for the block and, on the way out, moves what survived to the
permanent generation (``gc.freeze``, only after a block that built many objects, and only in
the ``statemap`` command's own process) so later collections skip it too; objects that become
garbage later are still freed by reference counting. A library call never freezes: ``gc.freeze``
acts on every object of the process, the host application's included, whose cyclic garbage would
then never be collected.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from .process import is_command_process

__all__ = ["paused"]


@contextmanager
def paused() -> Iterator[None]:
    """Pause cyclic garbage collection for the block (nested blocks are free).

    Example::

        >>> with paused():
        ...     metas = {f"k{i}": (i,) for i in range(3)}
    """
    if not gc.isenabled():  # nested, or the caller disabled it: leave it as it is
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if is_command_process() and gc.get_count()[0] > FREEZE_AFTER:
            gc.freeze()
        gc.enable()


FREEZE_AFTER = 100_000  # objects allocated in the block (counted while paused) worth freezing
