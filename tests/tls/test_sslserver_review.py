"""Review of sslserver (issue 14): ALRM's drain, -n's bounded wait for the control byte, the
command's name in its start-up messages, a truncation logged at -v, the end event's dur_ms."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from tls.certs import Certificates
from tls.tlsclient import SSLSERVER, TlsClient, serverproc, start_sslserver


def test_the_end_event_has_dur_ms_in_the_structured_modes(tls_certs: Certificates) -> None:
    with start_sslserver(["-v", "--log=logfmt"], ["echo", "hi"], tls_certs.environment()) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            assert client.read_all().data == b"hi\n"
        (line,) = server.wait_for_log(r"ev=end ")
    assert re.search(rb" dur_ms=\d+", line), line


@pytest.mark.parametrize(
    ("arguments", "code", "expected"),
    [
        (["--drain=x", "0", "0", "true"], 100, b"sslserver: fatal: bad value for --drain: x\n"),
        (["--log=xml", "0", "0", "true"], 100, b"sslserver: fatal: bad value for --log: xml\n"),
        (["--proxy-timeout=5", "0", "0", "true"], 100, b"sslserver: fatal: --proxy-timeout needs --proxy-from\n"),
        (["-a", "0", "0", "true"], 100, b"sslserver: illegal option -- a\nsslserver: usage: sslserver "),
        (["--nope", "0", "0", "true"], 100, b"sslserver: illegal option --nope\nsslserver: usage: sslserver "),
        (["0", "0"], 100, b"sslserver: usage: sslserver "),
        (["127.0.0.1", "nosuchport", "true"], 111, b"sslserver: fatal: unable to figure out port number for "),
        (["127.0.0.1", "0", "true"], 111, b"sslserver: fatal: unable to load certificate"),
        (["-3", "127.0.0.1", "0", "true"], 111, b"sslserver: fatal: unable to read password from fd 3"),
    ],
)
def test_every_start_up_message_has_sslserver_s_name(arguments: list[str], code: int, expected: bytes) -> None:
    process = serverproc.launch(SSLSERVER, arguments)  # no CERTFILE: a start that gets that far fails at once
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == code
    assert stderr.startswith(expected), stderr
    assert b"tcpserver" not in stderr


def test_the_start_up_failures_after_the_certificates_have_its_name(tls_certs: Certificates, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["127.0.0.1", str(port), "true"], b"sslserver: fatal: unable to bind: address already used\n"),
            (
                ["--status-socket=" + str(tmp_path / "no" / "s"), "127.0.0.1", "0", "true"],
                b"sslserver: fatal: unable to bind status socket ",
            ),
        ]
        environment = serverproc.plain_environment(tls_certs.environment())
        for arguments, expected in cases:
            process = serverproc.launch(SSLSERVER, arguments, environment=environment)
            _, stderr = process.communicate(timeout=10)
            assert process.returncode == 111
            assert stderr.startswith(expected), stderr
