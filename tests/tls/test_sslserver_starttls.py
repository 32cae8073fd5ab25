"""sslserver -n (UCSPI-TLS): the program on the plain socket, y / Y / EOF / other bytes on SSLCTLFD.

The program here (UCSPI_PROGRAM) says `220 ready` in plaintext, waits for one line, writes the
command byte the test chose, and then, after TLS, says what it got on SSLREADFD. It records what
it saw in a report file, so a test can check the environment, the blob and how it ended.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from tls.certs import Certificates
from tls.tlsclient import TlsClient, client_context, serverproc, start_sslserver, wait_until, zombies_of

PYTHON = sys.executable

UCSPI_PROGRAM = r"""
import json, os, signal, sys
report_path, command, read_blob = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
report = {"env": {k: v for k, v in os.environ.items() if k.startswith(("SSL", "PROTO", "TCP"))}}
def save(**more):
    report.update(more)
    with open(report_path + ".tmp", "w") as f:
        json.dump(report, f)
    os.rename(report_path + ".tmp", report_path)
def on_term(*_):
    save(ended="SIGTERM")
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
ctl, rfd, wfd = (int(os.environ[name]) for name in ("SSLCTLFD", "SSLREADFD", "SSLWRITEFD"))
report["fds"] = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
os.write(1, b"220 ready\n")
line = b""
while not line.endswith(b"\n"):
    chunk = os.read(0, 1)
    if not chunk:
        save(ended="plain eof")
        sys.exit(0)
    line += chunk
if command == b"-":
    os.close(ctl)
    os.write(1, b"plain: " + line)
    save(ended="declined")
    sys.exit(0)
os.write(1, b"go ahead\n")
os.write(ctl, command)
blob = b""
if read_blob != "none":
    while True:
        chunk = os.read(ctl, 4096)
        if not chunk:
            break
        blob += chunk
        if read_blob == "nul" and blob.endswith(b"\0\0"):
            break
report["blob"] = blob.decode("latin-1")
os.write(wfd, b"secret hello\n")
data = b""
while True:
    chunk = os.read(rfd, 65536)
    if not chunk:
        break
    data += chunk
