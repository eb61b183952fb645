"""Counters in the spool's ``info`` database: typed keys, one text encoding, one reader.

Each counter is a u64 under a key such as ``delivered:pacs`` or ``failed_status:pacs:43264``.
That text is the on-disk format (unchanged, so the counters of an existing spool keep
counting); :class:`CounterKey` is the only code that writes or splits it, and
:class:`Counters` is what the views and ``/metrics`` read, by kind and destination.
"""
from __future__ import annotations

import enum
import logging
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import lmdb

_U64 = struct.Struct(">Q")
log = logging.getLogger("fastroute.counters")

# Delivery latency histogram (received -> delivered), upper bounds in seconds; one counter each.
# A LAN delivery takes 2-4 ms, so the buckets start at 1 ms. The set is a superset of the
# buckets before 0.2 (0.05 ... 86400): a spool's old bucket keys are still read as they are
# (their counts sit in the bucket they were counted in, which is still an upper bound).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0, 1800.0, 3600.0, 86400.0)


class CounterKind(enum.StrEnum):
    SEQ = "seq"                            # the oid sequence
    AUDIT_SEQ = "audit_seq"                # the audit chain's sequence
    RECEIVED = "received"
    RECEIVED_BYTES = "received_bytes"
    RECEIVED_FROM = "received_from"        # extra: the calling AE title
    DELIVERED = "delivered"
    DELIVERED_BYTES = "delivered_bytes"
    FAILED = "failed"
    FAILED_STATUS = "failed_status"        # extra: the last status, decimal (-1: no response)
    RETRIES = "retries"
    SUPPRESSED = "suppressed"
    SUPERSEDED = "superseded"
    UNKNOWN_OUTCOMES = "unknown_outcomes"
    PURGED = "purged"
    TRANSCODED = "transcoded"
    LATENCY_BUCKET = "latency_bucket"      # extra: the bucket's upper bound, or "inf"
    LATENCY_SUM_US = "latency_sum_us"
    LATENCY_COUNT = "latency_count"
    ASSOC_IN = "assoc_in"                  # extra: outcome[/reason] (accepted, rejected/..., aborted)
    ASSOC_OUT = "assoc_out"                # per destination; extra: outcome[/reason]
    REFUSED = "refused"                    # extra: the C-STORE failure status, decimal
    WORKER_RESTARTS = "worker_restarts"    # extra: the worker's role (listener, sender, http)
    LAST_SUCCESS = "last_success"          # per destination: unix time of the last delivery (a maximum)
    COMMITTED = "committed"                # per destination: instances the destination committed (issue 14)
    COMMIT_FAILED = "commit_failed"        # per destination: instances its commitment report failed
    COMMIT_REQUESTS = "commit_requests"    # per destination: N-ACTION requests sent (re-requests too)
    VERIFIED = "verified"                  # per destination: instances its C-FIND listed (verify: find)
    VERIFY_FAILED = "verify_failed"        # per destination: studies still missing instances after re-sends
    QUARANTINED = "quarantined"            # per destination: objects its content plan quarantined (issue 15)


_GLOBAL = frozenset({CounterKind.SEQ, CounterKind.AUDIT_SEQ, CounterKind.RECEIVED, CounterKind.RECEIVED_BYTES})
_EXTRA_ONLY = frozenset({CounterKind.RECEIVED_FROM, CounterKind.ASSOC_IN, CounterKind.REFUSED,
                         CounterKind.WORKER_RESTARTS})
_WITH_EXTRA = frozenset({CounterKind.FAILED_STATUS, CounterKind.LATENCY_BUCKET, CounterKind.ASSOC_OUT})
_KINDS = {k.value: k for k in CounterKind}


