"""A bounded fuzz target for the listener (issue 11): malformed PDUs, command sets and datasets
sent to a real running listener, which must log no traceback or "internal error", keep
answering C-ECHO, and store a valid C-STORE afterwards.

A seeded generator, not hypothesis: input ``i`` of seed ``S`` is always the same bytes, so a
failure names (seed, index) and is reproduced by rerunning with them. CI runs
FASTROUTE_FUZZ_N inputs (default 4000, about 20 s); locally, e.g.
``FASTROUTE_FUZZ_N=1000000 FASTROUTE_FUZZ_SEED=7 pytest tests/test_fuzz_scp.py``.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

import peers
from fastroute.dicom import dimse, pdu
from test_scp import CT, RawPeer, Scp, associate_rq, scp, store_rq, synth_dataset, tiny

__all__ = ["scp"]

N = int(os.environ.get("FASTROUTE_FUZZ_N", "4000"))
SEED = int(os.environ.get("FASTROUTE_FUZZ_SEED", "11"))
VERIFY = "1.2.840.10008.1.1"
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
CONTEXTS = [(1, CT, [ExplicitVRLittleEndian]), (3, CT, [ImplicitVRLittleEndian]),
            (5, CT, [DeflatedExplicitVRLittleEndian]), (7, VERIFY, [ExplicitVRLittleEndian])]


def mutate(rng: random.Random, data: bytes, rounds: int = 3) -> bytes:
    """A few random edits: bit flips, byte runs, cuts, insertions, 16/32-bit length smashes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, rounds)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[pos:pos + rng.randint(1, 8)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del buf[pos:]
        elif op == 3:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and len(buf) >= 4:
            p = min(pos, len(buf) - 4)
            buf[p:p + 4] = struct.pack("<I", rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x280000,
                                                         rng.randrange(1 << 32)]))
        elif op == 5 and len(buf) >= 2:
            p = min(pos, len(buf) - 2)
            buf[p:p + 2] = struct.pack("<H", rng.choice([0, 0xFFFF, rng.randrange(1 << 16)]))
        elif op == 6:
            buf[pos:pos] = rng.choice([b"SQ\0\0\xff\xff\xff\xff", b"\xfe\xff\x00\xe0\xff\xff\xff\xff",
                                       b"\xfe\xff\xdd\xe0\0\0\0\0", b"\x08\x00\x05\x00CS\x02\x00\0\0",
                                       b"\xe0\x7f\x10\x00OB\0\0\xff\xff\xff\xff"])
    return bytes(buf)


def pdv_pdu(ctx: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">BBIIBB", 4, 0, len(fragment) + 6, len(fragment) + 2, ctx, control) + fragment


class Inputs:
    """The generator: ``case(i)`` is (kind, bytes) of input ``i``."""

    def __init__(self, seed: int, uid: str, dataset: bytes) -> None:
        self.seed, self.uid, self.dataset = seed, uid, dataset
        self.rq = associate_rq(CONTEXTS, "FUZZ", "FASTROUTE", 16384)

    def case(self, i: int) -> tuple[str, bytes]:
        rng = random.Random(self.seed * 1_000_003 + i)
        kind = rng.choice(["random", "associate", "pdu-header", "command", "dataset", "dataset",
                           "pdv", "sequence"])
        if kind == "random":
            return kind, rng.randbytes(rng.randint(0, 400))
        if kind == "associate":
            return kind, mutate(rng, self.rq, 4)
        if kind == "pdu-header":      # any type and length, with or without a body
            body = rng.randbytes(rng.choice([0, 1, 3, 4, 5, 68, 200]))
            length = rng.choice([len(body), 0, 4, rng.randrange(1 << 32)])
            head = self.rq if rng.random() < 0.5 else b""
            return kind, head + struct.pack(">BBI", rng.randrange(256), 0, length) + body
        ctx = rng.choice([1, 3, 5, 7, 9, 255])
        msg_id = rng.randrange(1 << 16)
        command = store_rq(msg_id, self.uid) if ctx != 7 else dimse.encode_c_echo_rq(msg_id)
        dataset: bytes | None = self.dataset if ctx != 7 else None
        if kind == "command":
            command = mutate(rng, command)
        elif kind == "dataset":
            dataset = mutate(rng, self.dataset, 5)
        stream = self.rq
        if kind == "pdv":
            frames = pdv_pdu(ctx, rng.randrange(256), mutate(rng, command))
            frames += pdv_pdu(ctx, rng.randrange(256), dataset or b"")
            stream += mutate(rng, frames) if rng.random() < 0.5 else frames
        else:
            stream += b"".join(h + bytes(p) for h, p in pdu.p_data_tf(ctx, True, command, 16384))
            if dataset is not None:
                stream += b"".join(h + bytes(p) for h, p in pdu.p_data_tf(ctx, False, dataset, 16384))
        if kind == "sequence":         # PDUs in odd orders: releases, aborts, a second RQ
            extras = [pdu.encode_release_rq(), pdu.encode_release_rp(), pdu.encode_abort(0, 0),
                      self.rq, struct.pack(">BBI", rng.randrange(1, 8), 0, 0)]
            for _ in range(rng.randint(1, 3)):
                stream += rng.choice(extras)
        return kind, stream


def send_and_drain(port: int, data: bytes) -> None:
    """Send ``data``, end our side, read until the listener closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            raise AssertionError("the listener neither answered nor closed within 5 s") from None


def test_fuzz_listener(tmp_path: Path, dcmtk: Any, scp: Callable[..., Scp],
                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    s = scp(acse_timeout=2.0, network_timeout=2.0, association_idle_timeout=2.0,
            max_object_bytes="4MiB", spool_max_bytes="256MiB")
    uid, data = synth_dataset(tmp_path)
    inputs = Inputs(SEED, uid, data)
    for i in range(N):
        kind, payload = inputs.case(i)
        try:
            send_and_drain(s.port, payload)
        except AssertionError as exc:
            raise AssertionError(f"seed {SEED} input {i} ({kind}): {exc}; bytes {payload[:200].hex()}")
        bad = [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
        assert not bad, (f"seed {SEED} input {i} ({kind}) logged {bad[0].getMessage()!r}; "
                         f"bytes {payload[:200].hex()}")
        caplog.clear()
        if i % 250 == 249:
            raw = RawPeer(s.port)
            assert raw.associate([(1, VERIFY, [ExplicitVRLittleEndian])])[0] == pdu.A_ASSOCIATE_AC, \
                f"no association after seed {SEED} input {i}"
            raw.send_message(1, dimse.encode_c_echo_rq(1))
            assert raw.response()[0x0900] == 0
            raw.release()
    peers.wait_until(lambda: not s.receiver.slots.live(), 10, message="slots held after fuzzing")
    # A valid C-STORE from a real peer afterwards is stored, byte for byte.
    before = {u for u, _, _ in s.stored()}
    files = tiny(tmp_path, 1, name="after")
    res = peers.storescu(s.port, files)
    assert res.returncode == 0, res.stdout + res.stderr
    import pydicom
    new = pydicom.dcmread(files[0]).SOPInstanceUID
    assert new not in before and new in s.by_uid()
