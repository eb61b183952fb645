"""Logging handlers for the application (the library itself only has a NullHandler).

Both formats write one record per line, whatever a peer sends: AE titles, UIDs and error
comments reach the log as arguments, and a newline or an escape sequence in them would
forge a line or drive the terminal tailing the log (issue 11 item 8). The formatters escape
control characters in the formatted message, once, here, so no call site has to.

Events carry their subjects as fields (issue 12 item 5): a call site passes
``extra=fields(destination=..., sop_uid=...)`` and the JSON format adds each of :data:`FIELDS`
that a record has as a key of its own (escaped like the message), so a log shipper can filter on
a Study Instance UID without parsing prose. Call sites adopt it one by one; the text format
keeps the message as written (which names the same values) and gets an ISO 8601 time with offset.
"""
from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time
from typing import Any

__all__ = ["FIELDS", "JsonFormatter", "TextFormatter", "escape_control", "fields", "set_process_title",
           "setup_logging"]

# The event fields the JSON format lifts from a record's ``extra=`` into keys of their own.
FIELDS = ("destination", "calling_ae", "called_ae", "peer", "study_uid", "sop_uid", "status", "oid")

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


def fields(*, destination: str | None = None, calling_ae: str | None = None, called_ae: str | None = None,
           peer: str | None = None, study_uid: str | None = None, sop_uid: str | None = None,
           status: int | None = None, oid: int | None = None) -> dict[str, Any]:
    """``extra=`` for a log call: typed keyword arguments, so a misspelt field fails mypy
    instead of silently becoming a key no query finds. None values are left out."""
    given = {"destination": destination, "calling_ae": calling_ae, "called_ae": called_ae, "peer": peer,
             "study_uid": study_uid, "sop_uid": sop_uid, "status": status, "oid": oid}
    return {k: v for k, v in given.items() if v is not None}


def _field_value(value: Any) -> Any:
    """A field as JSON: numbers stay numbers, anything else is escaped text."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    return escape_control(value if isinstance(value, str) else str(value))


class TextFormatter(logging.Formatter):
    """The text format, with the message escaped; tracebacks keep their line breaks.

    Times are ISO 8601 with the local offset (``2026-12-05T23:02:02.123+01:00``): a log read in
    another zone, or across a DST change, still orders and compares correctly."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created).astimezone()
        return stamp.isoformat(timespec="milliseconds")

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
    The event :data:`FIELDS` a call site passed with ``extra=`` become keys, escaped the same way.
    """

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "process": self.process,
            "pid": record.process, "message": _safe_message(record),
        }
        attrs = record.__dict__
        for name in FIELDS:
            if name in attrs and attrs[name] is not None:
                doc[name] = _field_value(attrs[name])
        if record.exc_info:
            doc["exception"] = escape_control(self.formatException(record.exc_info),
                                              keep_newlines=True)
        return json.dumps(doc, ensure_ascii=False)


def set_process_title(role: str) -> None:
    """Show the process's role in ``ps``/``top`` (``fastroute: listener-0``): every child is a
    ``python`` otherwise, and an operator killing or profiling one cannot tell which it is."""
    import setproctitle

    setproctitle.setproctitle(f"fastroute: {role}")


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
