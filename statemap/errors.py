"""One exception root for everything statemap reports to a user.

Every message names *where* (a file, ``file:line`` of a spec, a rule or a key)
and, where there is one, *what to do about it*.
"""

from __future__ import annotations


class StatemapError(Exception):
    """Root of every error statemap raises on purpose. The CLI exits 2 on it."""


class SpecError(StatemapError):
    """A mapping spec is malformed: bad YAML, unknown field, unknown op, bad template."""


class PlanError(StatemapError):
    """A spec does not fit a checkpoint: a rule matched nothing, shapes do not divide, ..."""


class CheckpointError(StatemapError):
    """A checkpoint cannot be read: missing, truncated, corrupt, or not a state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to run code (a pickle naming ``os.system`` and the like); refused."""


class OutputError(StatemapError):
    """An output cannot be written: it exists (use ``--force``), it is an input, disk full, ..."""


class AssumptionError(PlanError):
    """A fact a spec relies on (``assume:``) does not hold for this checkpoint; nothing is written."""
