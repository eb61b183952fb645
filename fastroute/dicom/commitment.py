"""Storage Commitment Push Model (PS3.4 Annex J): the N-ACTION and N-EVENT-REPORT codecs.

I/O-free like the rest of ``dicom/``: command sets and datasets in, values out. Both roles use
it: the router's sender asks a destination to commit what it delivered (N-ACTION-RQ, then an
N-EVENT-REPORT-RQ comes back, on the same association or on a new one to the listener), and
the listener answers a modality's N-ACTION and later reports to it.

The datasets are small (one reference per instance), so pydicom encodes them, in the
presentation context's transfer syntax (any uncompressed one, see ``dimse.encode_identifier``).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fastroute.dicom import pdu
from fastroute.dicom.acse import IMPLICIT_VR_LITTLE_ENDIAN
from fastroute.dicom.dimse import (DATASET_PRESENT, REQUESTED_SOP_CLASS_UID, REQUESTED_SOP_INSTANCE_UID,
                                   CommandField, decode_identifier, encode_identifier)
from fastroute.dicom.pdu import (AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID, COMMAND_DATA_SET_TYPE,
                                 COMMAND_FIELD, MESSAGE_ID)

STORAGE_COMMITMENT_SOP_CLASS = "1.2.840.10008.1.20.1"      # Storage Commitment Push Model
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"     # its well-known SOP instance
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# What the sender proposes for it: uncompressed syntaxes only (the dataset is an identifier).
SYNTAXES = (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN)
ACTION_TYPE_ID = 0x1008
EVENT_TYPE_ID = 0x1002
ACTION_REQUEST_COMMIT = 1                   # PS3.4 J.3.2.1.1: Request Storage Commitment
EVENT_ALL_COMMITTED = 1                     # J.3.3.1: Storage Commitment Request Successful
EVENT_FAILURES = 2                          # J.3.3.1: ... Complete - Failures Exist
# Failure Reasons (PS3.4 J.3.3.1.1.2 / C.14.1.1)
NO_SUCH_OBJECT_INSTANCE = 0x0112
PROCESSING_FAILURE = 0x0110
RESOURCE_LIMITATION = 0x0213
REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
CLASS_INSTANCE_CONFLICT = 0x0119
DUPLICATE_TRANSACTION_UID = 0x0131


@dataclass(frozen=True, slots=True)
class Ref:
    """One referenced instance: Referenced SOP Class UID and Instance UID."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class Failed:
    """An instance the SCP could not commit, with its Failure Reason (0x0112 no such object)."""

    sop_class_uid: str
    sop_instance_uid: str
    reason: int


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """An N-ACTION-RQ's dataset: the transaction and the instances to commit."""

    transaction_uid: str
    refs: tuple[Ref, ...]


@dataclass(frozen=True, slots=True)
class EventReport:
    """An N-EVENT-REPORT-RQ's dataset: what the SCP committed and what it failed."""

    transaction_uid: str
    committed: tuple[Ref, ...] = ()
    failed: tuple[Failed, ...] = ()
    retrieve_ae: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def event_type(self) -> int:
        return EVENT_FAILURES if self.failed else EVENT_ALL_COMMITTED


def new_transaction_uid() -> str:
    return str(generate_uid())


# -- command sets --------------------------------------------------------------------------------

def encode_n_action_rq(message_id: int) -> bytes:
    """N-ACTION-RQ (PS3.7 10.3.4.1) on the well-known Storage Commitment instance, Action 1."""
    return pdu.encode_command({
        COMMAND_FIELD: CommandField.N_ACTION_RQ, MESSAGE_ID: message_id,
        REQUESTED_SOP_CLASS_UID: STORAGE_COMMITMENT_SOP_CLASS,
        REQUESTED_SOP_INSTANCE_UID: STORAGE_COMMITMENT_INSTANCE,
        ACTION_TYPE_ID: ACTION_REQUEST_COMMIT, COMMAND_DATA_SET_TYPE: DATASET_PRESENT})


