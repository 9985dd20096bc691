"""Sender-controlled text made safe for one log line or one cell of the terminal board.

    _log.warning("[%s] %s", printable(run_id), printable(event.message))

A run id, a host name or a config value comes from whoever can reach the collector. Raw,
a newline in one forges a log line, a NUL or an escape sequence garbles a terminal, and a
bidi override (U+202E) makes a line read backwards. ``printable`` escapes every character
Python does not call printable (controls, format characters such as bidi and zero-width
marks, line and paragraph separators, unassigned code points) as ``\\n``, ``\\r``,
``\\t``, ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``, and doubles a backslash, so the
escaped form reads back unambiguously.
"""

from __future__ import annotations

import logging

__all__ = ["SafeFormatter", "printable"]


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _SHORT:
        return _SHORT[c]
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def printable(text: object) -> str:
    """``text`` as one line of visible characters (see the module docstring)."""
    s = text if type(text) is str else str(text)
    if s.isprintable() and "\\" not in s:  # nearly always: one C-speed pass
        return s
    return "".join("\\\\" if c == "\\" else c if c.isprintable() else _escape(c) for c in s)


def _controls_escaped(s: str) -> str:
    """What ``printable`` does, except to backslashes: safe to apply to its output again."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _escape(c) for c in s)


class SafeFormatter(logging.Formatter):
    """A formatter whose message part is always one line of visible characters.

    Call sites escape what a sender controls with ``printable``; this is the net under
    them (and under messages of libraries), so no log line can be forged from outside.
    A traceback keeps its own lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        msg = record.message
        safe = _controls_escaped(msg)
        if safe is msg:
            return super().formatMessage(record)
        clone = logging.makeLogRecord(record.__dict__)
        clone.message = safe
        return super().formatMessage(clone)
