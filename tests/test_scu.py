"""fastroute.dicom.scu.Connection against real peers: DCMTK storescp, pynetdicom's SCP and a
scripted raw SCP.

What must hold: bytes arrive exactly as sent (storescp +B writes the dataset as received, so
the file after its meta group must equal the sent bytes), every status and comment comes back
as the peer sent it, each way of failing raises the exception the scheduler's retry and
backoff decisions depend on, and requests the peer sends on our association are served.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import faultproxy
import peers
import pytest
from faultproxy import Fault
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from fastroute.config import DestinationConfig
from fastroute.dicom import acse, dimse, pdu
from fastroute.dicom.dimse import CommandField, Message, Peer, Pending, Reply
from fastroute.dicom.ul import AssociateRequest, ReleaseRequest, Role, UpperLayer
from fastroute.dicom.scu import (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, AssociationFailed,
                                 Connection, NoContextAccepted, OutcomeUnknown, StoreResult, echo)

StoreSCPFactory = Callable[..., peers.StoreSCP]
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
COMPRESSED_FILES = [
    "MR2_J2KR.dcm",                     # JPEG 2000 lossless
    "OBXXXX1A_rle.dcm",                 # RLE
    "JPEG-LL.dcm",                      # JPEG lossless SV1
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "color3d_jpeg_baseline.dcm",        # JPEG baseline, 6 MB
    "SC_rgb_expb.dcm",                  # Explicit VR big endian
    "RG1_UNCR.dcm",                     # 7 MB uncompressed
]


def c_store_body(path: Path) -> tuple[str, str, str, bytes]:
    """(SOP class, SOP instance, transfer syntax, dataset bytes as a C-STORE carries them)."""
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        return (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                str(meta.TransferSyntaxUID), fp.read())


def destination(port: int, ae_title: str = "DEST", **options: Any) -> DestinationConfig:
    options.setdefault("dimse_timeout", 30.0)
    options.setdefault("acse_timeout", 10.0)
    return DestinationConfig(name="dest", ae_title=ae_title, host=peers.HOST, port=port, **options)


def store(conn: Connection, body: tuple[str, str, str, bytes]) -> StoreResult:
    sop_class, sop_uid, ts, data = body
    conn.ensure({(sop_class, ts)})
    cx = conn.context_for(sop_class, ts)
    assert cx is not None, f"{sop_class} in {ts} not accepted"
    return conn.send_raw(cx, sop_class, sop_uid, memoryview(data))


# -- DCMTK storescp --------------------------------------------------------------------------


@pytest.mark.parametrize("peer_max_pdu", [None, 4096])
def test_bytes_arrive_exactly_as_sent(storescp: StoreSCPFactory, pydicom_data_dir: Path,
                                      synth_study: Callable[..., list[Path]],
                                      peer_max_pdu: int | None) -> None:
    """Tiny, multi-MB and compressed objects over one association, one PDU size or another."""
    files = synth_study(n_instances=3, tiny=True)
    files += synth_study(n_instances=1, rows=2048, cols=1024, transfer_syntax=ImplicitVRLittleEndian)
    files += [pydicom_data_dir / name for name in COMPRESSED_FILES]
    bodies = [c_store_body(f) for f in files]
    assert max(len(b[3]) for b in bodies) > 4_000_000
    scp = storescp("DEST", bit_preserving=True, max_pdu=peer_max_pdu)
    conn = Connection(destination(scp.port), "FASTROUTE")
    assoc = conn.ensure({(b[0], b[2]) for b in bodies})
    for body in bodies:
        assert store(conn, body) == StoreResult(0, "")
    assert conn.assoc is assoc, "the association was not reused"
    conn.release()
    assert conn.assoc is None
    scp.wait_for(len(bodies), timeout=30)
    for sop_class, sop_uid, ts, data in bodies:
        received = scp.file_for(sop_uid)
        assert received is not None, f"{sop_uid} not received"
        got_class, got_uid, got_ts, got = c_store_body(received)
        assert (got_class, got_uid, got_ts) == (sop_class, sop_uid, ts)
        assert got == data, f"{sop_uid} ({ts}): bytes differ"


def test_association_reused_across_many_sends(storescp: StoreSCPFactory,
                                              synth_study: Callable[..., list[Path]]) -> None:
    bodies = [c_store_body(f) for f in synth_study(n_instances=40, tiny=True)]
    scp = storescp("DEST", extra_args=["-v"])
    conn = Connection(destination(scp.port), "FASTROUTE")
    first = conn.ensure({(CT, ExplicitVRLittleEndian)})
    before = conn.last_used
    for body in bodies:
        assert store(conn, body).status == 0
        assert conn.assoc is first
    assert conn.last_used > before
    assert conn.accepted(CT) == [ExplicitVRLittleEndian]
    assert conn.context_for(CT, ImplicitVRLittleEndian) is None
    # A new pair re-associates once, keeping what was proposed before.
    second = conn.ensure({(MR, ExplicitVRLittleEndian)})
    assert second is not first and conn.proposed == {(CT, ExplicitVRLittleEndian),
                                                     (MR, ExplicitVRLittleEndian)}
    assert store(conn, bodies[0]).status == 0
    conn.release()
    scp.wait_for(40)
    assert peers.wait_until(lambda: scp.log().count("Association Release") == 2, 10)
    assert scp.log().count("Association Received") == 2


def test_abort_after_request_is_outcome_unknown(storescp: StoreSCPFactory,
                                                synth_study: Callable[..., list[Path]]) -> None:
    [body] = [c_store_body(f) for f in synth_study(n_instances=1, tiny=True)]
    scp = storescp("DEST", abort_after=True)
    conn = Connection(destination(scp.port), "FASTROUTE")
    with pytest.raises(OutcomeUnknown, match="aborted by FASTROUTE -> DEST@"):
        store(conn, body)
    assert conn.assoc is None
    conn.abort()   # what schedule does next: harmless when already gone


def test_refused_association_says_why(storescp: StoreSCPFactory) -> None:
    """The wording the old pynetdicom engine used, which operators' alerts may match."""
    scp = storescp("DEST", refuse=True)
    with pytest.raises(AssociationFailed) as fast:
        Connection(destination(scp.port), "FASTROUTE").ensure({(CT, ExplicitVRLittleEndian)})
    assert str(fast.value) == (f"association rejected by FASTROUTE -> DEST@127.0.0.1:{scp.port}: "
                               "result=1 source=1 reason=1 (no reason given)")


