"""Logs: a peer's text cannot forge log lines or drive a terminal (issue 11 item 8); events
carry their fields as JSON keys, text times carry a zone, processes name their role in ps, and
the banner is JSON too (issue 12 item 5).

The formats are checked in a subprocess that calls setup_logging exactly as the router's
processes do, and reads back what reaches stderr.
"""
from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastroute.logsetup import FIELDS, JsonFormatter, TextFormatter, escape_control, fields

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
""" + r"""
from fastroute.logsetup import fields
log.warning("C-STORE failed", extra=fields(destination="pacs", calling_ae=sys.argv[3], called_ae="ROUTER",
            peer="10.0.0.5:104", study_uid="1.2.3", sop_uid=sys.argv[2], status=0xA700, oid=42,
            worker="sender-pacs"))
"""


def run(fmt: str, tz: str = "UTC") -> str:
    env = dict(os.environ, PYTHONPATH=REPO, TZ=tz)
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
    assert [line.split()[1:3] for line in lines[:4]] == [["WARNING", "listener-0"]] * 2 + [
        ["ERROR", "listener-0"]] * 2
    assert lines[0].endswith(r"association from EVIL\nFAKE 2026 ERROR refused: calling AE "
                             r"'EVIL\nFAKE 2026 ERROR'")
    assert lines[1].endswith(r"store from A\r\x1b[2J\x9b31m\x7f\x00\u2028Z failed: "
                             r"EVIL\nFAKE 2026 ERROR")
    assert lines[2].endswith(r"fastroute.scp: A\r\x1b[2J\x9b31m\x7f\x00\u2028Z")
    assert lines[3].endswith(r"C-STORE from EVIL\nFAKE 2026 ERROR raised")
    assert lines[4] == "Traceback (most recent call last):"
    assert lines[6] == "RuntimeError: boom"
    assert lines[5].startswith("  File ") and len(lines) == 8  # (-c: no source line)
    assert lines[7].endswith("fastroute.scp: C-STORE failed")   # fields are for JSON; text as written
    assert not any(line.startswith("FAKE") for line in lines)


@pytest.mark.parametrize(("tz", "offset"), [("UTC", r"\+00:00"), ("Asia/Kolkata", r"\+05:30"),
                                            ("America/St_Johns", r"-0[23]:30")])
def test_text_time_carries_its_zone(tz: str, offset: str) -> None:
    """ISO 8601 with the local offset: lines from routers in different zones still compare."""
    before = time.time()
    stamp = run("text", tz).splitlines()[0].split()[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}" + offset, stamp), stamp
    parsed = datetime.datetime.fromisoformat(stamp).timestamp()
    assert before - 1 <= parsed <= time.time() + 1   # the offset is the true one, not a label


def test_json_format_one_object_per_line() -> None:
    out = run("json")
    assert_clean(out)
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 5
    assert not set(FIELDS) & set(docs[0])   # no fields given, none invented
    assert docs[0]["message"] == ("association from EVIL\\nFAKE 2026 ERROR refused: "
                                  "calling AE 'EVIL\\nFAKE 2026 ERROR'")
    assert docs[1]["message"] == ("store from A\\r\\x1b[2J\\x9b31m\\x7f\\x00\\u2028Z failed: "
                                  "EVIL\\nFAKE 2026 ERROR")
    assert all(doc["process"] == "listener-0" for doc in docs)
    trace = docs[3]["exception"].splitlines()
    assert trace[0] == "Traceback (most recent call last):" and trace[-1] == "RuntimeError: boom"


def test_json_events_carry_their_fields_escaped() -> None:
    out = run("json")
    assert_clean(out)
    event = json.loads(out.splitlines()[-1])
    assert event["message"] == "C-STORE failed"
    assert {k: event[k] for k in FIELDS} == {
        "destination": "pacs", "calling_ae": r"A\r\x1b[2J\x9b31m\x7f\x00\u2028Z", "called_ae": "ROUTER",
        "peer": "10.0.0.5:104", "study_uid": "1.2.3", "sop_uid": r"EVIL\nFAKE 2026 ERROR",
        "status": 0xA700, "oid": 42, "worker": "sender-pacs"}


def test_fields_helper_leaves_out_what_is_not_known() -> None:
    assert fields(destination="pacs", status=0, oid=None) == {"destination": "pacs", "status": 0}
    record = logging.makeLogRecord({"msg": "x", **fields(status=0, peer="h:1"), "other": "not a field"})
    doc = json.loads(JsonFormatter("p").format(record))
    assert doc["status"] == 0 and doc["peer"] == "h:1" and "other" not in doc


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


def _titles(pgid: int) -> dict[int, str]:
    """What ps shows for each process of a process group (/proc/PID/cmdline)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ProcessLookupError):
            continue   # exited while we looked
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_router_processes_name_their_role_and_log_json(tmp_path: Path) -> None:
    """The real router: every line it writes is JSON (banner and supervisor included), and ps
    tells its processes apart."""
    from peers import free_port, wait_until
    from router import Router

    r = Router(tmp_path / "router", {
        "log_format": "json", "http": {"host": "127.0.0.1", "port": free_port()},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}}})
    r.start()
    try:
        assert r.proc is not None
        want = {"fastroute: supervisor", "fastroute: listener-0", "fastroute: sender-pacs", "fastroute: http"}
        wait_until(lambda: want <= set(_titles(r.proc.pid).values()), 30,   # type: ignore[union-attr]
                   message=lambda: f"process titles: {_titles(r.proc.pid)}")   # type: ignore[union-attr]
        assert _titles(r.proc.pid)[r.proc.pid] == "fastroute: supervisor"
        wait_until(lambda: "http: dashboard and API" in r.log_text(), 30, message="the http process's start")
    finally:
        assert r.stop() == 0
    lines = r.log_text().splitlines()
    docs = []
    for line in lines:
        try:
            docs.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}\n{r.log_tail()}") from None
    banner = [d for d in docs if d["logger"] == "fastroute.banner"]
    assert banner[0]["message"].startswith("fastroute ") and banner[0]["process"] == "supervisor"
    assert any("listening as AE FASTROUTE" in d["message"] for d in banner)
    assert any(d["message"].startswith("started listener-0 (pid") for d in docs)   # the supervisor's lines
    assert {d["process"] for d in docs} >= {"supervisor", "http"}


