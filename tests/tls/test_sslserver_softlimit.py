"""`softlimit -m 30000000 sslserver ...`, as s/qmail's smtps run file has it: sslserver starts
through the native launcher as tcpserver does (bin/tcpserver.c lifts the soft limits for
Python's sake), and its program gets the limits softlimit set. Before, sslserver was left
under them, and Python failed to map uvloop: a traceback and exit 1, nothing served."""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest
from conftest import IN_CI, needs_tool

from tls.certs import Certificates
from tls.tlsclient import SSLSERVER, TOP, TlsClient, start_sslserver

LAUNCHER_BUILT = not os.path.islink(TOP / "bin" / "tcpserver")
EXTENSION_BUILT = importlib.util.find_spec("ucspi.server._spawn") is not None

pytestmark = [
    needs_tool("softlimit", "daemontools"),
    pytest.mark.skipif(
        not (LAUNCHER_BUILT and EXTENSION_BUILT) and not IN_CI,
        reason="built without a C compiler: no native launcher or extension (README: softlimit)",
    ),
]

LIMITS = ["-m", "30000000"]


@pytest.mark.parametrize("command", [SSLSERVER, TOP / "bin" / "sslserver"], ids=["installed", "checkout"])
def test_sslserver_starts_under_softlimit_and_the_program_gets_the_limits(
    tls_certs: Certificates, command: os.PathLike[str]
) -> None:
    expected = subprocess.run(
        ["softlimit", *LIMITS, "cat", "/proc/self/limits"], capture_output=True, check=True, timeout=10
    ).stdout
    server = start_sslserver(
        [], ["cat", "/proc/self/limits"], tls_certs.environment(), wrapper=["softlimit", *LIMITS], command=command
    )
    try:
        for _ in range(2):  # and again: still serving
            with TlsClient(server.port) as client:
                client.handshake()
                assert client.read_all().data == expected
    finally:
        server.stop()