def test_no_context_accepted_says_why(storescp: StoreSCPFactory) -> None:
    scp = storescp("DEST", accept=[ExplicitVRLittleEndian], sop_classes=[MR])
    dest = destination(scp.port)
    pairs = {(CT, str(ExplicitVRLittleEndian)), (CT, str(ImplicitVRLittleEndian))}
    with pytest.raises(NoContextAccepted) as fast:
        Connection(dest, "FASTROUTE").ensure(pairs)
    # The message and reasons the pynetdicom engine gave (it was compared live until it left).
    assert str(fast.value) == (f"DEST@127.0.0.1:{scp.port} accepted none of the 2 presentation "
                               "context(s) proposed")
    assert fast.value.rejected == {CT: "abstract syntax (SOP class) not supported"}


def test_nothing_listening_is_association_failed() -> None:
    port = peers.free_port()
    conn = Connection(destination(port, acse_timeout=2.0), "FASTROUTE")
    with pytest.raises(AssociationFailed, match=f"cannot connect to FASTROUTE -> DEST@127.0.0.1:{port}"):
        conn.ensure({(CT, ExplicitVRLittleEndian)})
    assert conn.assoc is None


ProxyFactory = Callable[..., faultproxy.FaultProxy]


def test_response_lost_after_the_object_was_stored(storescp: StoreSCPFactory,
                                                   fault_proxy: ProxyFactory,
                                                   synth_study: Callable[..., list[Path]]) -> None:
    """The destination stored it but the answer never came: OutcomeUnknown (resend)."""
    [body] = [c_store_body(f) for f in synth_study(n_instances=1, tiny=True)]
    scp = storescp("DEST")
    proxy = fault_proxy(scp.port, fault=Fault(cut_down_at_pdu=faultproxy.P_DATA_TF))
    conn = Connection(destination(proxy.port), "FASTROUTE")
    with pytest.raises(OutcomeUnknown, match="C-STORE response"):
        store(conn, body)
    assert conn.assoc is None
    scp.wait_for(1)


