"""``python -m bench.tls_send``: the SCU's TLS write path on its own, over loopback.

SSL sockets have no ``sendmsg``, so fastroute.dicom.scu gathers each PDU's 12-byte header with
the payload after it into full TLS records (``_send_tls``). This compares, for one C-STORE's
P-DATA-TF buffers at a few peer maximum PDU sizes, MB/s of

* ``gather``  — scu._send_tls (what the SCU does);
* ``naive``   — one ``sendall`` per buffer (a 12-byte record per header);
* ``copy``    — the whole message joined into one bytes object, one ``sendall``;
* ``plain``   — the same buffers with ``sendmsg`` on plain TCP (the non-TLS path).

Another process reads and discards on the other end (a thread would contend for the GIL
with the writer and distort the many-small-writes strategies). Figures are for comparing the strategies on
one machine, not for sizing.
"""
from __future__ import annotations

import argparse
import socket
import ssl
import sys
import tempfile
import multiprocessing
import time
from pathlib import Path

from fastroute.config import TlsListenerConfig, TlsPeerConfig
from fastroute.dicom import scu, tls
from fastroute.dicom.dimse import encode_c_store_rq, message_buffers

from .tlspki import make_pki


def _drain(conn: socket.socket) -> None:
    try:
        while conn.recv(1 << 20):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def _pair(pki_dir: Path, use_tls: bool) -> socket.socket:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    sctx = tls.server_context(TlsListenerConfig(cert=pki_dir / "server.pem", key=pki_dir / "server.key",
                                                ca=pki_dir / "ca.pem", require_client_cert=True))

    def accept() -> None:
        conn, _ = srv.accept()
        srv.close()
        if use_tls:
            conn = sctx.wrap_socket(conn, server_side=True)
        _drain(conn)

    reader = multiprocessing.get_context("fork").Process(target=accept, daemon=True)
    reader.start()
    srv.close()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if use_tls:
        cctx = tls.client_context(TlsPeerConfig(ca=pki_dir / "ca.pem", cert=pki_dir / "client.pem",
                                                key=pki_dir / "client.key"))
        sock = cctx.wrap_socket(sock, server_hostname="localhost")
    return sock


def _run(pki_dir: Path, way: str, payload: memoryview, max_pdu: int, repeat: int) -> float:
    sock = _pair(pki_dir, way != "plain")
    command = encode_c_store_rq(1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3")
    t0 = time.perf_counter()
    for _ in range(repeat):
        buffers = list(message_buffers(1, command, payload, max_pdu))
        if way == "gather":
            scu._send_tls(sock, buffers, [0])
        elif way == "naive":
            for b in buffers:
                sock.sendall(b)
        elif way == "copy":
            sock.sendall(b"".join(buffers))
        else:
            scu._send_all(sock, buffers, [0])
    elapsed = time.perf_counter() - t0
    sock.close()
    return len(payload) * repeat / elapsed / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls_send", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512 * 1024, help="dataset bytes per message (default 512 KiB)")
    p.add_argument("--total", type=int, default=256, help="MB sent per measurement (default 256)")
    p.add_argument("--pdu", default="4096,16384,262144", help="peer maximum PDU sizes (default 4096,16384,262144)")
    args = p.parse_args(argv)
    payload = memoryview(bytes(range(256)) * (args.size // 256))
    repeat = max(1, args.total * 1_000_000 // len(payload))
    with tempfile.TemporaryDirectory(prefix="fastroute-tls-send-") as tmp:
        pki_dir = Path(tmp)
        make_pki(pki_dir)
        print(f"{len(payload)} bytes per message, {repeat} messages per measurement; MB/s")
        print(f"{'max PDU':>9} {'gather':>8} {'naive':>8} {'copy':>8} {'plain':>8}")
        for max_pdu in (int(x) for x in args.pdu.split(",")):
            row = [_run(pki_dir, way, payload, max_pdu, repeat) for way in ("gather", "naive", "copy", "plain")]
            print(f"{max_pdu:>9} " + " ".join(f"{v:8.0f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
