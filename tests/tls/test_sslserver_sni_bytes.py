"""A server name (SNI) that is no ASCII: Python cannot decode it for the SNI callback, and wrote
the failure to stderr as a traceback (`Exception ignored in: b'\\xff\\xfe'`, then Python's lines),
in the middle of the log, which promises printable lines that start with the command's name."""

from __future__ import annotations

import subprocess
import time

from conftest import needs_tool

from tls.certs import Certificates
from tls.tlsclient import start_sslserver

OPENSSL = needs_tool("openssl", "openssl")


@OPENSSL
def test_a_binary_server_name_drops_that_client_in_one_log_line(tls_certs: Certificates) -> None:
    server = start_sslserver(["-v"], ["echo", "hi"], tls_certs.environment())
    try:
        subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-servername", b"\xff\xfe", "-quiet"],
            input=b"",
            capture_output=True,
            timeout=10,
        )
        served = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-quiet"],
            input=b"",
            capture_output=True,
            timeout=10,
        )
        assert b"hi\n" in served.stdout  # the next client is served
        time.sleep(0.2)
    finally:
        server.stop()
    lines = server.log()
    text = b"\n".join(lines)
    assert b"Traceback" not in text and b"Exception ignored" not in text, text
    for line in lines:
        assert line.startswith(b"sslserver: "), line
        assert all(32 <= byte < 127 for byte in line), line
