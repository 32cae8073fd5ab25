"""sslserver with the clients people use: swaks, openssl s_client, Python's smtplib (issue 14, Tests).

The program is tests/tls/fake_smtpd.py, a qmail-smtpd stand-in that offers AUTH PLAIN only under
TLS: in SMTPS when SSL_PROTOCOL is set (so `sslserver -e -s`, as s/qmail needs), and through
`sslserver -n` after STARTTLS, by UCSPI-TLS. Each case runs with the ECDSA P-256 and the
RSA-2048 certificate, and every client verifies the server against the test CA and the name
`localhost` (or 127.0.0.1). Every client run is bounded by a timeout.
"""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_tool

from tls.certs import CLIENT_EMAIL, Certificates
from tls.tlsclient import fake_smtpd, open_descriptors, smtpd_log, start_sslserver, wait_until, zombies_of

SWAKS = needs_tool("swaks", "swaks libnet-ssleay-perl")
OPENSSL = needs_tool("openssl", "openssl")
KINDS = ["ec", "rsa"]
CLIENT_TIMEOUT = 30
AUTH_PLAIN_U_P = "AHUAcA=="  # base64 of "\0u\0p"


def run(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=CLIENT_TIMEOUT, check=False)


def events(log: Path, name: str) -> list[dict[str, object]]:
    return [entry for entry in smtpd_log(log) if entry["event"] == name]


def ended(log: Path, count: int = 1) -> bool:
    """fake_smtpd has logged its end count times (it writes the log after its last reply)."""
    return wait_until(lambda: len(events(log, "end")) >= count, 10)


@pytest.fixture
def smtps(tls_certs: Certificates, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, Path]]:
    """`sslserver -e -s -v 127.0.0.1 0 fake_smtpd` with the certificate of request.param: (port, log)."""
    log = tmp_path / "smtpd.log"
    with start_sslserver(["-e", "-s", "-v"], fake_smtpd(log), tls_certs.environment(request.param)) as server:
        yield server.port, log
        assert_clean(server.pid)


@pytest.fixture
def starttls(tls_certs: Certificates, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, Path]]:
    """`sslserver -n -e -v 127.0.0.1 0 fake_smtpd`, acceptutils' form (no -s): (port, log)."""
    log = tmp_path / "smtpd.log"
    with start_sslserver(["-n", "-e", "-v"], fake_smtpd(log), tls_certs.environment(request.param)) as server:
        yield server.port, log
        assert_clean(server.pid)


def assert_clean(pid: int) -> None:
    """No child of the server left a zombie once its sessions are over."""
    assert wait_until(lambda: not zombies_of(pid), 5), f"zombies of {pid}: {zombies_of(pid)}"
    assert open_descriptors(pid) < 64


def swaks(port: int, *options: str) -> subprocess.CompletedProcess[bytes]:
    return run(
        [
            "swaks", "--server", "127.0.0.1", "--port", str(port), "--from", "a@example.test",
            "--to", "b@example.test", "--timeout", "20", *options,
        ]
    )  # fmt: skip


