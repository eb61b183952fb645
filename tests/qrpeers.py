"""Query/Retrieve peers for the tests (issue 13): a fault-injecting fake archive, DCMTK's
``dcmqrscp`` as a source, and move destinations registered in the Orthanc test peer.

Shared by the Q/R SCU tests and the migration tests; no pytest dependency.

- :class:`FakeArchive`: a pynetdicom Study Root Q/R SCP (C-FIND, C-MOVE, C-GET) over
  in-memory datasets (``add_files`` / ``add``) or a lazily :class:`Generated` archive, with per-request misbehaviour set through
  attributes (see its docstring). Every request it answered is in ``requests``; every
  C-CANCEL it saw counts in ``cancels``. It moves to the AE titles in ``destinations``.
- :class:`DcmQrScp`: ``dcmqrscp`` with a generated config (one storage area, an AE table
  entry per move destination), started like the other peers and loaded with :meth:`load`.
- :func:`register_modality`: makes an AE known to the Orthanc peer (``PUT /modalities``), as a
  C-MOVE destination or as a calling AE allowed to C-FIND/C-MOVE/C-GET.
"""
from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE

import peers
from peers import HOST, _Peer, dcmtk_tool, free_port, process_listens

log = logging.getLogger("tests.qrpeers")

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

# Keys each level owns (what a match at that level answers with, besides the requested ones).
LEVEL_KEYS = {
    "STUDY": ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate",
              "StudyTime", "StudyDescription", "StudyID"),
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}
UNIQUE_KEY = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


# --------------------------------------------------------------------------------------------
# Matching (PS3.4 C.2.2.2: single value, wildcard, UID list, range), enough for the tests


def _matches(value: Any, key: Any) -> bool:
    """Whether one attribute ``value`` of a stored object matches the request key ``key``."""
    if isinstance(key, (list, tuple, MultiValue)):
        # List of UID matching (PS3.4 C.2.2.2.2): pydicom decodes "uid1\\uid2" as a MultiValue,
        # whose str() is a Python list, not the backslash-separated value
        items = [str(k) for k in key]
        return any(_matches(value, k) for k in items if k) or not any(items)
    if key is None or str(key) == "":
        return True                                    # universal match: a return key
    text = "" if value is None else str(value)
    wanted = str(key)
    if "\\" in wanted:                                 # list of UIDs (or values), as text
        return text in wanted.split("\\")
    if "-" in wanted and wanted.replace("-", "").replace(".", "").isdigit():
        low, _, high = wanted.partition("-")           # date/time range; open ends allowed
        return bool(text) and (not low or text >= low) and (not high or text <= high)
    if "*" in wanted or "?" in wanted:
        return fnmatch.fnmatchcase(text, wanted)
    return text == wanted


def _values(identifier: Dataset, keyword: str) -> list[str]:
    """A key's values: one, or several for a list of UIDs (a MultiValue once decoded)."""
    value = identifier.get(keyword)
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value if str(v)]
    text = "" if value is None else str(value)
    return [v for v in text.split("\\") if v]


@dataclass
class Request:
    """One request the fake archive answered: its command and the identifier it carried."""

    command: str                      # "C-FIND", "C-MOVE", "C-GET"
    identifier: Dataset
    move_destination: str = ""
    message_id: int = 0
    status: int | None = None         # the final status sent (None: none, e.g. it hung)


