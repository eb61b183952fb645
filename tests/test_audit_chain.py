"""Issue 11 item 9: the audit chain's ends are anchored and, with ``audit_key``, keyed, so that
truncation and a re-hashed rewrite are detected; ``audit --verify`` names the failed check."""
from __future__ import annotations

import hashlib
import json
import struct
import tarfile
from pathlib import Path
from typing import Any, Iterator

import lmdb
import pytest
import yaml

from fastroute.cli import main as cli_main
from fastroute.config import loads
from fastroute.errors import ConfigError
from fastroute.spool import Incoming, Outcome, OutcomeKind, Spool
from fastroute.spool.audit import AuditCheck, read_key

KEY = b"k" * 32
U64 = struct.Struct(">Q")
LEGACY = Path(__file__).parent / "data" / "legacy_spool.tar.xz"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fill(sp: Spool, n: int = 3) -> None:
    """n objects delivered (three events each: none for put, one delivered) plus operator events."""
    for i in range(n):
        sp.put_many([Incoming(b"x" * 100, "1.2.840.10008.1.2.1", "1.2.3", f"1.{i}", ("a",),
                              {"calling_ae": "CT1"})])
        [c], _ = sp.claim("a", 1)
        sp.settle("a", [Outcome(c.oid, OutcomeKind.DELIVERED, 0)])
        sp.audit_record("pause", who="alice", why=f"maintenance {i}", destination="a")


