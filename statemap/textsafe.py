"""Showing text that came from a file or a spec: as text, never as markup or terminal control.

Tensor names, metadata values, paths and spec strings are chosen by whoever wrote the file.
Printed as they are they could carry rich markup (``enc.[/bold].w`` crashed the report), or
terminal escapes (``\\x1b]0;...`` retitles the window, ``\\x1b[2J`` clears it). Every console
statemap prints through is a :func:`console` (markup, emoji and highlighting off, every
string passed through :func:`show`), and every error line goes through :func:`show` too.

Example::

    >>> show("enc.\\x1b[31m.w")
    'enc.\\\\x1b[31m.w'
"""

from __future__ import annotations

from typing import Any

MAX_SHOWN = 2000  # characters of one file-controlled string shown in a message or a table cell


def show(value: object, limit: int | None = MAX_SHOWN) -> str:
    """``value`` as one line of plain text: non-printable characters escaped, long text cut.

    Newlines, tabs, escape sequences, bidi overrides and other invisible characters become
    ``\\n`` / ``\\x1b`` / ``\\u202e``; text longer than ``limit`` characters is cut in the middle
    *before* anything else is done with it (the start names the file, the end says the problem).
    """
    s = value if isinstance(value, str) else _str(value)
    if limit is not None and len(s) > limit:  # keep both ends: a message names the file first, the problem last
        half = limit // 2
        return f"{_printable(s[:half])}...({len(s) - 2 * half:,} characters cut)...{_printable(s[-half:])}"
    return _printable(s)


def _printable(s: str) -> str:
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _escape(c) for c in s)


def _str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a hostile object's __str__; show its type instead
        return f"<{type(value).__name__}>"


def _escape(c: str) -> str:
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    if c == "\r":
        return "\\r"
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def short_repr(value: object, limit: int = 200) -> str:
    """``repr`` of a value for a message, computed on a cut-down copy so huge values cost nothing."""
    if isinstance(value, (str, bytes, bytearray)):
        r = repr(value[: limit + 1])
        if len(value) > limit:
            r = r[: limit + 2] + f"...({len(value):,} long)"
        return show(r, None)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 640:
        return f"<an integer of {value.bit_length():,} bits>"
    if isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > 20:
        return f"<a {type(value).__name__} of {len(value):,} items>"
    try:
        r = repr(value)
    except Exception:  # noqa: BLE001 - hostile or huge nested value
        r = f"<{type(value).__name__}>"
    return show(r, limit)


PIPE_WIDTH = 1_000_000  # "columns" of a console that is not a terminal: lines are never wrapped


def console(quiet: bool = False, **kwargs: Any) -> Any:
    """A rich Console that renders every string as plain text (see the module docstring).

    Styles are given with ``style=`` or :func:`styled`, never with markup. On a terminal, rich
    fits tables to its width; anywhere else (a pipe, a file, a log) nothing is ever wrapped: a
    table row or a path stays on one line, so ``grep`` and log readers see whole lines.
    """
    from rich.console import Console

    class _SafeConsole(Console):
        def render_str(self, text: str, *args: Any, **kw: Any) -> Any:
            kw["markup"] = False
            kw["emoji"] = False
            kw["highlight"] = False
            return super().render_str(show(text), *args, **kw)

        def _render_buffer(self, buffer: Any) -> str:
            text = super()._render_buffer(buffer)
            if self.width == PIPE_WIDTH:  # not a terminal: no cell padding at the end of a line
                text = "\n".join(line.rstrip(" ") for line in text.split("\n"))
            return text

    c = _SafeConsole(quiet=quiet, markup=False, emoji=False, highlight=False, **kwargs)
    if "width" not in kwargs and not c.is_terminal:
        c.width = PIPE_WIDTH
        c.soft_wrap = True
    return c


def styled(*parts: str | tuple[str, str]) -> Any:
    """A rich Text from plain parts and ``(text, style)`` parts, each passed through :func:`show`."""
    from rich.text import Text

    out = Text()
    for p in parts:
        if isinstance(p, tuple):
            out.append(show(p[0]), style=p[1])
        else:
            out.append(show(p))
    return out


__all__ = ["MAX_SHOWN", "PIPE_WIDTH", "console", "short_repr", "show", "styled"]