# -- call sites that carry their fields ---------------------------------------------------------

def _as_json(record: logging.LogRecord) -> dict[str, object]:
    doc: dict[str, object] = json.loads(JsonFormatter("p").format(record))
    return doc


@pytest.mark.peers
def test_c_store_to_dcmtk_logs_its_fields(storescp: object, synth_study: object,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """The sender's C-STORE line (DEBUG) as a shipper sees it: AE titles, address, SOP UID, status."""
    import peers
    from test_scu import c_store_body, destination, store

    from fastroute.dicom.scu import Connection

    body = c_store_body(synth_study(n_instances=1, tiny=True)[0])   # type: ignore[operator]
    scp = storescp("DEST")   # type: ignore[operator]
    conn = Connection(destination(scp.port), "FASTROUTE")
    with caplog.at_level(logging.DEBUG, logger="fastroute.send"):
        assert store(conn, body).status == 0
        conn.release()
    line = next(r for r in caplog.records if r.getMessage().startswith("C-STORE"))
    doc = _as_json(line)
    assert {k: doc.get(k) for k in ("calling_ae", "called_ae", "peer", "sop_uid", "status")} == {
        "calling_ae": "FASTROUTE", "called_ae": "DEST", "peer": peers.HOST, "sop_uid": body[1], "status": 0}
    associated = next(r for r in caplog.records if r.getMessage().startswith("associated"))
    assert _as_json(associated)["called_ae"] == "DEST"


def test_operator_actions_log_their_destination(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import time as _time

    from test_ops import AGE, STUDY_A, fill, make_config

    from fastroute.ops import actions
    from fastroute.spool import Spool

    cfg, _ = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=0)
    try:
        fill(spool, _time.time() - AGE)
        with caplog.at_level(logging.INFO, logger="fastroute.ops"):
            actions.set_paused(cfg, spool, "pacs", True, who="tester")
            actions.retry(cfg, spool, study_instance_uid=STUDY_A, who="tester")
            actions.purge(cfg, spool, destination="vna", states=["pending"], reason="test",
                          study_instance_uid=STUDY_A, who="tester")
    finally:
        spool.close()
    docs = [_as_json(r) for r in caplog.records if r.name == "fastroute.ops"]
    assert [(d.get("destination"), d.get("study_uid")) for d in docs] == [
        ("pacs", None), (None, STUDY_A), ("vna", STUDY_A)]


def _json_lines(text: str) -> list[dict[str, object]]:
    docs = []
    for line in text.splitlines():
        try:
            docs.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
    return docs


@pytest.mark.peers
def test_router_receive_delivery_and_refusal_lines_carry_fields(
        tmp_path: Path, storescp: object, dcmtk: object) -> None:
    """A real router in JSON mode, C-STORE from DCMTK storescu through fastroute to DCMTK
    storescp: the receive line and the delivery line carry the object's subjects as keys (the
    Study UID too, which the receive path used to never log), and a refusal carries its status."""
    import pydicom

    import synth
    from peers import free_port, storescu, wait_until
    from router import Router, destination

    files = synth.make_tiny(tmp_path / "tiny", n=1)
    ds = pydicom.dcmread(files[0])
    sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    port = free_port()
    scp = storescp("PACS", port=port)   # type: ignore[operator]
    r = Router(tmp_path / "router", {
        "log_format": "json", "log_level": "DEBUG", "http": {"host": "127.0.0.1", "port": free_port()},
        "destinations": {"pacs": destination(port, "PACS")},
        "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    r.start()
    try:
        res = storescu(r.port, files, calling_ae="MODALITY")
        assert res.returncode == 0, res.stderr
        assert len(scp.wait_for(1, timeout=30)) == 1
        wait_until(lambda: any(d.get("logger") == "fastroute.schedule" and d.get("sop_uid") == sop
                               for d in _json_lines(r.log_text())), 30,
                   message=lambda: f"no delivery line:\n{r.log_tail()}")
        # The supervisor's lines about a child name it as a field: a sender killed, then restarted.
        assert r.proc is not None
        [sender] = [pid for pid, title in _titles(r.proc.pid).items() if title == "fastroute: sender-pacs"]
        os.kill(sender, signal.SIGKILL)
        wait_until(lambda: sum(1 for d in _json_lines(r.log_text()) if d.get("worker") == "sender-pacs"
                               and str(d["message"]).startswith("started sender-pacs")) == 2, 30,
                   message=lambda: f"sender-pacs not restarted:\n{r.log_tail()}")
        [died] = [d for d in _json_lines(r.log_text()) if " died " in str(d["message"])]
        assert died["worker"] == "sender-pacs" and died["level"] == "ERROR" and died["process"] == "supervisor"
    finally:
        assert r.stop() == 0
    docs = _json_lines(r.log_text())
    keys = ("calling_ae", "sop_uid", "study_uid", "destination", "status", "oid")
    received = next(d for d in docs if d["logger"] == "fastroute.intake" and d.get("sop_uid") == sop)
    # Acknowledged from the listener's journal (no oid yet); the applier's line gives the oid.
    queued = next(d for d in docs if d["logger"] == "fastroute.journal" and d.get("sop_uid") == sop)
    delivered = next(d for d in docs if d["logger"] == "fastroute.schedule" and d.get("sop_uid") == sop)
    assert "oid" not in received and "journalled in shard 0" in str(received["message"])
    assert queued["oid"] == delivered["oid"] and f"oid={delivered['oid']}" in str(queued["message"])
    assert {k: queued.get(k) for k in ("calling_ae", "sop_uid", "study_uid", "destination")} == {
        "calling_ae": "MODALITY", "sop_uid": sop, "study_uid": study, "destination": "pacs"}
    for line in (received, delivered):
        assert {k: line.get(k) for k in keys} == {
            "calling_ae": "MODALITY", "sop_uid": sop, "study_uid": study, "destination": "pacs",
            "status": 0, "oid": None if line is received else delivered["oid"]}, line
        assert study in str(line["message"])           # text logs have no fields: the message names it
    assert received["called_ae"] == "FASTROUTE" and delivered["called_ae"] == "PACS"
    accepted = next(d for d in docs if d["logger"] == "fastroute.scp" and "accepted" in str(d["message"]))
    assert (accepted.get("calling_ae"), accepted.get("called_ae"), accepted.get("peer")) == (
        "MODALITY", "FASTROUTE", "127.0.0.1")
    assert any(d.get("worker") == "listener-0" and str(d["message"]).startswith("started listener-0")
               for d in docs)

    # A refusal: the free-space floor above what the disk has -> 0xA700, said as a key.
    import shutil
    r.write_config(min_free_bytes=shutil.disk_usage(tmp_path).free + 1024**4)
    r.start()
    try:
        assert storescu(r.port, synth.make_tiny(tmp_path / "more", n=1), calling_ae="MODALITY").returncode != 0
        wait_until(lambda: any(d.get("status") == 0xA700 for d in _json_lines(r.log_text())), 20,
                   message=lambda: f"no refusal line with its status:\n{r.log_tail()}")
    finally:
        assert r.stop() == 0
    refused = next(d for d in _json_lines(r.log_text()) if d.get("status") == 0xA700)
    assert refused["level"] == "ERROR" and refused["calling_ae"] == "MODALITY" and refused.get("sop_uid")
    assert refused.get("study_uid")     # refused after the peek: the Study UID is known and named
    assert "0xA700" in str(refused["message"])