@pytest.fixture(params=[None, KEY], ids=["plain", "keyed"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "s", map_size=64 * 1024**2, audit_key=request.param)
    fill(sp)
    yield sp
    sp.close()


def dbs(sp: Spool) -> tuple[Any, Any]:
    return sp.env.open_db(b"audit"), sp.env.open_db(b"info")


def raw_events(sp: Spool) -> list[dict[str, Any]]:
    audit, _ = dbs(sp)
    with sp.env.begin(db=audit) as txn:
        return [json.loads(bytes(v)) for _, v in txn.cursor()]


def delete(sp: Spool, *seqs: int) -> None:
    audit, _ = dbs(sp)
    with sp.env.begin(write=True, db=audit) as txn:
        for seq in seqs:
            assert txn.delete(U64.pack(seq))


def rewrite(sp: Spool, events: list[dict[str, Any]], digest: Any) -> None:
    """What someone with write access to the spool but without the key does: rewrite the
    events, re-hash the chain from the first one with ``digest``, and fix up the head."""
    audit, info = dbs(sp)
    prev = events[0]["prev"]
    with sp.env.begin(write=True) as txn:
        for ev in events:
            ev = {k: v for k, v in ev.items() if k != "hash"}
            ev["prev"] = prev
            ev["hash"] = prev = digest(ev)
            txn.put(U64.pack(ev["seq"]), json.dumps(ev).encode(), db=audit)
        txn.put(b"audit_head", prev.encode(), db=info)


def sha256(ev: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(ev)).hexdigest()


def check(sp: Spool) -> tuple[AuditCheck, str]:
    report = sp.audit_report()
    assert report.ok == (report.check is AuditCheck.OK)
    return report.check, report.text


def test_an_untouched_chain_verifies_and_says_how_strong_it_is(spool: Spool) -> None:
    report = spool.audit_report()
    events = raw_events(spool)
    assert report.ok, report.text
    assert report.events == len(events) and report.head == events[-1]["hash"]
    assert report.head_seq == events[-1]["seq"]
    if spool.audit._key is None:
        assert "cannot be detected" in report.text and "alg" not in events[0]
    else:
        assert "HMAC-SHA256 keyed from seq=1" in report.text
        assert all(e["alg"] == "hmac-sha256" for e in events)


def test_deleting_the_last_events_is_a_truncated_head(spool: Spool) -> None:
    n = len(raw_events(spool))
    delete(spool, n, n - 1)
    got, text = check(spool)
    assert got is AuditCheck.TRUNCATED_HEAD and f"seq={n - 2}" in text


def test_deleting_the_first_events_is_detected(spool: Spool) -> None:
    delete(spool, 1, 2)
    got, text = check(spool)
    assert got is AuditCheck.MISSING_FIRST and "starts at seq=3" in text


def test_deleting_a_middle_event_is_a_broken_link(spool: Spool) -> None:
    delete(spool, 3)
    got, text = check(spool)
    assert got is AuditCheck.BROKEN_LINK and "seq=4" in text


def test_an_event_edited_in_place_is_altered(spool: Spool) -> None:
    events = raw_events(spool)
    ev = events[2]
    ev["who"] = "mallory"
    audit, _ = dbs(spool)
    with spool.env.begin(write=True, db=audit) as txn:
        txn.put(U64.pack(ev["seq"]), json.dumps(ev).encode())
    got, text = check(spool)
    assert got is AuditCheck.ALTERED and f"seq={ev['seq']}" in text


def test_an_edited_and_rehashed_chain(spool: Spool) -> None:
    """Without a key a re-hashed rewrite cannot be detected (and verify says so); with one it is,
    whether the forger keeps the events marked keyed or strips the mark."""
    events = raw_events(spool)
    events[2]["who"] = "mallory"
    keyed = spool.audit._key is not None
    if not keyed:
        rewrite(spool, events[2:], sha256)
        report = spool.audit_report()
        assert report.ok and "cannot be detected" in report.text
        return
    rewrite(spool, events[2:], sha256)            # "alg" kept: HMACs from seq 3 on do not match
    got, text = check(spool)
    assert got is AuditCheck.WRONG_KEY and "seq=3" in text and "re-hashed" in text
    plain = [{k: v for k, v in e.items() if k != "alg"} for e in events[2:]]
    rewrite(spool, plain, sha256)                 # downgraded to plain SHA-256 after keyed events
    got, text = check(spool)
    assert got is AuditCheck.WRONG_KEY and "not keyed but follows keyed seq=1" in text
    whole = [{k: v for k, v in e.items() if k != "alg"} for e in raw_events(spool)]
    rewrite(spool, whole, sha256)                 # the whole chain as if never keyed
    got, text = check(spool)
    assert got is AuditCheck.WRONG_KEY and "no event is keyed" in text


def test_a_wrong_key_or_no_key(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s", map_size=64 * 1024**2, audit_key=KEY)
    fill(sp)
    sp.close()
    other = Spool(tmp_path / "s", map_size=64 * 1024**2, audit_key=b"another key")
    try:
        got, text = check(other)
        assert got is AuditCheck.WRONG_KEY and "seq=1" in text and "key differs" in text
    finally:
        other.close()
    none = Spool(tmp_path / "s", map_size=64 * 1024**2)
    try:
        got, text = check(none)
        assert got is AuditCheck.NO_KEY and "no audit_key" in text
    finally:
        none.close()


def test_a_legitimate_prune_verifies_and_anchors_the_start(spool: Spool) -> None:
    events = raw_events(spool)
    cut = events[4]["time"]
    assert spool.audit_prune(cut) == 4
    kept = raw_events(spool)
    assert kept[0]["seq"] == 5 and kept[-1]["action"] == "audit_prune"
    assert (kept[-1]["first_seq"], kept[-1]["pruned"]) == (5, 4)
    assert spool.audit_verify()[0], spool.audit_verify()[1]
    delete(spool, 5)                                       # and now one more, behind its back
    got, text = check(spool)
    assert got is AuditCheck.MISSING_FIRST and "kept it from seq=5" in text


def test_pruning_everything_still_verifies(spool: Spool) -> None:
    n = len(raw_events(spool))
    assert spool.audit_prune(float("inf")) == n
    [only] = raw_events(spool)
    assert only["action"] == "audit_prune" and only["seq"] == only["first_seq"] == n + 1
    assert spool.audit_verify()[0], spool.audit_verify()[1]
    spool.audit_record("resume", who="alice", destination="a")
    assert spool.audit_verify()[0], spool.audit_verify()[1]


def test_a_forged_prune_anchor_is_detected(tmp_path: Path) -> None:
    """Deleting the first events and writing a matching anchor does not help: the anchor must
    be the one the last (keyed) audit_prune event recorded."""
    sp = Spool(tmp_path / "s", map_size=64 * 1024**2, audit_key=KEY)
    try:
        fill(sp)
        delete(sp, 1, 2)
        [third] = [e for e in raw_events(sp) if e["seq"] == 3]
        _, info = dbs(sp)
        with sp.env.begin(write=True, db=info) as txn:
            txn.put(b"audit_anchor", json.dumps({"seq": 3, "prev": third["prev"]}).encode())
        got, text = check(sp)
        assert got is AuditCheck.MISSING_FIRST and "anchor" in text
    finally:
        sp.close()


def test_a_removed_prune_anchor_is_detected(spool: Spool) -> None:
    spool.audit_prune(raw_events(spool)[2]["time"])
    _, info = dbs(spool)
    with spool.env.begin(write=True, db=info) as txn:
        assert txn.delete(b"audit_anchor")
    got, text = check(spool)
    assert got is AuditCheck.MISSING_FIRST and "anchor" in text and "was removed" in text


def test_a_legacy_chain_verifies_and_is_keyed_from_the_switch(tmp_path: Path) -> None:
    """A chain written before keys (plain SHA-256, no "alg") still verifies; configuring a key
    on it records an audit_keyed event, keyed, from which on a rewrite is detected."""
    with tarfile.open(LEGACY) as tar:
        tar.extractall(tmp_path, filter="data")
    sp = Spool(tmp_path / "spool", map_size=16 * 1024**2, audit_key=KEY)
    try:
        report = sp.audit_report()
        assert report.ok and report.events == 8, report.text
        assert "keyed from seq=8" in report.text and "events before it are plain SHA-256" in report.text
        assert raw_events(sp)[-1]["action"] == "audit_keyed"
    finally:
        sp.close()
    again = Spool(tmp_path / "spool", map_size=16 * 1024**2, audit_key=KEY)   # recorded once only
    try:
        assert len(raw_events(again)) == 8 and again.audit_verify()[0]
    finally:
        again.close()


def test_a_chain_pruned_before_anchors_existed_still_verifies(tmp_path: Path) -> None:
    """The old prune left no anchor, only the "retention" event apply_retention records."""
    sp = Spool(tmp_path / "s", map_size=64 * 1024**2)
    try:
        fill(sp)
        delete(sp, 1, 2)
        assert check(sp)[0] is AuditCheck.MISSING_FIRST
        sp.audit_record("retention", who="fastroute", why="retention policy", audit_pruned=2)
        assert sp.audit_verify()[0], sp.audit_verify()[1]
    finally:
        sp.close()
    keyed = Spool(tmp_path / "k", map_size=64 * 1024**2, audit_key=KEY)   # a keyed one does not pass
    try:
        fill(keyed)
        keyed.audit_record("retention", who="fastroute", why="retention policy", audit_pruned=2)
        delete(keyed, 1, 2)
        assert check(keyed)[0] is AuditCheck.MISSING_FIRST
    finally:
        keyed.close()


def test_read_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FR_AUDIT_KEY", "s3cret")
    assert read_key("env:FR_AUDIT_KEY") == b"s3cret"
    (tmp_path / "key").write_bytes(b"from a file\n")
    assert read_key(f"file:{tmp_path / 'key'}") == b"from a file"
    monkeypatch.delenv("FR_AUDIT_KEY")
    with pytest.raises(ConfigError, match="FR_AUDIT_KEY is not set"):
        read_key("env:FR_AUDIT_KEY")
    with pytest.raises(ConfigError, match="cannot read"):
        read_key(f"file:{tmp_path / 'missing'}")


def test_config_audit_key() -> None:
    assert loads("audit_key: env:FR_AUDIT_KEY\n").audit_key == "env:FR_AUDIT_KEY"
    assert loads("audit_key: file:/etc/fastroute/audit.key\n").audit_key == "file:/etc/fastroute/audit.key"
    assert loads("audit_key:\n").audit_key is None and loads("port: 104\n").audit_key is None
    with pytest.raises(ConfigError, match="audit_key.*env:NAME") as err:
        loads("port: 104\naudit_key: hunter2\n")
    assert err.value.line == 2          # type: ignore[attr-defined]


def test_cli_verify_names_the_failed_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FR_AUDIT_KEY", "s3cret")
    path = tmp_path / "fastroute.yaml"
    path.write_text(yaml.safe_dump({"spool": str(tmp_path / "spool"), "spool_max_bytes": "64MiB",
                                    "min_free_bytes": 0, "audit_key": "env:FR_AUDIT_KEY"}))
    c = str(path)
    sp = Spool.from_config(loads(path.read_text()))
    fill(sp)
    sp.close()
    assert cli_main(["audit", "-c", c, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "chain intact" in out and "HMAC-SHA256 keyed from seq=1" in out
    sp = Spool.from_config(loads(path.read_text()))
    delete(sp, len(raw_events(sp)))
    sp.close()
    assert cli_main(["audit", "-c", c, "--verify"]) == 1
    assert "FAILED (truncated head)" in capsys.readouterr().out
    monkeypatch.setenv("FR_AUDIT_KEY", "guessed")
    sp = Spool(tmp_path / "spool", map_size=64 * 1024**2)   # restore the head, key-less
    events = raw_events(sp)
    _, info = dbs(sp)
    with sp.env.begin(write=True, db=info) as txn:
        txn.put(b"audit_head", events[-1]["hash"].encode())
    sp.close()
    assert cli_main(["audit", "-c", c, "--verify"]) == 1
    assert "FAILED (wrong key / re-hashed)" in capsys.readouterr().out
