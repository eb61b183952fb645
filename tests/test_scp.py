"""The asyncio SCP (fastroute.dicom.scp) against real peers, raw bytes and its pure core.

Each test builds Spool + RuleSet + Committer + StoreService + Listener in-process (as
workers.listener_main wires them) on a free port, and reads what was stored back from the
spool. References for "the same bytes": the files' own dataset bytes, or a bit-preserving
DCMTK storescp (+B) fed by the same storescu.
"""
from __future__ import annotations

import logging
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

import peers
import synth
from dicomcompare import assert_same_dataset
from fastroute.cli import read_part10
from fastroute.config import Config, loads
from fastroute.dicom import acse, dimse, pdu
from fastroute.dicom.access import check_access, parse_networks
from fastroute.dicom.dimse import CommandField, Message, MessageTooLarge, Peer, Pending, Reply
from fastroute.dicom.scp import Listener
from fastroute.dicom.ul import ReleaseRequest, Role, State, UpperLayer
from fastroute.routing.intake import Refusal, StoreService, prepare_store
from fastroute.routing.rules import RuleSet
from fastroute.spool import Incoming, Spool
from fastroute.spool.commit import Committer

CT = "1.2.840.10008.5.1.4.1.1.2"
LOGGER = "fastroute.scp"


# -- fixtures -----------------------------------------------------------------------------------

@dataclass
class Scp:
    """A running listener and what it wrote to its spool."""

    receiver: Listener
    spool: Spool
    committer: Committer
    cfg: Config
    store: StoreService

    @property
    def port(self) -> int:
        return self.cfg.port

    def stored(self) -> list[tuple[str, str, bytes]]:
        """(SOP Instance UID, transfer syntax, bytes) of every spooled object, in arrival order."""
        out = []
        seq = self.spool.counters().get("seq", 0)
        for oid in range(1, seq + 1):
            meta = self.spool.meta(oid)
            if meta is not None:
                out.append((meta["sop_instance_uid"], meta["transfer_syntax"], self.spool.read(oid)))
        return out

    def by_uid(self) -> dict[str, tuple[str, bytes]]:
        return {uid: (ts, data) for uid, ts, data in self.stored()}


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Callable[..., Scp]]:
    """Factory: ``scp(handlers=..., sop_classes=..., **config)`` -> a started listener with the
    C-STORE service (and any other handlers), stopped at teardown."""
    started: list[Scp] = []

    def make(handlers: dict[int, Any] | None = None, **config: Any) -> Scp:
        port = peers.free_port()
        limits = {k: config.pop(k) for k in ("pause_at_bytes", "sop_classes") if k in config}
        settings = {"ae_title": "FASTROUTE", "host": "127.0.0.1", "port": port,
                    "spool": str(tmp_path / f"spool{len(started)}"), "min_free_bytes": 0,
                    "spool_max_bytes": "256MiB", **config}
        cfg = loads(yaml.safe_dump(settings))
        spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=cfg.min_free_bytes)
        committer = Committer(spool, None, gather=cfg.group_commit_delay)
        rules = RuleSet.from_config(cfg)
        store = StoreService(rules, committer, max_object_bytes=cfg.max_object_bytes)
        services = {CommandField.C_STORE_RQ: store, **(handlers or {})}
        receiver = Listener(cfg, services, **limits)
        receiver.start()
        s = Scp(receiver, spool, committer, cfg, store)
        started.append(s)
        return s

    yield make
    for s in started:
        s.receiver.stop(1.0)
        s.store.close()
        s.committer.close()
        s.spool.close()
        assert not peers.is_listening(s.port), f"port {s.port} still listening after stop()"
        assert s.receiver._thread is None and s.receiver.loop.is_closed()
        assert not s.receiver._conns, "connections left after stop()"


def tiny(tmp_path: Path, n: int, name: str = "tiny") -> list[Path]:
    return synth.make_tiny(tmp_path / name, n)


def ok(res: Any) -> None:
    assert res.returncode == 0, res.stdout + res.stderr


# -- a raw peer: bytes on a socket, framed with fastroute.dicom.pdu ------------------------------------

def associate_rq(contexts: Sequence[tuple[int, str, Sequence[str]]], calling: str, called: str,
                 max_pdu: int) -> bytes:
    """An A-ASSOCIATE-RQ PDU from a foreign implementation, with any context IDs and syntaxes."""
    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title = calling
    rq.called_ae_title = called
    cxs = []
    for cid, abstract, syntaxes in contexts:
        cx = build_context(abstract, list(syntaxes))
        cx.context_id = cid
        cxs.append(cx)
    rq.presentation_context_definition_list = cxs
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.9999"
    rq.user_information = [ml, impl]
    return pdu.encode_associate_rq(rq)