def test_connection_cut_while_sending(storescp: StoreSCPFactory, fault_proxy: ProxyFactory,
                                      synth_study: Callable[..., list[Path]]) -> None:
    [body] = [c_store_body(f) for f in synth_study(n_instances=1)]      # 512 x 512 CT
    scp = storescp("DEST")
    proxy = fault_proxy(scp.port)
    conn = Connection(destination(proxy.port), "FASTROUTE")
    conn.ensure({(body[0], body[2])})
    proxy.set_fault(Fault(cut_up_after=0))
    with pytest.raises(OutcomeUnknown):
        store(conn, body)
    assert conn.assoc is None


@pytest.mark.parametrize("fault, why", [
    (Fault(blackhole=True), r"no answer within the ACSE timeout \(1 s\)"),
    # accepted and closed at once: EOF, reset or broken pipe, depending on timing; the reset
    # can even beat connect() to its result
    (Fault(refuse=True), r"(association with|cannot connect to) FASTROUTE -> DEST@127\.0\.0\.1:\d+"
                         r"(:| failed: )"),
])
def test_no_association_answer(storescp: StoreSCPFactory, fault_proxy: ProxyFactory,
                               fault: Fault, why: str) -> None:
    scp = storescp("DEST")
    proxy = fault_proxy(scp.port, fault=fault)
    conn = Connection(destination(proxy.port, acse_timeout=1.0), "FASTROUTE")
    start = time.monotonic()
    with pytest.raises(AssociationFailed, match=why):
        conn.ensure({(CT, ExplicitVRLittleEndian)})
    assert time.monotonic() - start < 3 and conn.assoc is None


# -- pynetdicom Storage SCP in-process -------------------------------------------------------