def transcript(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode(errors="replace")


# ---------------------------------------------------------------- swaks


@SWAKS
@pytest.mark.parametrize("smtps", KINDS, indirect=True)
def test_swaks_smtps_auth_plain(smtps: tuple[int, Path], tls_certs: Certificates) -> None:
    """`swaks --tlsc --auth PLAIN` (SMTPS, certificate verified) exits 0 with a whole transaction."""
    port, log = smtps
    result = swaks(
        port, "--tlsc", "--auth", "PLAIN", "--auth-user", "u", "--auth-password", "p",
        "--tls-verify", "--tls-ca-path", str(tls_certs.ca),
    )  # fmt: skip
    text = transcript(result)
    assert result.returncode == 0, text
    assert "TLS started with cipher TLSv1.3" in text
    assert "235 " in text and "250 ok queued" in text and "221 " in text
    assert ended(log)
    environment = events(log, "start")[0]["environment"]
    assert isinstance(environment, dict)
    assert environment["PROTO"] == "SSL" and environment["SSL_PROTOCOL"] == "TLSv1.3"
    assert environment["TCPREMOTEIP"] == environment["SSLREMOTEIP"] == "127.0.0.1"  # -e: qmail-smtpd's
    assert [entry["ok"] for entry in events(log, "auth")] == [True]


@SWAKS
@pytest.mark.parametrize("starttls", KINDS, indirect=True)
def test_swaks_starttls_auth_plain(starttls: tuple[int, Path], tls_certs: Certificates) -> None:
    """`swaks --tls --auth PLAIN` through -n: STARTTLS by UCSPI-TLS, then AUTH from the second EHLO."""
    port, log = starttls
    result = swaks(
        port, "--tls", "--auth", "PLAIN", "--auth-user", "u", "--auth-password", "p",
        "--tls-verify", "--tls-ca-path", str(tls_certs.ca),
    )  # fmt: skip
    text = transcript(result)
    assert result.returncode == 0, text
    assert "250 STARTTLS" in text and "TLS started with cipher TLSv1.3" in text and "235 " in text
    assert ended(log)
    environment = events(log, "start")[0]["environment"]
    assert isinstance(environment, dict)
    assert {"SSLCTLFD", "SSLREADFD", "SSLWRITEFD"} <= set(environment)
    assert "SSL_PROTOCOL" not in environment  # TLS had not started when the program did
    blob = events(log, "blob")
    assert len(blob) == 1, smtpd_log(log)
    variables = blob[0]["variables"]
    assert isinstance(variables, dict) and variables["SSL_PROTOCOL"] == "TLSv1.3"
    assert str(blob[0]["raw"]).endswith("\0\0")
    assert [entry["ok"] for entry in events(log, "auth")] == [True]


@SWAKS
@pytest.mark.parametrize("starttls", ["ec"], indirect=True)
def test_swaks_auth_without_tls_exits_28(starttls: tuple[int, Path]) -> None:
    """AUTH is offered only under TLS: `swaks --auth` on the plain session exits 28."""
    port, log = starttls
    result = swaks(port, "--auth", "PLAIN", "--auth-user", "u", "--auth-password", "p")
    text = transcript(result)
    assert result.returncode == 28, text
    assert "did not advertise authentication" in text
    assert ended(log)
    assert events(log, "auth") == [] and events(log, "starttls") == []


@SWAKS
@pytest.mark.parametrize("smtps", ["ec"], indirect=True)
def test_swaks_refuses_an_untrusted_server(smtps: tuple[int, Path], tls_certs: Certificates) -> None:
    """The clients' verification is real: against another CA swaks fails the handshake (29)."""
    port, log = smtps
    result = swaks(port, "--tlsc", "--tls-verify", "--tls-ca-path", str(tls_certs.untrusted_ca), "--quit-after", "EHLO")
    assert result.returncode == 29, transcript(result)
    assert events(log, "start") == []  # the program starts only after a handshake that succeeded


# ---------------------------------------------------------------- openssl s_client


def s_client(port: int, certs: Certificates, *options: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """s_client -quiet (which implies -ign_eof: it reads on after its stdin ends, to the server's close)."""
    return run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-CAfile", str(certs.ca),
            "-verify_return_error", "-verify_hostname", "localhost", "-servername", "localhost", *options,
        ],
        stdin,
    )  # fmt: skip


@OPENSSL
@pytest.mark.parametrize("smtps", KINDS, indirect=True)
def test_s_client_smtps(smtps: tuple[int, Path], tls_certs: Certificates) -> None:
    port, _ = smtps
    stdin = f"EHLO client.example\r\nAUTH PLAIN {AUTH_PLAIN_U_P}\r\nQUIT\r\n".encode()
    result = s_client(port, tls_certs, stdin=stdin)
    assert result.returncode == 0, transcript(result)
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("220 ") and "250 AUTH PLAIN" in lines
    assert lines[-2:] == ["235 ok, go ahead (#2.0.0)", "221 fake.example bye"]


@OPENSSL
@pytest.mark.parametrize("starttls", KINDS, indirect=True)
def test_s_client_starttls(starttls: tuple[int, Path], tls_certs: Certificates) -> None:
    """-starttls smtp: s_client sends EHLO and STARTTLS in plaintext; EHLO again is ours to send."""
    port, log = starttls
    stdin = f"EHLO client.example\r\nAUTH PLAIN {AUTH_PLAIN_U_P}\r\nQUIT\r\n".encode()
    result = s_client(port, tls_certs, "-starttls", "smtp", stdin=stdin)
    assert result.returncode == 0, transcript(result)
    lines = result.stdout.decode().splitlines()
    assert "250 AUTH PLAIN" in lines
    assert lines[-2:] == ["235 ok, go ahead (#2.0.0)", "221 fake.example bye"]
    assert ended(log)
    assert [entry["ok"] for entry in events(log, "auth")] == [True]


# ---------------------------------------------------------------- smtplib


def verifying_context(certs: Certificates) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


@pytest.mark.parametrize("smtps", KINDS, indirect=True)
def test_smtplib_smtp_ssl(smtps: tuple[int, Path], tls_certs: Certificates) -> None:
    port, log = smtps
    with smtplib.SMTP_SSL("localhost", port, context=verifying_context(tls_certs), timeout=20) as client:
        client.ehlo("client.example")
        assert "PLAIN" in client.esmtp_features["auth"]
        assert client.login("u", "p")[0] == 235
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: x\r\n\r\nbody\r\n")
        assert client.quit()[0] == 221
    assert ended(log)
    assert [entry["authenticated"] for entry in events(log, "message")] == [True]


