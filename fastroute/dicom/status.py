"""DIMSE status codes (PS3.7 Annex C, PS3.4 Annex B/C) with their categories, for both directions.

One table answers the two questions every part of fastroute asks of a status: what kind it is
(the listener choosing a refusal, the sender deciding whether to retry, the operator views
and ``/metrics`` labelling it) and how to say it to a person. Like pynetdicom's ``status.py``
``code_to_category``, but with the router's own split of failures: *transient* (worth
retrying: out of resources, cancel, unknown codes) and *permanent* (will fail the same way
every time: data set does not match, cannot understand, refused SOP class).
Importing this module pulls in nothing but the standard library, so the HTTP process can.
"""
from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """The codes fastroute sends or acts on by name."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    CANCEL = 0xFE00
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    INVALID_SOP_INSTANCE = 0x0117
    PROCESSING_FAILURE = 0x0110
    NO_SUCH_ATTRIBUTE = 0x0105
    INVALID_ATTRIBUTE_VALUE = 0x0106
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_MATCHES = 0xA701        # C-MOVE/C-GET: unable to calculate matches
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702  # C-MOVE/C-GET: unable to perform sub-operations
    MOVE_DESTINATION_UNKNOWN = 0xA801
    SUB_OPERATIONS_FAILED = 0xB000           # C-MOVE/C-GET: one or more sub-operations failed
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    WARNING_COERCION = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATASET_MISMATCH = 0xB007


class Category(enum.StrEnum):
    SUCCESS = "success"
    WARNING = "warning"
    PENDING = "pending"
    TRANSIENT = "transient"      # retry: the same request may succeed later
    PERMANENT = "permanent"      # do not retry: it will fail the same way every time


MEANINGS: dict[int, str] = {
    0x0000: "Success",
    0xFF00: "Pending",
    0xFF01: "Pending: optional keys not supported",
    0xFE00: "Cancel",
    0xA700: "Refused: Out of Resources",
    0xA701: "Refused: Out of Resources - Unable to calculate number of matches",
    0xA702: "Refused: Out of Resources - Unable to perform sub-operations",
    0xA801: "Refused: Move Destination unknown",
    0xA900: "Error: Data Set does not match SOP Class",
    0xC000: "Error: Cannot understand",
    0xB000: "Warning: Coercion of Data Elements",
    0xB006: "Warning: Elements Discarded",
    0xB007: "Warning: Data Set does not match SOP Class",
    0x0122: "Refused: SOP Class not supported",
    0x0124: "Refused: Not authorized",
    0x0117: "Invalid SOP Instance",
    0x0110: "Processing failure",
    0x0105: "No such attribute",
    0x0106: "Invalid attribute value",
    0x0210: "Duplicate invocation",
    0x0211: "Unrecognized operation",
    0x0212: "Mistyped argument",
    0x0213: "Resource limitation",
}

# General failures (PS3.7 C.4) that a retry cannot cure.
_PERMANENT_GENERAL = frozenset({0x0122, 0x0124, 0x0117, 0x0210, 0x0211, 0x0212, 0x0110, 0x0105, 0x0106})


def category(status: int) -> Category:
    """The category of any 16-bit status, known or not (an unknown code is transient)."""
    if status == 0x0000:
        return Category.SUCCESS
    if status in (0xFF00, 0xFF01):
        return Category.PENDING
    if (status & 0xF000) == 0xB000 or status in (0x0001, 0x0107, 0x0116):
        return Category.WARNING
    if (status & 0xFF00) == 0xA700 or status in (0xFE00, 0x0213):
        return Category.TRANSIENT
    if (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000 or status in _PERMANENT_GENERAL:
        return Category.PERMANENT
    return Category.TRANSIENT


def meaning(status: int | None) -> str:
    """The standard's words for a status ("no response" for None, as the sender records it)."""
    if status is None or status < 0:
        return "no response"
    return MEANINGS.get(status) or MEANINGS.get(status & 0xFF00) or (
        "Error: Cannot understand" if (status & 0xF000) == 0xC000 else "unknown status")


def classify_store(status: int) -> str:
    """What a C-STORE status means for the object: ``delivered`` (success or warning),
    ``transient`` (retry it later) or ``permanent`` (it will fail the same way)."""
    cat = category(status)
    if cat is Category.SUCCESS or cat is Category.WARNING:
        return "delivered"
    return "permanent" if cat is Category.PERMANENT else "transient"


def describe(status: int | None) -> str:
    """``0xA700 (Refused: Out of Resources)``: the form every log line and view uses."""
    if status is None or status < 0:
        return "no response"
    return f"0x{status:04X} ({meaning(status)})"
