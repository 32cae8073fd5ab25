"""tcpclient -h, -p's absence, -l's absence and -r against the fake DNS and identd, side by side.

Each test has its own 127.0.0.N (fresh_loopback): the fake DNS listens on N:53, the identd on
N:113, and the server on N, so the client's ident query and PTR lookups go to the fakes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clientproc import CLIENTS, SHOW_PROGRAM, masked_environment, original_available, run_client, shown
from fakes import FakeDNS, FakeIdentd, fresh_loopback
from serverproc import OUR_SERVER, plain_environment, start_server

pytestmark = pytest.mark.skipif(not original_available(), reason="Debian's tcpclient is not installed here")

GREETER = ["sh", "-c", "echo hello; cat >/dev/null"]


@pytest.fixture
def loopback() -> str:
    return fresh_loopback()


@pytest.fixture
def server(loopback: str) -> Iterator:
    with start_server(OUR_SERVER.command, ["-H", "-R", "-l", "srv"], GREETER, host=loopback) as running:
        yield running


def _run_both(arguments: list[str], loopback: str) -> dict:
    environment = plain_environment({b"DNSCACHEIP": loopback.encode()})
    return {name: run_client(command, arguments, environment=environment) for name, command in CLIENTS.items()}


def test_names_and_info_from_dns_and_identd(loopback: str, server) -> None:
    reply = b"%d , %d : USERID : UNIX : joe user\r\n"
    with (
        FakeDNS(loopback, ptr={loopback: "Server.Example.", "127.0.0.1": "client.example."}) as dns,
        FakeIdentd(loopback, reply=lambda line: line.strip() + reply[7:]) as identd,
    ):
        results = _run_both(["-t", "5", loopback, str(server.port), *SHOW_PROGRAM], loopback)
    ours, original = results["ours"], results["original"]
    assert (ours.returncode, ours.stderr) == (original.returncode, original.stderr) == (0, b"")
    assert masked_environment(shown(ours), server.port) == masked_environment(shown(original), server.port)
    environment = shown(ours)["environment"]
    # The connection leaves from 127.0.0.1, the address the kernel picks for any 127.0.0.N.
    assert "TCPLOCALHOST=client.example" in environment and "TCPREMOTEHOST=server.example" in environment
    assert "TCPREMOTEINFO=joeuser" in environment
    # Both asked the identd the same question: the server's port first, then ours.
    lines = [request.line for request in identd.requests]
    assert len(lines) == 2 and all(line.startswith(b"%d , " % server.port) for line in lines)
    assert {request.rdtype for request in dns.requests} == {"PTR"}


def test_no_name_is_an_empty_name(loopback: str, server) -> None:
    """An NXDOMAIN answer sets TCPLOCALHOST and TCPREMOTEHOST to "" (tcpserver removes them)."""
    with FakeDNS(loopback, mode="nxdomain"):
        results = _run_both(["-R", loopback, str(server.port), *SHOW_PROGRAM], loopback)
    ours, original = results["ours"], results["original"]
    assert ours.returncode == original.returncode == 0
    assert masked_environment(shown(ours), server.port) == masked_environment(shown(original), server.port)
    assert "TCPREMOTEHOST=" in shown(ours)["environment"]


def test_ident_timeout_leaves_info_unset(loopback: str, server) -> None:
    """-hrt1 (rts): an identd that never answers costs one second, TCPREMOTEINFO unset."""
    with FakeDNS(loopback, ptr={loopback: "localhost."}), FakeIdentd(loopback, mode="silent"):
        arguments = ["-Di", loopback, "-hrt1", "-l", "Local", loopback, str(server.port), *SHOW_PROGRAM]
        results = _run_both(arguments, loopback)
    ours, original = results["ours"], results["original"]
    assert ours.returncode == original.returncode == 0
    assert masked_environment(shown(ours), server.port) == masked_environment(shown(original), server.port)
    assert not any(entry.startswith("TCPREMOTEINFO=") for entry in shown(ours)["environment"])
