"""Storage SCP: accept, peek, route and durably spool; answer success only after the commit.

pynetdicom does association negotiation and DIMSE; this module adds access control, reads the
few attributes routing needs straight from the received bytes (never a full decode), and
hands each object to the ``Committer``, which commits concurrent associations' objects in one
LMDB transaction (group commit) so durability does not cost one fsync per object.
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from fastroute.dicom.attrs import read_attributes
from fastroute.config import Config
from fastroute.errors import PeekError, SpoolError, SpoolFullError
from fastroute.routing.rules import RuleSet
from fastroute.spool import Incoming, Spool
from fastroute.spool.commit import Committer
from fastroute.spool.wakeup import Notifier

log = logging.getLogger("fastroute.receive")

# Transfer syntaxes accepted as sent (no conversion on the receive path).
ACCEPTED_SYNTAXES = [
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline
    "1.2.840.10008.1.2.4.51",   # JPEG Extended
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",      # RLE Lossless
    "1.2.840.10008.1.2.4.92",   # JPEG 2000 Part 2 Multi-component Lossless
    "1.2.840.10008.1.2.4.93",   # JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.101",  # MPEG2 Main Profile / High Level
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile / Level 4.1
    "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD-compatible
    "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 2D
    "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 3D
    "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC/H.264 Stereo
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main Profile
    "1.2.840.10008.1.2.4.108",  # HEVC/H.265 Main 10 Profile
]

# Attributes every object is indexed by, whatever the rules need.
INDEX_KEYWORDS = {
    0x00080016: "sop_class_uid", 0x00080018: "sop_instance_uid", 0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid", 0x00100020: "patient_id", 0x00080050: "accession_number",
    0x00080060: "modality",
}

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_DATASET_MISMATCH = 0xA900


class _ReusePortServer(ThreadedAssociationServer):
    """Association server whose socket lets several listener processes share the port."""

    def server_bind(self) -> None:
        assert self.socket is not None
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted sockets inherit TCP_NODELAY on Linux: set it on the listener.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


@dataclass
class _AssocStats:
    stored: int = 0
    refused: int = 0
    bytes: int = 0


class Receiver:
    """One listener: a pynetdicom AE whose C-STORE handler ends in a durable spool commit."""

    def __init__(self, cfg: Config, spool: Spool, rules: RuleSet, committer: Committer) -> None:
        self.cfg = cfg
        self.spool = spool
        self.rules = rules
        self.committer = committer
        self.tags = tuple(sorted(set(rules.tags) | set(INDEX_KEYWORDS)))
        self._networks = ([ipaddress.ip_network(p, strict=False) for p in cfg.allowed_peers]
                          if cfg.allowed_peers is not None else None)
        self._stats: dict[int, _AssocStats] = {}
        self.server: ThreadedAssociationServer | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.maximum_pdu_size = self.cfg.max_pdu
        ae.acse_timeout = self.cfg.acse_timeout
        ae.dimse_timeout = self.cfg.dimse_timeout
        ae.network_timeout = self.cfg.network_timeout
        ae.require_called_aet = self.cfg.require_called_ae
        ae.add_supported_context(Verification, ACCEPTED_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ACCEPTED_SYNTAXES)
        return ae

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ThreadedAssociationServer:
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        server = self.ae.make_server((self.cfg.host, self.cfg.port), evt_handlers=handlers,
                                     server_class=_ReusePortServer)
        self.ae._servers.append(server)
        thread = threading.Thread(target=server.serve_forever, name="fastroute-acceptor", daemon=True)
        thread.start()
        self.server = server
        log.info("listening as %s on %s:%d", self.cfg.ae_title, self.cfg.host, server.server_address[1])
        return server

    def active(self) -> int:
        return sum(1 for a in self.ae.active_associations if a.is_acceptor)

    def stop(self, grace: float) -> None:
        """Stop accepting, let running associations finish for ``grace`` s, then abort them."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        deadline = time.monotonic() + grace
        while self.active() and time.monotonic() < deadline:
            for a in self.ae.active_associations:
                a.join(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        left = self.active()
        if left:
            log.warning("aborting %d association(s) still open after %.0fs grace; their unacknowledged "
                        "objects were not accepted and will be re-sent by the modality", left, grace)
        self.ae.shutdown()

    # -- handlers ----------------------------------------------------------------------------

    @staticmethod
    def _peer(event: Any) -> tuple[str, str, str]:
        rq = event.assoc.requestor
        prim = rq.primitive   # set before negotiation; requestor.ae_title only after it
        calling = prim.calling_ae_title if prim is not None else rq.ae_title
        called = prim.called_ae_title if prim is not None else ""
        return str(calling).strip(), str(called).strip(), str(rq.address)

    def _on_requested(self, event: Any) -> None:
        calling, called, ip = self._peer(event)
        if self._networks is not None:
            try:
                addr = ipaddress.ip_address(ip)
                allowed = any(addr in net for net in self._networks)
            except ValueError:
                allowed = False
            if not allowed:
                log.warning("rejecting association from %s@%s to %s: peer address not in allowed_peers",
                            calling, ip, called)
                event.assoc.acse.send_reject(0x01, 0x01, 0x01)   # permanent, user, no reason given
                event.assoc.kill()
                return
        if self.cfg.allowed_calling_aes is not None and calling not in self.cfg.allowed_calling_aes:
            log.warning("rejecting association from %s@%s to %s: calling AE title not in allowed_calling_aes",
                        calling, ip, called)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)       # calling AE title not recognised
            event.assoc.kill()
            return
        if self.cfg.require_called_ae and called != self.cfg.ae_title:
            log.warning("rejecting association from %s@%s: called AE title %r is not %r",
                        calling, ip, called, self.cfg.ae_title)

    def _on_accepted(self, event: Any) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._stats[id(event.assoc)] = _AssocStats()
        calling, called, ip = self._peer(event)
        log.info("association from %s@%s to %s accepted", calling, ip, called)

    def _on_closed(self, event: Any) -> None:
        st = self._stats.pop(id(event.assoc), None)
        calling, called, ip = self._peer(event)
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        if st is not None:
            log.info("association from %s@%s to %s %s: %d stored (%d bytes), %d refused",
                     calling, ip, called, how, st.stored, st.bytes, st.refused)

    def _on_echo(self, event: Any) -> int:
        calling, _, ip = self._peer(event)
        log.debug("C-ECHO from %s@%s", calling, ip)
        return 0x0000

    def _on_store(self, event: Any) -> int | Dataset:
        req = event.request
        calling, called, ip = self._peer(event)
        sop_class = str(req.AffectedSOPClassUID)
        sop_uid = str(req.AffectedSOPInstanceUID)
        ts = str(event.context.transfer_syntax)
        st = self._stats.setdefault(id(event.assoc), _AssocStats())
        data = req.DataSet.getvalue()
        try:
            attrs = read_attributes(data, ts, self.tags)
        except PeekError as exc:
            st.refused += 1
            log.error("C-STORE from %s@%s sop_instance_uid=%s: unreadable dataset (%s) -> status 0x%04X",
                      calling, ip, sop_uid, exc, STATUS_CANNOT_UNDERSTAND)
            return _failure(STATUS_CANNOT_UNDERSTAND, f"dataset could not be parsed: {exc}")
        ds_sop = attrs.get(0x00080018)
        if ds_sop is not None and str(ds_sop) != sop_uid:
            st.refused += 1
            log.error("C-STORE from %s@%s: Affected SOP Instance UID %s differs from the dataset's %s "
                      "-> status 0x%04X", calling, ip, sop_uid, ds_sop, STATUS_DATASET_MISMATCH)
            return _failure(STATUS_DATASET_MISMATCH, "SOP Instance UID in command and dataset differ")
        context = {"calling_ae": calling, "called_ae": called, "peer_ip": ip}
        decision = self.rules.route(attrs, context)
        meta: dict[str, Any] = {name: _text(attrs.get(tag)) for tag, name in INDEX_KEYWORDS.items()
                                if tag not in (0x00080016, 0x00080018)}
        meta.update(calling_ae=calling, called_ae=called, peer=ip, rules=list(decision.matched))
        item = Incoming(data, ts, sop_class, sop_uid, decision.destinations, meta)
        try:
            result = self.committer.submit(item)
        except SpoolFullError as exc:
            st.refused += 1
            log.error("C-STORE from %s@%s sop_instance_uid=%s refused: %s -> status 0x%04X",
                      calling, ip, sop_uid, exc, STATUS_OUT_OF_RESOURCES)
            return _failure(STATUS_OUT_OF_RESOURCES, "spool full or disk below free-space floor")
        except (SpoolError, OSError) as exc:
            st.refused += 1
            log.error("C-STORE from %s@%s sop_instance_uid=%s could not be spooled: %s -> status 0x%04X",
                      calling, ip, sop_uid, exc, STATUS_OUT_OF_RESOURCES)
            return _failure(STATUS_OUT_OF_RESOURCES, "spool write failed")
        st.stored += 1
        st.bytes += len(data)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("C-STORE from %s@%s sop_instance_uid=%s stored oid=%d -> %s (rules: %s)%s",
                      calling, ip, sop_uid, result.oid, ",".join(result.queued) or "unrouted",
                      ",".join(decision.matched) or "default",
                      f" suppressed for {','.join(result.suppressed)}" if result.suppressed else "")
        return 0x0000


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return ""
    return str(value)
