"""Process-wide tuning that only the ``statemap`` command's own process may do.

A library call shares its process with the host application: it must not change what the host
sees (``gc.freeze`` of every object, the BLAS thread count). The command line owns its process
and marks it at start (:func:`mark_command_process`); modules ask :func:`is_command_process`.

Example::

    >>> is_command_process()  # a Python call, not the statemap command
    False
"""

from __future__ import annotations

import os
import sys

__all__ = ["is_command_process", "mark_command_process", "one_blas_thread"]

_command = False


def mark_command_process() -> None:
    """Called once by the ``statemap`` command (never by a library call)."""
    global _command
    _command = True


def is_command_process() -> bool:
    """True in the ``statemap`` command's own process."""
    return _command


def one_blas_thread() -> None:
    """In the ``statemap`` command's own process, before numpy is imported: OpenBLAS on one thread.
    By default OpenBLAS starts a thread per core when numpy is imported, and they spin for a while
    after each call (~0.05-0.1 s of CPU measured here), taking cores from statemap's own threads
    (writing multiplies no matrices; ``diff --values`` hashes on two threads of its own). A value
    the user set is kept; a library call, or a process that imported numpy already, is left as is."""
    if is_command_process() and "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
