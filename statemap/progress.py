"""progress: how far a long step is, for whoever shows it (the CLI, on a terminal); silent otherwise.

The library announces its long steps (writing an output, reading two checkpoints for
``diff --values``, building an ``hf:`` model) with :func:`task`; nothing is shown unless a
reporter is installed with :func:`reporting`. The CLI installs :class:`RichReporter` only when
stderr is a terminal and neither ``--json`` nor ``-q`` is given, so scripts, pipes and logs
never see a progress bar.

Example::

    >>> with task("writing", tensors=2, nbytes=8) as t:
    ...     t.advance(nbytes=4)
    ...     t.advance(nbytes=4)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol


class Task(Protocol):
    def advance(self, tensors: int = 1, nbytes: int = 0) -> None: ...


class Reporter(Protocol):
    def task(self, label: str, tensors: int | None, nbytes: int | None) -> Any:
        """A context manager yielding a :class:`Task`."""
        ...


class _Silent:
    def advance(self, tensors: int = 1, nbytes: int = 0) -> None:
        pass


_REPORTER: ContextVar[Reporter | None] = ContextVar("statemap_progress", default=None)


@contextmanager
def task(label: str, tensors: int | None = None, nbytes: int | None = None) -> Iterator[Task]:
    """A long step of ``tensors`` tensors / ``nbytes`` bytes (None: unknown, a spinner is shown)."""
    reporter = _REPORTER.get()
    if reporter is None:
        yield _Silent()
        return
    with reporter.task(label, tensors, nbytes) as t:
        yield t


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Show the progress of every :func:`task` inside this block with ``reporter``."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)


class RichReporter:
    """Progress bars on a rich console (stderr): tensors done / total, bytes, rate and time left."""

    def __init__(self, console: Any) -> None:
        self.console = console

    @contextmanager
    def task(self, label: str, tensors: int | None, nbytes: int | None) -> Iterator[Task]:
        from rich.markup import escape
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from .textsafe import show

        label = escape(show(label, 80))
        if nbytes is None:  # nothing to count: a spinner with a label and the time so far
            columns: tuple[Any, ...] = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        else:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[done]}/{task.fields[of]} tensors"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
        with Progress(*columns, console=self.console, transient=True) as progress:
            tid = progress.add_task(label, total=nbytes, done=0, of=tensors if tensors is not None else "?")

            class _Bar:
                done = 0

                def advance(self, tensors: int = 1, nbytes: int = 0) -> None:
                    self.done += tensors
                    progress.update(tid, advance=nbytes, done=self.done)

            yield _Bar()


__all__ = ["RichReporter", "Task", "reporting", "task"]