save(ended="tls eof", data=data.decode("latin-1"))
"""


def _start(tls_certs: Certificates, report: Path, command: str, read_blob: str = "none", options: tuple = ()):
    program = [PYTHON, "-c", UCSPI_PROGRAM, os.fspath(report), command, read_blob]
    return start_sslserver(["-n", "-HR", *options], program, tls_certs.environment())


def _report(path: Path) -> dict:
    assert wait_until(path.exists, 10), "the program wrote no report"
    return json.loads(path.read_text())


def _plain_until_go(port: int) -> socket.socket:
    sock = serverproc.connect(port, timeout=10)
    assert serverproc.read_line(sock) == b"220 ready\n"
    sock.sendall(b"STARTTLS\n")
    assert serverproc.read_line(sock) == b"go ahead\n"
    return sock


@pytest.mark.parametrize("read_blob", ["eof", "nul"])
def test_Y_sends_the_variables_and_closes_the_control_socket(
    tls_certs: Certificates, tmp_path: Path, read_blob: str
) -> None:
    report_path = tmp_path / "report"
    with _start(tls_certs, report_path, "Y", read_blob, ("-v",)) as server:
        sock = _plain_until_go(server.port)
        with TlsClient(server.port, sock=sock) as client:
            client.handshake()
            assert client.read_until(b"secret hello\n") == b"secret hello\n"
            client.send(b"over tls\n")
            client.close_notify()
            client.read_all()
        report = _report(report_path)
        server.wait_for_log(r"^sslserver: tls \d+ accept$")
    entries = report["blob"].split("\0")
    assert report["blob"].endswith("\0\0")
    variables = dict(entry.split("=", 1) for entry in entries if entry)
    assert variables["SSL_PROTOCOL"] == "TLSv1.3"
    assert variables["SSL_CIPHER"].startswith("TLS_")
    assert all("=" in entry for entry in entries if entry)  # no s6-style bare-name unsets
    assert report["data"] == "over tls\n" and report["ended"] == "tls eof"
    env = report["env"]
    assert env["PROTO"] == "SSL" and env["SSLREMOTEIP"] == "127.0.0.1"
    assert {int(env["SSLCTLFD"]), int(env["SSLREADFD"]), int(env["SSLWRITEFD"])} <= set(report["fds"])
    # 0, 1, 2, the three UCSPI-TLS descriptors and listdir's own: nothing else of the server's.
    assert len(report["fds"]) == 7, report["fds"]


def test_y_starts_tls_without_variables(tls_certs: Certificates, tmp_path: Path) -> None:
    report_path = tmp_path / "report"
    with _start(tls_certs, report_path, "y", "eof") as server:
        sock = _plain_until_go(server.port)
        with TlsClient(server.port, sock=sock) as client:
            client.handshake()
            assert client.read_until(b"secret hello\n") == b"secret hello\n"
            client.close_notify()
            client.read_all()
        report = _report(report_path)
    assert report["blob"] == ""  # the control socket closed without a word
    assert report["ended"] == "tls eof"


def test_eof_on_the_control_socket_is_a_declined_tls(tls_certs: Certificates, tmp_path: Path) -> None:
    report_path = tmp_path / "report"
    with _start(tls_certs, report_path, "-", options=("-v",)) as server:
        sock = serverproc.connect(server.port, timeout=10)
        assert serverproc.read_line(sock) == b"220 ready\n"
        sock.sendall(b"HELO\n")
        assert serverproc.read_to_eof(sock) == b"plain: HELO\n"
        sock.close()
        assert _report(report_path)["ended"] == "declined"
        server.wait_for_log(r"^sslserver: end ")
        assert wait_until(lambda: server.log()[-1].endswith(b"status: 0/40"), 5), server.log()


def test_another_byte_is_an_error_and_the_program_is_stopped(tls_certs: Certificates, tmp_path: Path) -> None:
    report_path = tmp_path / "report"
    with _start(tls_certs, report_path, "x", "eof") as server:
        sock = _plain_until_go(server.port)
        line = server.wait_for_log(r"unknown UCSPI-TLS command")[0]
        assert line == b"sslserver: warning: dropping connection, unknown UCSPI-TLS command x"
        assert _report(report_path)["ended"] in ("SIGTERM", "tls eof")
        sock.close()
        assert wait_until(lambda: not zombies_of(server.pid), 5)


def test_a_failed_handshake_after_y_does_not_leave_the_program_hanging(tls_certs: Certificates, tmp_path: Path) -> None:
    report_path = tmp_path / "report"
    with _start(tls_certs, report_path, "Y", "eof", ("-v", "-T", "2")) as server:
        sock = _plain_until_go(server.port)
        sock.sendall(b"this is no ClientHello\r\n" * 4)
        server.wait_for_log(r"unable to accept SSL: ")
        report = _report(report_path)
        assert report["ended"] in ("SIGTERM", "tls eof")
        server.wait_for_log(r"^sslserver: end ")
        sock.close()


def test_a_client_hello_sent_before_the_program_asks(tls_certs: Certificates, tmp_path: Path) -> None:
    """The hello waits in the socket until `y`: the program reads a line only, and the rest is TLS."""
    report_path = tmp_path / "report"
    with _start(tls_certs, report_path, "y", "eof") as server:
        sock = serverproc.connect(server.port, timeout=10)
        assert serverproc.read_line(sock) == b"220 ready\n"
        client = TlsClient(server.port, sock=sock, context=client_context(verify=False))
        try:
            client.obj.do_handshake()
        except Exception:
            pass
        sock.sendall(b"STARTTLS\n" + client.outgoing.read())  # the line and the hello together
        assert serverproc.read_line(sock) == b"go ahead\n"
        time.sleep(0.1)
        client.handshake()
        assert client.read_until(b"secret hello\n") == b"secret hello\n"
        client.close_notify()
        client.close()
        assert _report(report_path)["ended"] == "tls eof"