@dataclass(frozen=True, slots=True)
class CounterKey:
    """One counter: what it counts, for which destination, and the kind's extra label."""

    kind: CounterKind
    destination: str = ""
    extra: str = ""

    def encode(self) -> bytes:
        if self.kind in _GLOBAL:
            return self.kind.value.encode()
        if self.kind in _EXTRA_ONLY:
            return f"{self.kind.value}:{self.extra}".encode()
        if self.kind in _WITH_EXTRA:
            return f"{self.kind.value}:{self.destination}:{self.extra}".encode()
        return f"{self.kind.value}:{self.destination}".encode()

    @staticmethod
    def decode(key: str) -> CounterKey | None:
        """The key of a counter, or None for anything else kept in ``info``."""
        name, sep, rest = key.partition(":")
        kind = _KINDS.get(name)
        if kind is None or (kind in _GLOBAL) == bool(sep):
            return None
        if kind in _EXTRA_ONLY:
            return CounterKey(kind, extra=rest)
        if kind in _WITH_EXTRA:
            dest, _, extra = rest.rpartition(":")   # destination names have no ':'
            return CounterKey(kind, dest, extra) if dest else None
        return CounterKey(kind, rest)

    @staticmethod
    def latency_bucket(destination: str, le: float | None) -> CounterKey:
        return CounterKey(CounterKind.LATENCY_BUCKET, destination, bucket_label(le))

    @staticmethod
    def failed_status(destination: str, status: int | None) -> CounterKey:
        return CounterKey(CounterKind.FAILED_STATUS, destination, status_label(status))


def bucket_label(le: float | None) -> str:
    """The ``extra`` of a latency bucket: its upper bound as Python prints it, or ``inf``."""
    return "inf" if le is None else str(le)


class FailureCause(enum.StrEnum):
    """Why an object failed without a DICOM status from the destination (the failed-by-status
    counter's label then, instead of one "none" for every such failure)."""

    NO_RESPONSE = "no-response"          # timeouts and aborts, max_unknown_outcomes in a row
    CONTEXT_REFUSED = "context-refused"  # the destination accepted none of the contexts proposed
    NO_DECODER = "no-decoder"            # another syntax was needed and no installed plugin decodes it
    NOT_CONVERTIBLE = "not-convertible"  # another syntax was needed and the conversion is impossible
    SPOOL_ERROR = "spool-error"          # its bytes could not be read from the spool
    CONTENT_CHANGE = "content-change"    # its destination's modify refused it (lookup on_missing: fail)


def status_label(status: int | None, cause: str = "") -> str:
    """The ``extra`` of a failed-by-status counter: the status in decimal; without one, the
    failure's cause, or -1 (as spools written before causes were recorded have it)."""
    if status is not None:
        return str(status)
    return cause or "-1"


_ENCODED: dict[tuple[CounterKind, str, str], bytes] = {}


def key_bytes(kind: CounterKind, destination: str = "", extra: str = "") -> bytes:
    """``CounterKey(...).encode()``, remembered: the commit paths bump several counters per
    object and the set of keys is small (kinds x destinations x peers)."""
    t = (kind, destination, extra)
    raw = _ENCODED.get(t)
    if raw is None:
        if len(_ENCODED) > 65536:    # many calling AE titles: stay bounded
            _ENCODED.clear()
        raw = _ENCODED[t] = CounterKey(kind, destination, extra).encode()
    return raw


def incr(txn: lmdb.Transaction, db: Any, kind: CounterKind, destination: str = "", extra: str = "",
         by: int = 1) -> int:
    """Add to a counter inside the caller's write transaction; returns the new value."""
    raw_key = _ENCODED.get((kind, destination, extra)) or key_bytes(kind, destination, extra)
    raw = txn.get(raw_key, db=db)
    value = (_U64.unpack(raw)[0] if raw else 0) + by
    txn.put(raw_key, _U64.pack(value), db=db)
    return value


