"""The listener's defences (issue 11 items 1, 2, 5, 7): poison objects, deflate bombs, peers
that hold associations, malformed PDUs and character sets, against a running listener.

Each test reproduces a defect found by hostile testing; before the fix it was acknowledged
0x0000, answered 0xA700 "internal error", logged a traceback, or locked out other modalities.
"""
from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

import peers
from fastroute.dicom import dimse, pdu
from fastroute.dicom.slots import SlotTable
from test_scp import CT, RawPeer, Scp, associate_rq, pynetdicom_echo_ok, scp, store_rq, synth_dataset

__all__ = ["scp"]   # the fixture, imported for pytest

VERIFY = "1.2.840.10008.1.1"


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR LE element (short form: 2-byte length)."""
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that carry a traceback or say "internal error": each is a defect here."""
    return [r.getMessage() for r in caplog.records
            if r.exc_info or "internal error" in r.getMessage() or "Traceback" in r.getMessage()]


def echo(raw: RawPeer, msg_id: int) -> float:
    """Seconds one C-ECHO took on an established raw association."""
    start = time.monotonic()
    raw.send_message(1, dimse.encode_c_echo_rq(msg_id))
    assert raw.response()[0x0900] == 0
    return time.monotonic() - start


# -- item 1: poison objects ---------------------------------------------------------------------

