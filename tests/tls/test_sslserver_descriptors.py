"""sslserver with its descriptor table full: the program's pipes (and -n's socket pair) wait for
descriptors, as a lookup's socket does, instead of dropping the client. The original makes them
in the client's own child, whose table is never full. The serving process runs under
RLIMIT_NOFILE 40; every wait is bounded.
"""

from __future__ import annotations

import time

from tls.certs import Certificates
from tls.tlsclient import TlsClient, open_descriptors, serverproc, serverstate, start_sslserver, wait_until

LIMIT = 40


def _no_drop(server: serverproc.ServerProcess) -> None:
    assert not [line for line in server.log() if b"unable to create" in line], serverstate.warnings(server)


def test_the_programs_pipes_wait_for_descriptors_after_the_handshake(tls_certs: Certificates) -> None:
    """The first client's handshake finishes once clients that send nothing (waiting for -T) have
    filled the table; a few of those then leave, giving descriptors back."""
    options = ["-v", "-T", "20", "-c", "200", "-b", "64"]
    with (
        serverstate.more_descriptors(4 * LIMIT),
        start_sslserver(options, ["sh", "-c", "echo served"], tls_certs.environment()) as server,
    ):
        serverstate.short_of_descriptors(server.pid, LIMIT)
        first = serverproc.connect(server.port, timeout=10)
        idle = []
        try:
            assert wait_until(lambda: open_descriptors(server.pid) < LIMIT, 5)
            idle = [serverproc.connect(server.port, timeout=10) for _ in range(LIMIT)]
            assert wait_until(lambda: open_descriptors(server.pid) == LIMIT, 5), "the table never filled"
            client = TlsClient(server.port, sock=first, timeout=10)
            client.handshake()
            time.sleep(0.3)  # the pipes' creation meets EMFILE meanwhile
            for sock in idle[:6]:  # accepted after the first: their handshakes end, their descriptors come back
                sock.close()
            assert client.read_until(b"served\n", timeout=5) == b"served\n", serverstate.warnings(server)
        finally:
            first.close()
            for sock in idle:
                sock.close()
        _no_drop(server)


def test_starttls_programs_wait_for_their_socket_pair_and_pipes(tls_certs: Certificates) -> None:
    """-n: each program starts at once and holds four of the server's descriptors until it has
    read a line. More clients come than the table holds; then each sends its line, and every one
    is served, none dropped."""
    options = ["-v", "-n", "-c", "200", "-b", "64"]
    clients = []
    with (
        serverstate.more_descriptors(4 * LIMIT),
        start_sslserver(options, ["sh", "-c", "read line; echo served"], tls_certs.environment()) as server,
    ):
        serverstate.short_of_descriptors(server.pid, LIMIT)
        try:
            clients = [serverproc.connect(server.port, timeout=10) for _ in range(12)]
            assert wait_until(lambda: open_descriptors(server.pid) >= LIMIT - 1, 5), "the table never filled"
            time.sleep(0.3)  # the last ones accepted meet EMFILE meanwhile
            for sock in clients:
                sock.sendall(b"go\n")
            for sock in clients:
                assert serverproc.read_line(sock, 5) == b"served\n", serverstate.warnings(server)
        finally:
            for sock in clients:
                sock.close()
        _no_drop(server)
