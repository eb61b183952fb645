"""Log injection (issue 11 item 8): a peer's text cannot forge log lines or drive a terminal.

The formats are checked in a subprocess that calls setup_logging exactly as the router's
processes do, and reads back what reaches stderr.
"""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from fastroute.logsetup import JsonFormatter, TextFormatter, escape_control

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = "EVIL\nFAKE 2026 ERROR"
HOSTILE = "A\r\x1b[2J\x9b31m\x7f\x00\u2028Z"  # CR, ESC CSI, C1 CSI, DEL, NUL, LS

SCRIPT = r"""
import json, logging, sys
from fastroute.logsetup import setup_logging
sys.argv[2:] = [json.loads(arg) for arg in sys.argv[2:]]  # NUL cannot travel in argv
setup_logging("INFO", sys.argv[1], process="listener-0")
log = logging.getLogger("fastroute.scp")
log.warning("association from %s refused: calling AE %r", sys.argv[2], sys.argv[2])
log.warning("store from %(ae)s failed: %(comment)s", {"ae": sys.argv[3], "comment": sys.argv[2]})
log.error(ValueError(sys.argv[3]))
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("C-STORE from %s raised", sys.argv[2])
"""


def run(fmt: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, fmt, json.dumps(EVIL),
                           json.dumps(HOSTILE)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    return proc.stderr


def assert_clean(text: str) -> None:
    """No control character but the newlines that end records (and tracebacks' lines)."""
    assert not any(ch != "\n" and (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F
                                   or ch in "\u2028\u2029") for ch in text), repr(text)


def test_text_format_one_line_per_record() -> None:
    out = run("text")
    assert_clean(out)
    lines = out.splitlines()
    # 3 one-line records, then the exception record: its line and a normal traceback
    assert [line.split()[2:4] for line in lines[:4]] == [["WARNING", "listener-0"]] * 2 + [
        ["ERROR", "listener-0"]] * 2
    assert lines[0].endswith(r"association from EVIL\nFAKE 2026 ERROR refused: calling AE "
                             r"'EVIL\nFAKE 2026 ERROR'")
    assert lines[1].endswith(r"store from A\r\x1b[2J\x9b31m\x7f\x00\u2028Z failed: "
                             r"EVIL\nFAKE 2026 ERROR")
    assert lines[2].endswith(r"fastroute.scp: A\r\x1b[2J\x9b31m\x7f\x00\u2028Z")
    assert lines[3].endswith(r"C-STORE from EVIL\nFAKE 2026 ERROR raised")
    assert lines[4] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"
    assert lines[5].startswith("  File ") and len(lines) == 7  # (-c: no source line)
    assert not any(line.startswith("FAKE") for line in lines)


def test_json_format_one_object_per_line() -> None:
    out = run("json")
    assert_clean(out)
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 4
    assert docs[0]["message"] == ("association from EVIL\\nFAKE 2026 ERROR refused: "
                                  "calling AE 'EVIL\\nFAKE 2026 ERROR'")
    assert docs[1]["message"] == ("store from A\\r\\x1b[2J\\x9b31m\\x7f\\x00\\u2028Z failed: "
                                  "EVIL\\nFAKE 2026 ERROR")
    assert all(doc["process"] == "listener-0" for doc in docs)
    trace = docs[3]["exception"].splitlines()
    assert trace[0] == "Traceback (most recent call last):" and trace[-1] == "RuntimeError: boom"


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain AE", "plain AE"), ("a\nb", r"a\nb"), ("a\r\nb", r"a\r\nb"), ("\t", r"\t"),
    ("\x1b[31m", r"\x1b[31m"), ("\x00\x07\x7f", r"\x00\x07\x7f"), ("\x85\x9b", r"\x85\x9b"),
    ("\u2028\u2029", r"\u2028\u2029"), ("é ü 山田^太郎 \\ ", "é ü 山田^太郎 \\ "),
])
def test_escape_control(raw: str, shown: str) -> None:
    assert escape_control(raw) == shown
    assert escape_control("x\ny\x1b", keep_newlines=True) == "x\ny\\x1b"


def test_record_is_left_as_logged() -> None:
    """Other handlers (and caplog) still see the original message and arguments."""
    seen: list[logging.LogRecord] = []
    stream = io.StringIO()
    logger = logging.getLogger("fastroute.test.logsetup")
    logger.propagate = False
    text = logging.StreamHandler(stream)
    text.setFormatter(TextFormatter("%(message)s"))
    as_json = logging.StreamHandler(stream)
    as_json.setFormatter(JsonFormatter("p"))
    keep = logging.Handler()
    keep.emit = seen.append  # type: ignore[method-assign,assignment]
    for handler in (text, as_json, keep):
        logger.addHandler(handler)
    try:
        logger.warning("from %s", EVIL)
    finally:
        for handler in (text, as_json, keep):
            logger.removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    assert first == r"from EVIL\nFAKE 2026 ERROR"
    assert json.loads(second)["message"] == first
    assert seen[0].msg == "from %s" and seen[0].args == (EVIL,)
    assert seen[0].getMessage() == f"from {EVIL}"
