"""sslserver whose program cannot be run: each client, after its handshake, gets an end of the
session and nothing else; the log has the original's warning, and every slot comes back."""

from __future__ import annotations

import re

from tls.certs import Certificates
from tls.tlsclient import TlsClient, serverproc, start_sslserver


def test_a_program_that_cannot_run_drops_each_client_and_the_server_carries_on(tls_certs: Certificates) -> None:
    with start_sslserver(["-v", "-c", "1"], ["/nonexistent/program"], tls_certs.environment()) as server:
        for _ in range(2):  # -c 1: the second client is served only once the first slot is back
            with TlsClient(server.port, timeout=10) as client:
                client.handshake()
                assert client.read_all().data == b""
        server.wait_for_log(r"^sslserver: status: 0/1$", count=3)
        assert server.alive()
        log = [re.sub(rb"^sslserver: end \d+ ", b"sslserver: end PID ", line) for line in server.log()]
    drop = b"sslserver: warning: dropping connection, unable to run /nonexistent/program: file does not exist"
    assert log.count(drop) == 2, log
    if not serverproc.FALLBACK_FORCED:  # the child's end, as tcpserver's (differences item 1 on the fallback)
        end = b"sslserver: end PID status 28416"
        assert log.count(end) == 2, log
        assert log.index(drop) < log.index(end)