def encode_n_event_report_rq(message_id: int, event_type: int) -> bytes:
    """N-EVENT-REPORT-RQ (PS3.7 10.3.1.1) from the well-known Storage Commitment instance."""
    return pdu.encode_command({
        COMMAND_FIELD: CommandField.N_EVENT_REPORT_RQ, MESSAGE_ID: message_id,
        AFFECTED_SOP_CLASS_UID: STORAGE_COMMITMENT_SOP_CLASS,
        AFFECTED_SOP_INSTANCE_UID: STORAGE_COMMITMENT_INSTANCE,
        EVENT_TYPE_ID: event_type, COMMAND_DATA_SET_TYPE: DATASET_PRESENT})


# -- datasets ------------------------------------------------------------------------------------

def _ref_items(refs: Iterable[Ref | Failed]) -> list[Dataset]:
    items = []
    for r in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = r.sop_class_uid
        item.ReferencedSOPInstanceUID = r.sop_instance_uid
        if isinstance(r, Failed):
            item.FailureReason = r.reason
        items.append(item)
    return items


def encode_action(request: ActionRequest, transfer_syntax: str = IMPLICIT_VR_LITTLE_ENDIAN) -> bytes:
    ds = Dataset()
    ds.TransactionUID = request.transaction_uid
    ds.ReferencedSOPSequence = _ref_items(request.refs)
    return encode_identifier(ds, transfer_syntax)


def encode_event(report: EventReport, transfer_syntax: str = IMPLICIT_VR_LITTLE_ENDIAN) -> bytes:
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if report.retrieve_ae:
        ds.RetrieveAETitle = report.retrieve_ae
    if report.committed:
        ds.ReferencedSOPSequence = _ref_items(report.committed)
    if report.failed:
        ds.FailedSOPSequence = _ref_items(report.failed)
    return encode_identifier(ds, transfer_syntax)


def _refs(ds: Any, keyword: str) -> list[Any]:
    seq = getattr(ds, keyword, None)
    return list(seq) if seq is not None else []


def decode_action(data: bytes | bytearray | memoryview, transfer_syntax: str) -> ActionRequest:
    """ValueError when the dataset is not a usable commitment request (no Transaction UID)."""
    try:
        ds = decode_identifier(data, transfer_syntax)
        uid = str(ds.get("TransactionUID", "") or "")
        refs = tuple(Ref(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                     for i in _refs(ds, "ReferencedSOPSequence"))
    except (AttributeError, KeyError, TypeError, ValueError, EOFError, OSError) as exc:
        raise ValueError(f"malformed storage commitment request: {exc}") from exc
    if not uid:
        raise ValueError("storage commitment request without a Transaction UID")
    return ActionRequest(uid, refs)


def decode_event(data: bytes | bytearray | memoryview, transfer_syntax: str) -> EventReport:
    """ValueError when the dataset is not a usable commitment report (no Transaction UID)."""
    try:
        ds = decode_identifier(data, transfer_syntax)
        uid = str(ds.get("TransactionUID", "") or "")
        committed = tuple(Ref(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                          for i in _refs(ds, "ReferencedSOPSequence"))
        failed = tuple(Failed(str(i.get("ReferencedSOPClassUID", "")), str(i.ReferencedSOPInstanceUID),
                              int(i.get("FailureReason", PROCESSING_FAILURE) or PROCESSING_FAILURE))
                       for i in _refs(ds, "FailedSOPSequence"))
        retrieve_ae = str(ds.get("RetrieveAETitle", "") or "")
    except (AttributeError, KeyError, TypeError, ValueError, EOFError, OSError) as exc:
        raise ValueError(f"malformed storage commitment report: {exc}") from exc
    if not uid:
        raise ValueError("storage commitment report without a Transaction UID")
    return EventReport(uid, committed, failed, retrieve_ae)


def pick_syntax(accepted: Sequence[str]) -> str | None:
    """The transfer syntax to encode in, from those the context was accepted with."""
    for ts in accepted:
        if ts in SYNTAXES:
            return ts
    return None
