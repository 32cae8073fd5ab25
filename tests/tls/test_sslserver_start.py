"""sslserver's command line, start-up (certificates, -3) and the program's environment and log lines."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tls.certs import Certificates
from tls.tlsclient import SSLSERVER, TlsClient, client_context, serverproc, start_sslserver

SHOW_ENV = Path(__file__).with_name("show_env.py")


def run_sslserver(arguments: list[str], variables: dict[bytes, bytes] | None = None, **keywords: object):
    return subprocess.run(
        [os.fspath(SSLSERVER), *arguments],
        env={name.decode(): value.decode() for name, value in (variables or {}).items()} | {"PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=20,
        check=False,
        **keywords,
    )


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize("letter", ["-a", "-A", "-k"])
def test_a_letter_it_lacks_is_a_usage_error(letter: str) -> None:
    result = run_sslserver([letter, "127.0.0.1", "0", "true"])
    assert result.returncode == 100
    assert b"sslserver: usage: sslserver [" in result.stderr


def test_a_missing_program_is_a_usage_error(tls_certs: Certificates) -> None:
    result = run_sslserver(["127.0.0.1", "0"], tls_certs.environment())
    assert result.returncode == 100
    assert result.stderr.startswith(b"sslserver: usage: sslserver")


def test_help_and_version() -> None:
    help_result = run_sslserver(["--help"])
    assert help_result.returncode == 0 and b"-T timeout" in help_result.stdout and b"CERTFILE" in help_result.stdout
    version = run_sslserver(["--version"])
    assert version.returncode == 0 and version.stdout.startswith(b"sslserver (ucspi) ")


def test_help_gives_todays_exit_codes() -> None:
    """The started process exits 0 once its serving child has closed the listeners (README, Stopping)."""
    text = run_sslserver(["--help"]).stdout
    codes = re.sub(rb"\s+", b" ", text.split(b"Exit codes:\n", 1)[1]).strip()
    assert codes == (
        b"0 at SIGTERM, SIGHUP, SIGINT or SIGALRM, once the listeners are closed; the sessions go on "
        b"100 usage error 111 temporary or system failure, a certificate or key not loaded, the serving child lost"
    )


# ---------------------------------------------------------------- certificates


def test_no_certfile(tls_certs: Certificates) -> None:
    result = run_sslserver(["127.0.0.1", "0", "true"])
    assert result.returncode == 111
    assert b"sslserver: fatal: unable to load certificate" in result.stderr


def test_unreadable_certfile(tls_certs: Certificates) -> None:
    result = run_sslserver(["127.0.0.1", "0", "true"], {b"CERTFILE": b"/nonexistent/cert.pem"})
    assert result.returncode == 111
    assert b"sslserver: fatal: unable to load certificate" in result.stderr


def test_certfile_without_a_certificate(tls_certs: Certificates) -> None:
    variables = {b"CERTFILE": os.fsencode(tls_certs.ec_key), b"KEYFILE": os.fsencode(tls_certs.ec_key)}
    result = run_sslserver(["127.0.0.1", "0", "true"], variables)
    assert result.returncode == 111
    assert b"unable to load certificate" in result.stderr


def test_missing_key(tls_certs: Certificates) -> None:
    variables = {b"CERTFILE": os.fsencode(tls_certs.ec_cert), b"KEYFILE": b"/nonexistent/key.pem"}
    result = run_sslserver(["127.0.0.1", "0", "true"], variables)
    assert result.returncode == 111
    assert b"sslserver: fatal: unable to load key" in result.stderr


def test_key_in_certfile_when_keyfile_is_empty(tls_certs: Certificates) -> None:
    variables = {b"CERTFILE": os.fsencode(tls_certs.ec_combined), b"KEYFILE": b""}
    with start_sslserver([], ["echo", "hi"], variables) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            assert client.read_all().data == b"hi\n"


def test_key_does_not_match(tls_certs: Certificates) -> None:
    variables = {b"CERTFILE": os.fsencode(tls_certs.ec_cert), b"KEYFILE": os.fsencode(tls_certs.wrong_key)}
    result = run_sslserver(["127.0.0.1", "0", "true"], variables)
    assert result.returncode == 111
    assert b"sslserver: fatal: key does not match certificate" in result.stderr


def test_an_encrypted_key_without_3_is_not_loaded(tls_certs: Certificates) -> None:
    variables = {b"CERTFILE": os.fsencode(tls_certs.ec_cert), b"KEYFILE": os.fsencode(tls_certs.encrypted_key)}
    result = run_sslserver(["127.0.0.1", "0", "true"], variables, stdin=subprocess.DEVNULL)
    assert result.returncode == 111
    assert b"unable to load key" in result.stderr


def test_the_password_on_fd_3(tls_certs: Certificates, tmp_path: Path) -> None:
    variables = {b"CERTFILE": os.fsencode(tls_certs.ec_cert), b"KEYFILE": os.fsencode(tls_certs.encrypted_key)}
    password_file = tmp_path / "password"
    password_file.write_bytes(tls_certs.password + b"\0")
    # The shell opens the file on fd 3 of the server only (never in this process: pytest's own fds).
    wrapper = ["sh", "-c", 'f=$1; shift; exec "$@" 3<"$f"', "sh", os.fspath(password_file)]
    with serverproc.start_server(
        SSLSERVER, ["-3"], ["sh", "-c", "echo opened; ls /proc/self/fd"],
        environment=serverproc.plain_environment(variables), wrapper=wrapper,
    ) as server:  # fmt: skip
        assert not os.path.exists(f"/proc/{server.pid}/fd/3") or "password" not in os.readlink(
            f"/proc/{server.pid}/fd/3"
        )
        with TlsClient(server.port) as client:
            client.handshake()
            data = client.read_all().data
    assert data.startswith(b"opened\n")
    assert sorted(data.split()[1:]) == [b"0", b"1", b"2", b"3"]  # 3: ls's own directory descriptor


def test_3_with_inherited_listeners_is_fatal(tls_certs: Certificates) -> None:
    script = (
        "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1';"
        " os.execv(sys.argv[1], sys.argv[1:])"
    )
    result = subprocess.run(
        [serverproc.sys.executable, "-c", script, os.fspath(SSLSERVER), "-3", "127.0.0.1", "0", "true"],
        env={"PATH": "/usr/bin:/bin", "CERTFILE": os.fspath(tls_certs.ec_cert), "KEYFILE": os.fspath(tls_certs.ec_key)},
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 111
    assert b"-3 with inherited listeners" in result.stderr


# ---------------------------------------------------------------- environment


def _environment_of(server_options: list[str], tls_certs: Certificates, **connect: object) -> dict[bytes, bytes]:
    with start_sslserver(
        ["-HR", *server_options], [serverproc.sys.executable, SHOW_ENV], tls_certs.environment()
    ) as server:
        with TlsClient(server.port, **connect) as client:  # type: ignore[arg-type]
            client.handshake()
            ending = client.read_all()
    entries = [entry for entry in ending.data.split(b"\0") if entry]
    return dict(entry.split(b"=", 1) for entry in entries if b"=" in entry)


def test_the_default_environment(tls_certs: Certificates) -> None:
    env = _environment_of([], tls_certs)
    assert env[b"PROTO"] == b"SSL"
    assert env[b"SSLLOCALIP"] == b"127.0.0.1" and env[b"SSLREMOTEIP"] == b"127.0.0.1"
    assert env[b"SSLLOCALPORT"].isdigit() and env[b"SSLREMOTEPORT"].isdigit()
    assert b"SSLREMOTEHOST" not in env and b"SSLREMOTEINFO" not in env  # -H -R: unknown, so unset
    assert not any(name.startswith(b"TCP") for name in env)  # -E is the default
    assert not any(name.startswith(b"SSL_") and name not in (b"SSL_CERT_FILE", b"SSL_CERT_DIR") for name in env)
    assert not any(name.endswith(b"FD") and name.startswith(b"SSL") for name in env)  # no SSL*FD without -n


def test_e_adds_the_tcp_variables(tls_certs: Certificates) -> None:
    env = _environment_of(["-e"], tls_certs)
    assert env[b"PROTO"] == b"SSL"
    assert env[b"TCPREMOTEIP"] == env[b"SSLREMOTEIP"] == b"127.0.0.1"
    assert env[b"TCPLOCALPORT"] == env[b"SSLLOCALPORT"]


def test_s_adds_the_mod_ssl_variables(tls_certs: Certificates) -> None:
    env = _environment_of(["-s"], tls_certs)
    assert env[b"SSL_PROTOCOL"] == b"TLSv1.3"
    assert env[b"SSL_CIPHER"].startswith(b"TLS_")
    assert int(env[b"SSL_CIPHER_USEKEYSIZE"]) >= 128 and env[b"SSL_CIPHER_EXPORT"] == b"false"
    assert env[b"SSL_SERVER_S_DN"] == b"/O=ucspi tests/CN=localhost"
    assert env[b"SSL_SERVER_S_DN_CN"] == b"localhost"
    assert env[b"SSL_SERVER_I_DN_CN"] == b"ucspi test CA"
    assert env[b"SSL_SERVER_CERT"].startswith(b"-----BEGIN CERTIFICATE-----")
    assert env[b"SSL_VERSION_INTERFACE"] == b"ucspi-ssl"
    assert b"SSL_CLIENT_S_DN" not in env


def test_s_with_a_client_certificate(tls_certs: Certificates) -> None:
    variables = tls_certs.environment(CAFILE=tls_certs.ca)
    context = client_context(verify=False, cert=tls_certs.client_cert, key=tls_certs.client_key)
    with start_sslserver(["-HR", "-s", "-m"], [serverproc.sys.executable, SHOW_ENV], variables) as server:
        with TlsClient(server.port, context=context) as client:
            client.handshake()
            ending = client.read_all()
    env = dict(entry.split(b"=", 1) for entry in ending.data.split(b"\0") if b"=" in entry)
    assert env[b"SSL_CLIENT_S_DN"] == b"/O=ucspi tests/CN=localhost/emailAddress=client@example.test"
    assert env[b"SSL_CLIENT_S_DN_CN"] == b"localhost"
    assert env[b"SSL_CLIENT_S_DN_Email"] == b"client@example.test"
    assert env[b"SSL_CLIENT_CERT"].startswith(b"-----BEGIN CERTIFICATE-----")


def test_sni_picks_the_named_pair(tls_certs: Certificates) -> None:
    variables = tls_certs.environment("ec")
    variables[b"CERTFILE:rsa.test"] = os.fsencode(tls_certs.rsa_cert)
    variables[b"KEYFILE:rsa.test"] = os.fsencode(tls_certs.rsa_key)
    with start_sslserver(["-HR", "-s"], [serverproc.sys.executable, SHOW_ENV], variables) as server:
        for name, algorithm in (("rsa.test", "rsaEncryption"), ("localhost", "id-ecPublicKey")):
            with TlsClient(server.port, server_hostname=name) as client:
                client.handshake()
                der = client.obj.getpeercert(binary_form=True)
                ending = client.read_all()
            env = dict(entry.split(b"=", 1) for entry in ending.data.split(b"\0") if b"=" in entry)
            assert env[b"SSL_TLS_SNI_SERVERNAME"] == name.encode()
            # The two certificates differ in their key type; the DER shows which one was sent.
            key_oid = (
                b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01"
                if algorithm == "rsaEncryption"
                else b"\x2a\x86\x48\xce\x3d\x02\x01"
            )
            assert der is not None and key_oid in der


# ---------------------------------------------------------------- log


def test_v_and_V_log_lines(tls_certs: Certificates) -> None:
    with start_sslserver(["-V", "-HR"], ["echo", "x"], tls_certs.environment()) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            client.read_all()
        lines = server.wait_for_log(r"^sslserver: end ")
        log = server.log()
        serving = server.pid
    tls_line = next(line for line in log if b" tls " in line or line.startswith(b"sslserver: tls "))
    assert tls_line.startswith(b"sslserver: tls %d accept TLSv1.3:TLS_" % serving)
    index = log.index(tls_line)
    assert log[index + 1].startswith(b"sslserver: pid ") and log[index + 2].startswith(b"sslserver: ok ")
    assert lines


def test_a_failed_handshake_is_logged_and_costs_no_process(tls_certs: Certificates) -> None:
    with start_sslserver(["-v", "-HR"], ["echo", "never"], tls_certs.environment()) as server:
        with serverproc.connect(server.port) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert serverproc.read_to_eof(sock, 5).startswith(b"\x15") or True
        line = server.wait_for_log(r"unable to accept SSL")[0]
        assert line.startswith(b"sslserver: warning: dropping connection, unable to accept SSL: ")
        time.sleep(0.1)
        assert not any(line.startswith(b"sslserver: pid ") for line in server.log())


def test_a_bind_failure_in_sslservers_words(tls_certs: Certificates) -> None:
    """The shared start-up code's `tcpserver: fatal:` lines come out under sslserver's name, exit 111."""
    result = run_sslserver(["1.2.3.4", "0", "true"], tls_certs.environment())
    assert result.returncode == 111
    assert result.stderr.startswith(b"sslserver: fatal: unable to bind: ")


def test_certchainfile_takes_precedence(tls_certs: Certificates) -> None:
    variables = {
        b"CERTCHAINFILE": os.fsencode(tls_certs.rsa_cert),
        b"CERTFILE": b"/nonexistent/cert.pem",
        b"KEYFILE": os.fsencode(tls_certs.rsa_key),
    }
    with start_sslserver([], ["echo", "chain"], variables) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            assert client.read_all().data == b"chain\n"