class PynetdicomSCP:
    """pynetdicom's Storage SCP in this process, with a swappable C-STORE handler."""

    def __init__(self, handler: Callable[[evt.Event], Any]) -> None:
        self.handler = handler
        self.received: list[bytes] = []
        self.ae = AE("PYSCP")
        for cx in StoragePresentationContexts:
            self.ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self.port = peers.free_port()
        server = self.ae.start_server(
            (peers.HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None
        self.server: ThreadedAssociationServer = server

    def _on_store(self, event: evt.Event) -> Any:
        self.received.append(event.request.DataSet.getvalue())  # type: ignore[union-attr]
        return self.handler(event)

    def associations(self) -> list[Association]:
        return list(self.server.active_associations)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[[Callable[[evt.Event], Any]], PynetdicomSCP]]:
    started: list[PynetdicomSCP] = []

    def start(handler: Callable[[evt.Event], Any]) -> PynetdicomSCP:
        scp = PynetdicomSCP(handler)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def _status(code: int, comment: str | None = None) -> Callable[[evt.Event], Dataset]:
    def handler(event: evt.Event) -> Dataset:
        ds = Dataset()
        ds.Status = code
        if comment:
            ds.ErrorComment = comment
        return ds
    return handler


@pytest.mark.parametrize("code, comment", [(0xA700, "spool full"), (0xB000, "coerced"),
                                           (0xC123, None), (0x0000, None)])
def test_status_and_comment_come_back(pynetdicom_scp: Callable[..., PynetdicomSCP],
                                      synth_study: Callable[..., list[Path]], code: int,
                                      comment: str | None) -> None:
    scp = pynetdicom_scp(_status(code, comment))
    bodies = [c_store_body(f) for f in synth_study(n_instances=2, tiny=True)]
    conn = Connection(destination(scp.port, ae_title="PYSCP"), "FASTROUTE")
    for body in bodies:
        assert store(conn, body) == StoreResult(code, comment or "")
    assert scp.received == [b[3] for b in bodies]
    conn.release()
    assert conn.assoc is None


def test_no_answer_is_outcome_unknown_after_the_dimse_timeout(
        pynetdicom_scp: Callable[..., PynetdicomSCP],
        synth_study: Callable[..., list[Path]]) -> None:
    answer = threading.Event()

    def never(event: evt.Event) -> int:
        answer.wait(10)
        return 0

    scp = pynetdicom_scp(never)
    [body] = [c_store_body(f) for f in synth_study(n_instances=1, tiny=True)]
    conn = Connection(destination(scp.port, ae_title="PYSCP", dimse_timeout=1.0), "FASTROUTE")
    conn.ensure({(body[0], body[2])})
    start = time.monotonic()
    try:
        with pytest.raises(OutcomeUnknown, match=r"DIMSE timeout \(1 s\)"):
            store(conn, body)
    finally:
        answer.set()
    assert 0.9 < time.monotonic() - start < 5
    assert conn.assoc is None


def _readable(conn: Connection) -> bool:
    assert conn.assoc is not None
    return bool(select.select([conn.assoc.sock], [], [], 0)[0])


@pytest.mark.parametrize("via", ["ensure", "send_raw"])
@pytest.mark.parametrize("how", ["abort", "release"])
def test_peer_ending_an_idle_association(pynetdicom_scp: Callable[..., PynetdicomSCP],
                                         synth_study: Callable[..., list[Path]], how: str,
                                         via: str) -> None:
    """ensure() replaces it; send_raw() on it raises AssociationFailed (nothing was sent)."""
    scp = pynetdicom_scp(_status(0))
    bodies = [c_store_body(f) for f in synth_study(n_instances=2, tiny=True)]
    conn = Connection(destination(scp.port, ae_title="PYSCP"), "FASTROUTE")
    assert store(conn, bodies[0]).status == 0
    first = conn.assoc
    [assoc] = scp.associations()
    assert assoc.requestor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert assoc.requestor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    ender = threading.Thread(target=getattr(assoc, how))
    ender.start()
    peers.wait_until(lambda: _readable(conn), 5, message="the peer's PDU never arrived")
    if via == "send_raw":
        with pytest.raises(AssociationFailed, match="closed by the peer while idle"):
            conn.send_raw(1, bodies[1][0], bodies[1][1], bodies[1][3])
        assert conn.assoc is None and conn.proposed == set()
    assert store(conn, bodies[1]).status == 0      # via ensure(): a fresh association
    assert conn.assoc is not first
    ender.join(10)
    assert not ender.is_alive()
    if how == "release":
        assert assoc.is_released, "our A-RELEASE-RP did not reach the peer"
    assert scp.received == [bodies[0][3], bodies[1][3]]
    conn.release()


# -- requests from the peer on our association; C-ECHO ----------------------------------------


class ScriptedSCP:
    """A raw acceptor on a thread (fastroute's own upper layer, bytes on a socket) that accepts
    one association and then plays ``script``; what it received is kept for the test."""

    def __init__(self, script: Callable[["ScriptedSCP"], None]) -> None:
        self.server = socket.create_server((peers.HOST, 0))
        self.port = int(self.server.getsockname()[1])
        self.script = script
        self.got: list[Message] = []
        self.error: BaseException | None = None
        self.sock: socket.socket | None = None
        self.ul = UpperLayer(Role.ACCEPTOR, max_pdu_in=0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.settimeout(10)
            self.sock, _ = self.server.accept()
            self.sock.settimeout(10)
            rq = self._event()
            assert isinstance(rq, AssociateRequest), rq
            ac, contexts = acse.negotiate(rq.primitive, acse.supported_contexts([COMMITMENT]), 0)
            self.sock.sendall(self.ul.accept(ac, contexts))
            self.script(self)
        except BaseException as exc:   # reported by join()
            self.error = exc
        finally:
            if self.sock is not None:
                self.sock.close()
            self.server.close()

    def _event(self) -> object:
        assert self.sock is not None
        while (event := self.ul.next_event()) is None:
            data = self.sock.recv(65536)
            assert data, "the SCU closed the connection"
            self.ul.feed(data)
        return event

    def message(self) -> Message:
        event = self._event()
        assert isinstance(event, Message), event
        self.got.append(event)
        return event

    def send(self, context_id: int, command: bytes, dataset: bytes | None = None,
             split: bool = False) -> None:
        """A message as P-DATA-TF PDUs; ``split``: in two TCP writes cut mid-PDU."""
        assert self.sock is not None
        stream = b"".join(header + bytes(fragment)
                          for is_command, payload in ((True, command), (False, dataset))
                          if payload is not None
                          for header, fragment in pdu.p_data_tf(context_id, is_command, payload, 0))
        cut = len(stream) // 2 if split else len(stream)
        self.sock.sendall(stream[:cut])
        if cut < len(stream):
            self.sock.sendall(stream[cut:])

    def answer_release(self) -> None:
        assert isinstance(self._event(), ReleaseRequest)
        assert self.sock is not None
        self.sock.sendall(self.ul.release_reply())

    def join(self) -> None:
        self.thread.join(15)
        assert not self.thread.is_alive(), "the scripted SCP did not finish"
        if self.error is not None:
            raise self.error


COMMITMENT = "1.2.840.10008.1.20.1"
EVENT_INFO = b"\x08\x00\x50\x00\x53\x48\x04\x00ACC1"   # any dataset: the handler gets its bytes


def event_report(msg_id: int) -> bytes:
    return pdu.encode_command({0x0002: COMMITMENT, 0x0100: CommandField.N_EVENT_REPORT_RQ,
                               0x0110: msg_id, 0x0800: 0x0001, 0x1000: COMMITMENT + ".1",
                               0x1002: 1})


def test_requests_from_the_peer_are_served_while_waiting_and_while_idle(
        synth_study: Callable[..., list[Path]]) -> None:
    """An SCP that sends requests on our association (as storage commitment's N-EVENT-REPORT or
    C-GET's C-STOREs do) before answering ours, and again between our messages: each goes to
    its handler or gets 0x0211, and the C-STOREs still complete on the same association."""
    bodies = [c_store_body(f) for f in synth_study(n_instances=2, tiny=True)]
    replies: list[dict[int, Any]] = []

    def script(peer: ScriptedSCP) -> None:
        store1 = peer.message()
        peer.send(store1.context_id, event_report(77), EVENT_INFO)          # before the response
        replies.append(peer.message().command)
        peer.send(store1.context_id, pdu.encode_command({0x0100: 0x0110, 0x0110: 78, 0x0800: 0x0101,
                                                         0x0003: COMMITMENT, 0x1001: "1.2.3"}))   # N-GET
        replies.append(peer.message().command)
        peer.send(store1.context_id, dimse.encode_c_store_rsp(store1.message_id, store1.sop_class_uid,
                                                              store1.sop_instance_uid, 0))
        peer.send(store1.context_id, event_report(79), EVENT_INFO, split=True)   # while the SCU is idle
        replies.append(peer.message().command)
        store2 = peer.message()
        peer.send(store2.context_id, dimse.encode_c_store_rsp(store2.message_id, store2.sop_class_uid,
                                                              store2.sop_instance_uid, 0xB000, "coerced"))
        peer.answer_release()

    served: list[tuple[Peer, Message]] = []

    def on_report(peer: Peer, msg: Message) -> Reply | Pending:
        served.append((peer, msg))
        if msg.message_id == 77:
            return Reply(0x0000, elements={0x1002: 1})
        later: Future[int] = Future()               # finished on another thread, as a commit is
        threading.Thread(target=later.set_result, args=(1,)).start()
        return Pending(later, lambda f: Reply(0x0000, elements={0x1002: f.result()}))

    scp = ScriptedSCP(script)
    conn = Connection(destination(scp.port), "FASTROUTE",
                      handlers={CommandField.N_EVENT_REPORT_RQ: on_report})
    assert store(conn, bodies[0]) == StoreResult(0, "")
    first = conn.assoc
    assert first is not None
    peers.wait_until(lambda: _readable(conn), 5, message="the idle-time request never arrived")
    assert store(conn, bodies[1]) == StoreResult(0xB000, "coerced")
    assert conn.assoc is first, "a request while idle must not cost the association"
    conn.release()
    scp.join()
    assert [(r[0x0100], r[0x0120], r[0x0900]) for r in replies] == [
        (0x8100, 77, 0), (0x8110, 78, 0x0211), (0x8100, 79, 0)]
    assert replies[0][0x1000] == COMMITMENT + ".1" and replies[0][0x1002] == replies[2][0x1002] == 1
    assert [m.message_id for _, m in served] == [77, 79]
    peer, msg = served[0]
    assert (peer.calling_ae, peer.called_ae) == ("FASTROUTE", "DEST") and msg.data == EVENT_INFO
    assert [m.sop_instance_uid for m in scp.got if m.field == CommandField.C_STORE_RQ] == [
        bodies[0][1], bodies[1][1]]


def test_echo_uses_our_own_scu(storescp: StoreSCPFactory) -> None:
    scp = storescp("DEST", extra_args=["-v"])
    ok, text = echo(destination(scp.port), "FASTROUTE")
    assert ok and text == f"C-ECHO FASTROUTE -> DEST@127.0.0.1:{scp.port}: success", text
    assert peers.wait_until(lambda: "Received Echo Request" in scp.log(), 10)
    port = peers.free_port()
    ok, text = echo(destination(port, acse_timeout=2.0), "FASTROUTE")
    assert not ok and text.startswith(f"cannot connect to FASTROUTE -> DEST@127.0.0.1:{port}"), text


def test_an_idle_peer_that_stops_mid_pdu_is_dropped_after_a_bounded_wait(
        synth_study: Callable[..., list[Path]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastroute.send")
    [body] = [c_store_body(f) for f in synth_study(n_instances=1, tiny=True)]
    done = threading.Event()

    def script(peer: ScriptedSCP) -> None:
        first = peer.message()
        peer.send(first.context_id, dimse.encode_c_store_rsp(first.message_id, first.sop_class_uid,
                                                             first.sop_instance_uid, 0))
        assert peer.sock is not None
        peer.sock.sendall(b"\x04\x00\x00")        # the start of a PDU header, then nothing
        done.wait(10)

    scp = ScriptedSCP(script)
    conn = Connection(destination(scp.port, network_timeout=0.5), "FASTROUTE")
    assert store(conn, body).status == 0
    peers.wait_until(lambda: _readable(conn), 5, message="the partial PDU never arrived")
    start = time.monotonic()
    with pytest.raises(AssociationFailed, match="closed by the peer while idle"):
        conn.send_raw(1, body[0], body[1], body[3])
    assert 0.4 < time.monotonic() - start < 3 and conn.assoc is None
    assert "sent part of a PDU or message and stopped" in caplog.text
    done.set()
    scp.join()
