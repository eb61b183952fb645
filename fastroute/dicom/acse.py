"""Association control (PS3.8 7.1, PS3.7 D.3): what fastroute proposes, accepts and answers.

One owner for what the SCP and the SCU share: the implementation identity both sides announce,
the transfer syntaxes the listener accepts as sent, the contexts it supports, the negotiation
as acceptor and as requestor (pynetdicom's public ``negotiate_as_acceptor`` /
``negotiate_as_requestor`` over its ``A_ASSOCIATE`` primitive), and the words for
A-ASSOCIATE-RJ reasons and presentation-context results.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.uid import UID
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
    negotiate_as_acceptor,
    negotiate_as_requestor,
)

from fastroute import __version__

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"   # DICOM application context, PS3.7 A.2.1
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# pydicom.uid.generate_uid(entropy_srcs=["fastroute", "implementation class UID"]), frozen:
# the same on both sides, so a peer's logs name fastroute whichever way it was called.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.10887796605032696485799925401341379173"
IMPLEMENTATION_VERSION_NAME = "FASTROUTE_" + __version__.replace(".", "")[:6]
MAX_CONTEXTS = 128   # PS3.8: presentation context IDs are odd numbers 1..255

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


def supported_contexts(sop_classes: Iterable[str] = ()) -> list[PresentationContext]:
    """Verification and every Storage SOP class (plus ``sop_classes``), in the accepted syntaxes."""
    out = [build_context(VERIFICATION_SOP_CLASS, ACCEPTED_SYNTAXES)]
    out += [build_context(str(cx.abstract_syntax), ACCEPTED_SYNTAXES)
            for cx in AllStoragePresentationContexts]
    for uid in sop_classes:
        # A service added here may be proposed with SCP/SCU role selection (Storage Commitment:
        # the SCP proposes the SCP role to send its N-EVENT-REPORT on a new association).
        # Accepting both roles answers each proposal as proposed, with a reply item (PS3.7
        # D.3.3.4), which strict peers require; a proposal without an item keeps the defaults.
        cx = build_context(uid, ACCEPTED_SYNTAXES)
        cx.scu_role = True
        cx.scp_role = True
        out.append(cx)
    return out


def _identity(max_pdu: int) -> list[Any]:
    """The user information items both roles send: maximum length and who we are."""
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [max_len, impl, version]


def negotiate(rq: A_ASSOCIATE, supported: list[PresentationContext],
              max_pdu: int) -> tuple[A_ASSOCIATE, dict[int, str]]:
    """As acceptor: the A-ASSOCIATE-AC primitive for ``rq`` and {context id: transfer syntax}.

    Role selection is answered by pynetdicom's negotiation (our contexts have default roles,
    so no reply items); an asynchronous operations window is answered (1, 1), i.e.
    synchronous; user identity gets no response item (allowed: the peer asked, we don't verify).
    """
    roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in rq.user_information
             if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid}
    proposed, malformed = _split_malformed(rq.presentation_context_definition_list)
    results, role_items = negotiate_as_acceptor(proposed, supported, roles or None)
    results = sorted([*results, *malformed], key=lambda cx: cx.context_id or 0)
    ac = A_ASSOCIATE()
    ac.application_context_name = APPLICATION_CONTEXT_NAME
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    info: list[Any] = [*_identity(max_pdu), *role_items]
    if any(isinstance(i, AsynchronousOperationsWindowNegotiation) for i in rq.user_information):
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        info.append(window)
    ac.user_information = info
    accepted = {int(cx.context_id): str(cx.transfer_syntax[0]) for cx in results
                if cx.result == 0x00 and cx.context_id is not None}
    return ac, accepted


def _split_malformed(contexts: list[PresentationContext]) -> tuple[
        list[PresentationContext], list[PresentationContext]]:
    """The proposed contexts pynetdicom can negotiate, and results for those it cannot.

    PS3.8 9.3.2.2 requires one abstract syntax and at least one transfer syntax per context;
    a context without them is a provider rejection of that context (result 3 "abstract
    syntax not supported", 4 "transfer syntaxes not supported", PS3.8 9.3.3.2), not a
    reason to lose the association or log an internal error.
    """
    good, bad = [], []
    for cx in contexts:
        if cx.abstract_syntax is None or not cx.transfer_syntax:
            result = PresentationContext()
            result.context_id = cx.context_id
            result.result = 0x03 if cx.abstract_syntax is None else 0x04
            # The AC's transfer syntax sub-item is "not significant" for a rejection (9.3.3.2).
            result.transfer_syntax = [UID(cx.transfer_syntax[0] if cx.transfer_syntax
                                          else IMPLICIT_VR_LITTLE_ENDIAN)]
            bad.append(result)
        else:
            good.append(cx)
    return good, bad


def request(calling_ae: str, called_ae: str, pairs: Sequence[tuple[str, str | Sequence[str]]],
            max_pdu: int, *, scp_roles: Iterable[str] = ()) -> tuple[A_ASSOCIATE, list[PresentationContext]]:
    """As requestor: the A-ASSOCIATE-RQ primitive, one context per (SOP class, syntax or
    syntaxes) pair, odd IDs from 1, and the proposed contexts (for :func:`accepted_contexts`).

    A pair may offer several transfer syntaxes (the peer picks one): C-GET's storage contexts
    offer every syntax the source may hold. ``scp_roles`` are the SOP classes for which we ask
    the SCP role besides the default SCU role (an SCP/SCU Role Selection item each, PS3.7
    D.3.3.4): the storage classes whose C-STOREs a C-GET brings back on this association.
    """
    contexts = []
    for i, (sop_class, syntaxes) in enumerate(pairs):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = UID(sop_class)
        cx.transfer_syntax = [UID(syntaxes)] if isinstance(syntaxes, str) else [
            UID(ts) for ts in syntaxes]
        contexts.append(cx)
    rq = A_ASSOCIATE()
    rq.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    rq.calling_ae_title = calling_ae
    rq.called_ae_title = called_ae
    rq.presentation_context_definition_list = contexts
    info: list[Any] = _identity(max_pdu)
    for sop_class in dict.fromkeys(scp_roles):
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = UID(sop_class)
        role.scu_role = False          # we only receive this class's C-STOREs (PS3.4 C.4.3.1)
        role.scp_role = True
        info.append(role)
    rq.user_information = info
    return rq, contexts


def accepted_roles(ac: A_ASSOCIATE) -> dict[str, tuple[bool, bool]]:
    """As requestor: the (SCU, SCP) roles the A-ASSOCIATE-AC granted per SOP class. A class
    the acceptor sent no Role Selection item for keeps the default: we are SCU only (PS3.7
    D.3.3.4), i.e. the peer refused to act as storage SCU towards us for it."""
    return {str(item.sop_class_uid): (bool(item.scu_role), bool(item.scp_role))
            for item in ac.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid}


def accepted_contexts(proposed: list[PresentationContext],
                      ac: A_ASSOCIATE) -> list[PresentationContext]:
    """As requestor: every proposed context with the peer's result (ValueError/KeyError when
    the A-ASSOCIATE-AC answers contexts that were not proposed)."""
    return list(negotiate_as_requestor(proposed, ac.presentation_context_definition_results_list))


def context_result(result: int | None) -> str:
    """Why a presentation context was not accepted (PS3.8 9.3.3.2)."""
    return {1: "user rejection", 2: "no reason (provider rejection)",
            3: "abstract syntax (SOP class) not supported",
            4: "transfer syntax not supported"}.get(result or 0, f"result {result}")


def reject_reason(source: int | None, diag: int | None) -> str:
    """The words for an A-ASSOCIATE-RJ (source, reason/diagnostic), PS3.8 9.3.4."""
    table = {(1, 1): "no reason given", (1, 2): "application context not supported",
             (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
             (2, 1): "no reason given", (2, 2): "protocol version not supported",
             (3, 1): "temporary congestion", (3, 2): "local limit exceeded"}
    return table.get((source or 0, diag or 0), "unknown reason")
