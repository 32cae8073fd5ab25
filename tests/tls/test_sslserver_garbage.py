"""A TLS connection leaves no cyclic garbage, served or failed: its session, BIOs and buffers go
with their last reference, not at a collection of the cyclic collector (which runs on the loop,
for every client at once). The real sslserver runs under serverstate.KEEPING_GARBAGE; the
count is taken in its serving process.

Two cycles held every connection until a collection: the handshake thread's SSLWantReadError,
kept by the future whose frames its traceback held, and the relay's callbacks (the connection's
methods) while the connection held the relay.
"""

from __future__ import annotations

import socket
import sys

from tls.certs import Certificates
from tls.tlsclient import SSLSERVER, TlsClient, serverproc, serverstate, start_sslserver

SERVED = 30
FAILED = 10


def test_tls_connections_leave_no_cyclic_garbage(tls_certs: Certificates) -> None:
    wrapper = [sys.executable, "-c", serverstate.KEEPING_GARBAGE]
    with start_sslserver(["-v"], ["/bin/echo", "served"], tls_certs.environment(), wrapper=wrapper) as server:
        before = serverstate.garbage_kinds(server, server.pid)  # what start-up left
        for _ in range(SERVED):
            with TlsClient(server.port, timeout=10) as client:
                client.handshake()
                assert client.read_until(b"served\n", timeout=5) == b"served\n"
        for _ in range(FAILED):  # a handshake cut short, and one refused
            with serverproc.connect(server.port):
                pass
            with serverproc.connect(server.port) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                serverproc.read_to_eof(sock, 5)
        server.wait_for_log(r"unable to accept SSL: ", count=2 * FAILED)
        server.wait_for_log(r"^sslserver: end ", count=SERVED)
        added = serverstate.garbage_added(before, serverstate.garbage_kinds(server, server.pid))
    assert SSLSERVER.name == "sslserver"  # the wrapper runs the command its name says
    assert added == {}, added