@pytest.mark.parametrize("starttls", KINDS, indirect=True)
def test_smtplib_starttls(starttls: tuple[int, Path], tls_certs: Certificates) -> None:
    port, log = starttls
    with smtplib.SMTP("localhost", port, timeout=20) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        assert client.starttls(context=verifying_context(tls_certs))[0] == 220
        client.ehlo("client.example")
        assert not client.has_extn("starttls") and "PLAIN" in client.esmtp_features["auth"]
        assert client.login("u", "p")[0] == 235
        assert client.quit()[0] == 221
    assert ended(log)
    assert events(log, "discarded")[0]["count"] == 0


# ---------------------------------------------------------------- client certificates (-m, -z, -Z)


@OPENSSL
@pytest.mark.parametrize("option", ["-m", "-i", "-z"])
def test_client_certificate_accepted(tls_certs: Certificates, tmp_path: Path, option: str) -> None:
    """A client certificate signed by CAFILE's CA (CN=localhost, SAN 127.0.0.1): the session goes on
    and the program sees the SSL_CLIENT_* variables s/qmail reads."""
    log = tmp_path / "smtpd.log"
    variables = tls_certs.environment("ec", CAFILE=tls_certs.ca)
    with start_sslserver([option, "-s", "-e"], fake_smtpd(log), variables) as server:
        result = s_client(
            server.port, tls_certs, "-cert", str(tls_certs.client_cert), "-key", str(tls_certs.client_key),
            stdin=b"QUIT\r\n",
        )  # fmt: skip
        assert result.returncode == 0, transcript(result) + repr(server.log())
        assert result.stdout.decode().splitlines()[-1] == "221 fake.example bye"
        assert ended(log)
    environment = events(log, "start")[0]["environment"]
    assert isinstance(environment, dict)
    assert environment["SSL_CLIENT_S_DN_CN"] == "localhost"
    assert environment["SSL_CLIENT_S_DN_Email"] == CLIENT_EMAIL
    assert "CN=localhost" in environment["SSL_CLIENT_S_DN"]
    assert environment["SSL_CLIENT_CERT"].startswith("-----BEGIN CERTIFICATE-----")


@OPENSSL
@pytest.mark.parametrize(
    "option, which",
    [("-m", "none"), ("-m", "untrusted"), ("-z", "none"), ("-z", "untrusted"), ("-z", "other name")],
)
def test_client_certificate_refused(tls_certs: Certificates, tmp_path: Path, option: str, which: str) -> None:
    """-m and -z refuse a client without a certificate or with one CAFILE does not vouch for; -z also
    one for another name. The program never starts, and the server says why."""
    log = tmp_path / "smtpd.log"
    pairs = {
        "none": [],
        "untrusted": ["-cert", str(tls_certs.untrusted_client_cert), "-key", str(tls_certs.untrusted_client_key)],
        "other name": ["-cert", str(tls_certs.other_client_cert), "-key", str(tls_certs.other_client_key)],
    }
    variables = tls_certs.environment("ec", CAFILE=tls_certs.ca)
    with start_sslserver([option, "-s", "-e"], fake_smtpd(log), variables) as server:
        result = s_client(server.port, tls_certs, *pairs[which], stdin=b"QUIT\r\n")
        assert b"221 " not in result.stdout, transcript(result)
        server.wait_for_log(rb"^sslserver: .*(certificate|unable to accept SSL)", timeout=10)
        assert_clean(server.pid)
    assert events(log, "start") == []


@OPENSSL
def test_no_client_certificate_asked_by_default(tls_certs: Certificates, tmp_path: Path) -> None:
    """-Z (the default): a client with no certificate is served, and no SSL_CLIENT_* is set."""
    log = tmp_path / "smtpd.log"
    with start_sslserver(["-s", "-e"], fake_smtpd(log), tls_certs.environment("ec", CAFILE=tls_certs.ca)) as server:
        result = s_client(server.port, tls_certs, stdin=b"QUIT\r\n")
        assert result.returncode == 0, transcript(result)
        assert ended(log)
    environment = events(log, "start")[0]["environment"]
    assert isinstance(environment, dict)
    assert not [name for name in environment if name.startswith("SSL_CLIENT_")]


# ---------------------------------------------------------------- IPv6


def test_smtplib_over_ipv6(tls_certs: Certificates, tmp_path: Path) -> None:
    """On ::1, verified against the certificate's IP:::1: the variables name the IPv6 client."""
    log = tmp_path / "smtpd.log"
    with start_sslserver(["-e", "-s"], fake_smtpd(log), tls_certs.environment("ec"), host="::1") as server:
        with smtplib.SMTP_SSL("::1", server.port, context=verifying_context(tls_certs), timeout=20) as client:
            client.ehlo("client.example")
            assert client.login("u", "p")[0] == 235
            assert client.quit()[0] == 221
        assert ended(log)
    environment = events(log, "start")[0]["environment"]
    assert isinstance(environment, dict)
    assert environment["SSLREMOTEIP"] == environment["TCPREMOTEIP"] == "::1"
    assert environment["SSLLOCALIP"] == "::1"
