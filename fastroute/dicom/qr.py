"""Query/Retrieve as an SCU (PS3.4 Annex C): C-FIND, C-MOVE and C-GET over :mod:`.scu`.

CONTRACT SKELETON (lead engineer): the signatures below are what the migration runner and the
CLI code against; the bodies are being written on branch ``mig-qr``.

Not the hot path: identifiers are small, so they are encoded and decoded with pydicom. Every
wait is bounded (``dimse_timeout`` per response, a total timeout per operation); an operation
that runs past its total is cancelled (C-CANCEL) and drained, so the association stays usable.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset

from fastroute.dicom.dimse import Handler

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


class Level(enum.StrEnum):
    """QueryRetrieveLevel (0008,0052)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class Remote(Protocol):
    """What an association needs of a peer: a source or a destination config fits."""

    ae_title: str
    host: str
    port: int
    calling_ae: str | None
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    max_pdu: int


class QueryFailed(Exception):
    """A C-FIND ended with a failure status (``status``), or timed out (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetrieveFailed(Exception):
    """A C-MOVE/C-GET could not start or ended without a usable final response.

    ``status`` is the DICOM status when one came: 0xA801 means the source does not know the
    move destination (the message names the AE to register there), 0xA701/0xA702 out of
    resources (back off and try again)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class SubOperations:
    """The sub-operation counts of a C-MOVE/C-GET response (None where the peer left one out)."""

    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None


@dataclass(slots=True)
class RetrieveResult:
    """How a C-MOVE/C-GET ended: the final status and counts, the failed SOP Instance UIDs
    (0008,0058) of a 0xB000/0xA7xx/0xC000 final response, whether it was cancelled for its
    total timeout, and the Message ID it was sent with (the Move Originator Message ID of the
    C-STOREs it caused)."""

    status: int
    comment: str
    counts: SubOperations
    failed_sop_instance_uids: list[str] = field(default_factory=list)
    timed_out: bool = False
    message_id: int = 0


class QueryRetrieveClient:
    """One association to a peer for Q/R, reused across operations by one thread.

    ``store`` (C-GET only) is the handler for the C-STORE sub-operations that arrive on this
    association; ``storage`` the (SOP class, transfer syntaxes) to propose with the SCP role
    for them (at most 127 classes per association: the caller splits larger sets).
    """

    def __init__(self, remote: Remote, calling_ae: str, *, store: Handler | None = None,
                 storage: Iterable[tuple[str, Iterable[str]]] = ()) -> None:
        raise NotImplementedError

    def find(self, level: Level, identifier: Dataset | Mapping[str, Any], *,
             timeout: float | None = None) -> Iterator[Dataset]:
        """The matches, as they arrive. Closing the iterator early sends C-CANCEL and drains
        to the final response. QueryFailed on a failure status or ``timeout`` (total)."""
        raise NotImplementedError

    def next_message_id(self) -> int:
        """The Message ID the next request will carry (register it before a C-MOVE)."""
        raise NotImplementedError

    def move(self, identifier: Dataset | Mapping[str, Any], destination_ae: str, *,
             level: Level = Level.STUDY, timeout: float | None = None,
             on_pending: Callable[[SubOperations], None] | None = None) -> RetrieveResult:
        """C-MOVE: the source sends to ``destination_ae``; pending responses go to ``on_pending``."""
        raise NotImplementedError

    def get(self, identifier: Dataset | Mapping[str, Any], *, level: Level = Level.STUDY,
            timeout: float | None = None,
            on_pending: Callable[[SubOperations], None] | None = None) -> RetrieveResult:
        """C-GET: the C-STOREs arrive on this association and go to ``store``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the association (abort when the release is not answered)."""
        raise NotImplementedError


__all__ = ["Level", "Remote", "QueryFailed", "RetrieveFailed", "SubOperations", "RetrieveResult",
           "QueryRetrieveClient", "STUDY_ROOT_FIND", "STUDY_ROOT_MOVE", "STUDY_ROOT_GET"]