class RawPeer:
    """A scripted association requestor that can send anything, including what it should not."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = pdu.PduReader()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_pdu(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """The next PDU, or None when the server closed the connection."""
        self.sock.settimeout(timeout)
        while True:
            item = self.reader.next()
            if item is not None:
                return item[0], bytes(item[1])
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.reader.feed(data)

    def associate(self, contexts: Sequence[tuple[int, str, Sequence[str]]], called: str = "FASTROUTE",
                  calling: str = "RAW", max_pdu: int = 16384) -> tuple[int, bytes]:
        self.send(associate_rq(contexts, calling, called, max_pdu))
        got = self.recv_pdu()
        assert got is not None, "connection closed instead of an A-ASSOCIATE response"
        return got

    def send_message(self, ctx: int, command: bytes, dataset: bytes | None = None,
                     max_pdu: int = 16384) -> None:
        for header, payload in pdu.p_data_tf(ctx, True, command, max_pdu):
            self.send(header + bytes(payload))
        if dataset is not None:
            for header, payload in pdu.p_data_tf(ctx, False, dataset, max_pdu):
                self.send(header + bytes(payload))

    def response(self) -> dict[int, Any]:
        got = self.recv_pdu()
        assert got is not None and got[0] == pdu.P_DATA_TF, got
        pdvs = list(pdu.iter_pdvs(got[1]))
        assert len(pdvs) == 1 and pdvs[0][1] and pdvs[0][2]
        return pdu.decode_command(pdvs[0][3])

    def release(self) -> None:
        self.send(pdu.encode_release_rq())
        got = self.recv_pdu()
        assert got is not None and got[0] == pdu.A_RELEASE_RP, got
        assert self.recv_pdu() is None     # and the server closes


def store_rq(msg_id: int, sop_uid: str, sop_class: str = CT) -> bytes:
    return pdu.encode_command({0x0002: sop_class, 0x0100: 0x0001, 0x0110: msg_id, 0x0700: 0,
                               0x0800: 0x0102, 0x1000: sop_uid})


def synth_dataset(tmp_path: Path) -> tuple[str, bytes]:
    """(SOP Instance UID, Explicit VR LE dataset bytes) of one tiny synthetic CT."""
    path = tiny(tmp_path, 1, name=f"one{time.monotonic_ns()}")[0]
    ts, data = read_part10(path)
    assert ts == ExplicitVRLittleEndian
    return str(pydicom.dcmread(path).SOPInstanceUID), data


def pynetdicom_echo_ok(port: int) -> bool:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="FASTROUTE")
    try:
        return bool(assoc.is_established and assoc.send_c_echo().Status == 0)
    finally:
        if assoc.is_established:
            assoc.release()


# -- the pure core: no sockets ------------------------------------------------------------------

def _cfg(**kw: Any) -> Config:
    return loads(yaml.safe_dump({"ae_title": "FASTROUTE", "port": 11112, **kw}))


def test_check_access_reasons_and_precedence() -> None:
    cfg = _cfg(allowed_calling_aes=["CT1"], allowed_peers=["10.0.0.0/8"], max_associations=2)
    nets = parse_networks(cfg)
    assert check_access(cfg, nets, "CT1", "FASTROUTE", "10.1.2.3", 0) is None
    assert check_access(cfg, nets, "CT1", "FASTROUTE", "127.0.0.1", 0)[:3] == (1, 1, 1)  # type: ignore[index]
    assert check_access(cfg, nets, "MR1", "FASTROUTE", "10.1.2.3", 0)[:3] == (1, 1, 3)  # type: ignore[index]
    assert check_access(cfg, nets, "CT1", "OTHER", "10.1.2.3", 0)[:3] == (1, 1, 7)  # type: ignore[index]
    assert check_access(cfg, nets, "CT1", "OTHER", "10.1.2.3", 2)[:3] == (2, 3, 2)  # type: ignore[index]
    assert check_access(cfg, nets, "CT1", "FASTROUTE", "not-an-ip", 0)[:3] == (1, 1, 1)  # type: ignore[index]
    lax = _cfg(require_called_ae=False)
    assert check_access(lax, None, "ANY", "OTHER", "127.0.0.1", 0) is None


def pdv(ctx: int, is_command: bool, is_last: bool, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV, with any control bits (p_data_tf always ends last)."""
    control = (1 if is_command else 0) | (2 if is_last else 0)
    return struct.pack(">BBIIBB", 4, 0, len(fragment) + 6, len(fragment) + 2, ctx, control) + fragment