def test_poison_objects_are_refused_cannot_understand_and_never_spooled(
        tmp_path: Path, scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture) -> None:
    """Well-formed up to the attributes the rules read, malformed after them: 0xC000 with an
    Error Comment, nothing spooled; the valid object on the same association is stored."""
    caplog.set_level(logging.INFO)
    s = scp()
    uid, data = synth_dataset(tmp_path)
    overrun = data + struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 0xFF) + b"abc "  # past the end
    rows_ob = data + struct.pack("<HH2sHI", 0x0028, 0x0010, b"OB", 0, 0x280000) + b"\0" * 64
    raw = RawPeer(s.port)
    assert raw.associate([(1, CT, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    for i, poison in enumerate((overrun, rows_ob), start=1):
        raw.send_message(1, store_rq(i, uid), poison)
        rsp = raw.response()
        assert rsp[0x0900] == 0xC000, hex(rsp[0x0900])
        assert 0 < len(str(rsp[0x0902])) <= 64 and "parsed" in str(rsp[0x0902])
    assert s.stored() == []
    raw.send_message(1, store_rq(3, uid), data)
    assert raw.response()[0x0900] == 0
    raw.release()
    assert [u for u, _, _ in s.stored()] == [uid]
    assert f"sop_instance_uid={uid}: unreadable dataset" in caplog.text and "0xC000" in caplog.text
    assert not tracebacks(caplog)


def _bomb(inflated: int) -> bytes:
    """A raw-deflated Explicit VR LE dataset that inflates to about ``inflated`` bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = (element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0")
            + element(0x0008, 0x0018, b"UI", b"1.2.3.4.5.6\0")
            + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated))
    zeros = bytes(1 << 24)
    parts = [c.compress(head)] + [c.compress(zeros) for _ in range(inflated >> 24)]
    return b"".join(parts) + c.flush()


def test_deflate_bomb_is_refused_off_the_event_loop(scp: Callable[..., Scp],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A 1 MB dataset that inflates to 1 GiB: refused 0xC001 (permanent) at max_object_bytes
    while a C-ECHO on another association keeps answering within a second."""
    caplog.set_level(logging.INFO)
    s = scp(max_object_bytes="512MiB", spool_max_bytes="64MiB")
    bomb = _bomb(1 << 30)
    assert len(bomb) < 2 * 1024 * 1024
    sender = RawPeer(s.port)
    assert sender.associate([(1, CT, [DeflatedExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    other = RawPeer(s.port)
    assert other.associate([(1, VERIFY, [ExplicitVRLittleEndian])], calling="OTHER")[0] == pdu.A_ASSOCIATE_AC
    sender.send_message(1, store_rq(1, "1.2.3.4.5.6"), bomb, max_pdu=65536)
    answered: list[dict[int, Any]] = []
    reader = threading.Thread(target=lambda: answered.append(sender.response()))
    reader.start()
    latencies = []
    deadline = time.monotonic() + 60
    while reader.is_alive() and time.monotonic() < deadline:
        latencies.append(echo(other, len(latencies) + 1))
    reader.join(5)
    assert answered and answered[0][0x0900] == 0xC001, answered
    assert "max_object_bytes" in str(answered[0][0x0902])
    assert latencies and max(latencies) < 1.0, latencies
    assert len(latencies) >= 3, "the bomb was answered before C-ECHOs could overlap it"
    sender.release()
    other.release()
    assert s.stored() == []
    assert "too large" in caplog.text and not tracebacks(caplog)


# -- item 7: not the sender's fault is not transient ---------------------------------------------

@pytest.mark.parametrize("charset", [b"ISO_IR\x00100", b"ISO_IR 192\x00X "])
def test_nul_in_specific_character_set_is_a_permanent_refusal(
        tmp_path: Path, scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture, charset: bytes) -> None:
    caplog.set_level(logging.INFO)
    s = scp()
    ds = (element(0x0008, 0x0005, b"CS", charset) + element(0x0008, 0x0016, b"UI", CT.encode() + b"\0")
          + element(0x0008, 0x0018, b"UI", b"1.2.3.4\0") + element(0x0010, 0x0010, b"PN", b"Doe^J\xe9 "))
    raw = RawPeer(s.port)
    assert raw.associate([(1, CT, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    raw.send_message(1, store_rq(1, "1.2.3.4"), ds)
    rsp = raw.response()
    assert rsp[0x0900] == 0xC002 and "Character Set" in str(rsp[0x0902]), rsp
    raw.release()
    assert s.stored() == [] and not tracebacks(caplog)


# PDU type -> A-ABORT (source, reason). Before the A-ASSOCIATE-RQ (Sta2) PS3.8 Table 9-10
# prescribes AA-1: service user, reason not significant; after it AA-8: service provider,
# 2 unexpected PDU or 6 invalid PDU parameter value.
ZERO_BEFORE = {kind: (0, 0) for kind in range(1, 8)}
ZERO_AFTER = {1: (2, 2), 2: (2, 2), 3: (2, 6), 4: (2, 6), 5: (2, 6), 6: (2, 6), 7: (2, 6)}


@pytest.mark.parametrize("established", [False, True])
def test_zero_length_pdus_are_aborted_with_their_reason(
        scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture, established: bool) -> None:
    """Each zero-length PDU gets its A-ABORT (PS3.8 9.2 and 9.3.8), never an IndexError."""
    caplog.set_level(logging.INFO)
    s = scp()
    for kind, expected in (ZERO_AFTER if established else ZERO_BEFORE).items():
        raw = RawPeer(s.port)
        if established:
            assert raw.associate([(1, VERIFY, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
        raw.send(struct.pack(">BBI", kind, 0, 0))
        got = raw.recv_pdu(timeout=5)
        assert got is not None and got[0] == pdu.A_ABORT, (kind, got)
        assert (got[1][2], got[1][3]) == expected, (kind, got[1])
        assert raw.recv_pdu(timeout=5) is None
        raw.close()
    assert not tracebacks(caplog), tracebacks(caplog)
    assert pynetdicom_echo_ok(s.port)


def _rq_with_raw_contexts(contexts: list[tuple[int, bytes | None, list[bytes]]]) -> bytes:
    """An A-ASSOCIATE-RQ with presentation context items exactly as given (None: no abstract
    syntax sub-item, []: no transfer syntax sub-item), which pynetdicom would not encode."""
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body
    body = struct.pack(">HH", 1, 0) + b"FASTROUTE".ljust(16) + b"RAW".ljust(16) + b"\0" * 32
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    for cid, abstract, syntaxes in contexts:
        sub = item(0x30, abstract) if abstract is not None else b""
        sub += b"".join(item(0x40, ts) for ts in syntaxes)
        body += item(0x20, bytes((cid, 0, 0, 0)) + sub)
    body += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.9999"))
    return struct.pack(">BBI", 1, 0, len(body)) + body


def test_contexts_without_abstract_or_transfer_syntax_are_rejected_per_context(
        scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture) -> None:
    """PS3.8 9.3.3.2: result 3 (abstract syntax not supported) and 4 (transfer syntaxes not
    supported) for those contexts; the well-formed one is accepted and used."""
    caplog.set_level(logging.INFO)
    s = scp()
    raw = RawPeer(s.port)
    raw.send(_rq_with_raw_contexts([(1, VERIFY.encode(), []), (3, None, [b"1.2.840.10008.1.2"]),
                                    (5, VERIFY.encode(), [b"1.2.840.10008.1.2"])]))
    got = raw.recv_pdu()
    assert got is not None and got[0] == pdu.A_ASSOCIATE_AC, got
    ac = pdu.decode_associate_ac(got[1])
    results = {cx.context_id: cx.result for cx in ac.presentation_context_definition_results_list}
    assert results == {1: 4, 3: 3, 5: 0}
    raw.send_message(5, dimse.encode_c_echo_rq(1))
    assert raw.response()[0x0900] == 0
    raw.release()
    only_bad = RawPeer(s.port)
    only_bad.send(_rq_with_raw_contexts([(1, CT.encode(), [])]))
    got = only_bad.recv_pdu()
    assert got is not None and got[0] == pdu.A_ASSOCIATE_AC
    only_bad.close()
    assert not tracebacks(caplog), tracebacks(caplog)


# -- item 5: one client cannot lock out every modality -------------------------------------------

def test_silent_associations_of_one_ae_do_not_lock_out_another(
        dcmtk: Any, scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture) -> None:
    """50 associations from one AE that send nothing: the per-AE limit refuses most of them
    (transient, local limit exceeded, logged with AE, IP and limit), another AE's C-ECHO is
    answered, and the idle timeout frees the held slots."""
    caplog.set_level(logging.INFO)
    s = scp(max_associations=32, max_associations_per_ae=8, max_associations_per_ip=40,
            association_idle_timeout=3.0)
    cx = [(1, VERIFY, [ExplicitVRLittleEndian])]
    held, refused = [], 0
    for _ in range(50):
        raw = RawPeer(s.port)
        kind, body = raw.associate(cx, calling="HOG")
        if kind == pdu.A_ASSOCIATE_AC:
            held.append(raw)
        else:
            assert kind == pdu.A_ASSOCIATE_RJ and tuple(body[1:4]) == (2, 3, 2), body
            refused += 1
            raw.close()
    assert len(held) == 8 and refused == 42
    assert "rejecting association from HOG@127.0.0.1 to FASTROUTE: max_associations_per_ae (8)" in caplog.text
    start = time.monotonic()
    res = peers.echoscu(s.port, calling_ae="MODALITY")
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.monotonic() - start < 3
    assert len(s.receiver.slots.live()) == 8
    for raw in held:                                 # the idle timeout frees every slot
        got = raw.recv_pdu(timeout=10)
        assert got is not None and got[0] == pdu.A_ABORT
        raw.close()
    peers.wait_until(lambda: not s.receiver.slots.live(), 5, message="slots not released")
    assert "association_idle_timeout" in caplog.text
    again = RawPeer(s.port)
    assert again.associate(cx, calling="HOG")[0] == pdu.A_ASSOCIATE_AC
    again.release()


def test_per_ip_limit(scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    s = scp(max_associations_per_ip=2)
    cx = [(1, VERIFY, [ExplicitVRLittleEndian])]
    a, b, c = RawPeer(s.port), RawPeer(s.port), RawPeer(s.port)
    assert a.associate(cx, calling="A")[0] == pdu.A_ASSOCIATE_AC
    assert b.associate(cx, calling="B")[0] == pdu.A_ASSOCIATE_AC
    kind, body = c.associate(cx, calling="C")
    assert kind == pdu.A_ASSOCIATE_RJ and tuple(body[1:4]) == (2, 3, 2)
    assert "max_associations_per_ip (2) reached for 127.0.0.1" in caplog.text
    a.release()
    peers.wait_until(lambda: len(s.receiver.slots.live()) == 1, 5)
    d = RawPeer(s.port)
    assert d.associate(cx, calling="D")[0] == pdu.A_ASSOCIATE_AC
    for p in (b, d):
        p.release()
    c.close()


LISTENER = """
import sys
from fastroute.config import load
from fastroute.dicom.scp import Listener
listener = Listener(load(sys.argv[1]), {})
listener.start()
print("ready", flush=True)
sys.stdin.read()
"""


def test_the_association_cap_is_global_across_listener_processes(
        tmp_path: Path, scp: Callable[..., Scp]) -> None:
    """Two listener processes on one spool admit max_associations together, not each; the
    slots of a SIGKILLed process are reclaimed."""
    s = scp(max_associations=4)
    other_cfg = tmp_path / "other.yaml"
    port = peers.free_port()
    other_cfg.write_text(yaml.safe_dump({
        "ae_title": "FASTROUTE", "host": "127.0.0.1", "port": port, "spool": str(s.cfg.spool),
        "max_associations": 4}))
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(other_cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        cx = [(1, VERIFY, [ExplicitVRLittleEndian])]
        held = []
        for i in range(3):
            raw = RawPeer(s.port)
            assert raw.associate(cx, calling=f"IN{i}")[0] == pdu.A_ASSOCIATE_AC
            held.append(raw)
        far = RawPeer(port)
        assert far.associate(cx, calling="FAR")[0] == pdu.A_ASSOCIATE_AC
        for target in (port, s.port):                # 4 admitted in all: both refuse the 5th
            extra = RawPeer(target)
            kind, body = extra.associate(cx, calling="EXTRA")
            assert kind == pdu.A_ASSOCIATE_RJ and tuple(body[1:4]) == (2, 3, 2), (target, body)
            extra.close()
        owners = {pid for pid, _, _ in SlotTable(s.cfg.spool / "run" / "associations.slots").live()}
        assert owners == {os.getpid(), proc.pid}
        os.kill(proc.pid, signal.SIGKILL)            # its slot must not leak
        proc.wait(10)
        far.close()
        late = RawPeer(s.port)
        assert late.associate(cx, calling="LATE")[0] == pdu.A_ASSOCIATE_AC
        for raw in [*held, late]:
            raw.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_slot_table_reclaims_dead_and_reused_pids(tmp_path: Path) -> None:
    table = SlotTable(tmp_path / "run" / "slots")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    import fastroute.dicom.slots as slots_mod
    record = slots_mod._RECORD.pack(pid, 12345, b"GONE", b"10.0.0.1").ljust(slots_mod._SIZE, b"\0")
    reused = slots_mod._RECORD.pack(1, 1, b"REUSED", b"10.0.0.2").ljust(slots_mod._SIZE, b"\0")
    os.pwrite(table.fd, record + reused, 0)          # pid 1 exists but started at another time
    assert table.live() == []
    seen: list[tuple[int, int, int]] = []
    slot, refusal = table.admit("AE", "10.0.0.3", lambda *counts: seen.append(counts))  # type: ignore[func-returns-value]
    assert refusal is None and slot == 0 and seen == [(0, 0, 0)]
    assert table.live() == [(os.getpid(), "AE", "10.0.0.3")]
    table.release(slot)
    assert table.live() == []
    table.close()


def test_idle_timeout_spares_an_association_that_has_spoken(
        scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture) -> None:
    """association_idle_timeout is for associations silent since their accept; one that sent
    a request and is quiet now is network_timeout's, which is longer."""
    caplog.set_level(logging.INFO)
    s = scp(association_idle_timeout=0.5, network_timeout=5.0)
    cx = [(1, VERIFY, [ExplicitVRLittleEndian])]
    spoke, silent = RawPeer(s.port), RawPeer(s.port)
    assert spoke.associate(cx, calling="SPOKE")[0] == pdu.A_ASSOCIATE_AC
    assert silent.associate(cx, calling="SILENT")[0] == pdu.A_ASSOCIATE_AC
    echo(spoke, 1)
    start = time.monotonic()
    got = silent.recv_pdu(timeout=5)
    assert got is not None and got[0] == pdu.A_ABORT and time.monotonic() - start < 3
    with pytest.raises(TimeoutError):                # well past 0.5 s, still not aborted
        spoke.recv_pdu(timeout=1.5)
    echo(spoke, 2)
    spoke.release()
    silent.close()
    assert "SILENT@127.0.0.1 to FASTROUTE aborted (nothing sent" in caplog.text
    assert "SPOKE@127.0.0.1 to FASTROUTE aborted" not in caplog.text


def test_limit_keys_are_validated_and_default_sensibly() -> None:
    from fastroute.config import loads
    from fastroute.errors import ConfigError
    cfg = loads("ae_title: X\nmax_object_bytes: 512MiB\nassociation_idle_timeout: 10s\n")
    assert cfg.max_object_bytes == 512 * 1024**2 and cfg.association_idle_timeout == 10.0
    assert (cfg.max_associations, cfg.max_associations_per_ae, cfg.max_associations_per_ip) == (32, 16, 24)
    assert loads("ae_title: X\n").max_object_bytes == 4 * 1024**3
    with pytest.raises(ConfigError, match="max_associations_per_ae"):
        loads("ae_title: X\nmax_associations_per_ae: 0\n")
