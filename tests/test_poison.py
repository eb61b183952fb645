"""Issue 11 item 1, send side: an object the destination aborts on ("poison") fails after
``max_unknown_outcomes`` unknown outcomes in a row, and does not hold back the others.

The destination is a small pynetdicom SCP that aborts the association on chosen SOP Instance
UIDs (a DCMTK storescp stores whatever it is sent, so it cannot play the part)."""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

import synth
from fastroute.spool import QueueState
from peers import free_port, wait_until
from test_schedule import config, queue_files, running_sender

ALL_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70",
                "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"]


class AbortingSCP:
    """Stores every object except those in ``poison``, on which it aborts the association
    before answering (as a PACS does on a dataset it cannot parse)."""

    def __init__(self, poison: set[str]) -> None:
        self.poison = poison
        self.stored: dict[str, float] = {}            # SOP Instance UID -> when it arrived
        self.aborted: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.port = free_port()
        self.ae = AE("PACS")
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(str(cx.abstract_syntax), ALL_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.ae.maximum_associations = 4
        server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server

    def _store(self, event: evt.Event) -> int:
        uid = str(getattr(event.request, "AffectedSOPInstanceUID"))
        with self.lock:
            if uid in self.poison:
                self.aborted[uid] += 1
                event.assoc.abort()
                return 0x0000            # never sent: the association is gone
            self.stored[uid] = time.monotonic()
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def aborting_scp() -> Iterator[type[AbortingSCP]]:
    started: list[AbortingSCP] = []

    class Started(AbortingSCP):
        def __init__(self, poison: set[str]) -> None:
            super().__init__(poison)
            started.append(self)
    yield Started
    for scp in started:
        scp.close()


def test_poison_objects_fail_after_n_unknown_outcomes_without_blocking_the_rest(
        tmp_path: Path, aborting_scp: type[AbortingSCP]) -> None:
    """100 valid objects interleaved with 10 the destination aborts on: the valid ones are all
    delivered well within the poison's first backoff (before the fix the whole destination
    backed off on every abort: 76 s), and each poison object is sent exactly N times and
    then fails with the reason."""
    files = synth.make_tiny(tmp_path / "t", n=110)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    poison = {uids[i] for i in range(5, 110, 11)}
    assert len(poison) == 10
    scp = aborting_scp(poison)
    backoff = 8.0      # each resend of a poison object waits 4-8 s (equal jitter)
    cfg = config(tmp_path, scp.port, backoff_initial=backoff, backoff_max=backoff,
                 max_unknown_outcomes=3, max_attempts=100)
    with running_sender(cfg) as (spool, notifier):
        queue_files(spool, files)
        start = time.monotonic()
        notifier.notify("pacs")
        wait_until(lambda: len(scp.stored) == 100, backoff / 2,
                   message=lambda: f"{len(scp.stored)} of 100 valid objects within {backoff / 2:g} s")
        took = max(scp.stored.values()) - start
        print(f"100 valid objects delivered in {took:.2f} s past 10 poison ones")
        assert took < backoff / 4, f"valid objects took {took:.1f} s: blocked behind the poison"

        def failed() -> list[str]:
            return [e.record.sop_instance_uid for e in spool.entries("pacs", QueueState.FAILED)
                    if e.record is not None]
        wait_until(lambda: len(failed()) == 10, 4 * backoff + 10,
                   message=lambda: f"poison failed: {len(failed())} of 10, sends {dict(scp.aborted)}")
        assert set(failed()) == poison
        assert all(n == 3 for n in scp.aborted.values()), dict(scp.aborted)
        for e in spool.entries("pacs", QueueState.FAILED):
            assert e.error.startswith("outcome unknown 3 times in a row: association aborted by "), e.error
        counters = spool.counters()
        assert counters.get("delivered:pacs") == 100
        assert counters.get("unknown_outcomes:pacs") == 30
        assert not spool.entries("pacs", QueueState.PENDING)


def test_unknown_outcomes_count_in_a_row(tmp_path: Path) -> None:
    """The count that fails an object is of unknown outcomes IN A ROW: a response (even a
    transient failure status) breaks the run; the N-th one in a row fails it with the reason."""
    import random

    from fastroute.routing.schedule import decide
    from fastroute.spool import Incoming, Outcome, OutcomeKind, Spool

    cfg = config(tmp_path, 1, max_unknown_outcomes=3, max_attempts=100)
    dest = cfg.destinations["pacs"]
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, durable=False)
    rng = random.Random(1)
    try:
        spool.put_many([Incoming(b"\x00" * 8, "1.2.840.10008.1.2.1", "1.2.3", "1.2.3.4", ("pacs",))])

        def attempt(status: int | None) -> Outcome:
            [item], _ = spool.claim("pacs", 1)
            o = decide(item, dest, status, "aborted", unknown=status is None, now=0.0, rng=rng)
            spool.settle("pacs", [o])
            return o
        assert attempt(None).kind == OutcomeKind.RETRY
        assert attempt(None).kind == OutcomeKind.RETRY
        assert attempt(0xA700).kind == OutcomeKind.RETRY     # a response: the run starts over
        assert attempt(None).kind == OutcomeKind.RETRY
        assert attempt(None).kind == OutcomeKind.RETRY
        last = attempt(None)
        assert last.kind == OutcomeKind.FAILED
        assert last.error == "outcome unknown 3 times in a row: aborted"
        [entry] = spool.entries("pacs", QueueState.FAILED)
        assert entry.attempts == 6 and entry.error == last.error
    finally:
        spool.close()


def test_a_destination_that_aborts_every_object_is_backed_off_more_and_more(tmp_path: Path) -> None:
    """Objects on their first try ending without a response, N in a row, back the destination
    off; the run keeps growing the delay even though each new association succeeds."""
    import random

    from fastroute.dicom.scu import OutcomeUnknown
    from fastroute.routing.schedule import DestinationSender
    from fastroute.spool import Claimed, Spool

    cfg = config(tmp_path, 1, max_unknown_outcomes=2, backoff_initial=1.0, backoff_max=1000.0)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, durable=False)
    try:
        (cfg.spool / "run").mkdir()
        sender = DestinationSender(cfg, cfg.destinations["pacs"], spool, rng=random.Random(0))

        class Aborting:
            def abort(self) -> None:
                pass

            def send_raw(self, *args: object) -> None:
                raise OutcomeUnknown("association aborted by PACS@127.0.0.1:1 before the C-STORE response")

        class Planner:
            def prepare(self, conn: object, item: Claimed, data: memoryview) -> tuple[int, memoryview, str]:
                return 1, data, item.transfer_syntax

        sender.planner = Planner()  # type: ignore[assignment]
        delays = []
        for i in range(5):
            item = Claimed(i + 1, "1.2.3", f"1.2.3.{i}", "1.2.840.10008.1.2.1", 0, 8, "CT1")
            before = time.time()
            outcome = sender._send_view(Aborting(), item, memoryview(b"\0" * 8))  # type: ignore[arg-type]
            assert outcome.unknown and outcome.kind == "retry"
            delays.append(sender.down_until - before if sender.down_until > before else 0.0)
            sender._destination_ok()          # the next association is accepted again
        assert delays[0] == 0.0                # one object's abort: nobody else waits
        assert all(d > 0 for d in delays[1:])
        assert delays[4] > delays[1] * 2, delays   # 1, 2, 4, 8 s bases (with equal jitter)
    finally:
        spool.close()