def _assoc_rq_body(contexts: Sequence[tuple[int, str, Sequence[str]]]) -> bytes:
    return associate_rq(contexts, "UNIT", "FASTROUTE", 0)


def test_upper_layer_reassembles_any_chunking(tmp_path: Path) -> None:
    """Command split in two PDVs, dataset over three PDUs, stream fed in odd-sized chunks."""
    uid, data = synth_dataset(tmp_path)
    command = store_rq(7, uid)
    stream = _assoc_rq_body([(1, CT, [ExplicitVRLittleEndian])])
    stream += pdv(1, True, False, command[:20]) + pdv(1, True, True, command[20:])
    stream += b"".join(h + bytes(p) for h, p in pdu.p_data_tf(1, False, data, len(data) // 3 + 7))
    stream += pdv(1, True, True, dimse.encode_c_echo_rq(8))
    stream += pdu.encode_release_rq()
    for chunk in (1, 5, 13, 4096):
        ul = UpperLayer(Role.ACCEPTOR, max_pdu_in=16384)
        events: list[Any] = []
        for i in range(0, len(stream), chunk):
            ul.feed(stream[i:i + chunk])
            while (ev := ul.next_event()) is not None:
                events.append(ev)
                if len(events) == 1:
                    ul.established({1: ExplicitVRLittleEndian})
        kinds = [type(e).__name__ for e in events]
        assert kinds == ["AssociateRequest", "Message", "Message", "ReleaseRequest"], kinds
        store = events[1]
        assert isinstance(store, Message) and isinstance(store.data, bytearray) and store.data == data
        assert (store.field, store.message_id, store.sop_instance_uid, store.sop_class_uid) == (
            CommandField.C_STORE_RQ, 7, uid, CT)
        assert isinstance(events[2], Message) and events[2].message_id == 8
        assert events[2].field == CommandField.C_ECHO_RQ and events[2].data is None
        assert isinstance(events[3], ReleaseRequest) and ul.buffered == 0
        assert ul.state is State.RELEASE_REQUESTED
        assert ul.release_reply() == pdu.encode_release_rp() and ul.state is State.CLOSED


@pytest.mark.parametrize("case", ["unaccepted-context", "dataset-first", "store-without-data",
                                  "too-large", "pdata-before-ac", "oversized-pdu", "unknown-type"])
def test_upper_layer_protocol_errors(case: str) -> None:
    ul = UpperLayer(Role.ACCEPTOR, max_pdu_in=1024, max_object=100)
    if case not in ("pdata-before-ac",):
        ul.feed(_assoc_rq_body([(1, CT, [ExplicitVRLittleEndian])]))
        assert ul.next_event() is not None
        ul.established({1: ExplicitVRLittleEndian})
    cmd = store_rq(1, "1.2.3")
    frames = {
        "unaccepted-context": b"".join(h + bytes(p) for h, p in pdu.p_data_tf(3, True, cmd, 0)),
        "dataset-first": b"".join(h + bytes(p) for h, p in pdu.p_data_tf(1, False, b"\0" * 8, 0)),
        "store-without-data": b"".join(h + bytes(p) for h, p in pdu.p_data_tf(
            1, True, pdu.encode_command({0x0002: CT, 0x0100: 1, 0x0110: 1, 0x0800: 0x0101,
                                         0x1000: "1.2.3"}), 0)),
        "too-large": b"".join(h + bytes(p) for h, p in pdu.p_data_tf(1, True, cmd, 0))
        + b"".join(h + bytes(p) for h, p in pdu.p_data_tf(1, False, b"\0" * 200, 100)),
        "pdata-before-ac": b"".join(h + bytes(p) for h, p in pdu.p_data_tf(1, True, cmd, 0)),
        "oversized-pdu": struct.pack(">BBI", 4, 0, 5000),
        "unknown-type": b"\x09\x00\x00\x00\x00\x02\x00\x00",
    }
    ul.feed(frames[case])
    expected = MessageTooLarge if case == "too-large" else pdu.ProtocolError
    with pytest.raises(expected):
        while ul.next_event() is not None:
            pass


def test_prepare_store_refusals_and_routing(tmp_path: Path) -> None:
    uid, data = synth_dataset(tmp_path)
    cfg = _cfg(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
               rules=[{"name": "ct", "match": {"Modality": "CT", "calling_ae": "CT1"}, "send_to": ["pacs"]}])
    rules = RuleSet.from_config(cfg)
    tags = tuple(sorted(set(rules.tags) | {0x00080018, 0x00080060, 0x0020000D}))
    item = prepare_store(bytearray(data), ExplicitVRLittleEndian, CT, uid, tags, rules, "CT1", "FASTROUTE", "1.2.3.4")
    assert isinstance(item, Incoming) and item.destinations == ("pacs",)
    assert item.meta["calling_ae"] == "CT1" and item.meta["modality"] == "CT" and item.meta["rules"] == ["ct"]
    other = prepare_store(data, ExplicitVRLittleEndian, CT, uid, tags, rules, "MR1", "FASTROUTE", "1.2.3.4")
    assert isinstance(other, Incoming) and other.destinations == ()
    mismatch = prepare_store(data, ExplicitVRLittleEndian, CT, uid + ".9", tags, rules, "CT1", "X", "ip")
    assert isinstance(mismatch, Refusal) and mismatch.status == 0xA900
    broken = prepare_store(data[:9], ExplicitVRLittleEndian, CT, uid, tags, rules, "CT1", "X", "ip")
    assert isinstance(broken, Refusal) and broken.status == 0xC000 and len(broken.comment) <= 64


# -- DCMTK peers --------------------------------------------------------------------------------

def test_echo_and_tiny_objects_stored_as_sent(
        tmp_path: Path, dcmtk: Any, scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture) -> None:
    """DCMTK's dcmsend and storescu into the listener: the spool holds each file's own dataset
    bytes (the reference the pynetdicom receiver used to be compared with is the file itself)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    files = tiny(tmp_path, 12)
    fast = scp()
    ok(peers.echoscu(fast.port))
    ok(peers.dcmsend(fast.port, files[:6], single_association=True))
    ok(peers.storescu(fast.port, files[6:]))
    got = fast.by_uid()
    assert len(got) == 12
    for path in files:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert got[uid] == read_part10(path)
    text = caplog.text
    assert "association from DCMSEND@127.0.0.1 to FASTROUTE released: 6 stored" in text
    assert "association from STORESCU@127.0.0.1 to FASTROUTE released: 6 stored" in text
    assert "association from ECHOSCU@127.0.0.1 to FASTROUTE released: 0 stored" in text


FIDELITY_FILES = [
    "693_J2KR.dcm", "MR2_J2KI.dcm", "emri_small_jpeg_ls_lossless.dcm", "OBXXXX1A_rle_2frame.dcm",
    "JPEG-LL.dcm", "liver_expb.dcm", "gdcm-US-ALOKA-16.dcm", "SC_rgb.dcm", "US1_J2KR.dcm",
]


def test_real_files_in_their_own_syntaxes_bit_preserving(
        tmp_path: Path, scp: Callable[..., Scp], storescp: Callable[..., peers.StoreSCP],
        pydicom_data_dir: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    files = []
    for name in FIDELITY_FILES:
        files.append(Path(shutil.copy(pydicom_data_dir / name, src / name)))
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    direct = storescp("DIRECT", bit_preserving=True)
    ok(peers.storescu(direct.port, files, called_ae="DIRECT", propose="original"))
    direct.wait_for(len(uids))
    fast = scp(max_pdu=16384)        # small PDUs: every real file arrives in many fragments
    ok(peers.storescu(fast.port, files, propose="original"))
    got = fast.by_uid()
    assert set(got) == set(uids)
    for uid, original in uids.items():
        ref = direct.file_for(uid)
        assert ref is not None, uid
        ref_ts, ref_data = read_part10(ref)
        ts, data = got[uid]
        assert ts == ref_ts == read_part10(original)[0], original.name
        assert data == ref_data, f"{original.name}: spooled bytes differ from what storescu sent"


def test_rejections_carry_the_right_reasons(dcmtk: Any, scp: Callable[..., Scp],
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    s = scp(allowed_calling_aes=["CT1", "ECHOSCU"])
    bad = peers.echoscu(s.port, calling_ae="INTRUDER")
    assert bad.returncode != 0 and "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
    wrong = peers.echoscu(s.port, called_ae="NOTME", calling_ae="CT1")
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
    ok(peers.echoscu(s.port, calling_ae="CT1"))
    assert "rejecting association from INTRUDER@127.0.0.1 to FASTROUTE: calling AE title" in caplog.text
    assert "called AE title 'NOTME' is not 'FASTROUTE'" in caplog.text

    far = scp(allowed_peers=["10.0.0.0/8"])
    res = peers.echoscu(far.port)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Rejected Permanent" in out and "Reason: No Reason" in out, out
    assert "peer address not in allowed_peers" in caplog.text

    one = scp(max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", one.port, ae_title="FASTROUTE")
    try:
        assert held.is_established
        peers.wait_until(lambda: one.receiver.active() == 1, 5)
        busy = peers.echoscu(one.port)
        out = busy.stdout + busy.stderr
        assert busy.returncode != 0 and "Rejected Transient" in out and "Local Limit Exceeded" in out, out
    finally:
        held.release()
    peers.wait_until(lambda: one.receiver.active() == 0, 5)
    ok(peers.echoscu(one.port))


def test_concurrent_associations_share_commits(tmp_path: Path, dcmtk: Any, scp: Callable[..., Scp]) -> None:
    s = scp(group_commit_delay=0.005)
    batches = [tiny(tmp_path, 10, name=f"b{i}") for i in range(4)]
    results: list[Any] = [None] * 4

    def send(i: int) -> None:
        results[i] = peers.storescu(s.port, batches[i], calling_ae=f"SCU{i}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in results:
        ok(r)
    got = s.by_uid()
    assert len(got) == 40
    for path in (p for b in batches for p in b):
        assert got[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] == read_part10(path)
    assert s.committer.objects == 40 and s.committer.commits < 40   # group commit across associations


def test_spool_full_answers_out_of_resources(tmp_path: Path, dcmtk: Any, scp: Callable[..., Scp]) -> None:
    s = scp(min_free_bytes="1000TiB")
    ds = pydicom.dcmread(tiny(tmp_path, 1)[0])
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", s.port, ae_title="FASTROUTE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xA700 and "spool full" in status.ErrorComment
    res = peers.storescu(s.port, tiny(tmp_path, 2, name="more"))
    assert res.returncode != 0 or "0xa700" in (res.stdout + res.stderr).lower()
    assert s.stored() == []


# -- pynetdicom as the SCU ----------------------------------------------------------------------

def test_pynetdicom_scu_with_extended_negotiation(tmp_path: Path, scp: Callable[..., Scp]) -> None:
    s = scp()
    path = tiny(tmp_path, 1)[0]
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"user"
    identity.secondary_field = b"secret"
    identity.positive_response_requested = True
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 4
    window.maximum_number_operations_performed = 4
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CTImageStorage
    role.scu_role, role.scp_role = True, False
    assoc = ae.associate("127.0.0.1", s.port, ae_title="FASTROUTE", ext_neg=[identity, window, role])
    assert assoc.is_established
    # The SCP announces the SCU's identity: one implementation, one UID and version name.
    assert assoc.acceptor.implementation_version_name == acse.IMPLEMENTATION_VERSION_NAME == "FASTROUTE_010"
    assert assoc.acceptor.implementation_class_uid == acse.IMPLEMENTATION_CLASS_UID
    assert assoc.send_c_echo().Status == 0
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0
    ((uid, ts, data),) = s.stored()
    assert uid == ds.SOPInstanceUID and ts == ExplicitVRLittleEndian
    got = read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)
    assert_same_dataset(got, ds)


# -- raw peers: faults --------------------------------------------------------------------------

def test_garbage_truncation_and_aborts_leave_the_server_serving(
        tmp_path: Path, scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    s = scp()
    uid, data = synth_dataset(tmp_path)
    cx = [(1, CT, [ExplicitVRLittleEndian])]

    junk = RawPeer(s.port)                       # not DICOM at all
    junk.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = junk.recv_pdu()
    assert got is None or got[0] == pdu.A_ABORT
    junk.close()

    cut = RawPeer(s.port)                        # an A-ASSOCIATE-RQ cut short, then EOF
    cut.send(struct.pack(">BBI", 1, 0, 300) + b"\0" * 40)
    cut.sock.shutdown(socket.SHUT_WR)
    assert cut.recv_pdu() is None
    cut.close()

    for how in ("abort", "close"):               # half an object, then A-ABORT or a plain close
        raw = RawPeer(s.port)
        assert raw.associate(cx)[0] == pdu.A_ASSOCIATE_AC
        raw.send_message(1, store_rq(1, uid))
        raw.send(pdv(1, False, False, data[: len(data) // 2]))
        if how == "abort":
            raw.send(pdu.encode_abort(0, 0))
        raw.close()
        peers.wait_until(lambda: "unacknowledged object was discarded" in caplog.text, 5)
        caplog.clear()

    bad_pdv = RawPeer(s.port)                    # a P-DATA-TF whose PDV length overruns
    assert bad_pdv.associate(cx)[0] == pdu.A_ASSOCIATE_AC
    bad_pdv.send(struct.pack(">BBIIBB", 4, 0, 6, 100, 1, 3))
    got = bad_pdv.recv_pdu()
    assert got is not None and got[0] == pdu.A_ABORT and got[1][2] == 2   # provider abort
    assert bad_pdv.recv_pdu() is None
    bad_pdv.close()

    assert s.stored() == []
    assert pynetdicom_echo_ok(s.port)
    peers.wait_until(lambda: not s.receiver._conns, 5)   # type: ignore[union-attr]
    good = RawPeer(s.port)
    assert good.associate(cx)[0] == pdu.A_ASSOCIATE_AC
    good.send_message(1, store_rq(1, uid), data)
    assert good.response()[0x0900] == 0
    good.release()
    assert [u for u, _, _ in s.stored()] == [uid]


def test_statuses_for_unsupported_mismatch_unreadable(tmp_path: Path, scp: Callable[..., Scp]) -> None:
    s = scp(max_pdu=4096)
    uid, data = synth_dataset(tmp_path)
    raw = RawPeer(s.port)
    ac = raw.associate([(1, CT, [ExplicitVRLittleEndian]), (3, "1.2.3.4.5.6", [ExplicitVRLittleEndian])],
                       max_pdu=512)
    assert ac[0] == pdu.A_ASSOCIATE_AC
    find = pdu.encode_command({0x0002: CT, 0x0100: 0x0020, 0x0110: 1, 0x0700: 0, 0x0800: 0x0102})
    raw.send_message(1, find, b"\x08\x00\x52\x00CS\x06\x00STUDY ")
    rsp = raw.response()
    assert (rsp[0x0100], rsp[0x0120], rsp[0x0900]) == (0x8020, 1, 0x0211)
    raw.send_message(1, store_rq(2, uid + ".1"), data, max_pdu=4096)
    rsp = raw.response()
    assert (rsp[0x0100], rsp[0x0120], rsp[0x0900], rsp[0x1000]) == (0x8001, 2, 0xA900, uid + ".1")
    raw.send_message(1, store_rq(3, uid), data[:9])
    rsp = raw.response()
    assert rsp[0x0900] == 0xC000 and "parsed" in str(rsp[0x0902])
    raw.send_message(1, store_rq(4, uid), data, max_pdu=4096)
    assert raw.response()[0x0900] == 0
    raw.send_message(1, dimse.encode_c_echo_rq(5))   # C-ECHO on a storage context: answered
    assert raw.response()[0x0900] == 0
    raw.release()
    assert [u for u, _, _ in s.stored()] == [uid]


def test_oversized_object_and_pdu_are_aborted(tmp_path: Path, scp: Callable[..., Scp],
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    s = scp(max_pdu=4096, max_object_bytes=5000)
    uid, data = synth_dataset(tmp_path)
    assert len(data) > 5000
    raw = RawPeer(s.port)
    assert raw.associate([(1, CT, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    raw.send_message(1, store_rq(1, uid), data, max_pdu=4096)
    got = raw.recv_pdu()
    assert got is not None and got[0] == pdu.A_ABORT
    raw.close()
    assert "dataset larger than 5000 bytes" in caplog.text
    big = RawPeer(s.port)
    assert big.associate([(1, CT, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    big.send_message(1, store_rq(1, uid), data, max_pdu=16384)   # PDUs beyond our 4096
    got = big.recv_pdu()
    assert got is not None and got[0] == pdu.A_ABORT
    big.close()
    assert s.stored() == [] and pynetdicom_echo_ok(s.port)


def test_artim_and_network_timeouts(scp: Callable[..., Scp], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    s = scp(acse_timeout=0.5, network_timeout=0.8)
    silent = RawPeer(s.port)
    start = time.monotonic()
    assert silent.recv_pdu(timeout=5) is None          # closed without an A-ASSOCIATE-RQ
    assert 0.4 < time.monotonic() - start < 3
    silent.close()
    idle = RawPeer(s.port)
    assert idle.associate([(1, CT, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    start = time.monotonic()
    got = idle.recv_pdu(timeout=5)
    assert got is not None and got[0] == pdu.A_ABORT
    assert 0.7 < time.monotonic() - start < 3
    idle.close()
    assert "ARTIM" in caplog.text
    peers.wait_until(lambda: "network_timeout" in caplog.text, 5)


def test_stop_aborts_associations_left_after_grace(scp: Callable[..., Scp]) -> None:
    s = scp()
    ae = AE(ae_title="LINGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", s.port, ae_title="FASTROUTE")
    assert assoc.is_established
    peers.wait_until(lambda: s.receiver.active() == 1, 5)
    start = time.monotonic()
    s.receiver.stop(0.5)
    assert time.monotonic() - start < 5
    peers.wait_until(lambda: assoc.is_aborted, 5, message="association not aborted by stop()")
    assert not peers.is_listening(s.port)


def test_pipelined_requests_wait_for_the_commit_and_are_answered_in_order(
        tmp_path: Path, scp: Callable[..., Scp]) -> None:
    """A peer that does not wait for responses: requests queue behind the outstanding commit."""
    s = scp(group_commit_delay=0.05)
    objects = [synth_dataset(tmp_path) for _ in range(3)]
    raw = RawPeer(s.port)
    assert raw.associate([(1, CT, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    for i, (uid, data) in enumerate(objects, 1):
        raw.send_message(1, store_rq(i, uid), data)
    raw.send_message(1, dimse.encode_c_echo_rq(4))
    raw.send(pdu.encode_release_rq())
    answers = [raw.response() for _ in range(4)]
    assert [(a[0x0120], a[0x0900]) for a in answers] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    got = raw.recv_pdu()
    assert got is not None and got[0] == pdu.A_RELEASE_RP
    raw.close()
    assert [u for u, _, _ in s.stored()] == [uid for uid, _ in objects]


def test_reading_pauses_behind_a_slow_commit_and_resumes(tmp_path: Path, scp: Callable[..., Scp]) -> None:
    """Objects pipelined behind a slow commit: reading pauses (bounded memory), nothing deadlocks."""
    s = scp(group_commit_delay=0.15, pause_at_bytes=256 * 1024)
    files = synth.make_study(tmp_path / "ct", n_instances=10)     # ~0.5 MB each
    objects = [(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), read_part10(f)[1])
               for f in files]
    raw = RawPeer(s.port)
    assert raw.associate([(1, CT, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    conn = next(iter(s.receiver._conns))   # type: ignore[union-attr]

    def pipeline() -> None:
        for i, (uid, data) in enumerate(objects, 1):
            raw.send_message(1, store_rq(i, uid), data)

    sender = threading.Thread(target=pipeline)
    sender.start()
    answers = [raw.response() for _ in objects]
    sender.join(30)
    assert [a[0x0900] for a in answers] == [0] * len(objects)
    assert conn.pauses > 0, "reading never paused although objects waited behind a commit"
    assert not conn.paused
    raw.release()
    assert [u for u, _, _ in s.stored()] == [uid for uid, _ in objects]


# -- DIMSE dispatch: services other than C-STORE ------------------------------------------------

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


def test_any_request_goes_to_its_registered_handler(tmp_path: Path, scp: Callable[..., Scp],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A C-FIND and an N-ACTION reach the handlers registered for them, with the association's
    identity and the request's dataset; a Pending reply (another thread's future) holds the
    requests behind it until it is sent; C-CANCEL is ignored; unserved requests get 0x0211."""
    seen: list[tuple[Peer, Message]] = []
    release = threading.Event()

    def find(peer: Peer, msg: Message) -> Reply:
        seen.append((peer, msg))
        return Reply(0xA700, "no index here", elements={0x1020: 0})

    def action(peer: Peer, msg: Message) -> Pending:
        seen.append((peer, msg))
        fut: Future[int] = Future()
        threading.Thread(target=lambda: (release.wait(10), fut.set_result(7))).start()
        return Pending(fut, lambda f: Reply(0x0000, elements={0x1008: f.result()}))

    s = scp(handlers={CommandField.C_FIND_RQ: find, CommandField.N_ACTION_RQ: action},
            sop_classes=[STUDY_ROOT_FIND, STORAGE_COMMITMENT])
    raw = RawPeer(s.port)
    ac = raw.associate([(1, STUDY_ROOT_FIND, [ExplicitVRLittleEndian]),
                        (3, STORAGE_COMMITMENT, [ExplicitVRLittleEndian]),
                        (5, "1.2.840.10008.5.1.4.1.2.2.3", [ExplicitVRLittleEndian])], calling="QR")
    assert ac[0] == pdu.A_ASSOCIATE_AC
    identifier = b"\x08\x00\x52\x00\x43\x53\x06\x00STUDY "
    raw.send_message(1, pdu.encode_command({0x0002: STUDY_ROOT_FIND, 0x0100: 0x0020, 0x0110: 11,
                                            0x0700: 0, 0x0800: 0x0102}), identifier)
    rsp = raw.response()
    assert (rsp[0x0100], rsp[0x0120], rsp[0x0900], rsp[0x0902], rsp[0x1020], rsp[0x0002]) == (
        0x8020, 11, 0xA700, "no index here", 0, STUDY_ROOT_FIND)
    peer, msg = seen[0]
    assert (peer.calling_ae, peer.called_ae, peer.ip) == ("QR", "FASTROUTE", "127.0.0.1")
    assert peer.contexts[1] == ExplicitVRLittleEndian and 5 not in peer.contexts   # C-GET: not accepted
    assert msg.field == CommandField.C_FIND_RQ and msg.data == identifier

    # N-ACTION answered later; the C-ECHO and C-CANCEL sent meanwhile wait behind it.
    raw.send_message(3, pdu.encode_command({0x0003: STORAGE_COMMITMENT, 0x0100: 0x0130, 0x0110: 12,
                                            0x0800: 0x0101, 0x1001: STORAGE_COMMITMENT + ".1",
                                            0x1008: 1}))
    raw.send_message(3, pdu.encode_command({0x0100: 0x0FFF, 0x0120: 12, 0x0800: 0x0101}))
    raw.send_message(3, pdu.encode_command({0x0100: 0x0120, 0x0110: 13, 0x0800: 0x0101,
                                            0x0003: STORAGE_COMMITMENT, 0x1001: "1.2.3"}))   # N-SET
    raw.send_message(1, dimse.encode_c_echo_rq(14))
    raw.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        raw.sock.recv(1)                 # nothing until the N-ACTION's future is done
    release.set()
    answers = [raw.response() for _ in range(3)]
    assert [(a[0x0100], a[0x0120], a[0x0900]) for a in answers] == [
        (0x8130, 12, 0), (0x8120, 13, 0x0211), (0x8030, 14, 0)]
    assert answers[0][0x1008] == 7 and answers[0][0x1000] == STORAGE_COMMITMENT + ".1"
    raw.release()
    assert len(seen) == 2 and seen[1][1].field == CommandField.N_ACTION_RQ
    assert "N-SET-RQ (0x0120) is not served -> status 0x0211" in caplog.text


def test_a_handler_that_raises_costs_only_its_request(tmp_path: Path, scp: Callable[..., Scp]) -> None:
    """0xA700 with an Error Comment, then the association goes on; a rule that raises in the
    C-STORE service is answered the same way (our bug: the modality should retry)."""
    def broken(peer: Peer, msg: Message) -> Reply:
        raise RuntimeError("bug")

    s = scp(handlers={CommandField.C_FIND_RQ: broken}, sop_classes=[STUDY_ROOT_FIND])
    raw = RawPeer(s.port)
    assert raw.associate([(1, STUDY_ROOT_FIND, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    raw.send_message(1, pdu.encode_command({0x0002: STUDY_ROOT_FIND, 0x0100: 0x0020, 0x0110: 1,
                                            0x0700: 0, 0x0800: 0x0102}), b"\x08\x00\x52\x00\x43\x53\x00\x00")
    rsp = raw.response()
    assert rsp[0x0900] == 0xA700 and "bug" in str(rsp[0x0902])
    raw.send_message(1, dimse.encode_c_echo_rq(2))
    assert raw.response()[0x0900] == 0
    raw.release()


def test_a_rule_that_raises_is_answered_out_of_resources(tmp_path: Path, scp: Callable[..., Scp],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    s = scp()
    uid, data = synth_dataset(tmp_path)

    class Exploding:
        """A rule set whose evaluation raises, as a buggy rule would."""

        def route(self, *args: Any, **kwargs: Any) -> Any:
            raise ZeroDivisionError("rule bug")

    service = s.receiver.handlers[CommandField.C_STORE_RQ]
    assert isinstance(service, StoreService)
    service.rules = Exploding()           # type: ignore[assignment]
    raw = RawPeer(s.port)
    assert raw.associate([(1, CT, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    raw.send_message(1, store_rq(1, uid), data)
    rsp = raw.response()
    assert (rsp[0x0900], rsp[0x0902]) == (0xA700, "internal error")
    raw.release()
    assert s.stored() == []
    assert "routing failed" in caplog.text and "ZeroDivisionError: rule bug" in caplog.text


def test_a_response_sent_to_the_scp_is_a_protocol_error(scp: Callable[..., Scp]) -> None:
    s = scp()
    raw = RawPeer(s.port)
    assert raw.associate([(1, CT, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC
    raw.send_message(1, dimse.encode_c_store_rsp(1, CT, "1.2.3", 0))
    got = raw.recv_pdu()
    assert got is not None and got[0] == pdu.A_ABORT and got[1][3] == 2   # unexpected PDU
    raw.close()
