"""Logging handlers for the application (the library itself only has a NullHandler).

Both formats write one record per line, whatever a peer sends: AE titles, UIDs and error
comments reach the log as arguments, and a newline or an escape sequence in them would
forge a line or drive the terminal tailing the log (issue 11 item 8). The formatters escape
control characters in the formatted message, once, here, so no call site has to.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["JsonFormatter", "TextFormatter", "escape_control", "setup_logging"]

# C0 controls, DEL, C1 controls (0x9B is a one-byte CSI), and Unicode's line/paragraph
# separators, which some viewers break lines on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _replace(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str, keep_newlines: bool = False) -> str:
    r"""`text` with control characters shown as ``\n``, ``\r``, ``\t`` or ``\xNN``.

    A backslash is left as it is: the escapes only need to stop forged lines and terminal
    control, not to be reversible. `keep_newlines` keeps ``\n`` (for tracebacks).
    """
    if _CONTROL.search(text) is None:  # the common case: no copy
        return text
    if keep_newlines:
        return "\n".join(_CONTROL.sub(_replace, part) for part in text.split("\n"))
    return _CONTROL.sub(_replace, text)


def _safe_message(record: logging.LogRecord) -> str:
    """The record's message, escaped: its arguments, and a message built by hand too."""
    return escape_control(record.getMessage())


class TextFormatter(logging.Formatter):
    """The text format, with the message escaped; tracebacks keep their line breaks."""

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        record.msg, record.args = _safe_message(record), None
        try:
            return super().format(record)
        finally:  # other handlers (and tests' caplog) see the record as it was logged
            record.msg, record.args = msg, args

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return escape_control(super().formatException(ei), keep_newlines=True)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers.

    json.dumps escapes C0 controls itself, but with ensure_ascii=False it passes DEL and the
    C1 controls through; the message is escaped like the text format's, so both read alike.
    """

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "process": self.process,
            "pid": record.process, "message": _safe_message(record),
        }
        if record.exc_info:
            doc["exception"] = escape_control(self.formatException(record.exc_info),
                                              keep_newlines=True)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text", process: str = "main") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(TextFormatter(
            f"%(asctime)s %(levelname)-7s {process} %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
