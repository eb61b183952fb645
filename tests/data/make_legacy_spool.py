"""Write a small spool with the PREVIOUS spool code, as the fixture ``legacy_spool.tar.xz``.

Run against the code before the restructure (main at 6095274, where the spool was the single
module ``fastroute/spool.py`` with JSON-list routing records and f-string counter names)::

    PYTHONPATH=/path/to/checkout-of-6095274 python tests/data/make_legacy_spool.py tests/data

It writes objects in every state the old code could leave: pending (one with a retry record),
in flight, failed (twice, two statuses), delivered (one transcoded: the syntax in the record's
``error`` slot), superseded, purged, suppressed and unrouted; operator audit events; counters.
``tests/test_spool.py::test_legacy_spool`` opens a copy with the current code and drains it.
The clock is fixed so the fixture is the same on every run (only LMDB's free pages differ).
"""
from __future__ import annotations

import io
import sys
import tarfile
import tempfile
from pathlib import Path

from fastroute import audit
from fastroute.spool import FAILED, Incoming, Outcome, Spool

T0 = 1_700_000_000.0
TS = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def obj(uid: str, dests: tuple[str, ...], data: bytes, study: str = "1.2.3.4",
        calling: str = "CT1") -> Incoming:
    return Incoming(data, TS, CT, uid, dests, {
        "study_instance_uid": study, "patient_id": "PAT1", "accession_number": "ACC1",
        "modality": "CT", "calling_ae": calling, "called_ae": "FASTROUTE", "peer": "10.0.0.5",
        "rules": ["ct"] if dests else []})


def build(path: Path) -> None:
    spool = Spool(path, map_size=4 * 1024**2, duplicate_window=86400.0)
    put = lambda item, t: spool.put_many([item], now=T0 + t)[0]  # noqa: E731
    delivered = put(obj("1.1", ("pacs", "vna"), b"A" * 200), 1)
    transcoded = put(obj("1.2", ("pacs",), b"B" * 200), 2)
    failed = put(obj("1.3", ("pacs",), b"C" * 200), 3)
    failed2 = put(obj("1.4", ("pacs",), b"D" * 200), 4)
    inflight = put(obj("1.5", ("pacs",), b"E" * 200), 5)
    retry = put(obj("1.6", ("pacs",), b"F" * 200), 6)
    purged = put(obj("1.7", ("vna",), b"G" * 200), 7)
    put(obj("1.8", (), b"H" * 200, calling="MR1"), 8)
    put(obj("1.9", ("vna",), b"I" * 200), 9)            # superseded by the next
    put(obj("1.9", ("vna",), b"J" * 200), 10)                  # pending at vna
    claimed, _ = spool.claim("pacs", 10, now=T0 + 20)
    assert [c.oid for c in claimed] == [delivered.oid, transcoded.oid, failed.oid, failed2.oid,
                                        inflight.oid, retry.oid]
    spool.settle("pacs", [
        Outcome(delivered.oid, "delivered", status=0, at=T0 + 21),
        Outcome(transcoded.oid, "delivered", status=0xB000, transcoded=JPEG_LS, at=T0 + 22),
        Outcome(failed.oid, "failed", status=0xA900, error="Error: Data Set does not match SOP Class"),
        Outcome(failed2.oid, "failed", status=None, error="gave up after 5 attempts: timeout", unknown=True),
        Outcome(retry.oid, "retry", status=0xA700, error="Refused: Out of Resources", next_at=T0 + 3600),
    ], now=T0 + 23)
    # inflight.oid stays in flight (its sender "crashed")
    vna, _ = spool.claim("vna", 1, now=T0 + 30)
    assert [c.oid for c in vna] == [delivered.oid]
    spool.settle("vna", [Outcome(delivered.oid, "delivered", status=0, at=T0 + 31)], now=T0 + 31)
    assert spool.purge("vna", (FAILED, b"P"), [purged.oid], reason="wrong study") == [purged.oid]
    # a byte-identical re-send of 1.1: suppressed at both destinations
    again = put(obj("1.1", ("pacs", "vna"), b"A" * 200), 40)
    assert again.suppressed == ("pacs", "vna"), again
    spool.set_paused("vna", True)
    audit.record(spool, "pause", who="alice@host", why="maintenance", destination="vna")
    audit.record(spool, "purge", who="alice@host", why="wrong study", destination="vna",
                 states=["pending"], oids=[purged.oid], count=1)
    assert spool.audit_verify()[0]
    print(sorted(spool.counters().items()), file=sys.stderr)
    spool.close()


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spool"
        build(path)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            tar.add(path / "data.mdb", arcname="spool/data.mdb")
        (out / "legacy_spool.tar.xz").write_bytes(buf.getvalue())
    print(f"wrote {out / 'legacy_spool.tar.xz'} ({len(buf.getvalue())} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
