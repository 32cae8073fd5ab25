"""sslserver's path before the program: rules (a deny costs no TLS work), limits, the banner through
TLS, the rules' variables, and an IPv6 client's environment under -e."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tls.certs import Certificates
from tls.tlsclient import TlsClient, serverproc, start_sslserver

TOP = Path(__file__).resolve().parents[2]
SHOW_ENV = Path(__file__).with_name("show_env.py")


def _rules(tmp_path: Path, text: str) -> Path:
    cdb = tmp_path / "rules.cdb"
    subprocess.run([TOP / "bin" / "tcprules", cdb, tmp_path / "rules.tmp"], input=text.encode(), check=True, timeout=20)
    return cdb


def _environment(data: bytes) -> dict[bytes, bytes]:
    return dict(entry.split(b"=", 1) for entry in data.split(b"\0") if b"=" in entry)


def test_a_denied_client_gets_no_tls_at_all(tls_certs: Certificates, tmp_path: Path) -> None:
    cdb = _rules(tmp_path, "127.0.0.1:deny\n:allow\n")
    with start_sslserver(["-v", "-x", str(cdb)], ["echo", "never"], tls_certs.environment()) as server:
        with serverproc.connect(server.port) as sock:
            with TlsClient(server.port, sock=sock) as client:
                try:
                    client.obj.do_handshake()
                except Exception:
                    pass
                client.flush()
                assert serverproc.read_to_eof(sock, 5) == b""
        server.wait_for_log(r"^sslserver: deny ")
        assert not any(b" tls " in line or b"SSL" in line for line in server.log())


def test_the_rules_variables_reach_the_program(tls_certs: Certificates, tmp_path: Path) -> None:
    cdb = _rules(tmp_path, '127.0.0.1:allow,RELAYCLIENT="",GREETING="hello there"\n')
    program = [sys.executable, SHOW_ENV]
    with start_sslserver(["-x", str(cdb)], program, tls_certs.environment()) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            env = _environment(client.read_all().data)
    assert env[b"RELAYCLIENT"] == b"" and env[b"GREETING"] == b"hello there"
    assert env[b"PROTO"] == b"SSL"


def test_a_limit_closes_without_a_plaintext_message(tls_certs: Certificates) -> None:
    with start_sslserver(["-v", "-C", "1:busy\\n"], ["sleep", "5"], tls_certs.environment()) as server:
        with TlsClient(server.port) as first:
            first.handshake()
            server.wait_for_log(r"^sslserver: ok ")
            with serverproc.connect(server.port) as second:
                second.sendall(b"")
                assert serverproc.read_to_eof(second, 5) == b""  # no `busy` in the clear
            server.wait_for_log(r"^sslserver: deny .* MAXCONNIP:1")
            first.reset()


def test_the_banner_goes_through_tls(tls_certs: Certificates) -> None:
    with start_sslserver(["-B", "220 hello\r\n"], ["echo", "program"], tls_certs.environment()) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            assert client.read_all().data == b"220 hello\r\nprogram\n"


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_an_ipv6_client_gets_the_tcp6_twins_with_e(tls_certs: Certificates) -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1 here")
    program = [sys.executable, SHOW_ENV]
    with start_sslserver(["-e"], program, tls_certs.environment(), host="::1") as server:
        sock = socket.create_connection(("::1", server.port), timeout=10)
        with TlsClient(server.port, sock=sock) as client:
            client.handshake()
            env = _environment(client.read_all().data)
    assert env[b"PROTO"] == b"SSL"
    assert env[b"SSLREMOTEIP"] == env[b"TCPREMOTEIP"] == env[b"TCP6REMOTEIP"] == b"::1"
    assert env[b"TCP6LOCALPORT"] == env[b"SSLLOCALPORT"]


def test_a_proxy_header_comes_before_the_handshake(tls_certs: Certificates) -> None:
    program = [sys.executable, SHOW_ENV]
    options = ["-e", "--proxy-from=127.0.0.1"]
    with start_sslserver(options, program, tls_certs.environment()) as server:
        sock = serverproc.connect(server.port, timeout=10)
        sock.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.9 4711 465\r\n")
        with TlsClient(server.port, sock=sock) as client:
            client.handshake()
            env = _environment(client.read_all().data)
    assert env[b"SSLREMOTEIP"] == env[b"TCPREMOTEIP"] == b"192.0.2.7"
    assert env[b"SSLREMOTEPORT"] == b"4711" and env[b"SSLLOCALIP"] == b"198.51.100.9"
    assert env[b"TCPPROXYIP"] == b"127.0.0.1"
