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


def entries(spool_path: Path, db: str) -> int:
    """Entries of a db, the listeners' byte shards' included (fastroute.spool.shards)."""
    spool = Spool(spool_path, map_size=256 * 1024**2, readonly=True)
    try:
        with spool.env.begin() as txn:
            n = int(txn.stat(spool._dbs[db])["entries"])
        for shard in spool.shards.each() if db in shard_dbs else ():
            with shard.env.begin() as txn:
                n += int(txn.stat(shard.dbs[db])["entries"])
        return n
    finally:
        spool.close()


shard_dbs = ("obj", "objc", "chunk", "stage")


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
    pacs = storescp("PACS", port=port, bit_preserving=True)
    got = pacs.wait_for(len(files), timeout=60)
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in got}
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(by_uid[uid]) == dataset_bytes(f), f"{f.name} changed on the way"
    wait_until(lambda: r.queue()["pacs"]["delivered"] == len(files), 30, message="not recorded")
    r.stop()
    assert entries(r.spool_path, "chunk") == 0      # delivered everywhere: the chunks went too
    assert entries(r.spool_path, "objc") == 0


@pytest.mark.peers
def test_large_object_transcoded_for_a_destination(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    """A destination that takes only Implicit VR LE gets a chunked Explicit VR LE object
    converted (the transcoder assembles it in memory): same dataset, other syntax."""
    from dicomcompare import assert_same_dataset

    [big] = large_objects(tmp_path, n=1)
    pacs = storescp("PACS", accept=["1.2.840.10008.1.2"])
    r = router({"stream_threshold": "1MiB", "destinations": {"pacs": destination(pacs.port, "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    res = storescu(r.port, [big])
    assert res.returncode == 0, res.stdout + res.stderr
    [got] = pacs.wait_for(1, timeout=60)
    received = pydicom.dcmread(got)
    assert received.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    original = pydicom.dcmread(big)
    assert received.PixelData == original.PixelData
    for ds in (original, received):     # Implicit VR cannot say a private element's VR (UN),
        ds.remove_private_tags()        # nor OB from OW for 8-bit pixels
        del ds.PixelData
    assert_same_dataset(original, received)
    wait_until(lambda: r.queue()["pacs"]["delivered"] == 1, 30, message="not recorded")


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
    assert "unreadable dataset" in r.log_text()
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


def _rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


def _gib_object(tmp_path: Path, size: int) -> tuple[Path, str, str]:
    """A Secondary Capture dataset file (Explicit VR LE, no file meta) of ``size`` bytes whose
    OB Pixel Data is sparse zeros: (path, SOP class, SOP instance UID)."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BIG1", "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False, implicit_vr=False, little_endian=True)
    head = buf.getvalue()
    pixel_len = size - len(head) - 12
    head += b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_len.to_bytes(4, "little")
    path = tmp_path / "big.raw"
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path, str(ds.SOPClassUID), str(ds.SOPInstanceUID)


@pytest.mark.slow
@pytest.mark.peers
def test_one_gib_object_keeps_listener_memory_bounded(tmp_path: Path, router: Callable[..., Router]) -> None:
    """A 1 GiB object raised the listener's anonymous memory by 2 GiB at peak and kept 1 GiB
    (issue 11 item 3). Streamed, its peak growth stays within a few chunks."""
    import mmap
    import re
    import threading
    import time

    from test_scp import RawPeer, store_rq

    size = 1024**3
    path, sop_class, sop_uid = _gib_object(tmp_path, size)
    r = router({"destinations": {"pacs": destination(peers.free_port(), "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    [pid] = [int(p) for p in re.findall(r"started listener-0 \(pid (\d+)\)", r.log_text())]
    base = _rss_anon_kib(pid)
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _rss_anon_kib(pid))
            except (OSError, AssertionError):
                return
            done.wait(0.01)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    peer = RawPeer(r.port)
    started = time.monotonic()
    try:
        kind, _ = peer.associate([(1, sop_class, ["1.2.840.10008.1.2.1"])], max_pdu=262144)
        assert kind == 0x02
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            peer.send_message(1, store_rq(1, sop_uid, sop_class), None)
            for header, payload in pdu.p_data_tf(1, False, memoryview(mapped), 262144):
                peer.sock.sendall(header)
                peer.sock.sendall(payload)
                payload.release()
        peer.sock.settimeout(300)
        rsp = peer.response()
        took = time.monotonic() - started
        assert rsp[0x0900] == 0, rsp
        peer.release()
    finally:
        peer.close()
    after = _rss_anon_kib(pid)
    done.set()
    sampler.join(5)
    growth_mib = (peak[0] - base) / 1024
    print(f"1 GiB object in {took:.1f} s: listener RssAnon {base / 1024:.0f} MiB, peak +{growth_mib:.0f} MiB, "
          f"after +{(after - base) / 1024:.0f} MiB")
    assert growth_mib < 64, f"peak RssAnon growth {growth_mib:.0f} MiB for a 1 GiB object"
    assert (after - base) / 1024 < 64
    assert entries(r.spool_path, "objc") == 1
    assert entries(r.spool_path, "chunk") == size // CHUNK + (1 if size % CHUNK else 0)


class _Sink:
    """A DatasetSink that keeps only what a test needs to see."""

    def __init__(self, head: bytearray) -> None:
        self.size = len(head)
        self.writes = 1
        self.discarded = False

    def write(self, fragment: memoryview) -> None:
        self.size += len(fragment)
        self.writes += 1

    def discard(self) -> None:
        self.discarded = True

    def __len__(self) -> int:
        return self.size


class _Stager:
    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.sinks: list[_Sink] = []

    def open(self, head: bytearray, sop_instance_uid: str) -> _Sink:
        assert sop_instance_uid == "1.2.3.4"
        assert len(head) <= self.threshold + 16384     # at most one fragment past it
        sink = _Sink(head)
        self.sinks.append(sink)
        return sink


def _store_pdus(size: int, fragment: int = 16378) -> list[bytes]:
    from fastroute.dicom.dimse import encode_c_store_rq

    out = [h[6:] + bytes(p) for h, p in pdu.p_data_tf(1, True, encode_c_store_rq(1, "1.2.3", "1.2.3.4"), 0)]
    data = bytes(size)
    out += [h[6:] + bytes(p) for h, p in pdu.p_data_tf(1, False, data, fragment + 6)]
    return out


def test_assembler_streams_past_the_threshold_and_keeps_small_datasets_in_memory() -> None:
    from collections import deque

    from fastroute.dicom.dimse import Assembler, MessageTooLarge

    stager = _Stager(threshold=100_000)
    asm = Assembler(max_object=1_000_000)
    asm.contexts = {1: "1.2.840.10008.1.2.1"}
    asm.stager = stager
    out: deque[Any] = deque()
    for body in _store_pdus(50_000):                    # small: today's path, a bytearray
        asm.feed(memoryview(body), out)
    [small] = out
    assert isinstance(small.data, bytearray) and len(small.data) == 50_000 and not stager.sinks
    out.clear()
    for body in _store_pdus(500_000):                   # large: handed to the sink past 100 kB
        asm.feed(memoryview(body), out)
        assert asm._data is None or len(asm._data) <= stager.threshold + 16378
    [large] = out
    [sink] = stager.sinks
    assert large.data is sink and len(sink) == 500_000 and sink.writes > 20 and not sink.discarded
    out.clear()
    with pytest.raises(MessageTooLarge):                # too large: the staging is dropped
        for body in _store_pdus(1_100_000):
            asm.feed(memoryview(body), out)
    assert stager.sinks[-1].discarded
    asm2 = Assembler()
    asm2.contexts, asm2.stager = {1: "1.2.840.10008.1.2.1"}, stager
    for body in _store_pdus(300_000)[:-1]:              # cut off before its last fragment
        asm2.feed(memoryview(body), out)
    asm2.discard()                                      # what the listener does on connection_lost
    assert stager.sinks[-1].discarded and not out


def test_spool_links_reads_digests_and_frees_a_chunked_object(tmp_path: Path) -> None:
    """put_many links staged chunks to the object; view() gives them as page views; the
    duplicate policy's digest is the one of the joined bytes; the last destination's delivery
    deletes them."""
    from fastroute.spool import Incoming, Outcome, OutcomeKind, content_digest
    from fastroute.spool.staging import ChunkedView, StagedData

    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    try:
        owner = _OWNER.pack(os.getpid(), _start_time(os.getpid()))
        data = os.urandom(CHUNK + 1000)
        sid = b"S" * 16
        spool.stage_chunk(sid, 0, data[:CHUNK], owner)
        spool.stage_chunk(sid, 1, data[CHUNK:], owner)
        [res] = spool.put_many([Incoming(StagedData(sid, len(data), 2), "1.2.840.10008.1.2.1", "1.2.3",
                                         "1.2.3.9", ("a", "b"))])
        assert not isinstance(res, BaseException)
        with spool.env.begin() as txn:
            assert txn.get(sid, db=spool._dbs["stage"]) is None     # linked: no longer staging
        with spool.view(res.oid) as view:
            assert isinstance(view, ChunkedView) and [len(p) for p in view.parts] == [CHUNK, 1000]
            assert view.join() == data
        assert spool.read(res.oid) == data
        with spool.env.begin() as txn:
            assert spool.queues.stored_digest(txn, res.oid) == content_digest(data)
        for dest in ("a", "b"):
            [claimed], _ = spool.claim(dest, 1)
            spool.settle(dest, [Outcome(claimed.oid, OutcomeKind.DELIVERED, status=0)])
            with spool.env.begin() as txn:
                left = txn.stat(spool._dbs["chunk"])["entries"]
            assert left == (2 if dest == "a" else 0)
        with spool.env.begin() as txn:
            assert txn.stat(spool._dbs["objc"])["entries"] == 0
    finally:
        spool.close()


def test_a_staging_write_that_fails_is_answered_as_a_spool_failure(tmp_path: Path) -> None:
    """A write to the staging file that fails (a full disk) neither raises into the listener's
    event loop nor loses the association: the object is refused like a failed spool write
    (0xA700, the modality retries) once complete, and what was staged is removed."""
    from fastroute.routing.intake import refusal_for
    from fastroute.spool.commit import Committer

    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    committer = Committer(spool, None)
    try:
        stager = committer.stager(1024)
        f = stager.open(bytearray(CHUNK + 10))            # one full chunk staged at once
        os.close(f.fd)                                     # the next write fails (EBADF)
        f.write(memoryview(b"x" * 100))
        assert isinstance(f.error, OSError) and len(f) == CHUNK + 110
        exc = committer.seal(f).exception(timeout=10)
        assert isinstance(exc, OSError)
        assert refusal_for(exc).status == 0xA700
        with spool.env.begin() as txn:
            assert txn.stat(spool._dbs["chunk"])["entries"] == 0
            assert txn.stat(spool._dbs["stage"])["entries"] == 0
    finally:
        f.fd = -1                                          # already closed above
        committer.close()
        spool.close()


@pytest.mark.peers
def test_staging_left_by_a_crash_is_removed_when_the_listener_starts(
        tmp_path: Path, router: Callable[..., Router]) -> None:
    """SIGKILL of the whole router while a large object is half in: its staged chunks stay
    registered under the dead listener, and the next start removes them (it was never
    acknowledged, so nothing is lost)."""
    from test_scp import RawPeer, store_rq

    [big] = large_objects(tmp_path, n=1)
    data = dataset_bytes(big)
    ds = pydicom.dcmread(big, stop_before_pixels=True)
    r = router({"stream_threshold": "1MiB", "destinations": {"pacs": destination(peers.free_port(), "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    peer = RawPeer(r.port)
    try:
        kind, _ = peer.associate([(1, str(ds.SOPClassUID), ["1.2.840.10008.1.2.1"])])
        assert kind == 0x02
        peer.send_message(1, store_rq(1, str(ds.SOPInstanceUID), str(ds.SOPClassUID)), None)
        for header, payload in pdu.p_data_tf(1, False, data[:len(data) * 2 // 3], 16384):
            peer.send(header[:11] + b"\x00" + bytes(payload))
        wait_until(lambda: entries(r.spool_path, "chunk") >= 1, 10, message="nothing staged")
        r.kill()
    finally:
        peer.close()
    assert entries(r.spool_path, "stage") == 1
    r.start()
    wait_until(lambda: "removed the staged chunks of 1 large object(s)" in r.log_text(), 30,
               message=r.log_tail)
    assert entries(r.spool_path, "stage") == 0 and entries(r.spool_path, "chunk") == 0
    assert entries(r.spool_path, "meta") == 0
