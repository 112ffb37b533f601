"""Process-wide tuning that only the ``statemap`` command's own process may do.

A library call shares its process with the host application: it must not change what the host
sees (``gc.freeze`` of every object, the BLAS thread count). The command line owns its process
and marks it at start (:func:`mark_command_process`); modules ask :func:`is_command_process`.

Example::

    >>> is_command_process()  # a Python call, not the statemap command
    False
"""

from __future__ import annotations

__all__ = ["is_command_process", "mark_command_process"]

_command = False


def mark_command_process() -> None:
    """Called once by the ``statemap`` command (never by a library call)."""
    global _command
    _command = True


def is_command_process() -> bool:
    """True in the ``statemap`` command's own process."""
    return _command