@dataclass
class FakeArchive:
    """A pynetdicom Study Root Q/R SCP on 127.0.0.1 over in-memory datasets.

    Misbehaviour knobs (plain attributes, change them between requests):

    - ``busy_moves``: answer 0xA702 (out of resources, sub-operations) to the next N C-MOVE /
      C-GET requests, then behave.
    - ``fail_instances``: SOP Instance UIDs not sent; the retrieve ends 0xB000 with them in
      the Failed SOP Instance UID List (0008,0058).
    - ``unknown_destination``: every C-MOVE gets 0xA801 (also for AEs not in ``destinations``).
    - ``early_final``: the final C-MOVE response is sent *before* the last C-STORE reaches
      the move destination (which gets it ``early_final_delay`` s later, from another
      association, with the Move Originator AE / Message ID of the C-MOVE). The final
      response then counts only the sub-operations done before it.
    - ``hang``: a C-FIND (after its matches) / C-MOVE / C-GET (before its last C-STORE)
      never finishes until cancelled; then it answers 0xFE00 (Cancel). ``ignore_cancel`` makes it hang even then
      (a peer that never answers: the SCU must abort).
    - ``max_matches`` / ``cap_status``: a C-FIND returns at most N matches, then ends with
      ``cap_status`` (0xA700, 0xC000, ...) or, when None, silently with Success.
    - ``match_delay``: seconds before each C-FIND match (an archive slow on large answers:
      a query's total timeout then ends it, and the caller must split it).
    - ``image_level``: False refuses IMAGE-level C-FIND with 0xA900 (identifier does not match).
    - ``refuse_get_role``: SCP/SCU role selection refused (no C-GET possible); set before start.
    - ``ignore_uid_lists``: a key holding a LIST of UIDs matches nothing (archives that take
      "uid1\\uid2" as one value). By default lists match any of their UIDs (PS3.4 C.2.2.2.2).

    Content: ``add_files`` / ``add`` (held in memory), and/or ``generated=Generated(100_000)``
    (made on demand: a scale test's archive costs an index, not the studies).

    Usage: ``with FakeArchive(destinations={"DEST": (host, port)}) as pacs: pacs.add_files(...)``.
    """

    ae_title: str = "FAKEPACS"
    destinations: dict[str, tuple[str, int]] = field(default_factory=dict)
    port: int = 0
    busy_moves: int = 0
    fail_instances: set[str] = field(default_factory=set)
    unknown_destination: bool = False
    early_final: bool = False
    early_final_delay: float = 0.5
    hang: bool = False
    ignore_cancel: bool = False
    max_matches: int | None = None
    cap_status: int | None = None
    match_delay: float = 0.0
    image_level: bool = True
    refuse_get_role: bool = False
    ignore_uid_lists: bool = False
    datasets: dict[str, Dataset] = field(default_factory=dict)      # SOP Instance UID -> object
    generated: Generated | None = None       # lazily made studies instead of (besides) datasets
    requests: list[Request] = field(default_factory=list)
    cancels: int = 0
    _server: Any = None
    _local: threading.local = field(default_factory=threading.local)
    _threads: list[threading.Thread] = field(default_factory=list)

    # -- content ---------------------------------------------------------------------------

    def add(self, datasets: Iterable[Dataset]) -> Self:
        """Hold these objects (full datasets with file_meta, as read from Part 10 files)."""
        for ds in datasets:
            self.datasets[str(ds.SOPInstanceUID)] = ds
        return self

    def add_files(self, paths: Iterable[str | Path]) -> Self:
        return self.add(pydicom.dcmread(str(p)) for p in paths)

    def studies(self) -> dict[str, list[Dataset]]:
        """Study Instance UID -> its objects."""
        out: dict[str, list[Dataset]] = {}
        for ds in self.datasets.values():
            out.setdefault(str(ds.StudyInstanceUID), []).append(ds)
        return out

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        from pynetdicom import StoragePresentationContexts, evt

        ae = _MoveAE(self._local, ae_title=self.ae_title)
        for uid in (STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET):
            ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        for cx in StoragePresentationContexts:
            # C-GET: we act as the storage SCU on the requestor's association, if it asks
            # (``refuse_get_role``: the role selection is refused, as some archives do).
            uid = str(cx.abstract_syntax)
            if self.refuse_get_role:
                ae.add_supported_context(uid, cx.transfer_syntax)
            else:
                ae.add_supported_context(uid, cx.transfer_syntax, scu_role=False, scp_role=True)
        ae.requested_contexts = StoragePresentationContexts      # C-MOVE sub-associations
        ae.dimse_timeout = 30
        ae.network_timeout = 30
        handlers: list[Any] = [(evt.EVT_C_FIND, self._on_find), (evt.EVT_C_MOVE, self._on_move),
                               (evt.EVT_C_GET, self._on_get)]
        last: Exception | None = None
        for _ in range(3):                       # free_port() may lose a race
            port = self.port or free_port()
            try:
                self._server = ae.start_server((HOST, port), block=False, evt_handlers=handlers)
            except OSError as exc:
                last = exc
                continue
            self.port = port
            return self
        raise RuntimeError(f"FakeArchive could not listen: {last}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for t in self._threads:
            t.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- matching --------------------------------------------------------------------------

    def match(self, identifier: Dataset, *, study_level: bool = False) -> Iterator[Dataset]:
        """The objects matching ``identifier`` (every key with a value must match); with
        ``study_level`` a generated archive gives one header per study instead."""
        keys = [(elem.keyword, elem.value) for elem in identifier
                if elem.keyword and elem.keyword != "QueryRetrieveLevel" and elem.VR != "SQ"
                and elem.keyword not in _COMPUTED]
        if self.ignore_uid_lists and any(isinstance(v, (list, tuple, MultiValue)) and len(v) > 1
                                         for _, v in keys):
            return
        candidates: Iterable[Dataset] = self.datasets.values()
        if self.generated is not None:
            made = (self.generated.study_headers(identifier) if study_level
                    else self.generated.headers(identifier))
            candidates = [*self.datasets.values(), *made] if self.datasets else made
        for ds in candidates:
            if all(_matches(ds.get(k), v) for k, v in keys):
                yield ds

    def full(self, header: Dataset) -> Dataset:
        """The whole object (pixel data, file meta) behind a matched header."""
        uid = str(header.SOPInstanceUID)
        if uid in self.datasets or self.generated is None:
            return self.datasets[uid]
        return self.generated.full(header)

    def answers(self, identifier: Dataset) -> list[Dataset]:
        """The C-FIND matches: one per unique key of the level, with the requested keys."""
        level = str(identifier.get("QueryRetrieveLevel", "STUDY")).upper()
        generated_studies = level == "STUDY" and self.generated is not None and not self.datasets
        groups: dict[str, list[Dataset]] = {}
        limit = None if self.max_matches is None else self.max_matches + 1
        for ds in self.match(identifier, study_level=generated_studies):
            groups.setdefault(str(ds.get(UNIQUE_KEY[level], "")), []).append(ds)
            if limit is not None and len(groups) > limit:
                break                     # capped anyway: stop making matches
        out = []
        per_study = self.generated.instances_per_study() if self.generated is not None else 0
        for members in groups.values():
            first = members[0]
            rsp = Dataset()
            rsp.QueryRetrieveLevel = level
            wanted = [e.keyword for e in identifier if e.keyword and e.keyword != "QueryRetrieveLevel"]
            for keyword in dict.fromkeys([*wanted, UNIQUE_KEY[level]]):
                if keyword == "NumberOfStudyRelatedInstances":
                    rsp.NumberOfStudyRelatedInstances = per_study if generated_studies else len(members)
                elif keyword == "NumberOfStudyRelatedSeries":
                    rsp.NumberOfStudyRelatedSeries = (self.generated.series if self.generated is not None
                                                      and generated_studies else
                                                      len({str(m.SeriesInstanceUID) for m in members}))
                elif keyword == "NumberOfSeriesRelatedInstances":
                    rsp.NumberOfSeriesRelatedInstances = len(members)
                elif keyword == "ModalitiesInStudy":
                    rsp.ModalitiesInStudy = sorted({str(m.get("Modality", "")) for m in members})
                elif keyword in first:
                    rsp[keyword] = first[keyword]
                else:
                    setattr(rsp, keyword, "")
            out.append(rsp)
        return out

    # -- handlers (pynetdicom's threads) ----------------------------------------------------

    def _record(self, command: str, event: Any, destination: str = "") -> Request:
        req = Request(command, event.identifier, destination, int(event.request.MessageID))
        self.requests.append(req)
        return req

    def _wait_cancel(self, event: Any) -> bool:
        """Hang until a C-CANCEL arrives (True; with ``ignore_cancel`` never) or the
        association ends (False)."""
        counted = False
        while event.assoc.is_established:
            if event.is_cancelled:
                if not counted:
                    self.cancels += 1
                    counted = True
                if not self.ignore_cancel:
                    return True
            time.sleep(0.02)      # pynetdicom offers no wait on a cancel: a short poll
        return False

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        req = self._record("C-FIND", event)
        level = str(event.identifier.get("QueryRetrieveLevel", "")).upper()
        if level == "IMAGE" and not self.image_level:
            req.status = 0xA900
            yield 0xA900, None
            return
        answers = self.answers(event.identifier)
        capped = self.max_matches is not None and len(answers) > self.max_matches
        if capped:
            answers = answers[:self.max_matches]
        for rsp in answers:
            if self.match_delay:
                time.sleep(self.match_delay)       # the fault itself: a slow archive
            if event.is_cancelled:
                self.cancels += 1
                req.status = 0xFE00
                yield 0xFE00, None
                return
            yield 0xFF00, rsp
        if self.hang:
            if self._wait_cancel(event):
                req.status = 0xFE00
                yield 0xFE00, None
            return
        if capped and self.cap_status is not None:
            req.status = self.cap_status
            yield self.cap_status, None
            return
        req.status = 0x0000
        yield 0x0000, None

    def _to_send(self, req: Request, event: Any) -> tuple[list[Dataset], list[str]] | None:
        """The objects a retrieve sends and those it fails; None after answering 0xA702."""
        if self.busy_moves > 0:
            self.busy_moves -= 1
            req.status = 0xA702
            return None
        matched = list(self.match(event.identifier))
        failed = [str(ds.SOPInstanceUID) for ds in matched
                  if str(ds.SOPInstanceUID) in self.fail_instances]
        return [self.full(ds) for ds in matched
                if str(ds.SOPInstanceUID) not in self.fail_instances], failed

    def _on_move(self, event: Any) -> Iterator[Any]:
        destination = str(event.move_destination).strip()
        req = self._record("C-MOVE", event, destination)
        address = self.destinations.get(destination)
        if self.unknown_destination or address is None:
            req.status = 0xA801
            yield None, None
            return
        # the Move Originator AE Title of the sub-operations (see _MoveAE)
        self._local.originator = str(event.assoc.requestor.ae_title).strip()
        try:
            yield from self._retrieve(req, event, address)
        finally:
            self._local.originator = None

    def _on_get(self, event: Any) -> Iterator[Any]:
        req = self._record("C-GET", event)
        yield from self._retrieve(req, event, None)

    def _retrieve(self, req: Request, event: Any, address: tuple[str, int] | None) -> Iterator[Any]:
        plan = self._to_send(req, event)
        if address is not None:
            yield address                 # pynetdicom: where to send, first
        if plan is None:                  # busy: one sub-operation announced, refused at once
            yield 1
            empty = Dataset()
            empty.FailedSOPInstanceUIDList = ""
            yield 0xA702, empty
            return
        sending, failed = plan
        late: Dataset | None = None
        if self.early_final and address is not None and sending:
            late = sending.pop()
        yield len(sending) + len(failed) + (1 if late is not None else 0)
        for i, ds in enumerate(sending):
            if self.hang and i == len(sending) - 1:
                # pynetdicom ends a retrieve itself once every sub-operation is done: hang
                # before the last one (it stays "remaining")
                if self._wait_cancel(event):
                    req.status = 0xFE00
                    yield 0xFE00, None
                return
            if event.is_cancelled:
                self.cancels += 1
                req.status = 0xFE00
                yield 0xFE00, None
                return
            yield 0xFF00, ds
        if late is not None and address is not None:
            self._send_late(late, address, event)
        if failed:
            result = Dataset()
            result.FailedSOPInstanceUIDList = failed
            req.status = 0xB000
            yield 0xB000, result
            return
        req.status = 0x0000
        yield 0x0000, None

    def _send_late(self, ds: Dataset, address: tuple[str, int], event: Any) -> None:
        """The last object of an ``early_final`` move, on its own association, later."""
        from pynetdicom import AE, StoragePresentationContexts

        destination = str(event.move_destination).strip()
        message_id = int(event.request.MessageID)
        originator = str(event.assoc.requestor.ae_title).strip()

        def send() -> None:
            time.sleep(self.early_final_delay)        # after the final response has left
            ae = AE(ae_title=self.ae_title)
            ae.requested_contexts = StoragePresentationContexts
            assoc = ae.associate(address[0], address[1], ae_title=destination)
            if assoc.is_established:
                assoc.send_c_store(ds, originator_aet=originator, originator_id=message_id)
                assoc.release()
            else:
                log.error("FakeArchive: late C-STORE to %s at %s:%d failed", destination, *address)

        thread = threading.Thread(target=send, name="fakearchive-late", daemon=True)
        self._threads.append(thread)
        thread.start()


class _MoveAE(AE):
    """pynetdicom's C-MOVE SCP sends its OWN AE title as the Move Originator AE Title of the
    sub-operations (PS3.7 9.3.1.1 wants the C-MOVE requestor's): the associations it makes
    for a move get a send_c_store that puts the requestor's title there, as real archives do
    (Orthanc, dcmqrscp). The move handler's thread says whose move it is (``local``)."""

    def __init__(self, local: threading.local, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._local = local

    def associate(self, *args: Any, **kwargs: Any) -> Any:
        assoc = super().associate(*args, **kwargs)
        originator = getattr(self._local, "originator", None)
        if originator:
            send = assoc.send_c_store

            def send_c_store(dataset: Any, msg_id: int = 1, priority: int = 2,
                             originator_aet: str | None = None, originator_id: int | None = None) -> Any:
                return send(dataset, msg_id=msg_id, priority=priority, originator_aet=originator,
                            originator_id=originator_id)

            assoc.send_c_store = send_c_store  # type: ignore[method-assign]
        return assoc


_COMPUTED = frozenset({"NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
                       "NumberOfSeriesRelatedInstances", "ModalitiesInStudy",
                       "NumberOfPatientRelatedStudies"})


# --------------------------------------------------------------------------------------------
# DCMTK dcmqrscp as a source


class DcmQrScp(_Peer):
    """DCMTK ``dcmqrscp`` on 127.0.0.1: one storage area (AE ``ae_title``, read-write, any
    peer may query, retrieve and store), moving only to the AEs in ``destinations``
    (AE title -> (host, port)), as a real archive's AE table would.

    ``load(files)`` stores files into it with storescu (each in its own transfer syntax);
    it answers C-FIND at every level, C-MOVE and C-GET (Study Root and Patient Root).
    """

    name = "dcmqrscp"

    def __init__(self, ae_title: str = "DCMQRSCP", *,
                 destinations: Mapping[str, tuple[str, int]] | None = None,
                 port: int | None = None, workdir: Path | None = None) -> None:
        super().__init__(workdir)
        self.ae_title = ae_title
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.destinations = dict(destinations or {})
        self.storage = self.workdir / "db"
        self.storage.mkdir(parents=True, exist_ok=True)

    def _config(self) -> Path:
        hosts = [f"{name.lower()}_{i} = ({ae}, {host}, {port})"
                 for i, (name, (ae, (host, port))) in enumerate(
                     ((ae, (ae, addr)) for ae, addr in self.destinations.items()))]
        lines = [f"NetworkTCPPort = {self.port}", "MaxPDUSize = 16384", "MaxAssociations = 16", "",
                 "HostTable BEGIN", *hosts, "HostTable END", "",
                 "VendorTable BEGIN", "VendorTable END", "",
                 "AETable BEGIN", f"{self.ae_title} {self.storage} RW (500, 1024mb) ANY",
                 "AETable END", ""]
        path = self.workdir / "dcmqrscp.cfg"
        path.write_text("\n".join(lines))
        return path

    def _argv(self) -> list[str]:
        # Forks a child per association (its process group is stopped with it): DCMTK 3.6.7's
        # single-process mode (-s) segfaults after the first association is released.
        return [str(dcmtk_tool("dcmqrscp")), "-c", str(self._config()),
                "--disable-host-lookup", str(self.port)]

    def _ready(self) -> bool:
        return self.pid is not None and process_listens(self.pid, self.port)

    def _reassign_ports(self) -> bool:
        if self._auto_port:
            self.port = free_port()
        return self._auto_port

    def load(self, files: Iterable[str | Path], calling_ae: str = "LOADER") -> None:
        """Store ``files`` into the archive (storescu, original transfer syntaxes)."""
        done = peers.storescu(self.port, list(files), called_ae=self.ae_title,
                              calling_ae=calling_ae, propose="original", timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"storescu into dcmqrscp failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}\n{self.log()}")


# --------------------------------------------------------------------------------------------
# Orthanc as a source


def register_modality(orthanc: peers.Orthanc, name: str, ae_title: str, port: int,
                      host: str = HOST) -> None:
    """Make ``ae_title`` at host:port a DICOM modality of the Orthanc peer (REST, in memory):
    a C-MOVE destination it will send to, and a calling AE it answers C-FIND/C-MOVE/C-GET
    for. ``name`` is the modality's key: use ONE name per AE title (re-registering it moves
    the AE to a new port; Orthanc moves to the first modality with the AE title it finds,
    so a stale second entry for the same title would swallow the move)."""
    import json

    body = {"AET": ae_title, "Host": host, "Port": port, "AllowEcho": True, "AllowFind": True,
            "AllowMove": True, "AllowGet": True, "AllowStore": True}
    orthanc.request("PUT", f"/modalities/{name}", json.dumps(body).encode())


def load_orthanc(orthanc: peers.Orthanc, files: Iterable[str | Path]) -> None:
    """Store ``files`` into the Orthanc peer (REST upload, byte for byte)."""
    for path in files:
        orthanc.request("POST", "/instances", Path(path).read_bytes())


# --------------------------------------------------------------------------------------------
# A lazily generated archive (scale tests: 100,000 studies without 100,000 files)

GENERATED_ROOT = "1.2.826.0.1.3680043.8.498.77"      # pydicom's root + a branch of our own
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class Generated:
    """``n_studies`` studies of ``series`` x ``per_series`` tiny Secondary Capture objects,
    made on demand from their index: UIDs ``ROOT.seed.study[.series[.instance]]``, PatientID
    ``P<study % 1000>``, AccessionNumber ``A<study>``, StudyDate spread over 20 years from
    2000-01-01, and EMPTY for every ``empty_date_every``-th study (0: never). Only a sorted
    (date, study) index is kept, so a date-range C-FIND costs its matches, not the archive."""

    n_studies: int
    series: int = 1
    per_series: int = 1
    seed: int = 1
    empty_date_every: int = 997
    _by_date: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_date = sorted((self.study_date(i), i) for i in range(self.n_studies))

    # identity ------------------------------------------------------------------------------

    def study_uid(self, i: int) -> str:
        return f"{GENERATED_ROOT}.{self.seed}.{i}"

    def study_date(self, i: int) -> str:
        import datetime as dt

        if self.empty_date_every and i % self.empty_date_every == 0:
            return ""
        day = dt.date(2000, 1, 1) + dt.timedelta(days=(i * 7919) % 7300)
        return day.strftime("%Y%m%d")

    def instances_per_study(self) -> int:
        return self.series * self.per_series

    def _index(self, uid: str, parts: int) -> tuple[int, ...] | None:
        prefix = f"{GENERATED_ROOT}.{self.seed}."
        if not uid.startswith(prefix):
            return None
        tail = uid[len(prefix):].split(".")
        if len(tail) != parts or not all(t.isdigit() for t in tail):
            return None
        numbers = tuple(int(t) for t in tail)
        if numbers[0] >= self.n_studies or (parts > 1 and numbers[1] >= self.series) or (
                parts > 2 and numbers[2] >= self.per_series):
            return None
        return numbers

    # datasets ------------------------------------------------------------------------------

    def study(self, i: int) -> Dataset:
        ds = Dataset()
        ds.StudyInstanceUID = self.study_uid(i)
        ds.PatientID = f"P{i % 1000}"
        ds.PatientName = f"GEN^{i % 1000}"
        ds.AccessionNumber = f"A{i}"
        ds.StudyDate = self.study_date(i)
        ds.StudyTime = "120000"
        ds.StudyID = str(i)
        ds.StudyDescription = "generated"
        return ds

    def instance(self, i: int, s: int, k: int, *, pixels: bool = False) -> Dataset:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import UID, ExplicitVRLittleEndian

        ds = self.study(i)
        ds.SeriesInstanceUID = f"{self.study_uid(i)}.{s}"
        ds.SOPInstanceUID = f"{self.study_uid(i)}.{s}.{k}"
        ds.SOPClassUID = SECONDARY_CAPTURE
        ds.Modality = "OT"
        ds.SeriesNumber = s + 1
        ds.InstanceNumber = k + 1
        if pixels:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = 8
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            ds.PixelData = bytes((i + s + k + n) % 256 for n in range(64))
            ds.ConversionType = "WSD"
        return ds

    # queries -------------------------------------------------------------------------------

    def _studies(self, identifier: Dataset) -> Iterator[int]:
        """Candidate study indexes: by UID, else by StudyDate (range or exact), else all."""
        import bisect

        uids = _values(identifier, "StudyInstanceUID")
        if uids:
            for one in uids:
                found = self._index(one, 1)
                if found is not None:
                    yield found[0]
            return
        date = str(identifier.get("StudyDate", "") or "")
        if date:
            low, dash, high = date.partition("-")
            if not dash:
                low = high = date
            lo = bisect.bisect_left(self._by_date, (low or "0", -1))
            hi = bisect.bisect_right(self._by_date, ((high or "99999999"), self.n_studies))
            for _, i in self._by_date[lo:hi]:
                yield i
            return
        yield from range(self.n_studies)

    def headers(self, identifier: Dataset) -> Iterator[Dataset]:
        """Every instance (header only) of the candidate studies; FakeArchive matches them."""
        series_uids = _values(identifier, "SeriesInstanceUID")
        for i in self._studies(identifier):
            for s in range(self.series):
                if series_uids and f"{self.study_uid(i)}.{s}" not in series_uids:
                    continue
                for k in range(self.per_series):
                    yield self.instance(i, s, k)

    def study_headers(self, identifier: Dataset) -> Iterator[Dataset]:
        """One header per candidate study (STUDY-level C-FIND without making every instance)."""
        for i in self._studies(identifier):
            ds = self.study(i)
            ds.Modality = "OT"
            yield ds

    def full(self, header: Dataset) -> Dataset:
        found = self._index(str(header.SOPInstanceUID), 3)
        assert found is not None
        return self.instance(*found, pixels=True)
