"""Exception hierarchy: every error carries the protocol facts and a hint for the operator."""
from __future__ import annotations


class FastrouteError(Exception):
    """Base class; ``hint`` tells an operator what to do about it."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg} (hint: {self.hint})" if self.hint else msg


class ConfigError(FastrouteError):
    """A configuration file is invalid; the message names file, line, key and expectation."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None,
                 key: str = "", hint: str = "") -> None:
        where = source or "<config>"
        if line is not None:
            where += f":{line}"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}", hint=hint)
        self.source, self.line, self.key = source, line, key


class RuleSyntaxError(ConfigError):
    """A rule expression does not parse."""


class PeekError(ValueError):
    """Encoded dataset bytes are truncated or malformed where the peek had to read them.

    Shared by the native and pure-Python tag peek so callers catch one class.
    """


class ObjectTooLarge(PeekError):
    """A dataset (or what a deflated one inflates to) exceeds the object size limit.

    Raised before the excess is held in memory, so a deflate bomb costs at most the limit.
    """


class SpoolError(FastrouteError):
    """The spool cannot take or return an object."""


class SpoolFullError(SpoolError):
    """The spool reached its size limit or the disk its free-space floor.

    Maps to DICOM status 0xA700 (Refused: Out of Resources) on the receive path.
    """

    hint = "free disk space, raise spool_max_bytes / lower min_free_bytes, or fix the stuck destination"


class DeliveryError(FastrouteError):
    """One object could not be delivered to one destination."""

    def __init__(self, message: str, *, destination: str = "", ae_title: str = "",
                 sop_instance_uid: str = "", status: int | None = None,
                 permanent: bool = False, hint: str = "") -> None:
        parts = [message]
        if destination:
            parts.append(f"destination={destination}")
        if ae_title:
            parts.append(f"ae={ae_title}")
        if sop_instance_uid:
            parts.append(f"sop_instance_uid={sop_instance_uid}")
        if status is not None:
            parts.append(f"status=0x{status:04X}")
        super().__init__(" ".join(parts), hint=hint)
        self.destination = destination
        self.ae_title = ae_title
        self.sop_instance_uid = sop_instance_uid
        self.status = status
        self.permanent = permanent


class TranscodeError(FastrouteError):
    """A transfer syntax conversion is impossible (no decoder/encoder, or not allowed)."""


class NoCodecError(TranscodeError):
    """No decoder/encoder is installed for a transfer syntax; retrying cannot help.

    ``permanent`` lets the sender fail the object for this destination at once instead of
    backing off: only installing the named plugin (and restarting) changes the outcome.
    """

    permanent: bool = True
