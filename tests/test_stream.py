"""Issue 11 item 3: large objects are streamed into the spool in chunks, in bounded memory.

An object past ``stream_threshold`` is staged in LMDB chunks as it arrives, linked to its
routing record by the final commit (acknowledged only after it), sent from the chunks
zero-copy, and its chunks go with its last destination; staging that never reached a commit
(refused, aborted, crashed) is removed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
import pytest

import peers
import synth
from fastroute.dicom import pdu
from fastroute.spool import Spool
from fastroute.spool.staging import CHUNK, _OWNER, _start_time, chunk_key
from peers import storescu, wait_until
from router import Router, destination
from test_router import dataset_bytes


@pytest.fixture
def router(tmp_path: Path, dcmtk: Any) -> Iterator[Callable[..., Router]]:
    started: list[Router] = []

    def make(config: dict[str, Any], name: str = "router") -> Router:
        r = Router(tmp_path / name, config)
        started.append(r)
        return r.start()
    yield make
    for r in started:
        if r.proc is not None:
            r.stop()


def entries(spool_path: Path, db: str) -> int:
    spool = Spool(spool_path, map_size=256 * 1024**2, readonly=True)
    try:
        with spool.env.begin() as txn:
            return int(txn.stat(spool._dbs[db])["entries"])
    finally:
        spool.close()


def large_objects(tmp_path: Path, n: int = 2) -> list[Path]:
    """Multi-frame US (RGB): 12 frames of 512 x 512 x 3 = 9.4 MB each, three chunks."""
    return synth.make_study(tmp_path / "large", modality="US", n_instances=n, frames=12, rows=512, cols=512)


@pytest.mark.peers
def test_large_objects_are_staged_in_chunks_and_delivered_byte_identical(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    files = large_objects(tmp_path) + synth.make_tiny(tmp_path / "t", n=3)
    port = peers.free_port()      # the PACS is down until the spool was looked at
    r = router({"stream_threshold": "1MiB",
                "destinations": {"pacs": destination(port, "PACS", backoff_initial=0.2, backoff_max=0.5)},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    res = storescu(r.port, files)
    assert res.returncode == 0, res.stdout + res.stderr
    # Acknowledged, so committed: the large ones as manifests over chunks, no staging left.
    assert entries(r.spool_path, "objc") == 2
    assert entries(r.spool_path, "chunk") == 2 * 3
    assert entries(r.spool_path, "stage") == 0
    assert entries(r.spool_path, "obj") == 3
    size = len(dataset_bytes(files[0]))
    assert size > 2 * CHUNK
    pacs = storescp("PACS", port=port)
    got = pacs.wait_for(len(files), timeout=60)
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in got}
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(by_uid[uid]) == dataset_bytes(f), f"{f.name} changed on the way"
    wait_until(lambda: r.queue()["pacs"]["delivered"] == len(files), 30, message="not recorded")
    r.stop()
    assert entries(r.spool_path, "chunk") == 0      # delivered everywhere: the chunks went too
    assert entries(r.spool_path, "objc") == 0


def send_raw_store(port: int, path: Path, dataset: bytes, *, complete: bool = True) -> int | None:
    """C-STORE ``dataset`` (any bytes, as the file's SOP instance) from a scripted peer; its
    status, or None when ``complete`` is false: half of it is sent, then the connection dropped."""
    from test_scp import RawPeer, store_rq

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    peer = RawPeer(port)
    try:
        kind, _ = peer.associate([(1, sop_class, ["1.2.840.10008.1.2.1"])])
        assert kind == 0x02, "association not accepted"
        if not complete:
            peer.send_message(1, store_rq(1, sop_uid, sop_class), None)
            for header, payload in pdu.p_data_tf(1, False, dataset[:len(dataset) // 2], 16384):
                peer.send(header[:11] + b"\x00" + bytes(payload))     # never the last fragment
            return None
        peer.send_message(1, store_rq(1, sop_uid, sop_class), dataset)
        return int(peer.response()[0x0900])
    finally:
        peer.close()


@pytest.mark.peers
def test_malformed_large_object_is_refused_and_its_chunks_removed(
        tmp_path: Path, router: Callable[..., Router]) -> None:
    """The structure check runs over the whole staged dataset: an element that runs past the
    end, after the routing attributes and 9 MB of pixels, gets 0xC000 and nothing stays."""
    [good] = large_objects(tmp_path, n=1)
    data = dataset_bytes(good)
    r = router({"stream_threshold": "1MiB", "destinations": {"pacs": destination(peers.free_port(), "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    # A private element whose length (0x40) runs past the end of the dataset.
    status = send_raw_store(r.port, good, data + b"\xe1\x7f\x10\x00LO\x40\x00" + b"x" * 8)
    assert status == 0xC000
    assert "malformed dataset" in r.log_text()
    assert "removed 3 staged chunk(s)" in r.log_text()     # the structure check saw all of it
    assert entries(r.spool_path, "chunk") == 0
    assert entries(r.spool_path, "stage") == 0
    assert entries(r.spool_path, "objc") == 0


@pytest.mark.peers
def test_staging_of_an_aborted_association_is_removed(tmp_path: Path, router: Callable[..., Router]) -> None:
    """Half of a large dataset arrives (chunks staged), then the peer goes away: the listener
    removes the staging at once, not at its next start."""
    [good] = large_objects(tmp_path, n=1)
    data = dataset_bytes(good)
    r = router({"stream_threshold": "1MiB", "destinations": {"pacs": destination(peers.free_port(), "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    assert send_raw_store(r.port, good, data, complete=False) is None
    wait_until(lambda: "unacknowledged object was discarded" in r.log_text(), 10, message=r.log_tail)
    wait_until(lambda: "removed 1 staged chunk(s)" in r.log_text(), 10, message=r.log_tail)
    assert entries(r.spool_path, "stage") == 0 and entries(r.spool_path, "chunk") == 0
    assert entries(r.spool_path, "objc") == 0 and entries(r.spool_path, "meta") == 0


def test_orphaned_staging_is_removed_on_start(tmp_path: Path) -> None:
    """Chunks staged by a process that died before the final commit are removed when a
    listener's committer starts; those of a live process are kept."""
    from fastroute.spool.commit import Committer

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    try:
        dead_sid, live_sid = b"D" * 16, b"L" * 16
        spool.stage_chunk(dead_sid, 0, b"x" * 1000, _OWNER.pack(dead_pid, 12345))
        spool.stage_chunk(dead_sid, 1, b"y" * 1000, _OWNER.pack(dead_pid, 12345))
        spool.stage_chunk(live_sid, 0, b"z" * 1000, _OWNER.pack(os.getpid(), _start_time(os.getpid())))
        committer = Committer(spool, None)
        committer.close()
        with spool.env.begin() as txn:
            assert txn.get(chunk_key(dead_sid, 0), db=spool._dbs["chunk"]) is None
            assert txn.get(chunk_key(dead_sid, 1), db=spool._dbs["chunk"]) is None
            assert txn.get(dead_sid, db=spool._dbs["stage"]) is None
            assert txn.get(chunk_key(live_sid, 0), db=spool._dbs["chunk"]) is not None
    finally:
        spool.close()
