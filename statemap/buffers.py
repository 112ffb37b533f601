"""buffers: byte buffers reused once nothing refers to them.

A fresh allocation per tensor makes the kernel fault in and zero every page again (several
tensors alive at once keep glibc from reusing freed ones); a pooled buffer is already mapped. A
buffer is free again when CPython's reference count says only the pool holds it: no array or
view made from it is alive, so reusing it cannot change an array someone still holds. Used by
reads under :func:`statemap.load.checkpoint.reuse_buffers` and by a conversion's transposes
(:class:`statemap.xpose.OutputPool`). numpy is imported lazily.

Example::

    >>> pool = BufferPool(limit=2)
    >>> a = pool.take(1000)
    >>> a.nbytes, a.dtype.name
    (1000, 'uint8')
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BufferPool", "free_refcount"]


@functools.cache
def free_refcount() -> int:
    """What ``sys.getrefcount(a_list[i])`` says of an array nothing but the list refers to, measured
    on this interpreter rather than assumed (the count of getrefcount's own argument differs between
    Python versions: 3.14 may borrow it). Anything else means an array made from it is alive."""
    import numpy as np

    bufs = [np.empty(1, dtype=np.uint8)]
    return sys.getrefcount(bufs[0])


class BufferPool:
    """At most ``limit`` byte buffers, each handed out again once free (see the module). A buffer
    serves a request of half its size or more (a small request does not pin a large buffer); the
    smallest that fits is taken. Else a new buffer is made and kept, replacing the smallest free one
    when the pool is full; when every kept buffer is in use, :meth:`take` allocates as without a
    pool. Memory in use is what the callers hold plus the free buffers. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bufs: list[Any] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """An uninitialised uint8 array of ``nbytes``, a view of a pooled buffer when one is free."""
        import numpy as np

        with self.lock:
            free_count = free_refcount()
            best, free = -1, []
            for i in range(len(self.bufs)):
                if sys.getrefcount(self.bufs[i]) == free_count:  # nothing but the list refers to it
                    free.append(i)
                    size = self.bufs[i].nbytes
                    if nbytes <= size <= 2 * nbytes and (best < 0 or size < self.bufs[best].nbytes):
                        best = i
            if best >= 0:
                return self.bufs[best][:nbytes]
            buf = np.empty(nbytes, dtype=np.uint8)
            if len(self.bufs) >= self.limit and free:  # no free one fits: the smallest free one is replaced
                del self.bufs[min(free, key=lambda i: self.bufs[i].nbytes)]
            if len(self.bufs) < self.limit:
                self.bufs.append(buf)
            return buf[:nbytes]

    def trim(self) -> None:
        """Drop the free buffers."""
        with self.lock:
            free_count = free_refcount()
            self.bufs = [self.bufs[i] for i in range(len(self.bufs)) if sys.getrefcount(self.bufs[i]) != free_count]