class Counters(dict[str, int]):
    """A snapshot of every counter: a plain dict by encoded key (JSON as-is), read by kind
    and destination through the typed accessors."""

    def __init__(self, values: dict[CounterKey, int]) -> None:
        super().__init__((k.encode().decode(), v) for k, v in values.items())
        self._typed = values

    @classmethod
    def read(cls, txn: lmdb.Transaction, db: Any) -> Counters:
        values: dict[CounterKey, int] = {}
        for k, v in txn.cursor(db=db):
            if len(v) != 8:
                continue
            key = CounterKey.decode(bytes(k).decode(errors="replace"))
            if key is not None:
                values[key] = _U64.unpack(bytes(v))[0]
        return cls(values)

    @classmethod
    def from_text(cls, values: dict[str, int]) -> Counters:
        """From encoded keys (as ``dict(counters)`` has them); keys that are not counters are left out."""
        typed = {CounterKey.decode(k): v for k, v in values.items()}
        return cls({k: v for k, v in typed.items() if k is not None})

    def of(self, kind: CounterKind, destination: str = "", extra: str = "") -> int:
        return self._typed.get(CounterKey(kind, destination, extra), 0)

    def items_of(self, kind: CounterKind) -> Iterator[tuple[CounterKey, int]]:
        return ((k, v) for k, v in self._typed.items() if k.kind is kind)

    def per_destination(self, kind: CounterKind) -> dict[str, int]:
        return {k.destination: v for k, v in self.items_of(kind)}

    def total(self, kind: CounterKind) -> int:
        return sum(v for _, v in self.items_of(kind))

    def typed(self) -> dict[CounterKey, int]:
        return dict(self._typed)


class _CounterSink(Protocol):
    def add_counters(self, deltas: Mapping[CounterKey, int], maxima: Mapping[CounterKey, int] | None = None) -> None:
        ...


class EventTally:
    """Rare events (associations, refusals) counted in memory and written to the spool at
    most once per ``every`` seconds by a background thread: a modality that opens one
    association per object must not cost a commit per object. ``close()`` writes the rest;
    a failed write (spool full) keeps the counts for the next one."""

    def __init__(self, sink: _CounterSink, every: float = 1.0) -> None:
        self.sink = sink
        self.every = every
        self._lock = threading.Lock()
        self._pending: dict[CounterKey, int] = {}
        self._maxima: dict[CounterKey, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastroute-tally", daemon=True)
        self._thread.start()

    def add(self, kind: CounterKind, destination: str = "", extra: str = "", by: int = 1) -> None:
        key = CounterKey(kind, destination, extra)
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + by

    def set_max(self, kind: CounterKind, destination: str, value: int) -> None:
        """A value kept as the largest ever written (a timestamp), not added."""
        key = CounterKey(kind, destination)
        with self._lock:
            self._maxima[key] = max(value, self._maxima.get(key, 0))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            maxima, self._maxima = self._maxima, {}
        if not pending and not maxima:
            return
        try:
            self.sink.add_counters(pending, maxima)
        except Exception as exc:   # keep them for the next flush
            log.warning("could not write %d event counters to the spool: %s", len(pending) + len(maxima), exc)
            with self._lock:
                for k, v in pending.items():
                    self._pending[k] = self._pending.get(k, 0) + v
                for k, v in maxima.items():
                    self._maxima[k] = max(v, self._maxima.get(k, 0))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()


def add_counters(txn: lmdb.Transaction, db: Any, deltas: Mapping[CounterKey, int],
                 maxima: Mapping[CounterKey, int] | None = None) -> None:
    """Add several counters (and raise maxima) inside the caller's write transaction."""
    for key, by in deltas.items():
        incr(txn, db, key.kind, key.destination, key.extra, by)
    for key, value in (maxima or {}).items():
        raw_key = key.encode()
        raw = txn.get(raw_key, db=db)
        if raw is None or len(raw) != 8 or _U64.unpack(raw)[0] < value:
            txn.put(raw_key, _U64.pack(value), db=db)


__all__ = ["LATENCY_BUCKETS", "CounterKind", "CounterKey", "Counters", "EventTally", "add_counters", "incr",
           "key_bytes", "bucket_label", "status_label", "FailureCause"]
