"""Review of sslserver (issue 14): ALRM's drain, -n's bounded wait for the control byte, the
command's name in its start-up messages, a truncation logged at -v, the end event's dur_ms."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import pytest

from tls.certs import Certificates
from tls.tlsclient import SSLSERVER, TlsClient, fake_smtpd, serverproc, start_sslserver


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


def _drain_line(server: serverproc.ServerProcess) -> bytes:
    (line,) = server.wait_for_log(r"ev=drain ")
    return line


@pytest.mark.parametrize(("options", "deadline"), [([], b"30"), (["--drain=7"], b"7")])
def test_alrm_drains_as_tcpserver_s_30_s_by_default_or_drain_s(
    tls_certs: Certificates, options: list[str], deadline: bytes
) -> None:
    with start_sslserver(["-v", "--log=logfmt", *options], ["/bin/cat"], tls_certs.environment()) as server:
        with TlsClient(server.port, timeout=10) as client:
            client.handshake()
            client.send(b"ping\n")
            assert client.read_until(b"\n") == b"ping\n"
            server.process.send_signal(signal.SIGALRM)  # to the supervised process, as a supervisor's
            assert re.search(rb" deadline_s=" + deadline + rb"(\.0)?( |$)", _drain_line(server)), server.log()
            assert server.process.wait(5) == 0  # the listeners are closed: a new server may bind
            client.send(b"still\n")  # the session goes on meanwhile
            assert client.read_until(b"\n") == b"still\n"


def test_alrm_s_deadline_ends_the_program_with_term(tls_certs: Certificates) -> None:
    with start_sslserver(["-v", "--drain=1"], ["/bin/cat"], tls_certs.environment()) as server:
        with TlsClient(server.port, timeout=10) as client:
            client.handshake()
            started = time.monotonic()
            server.process.send_signal(signal.SIGALRM)
            assert client.read_all(timeout=8).how in ("close_notify", "eof")
            assert time.monotonic() - started < 6
        server.wait_for_log(r": end \d+ status 15$")  # the raw wait status: TERM


def test_term_still_lets_the_sessions_run_to_their_end(tls_certs: Certificates) -> None:
    with start_sslserver(["-v", "--log=logfmt"], ["/bin/cat"], tls_certs.environment()) as server:
        with TlsClient(server.port, timeout=10) as client:
            client.handshake()
            server.process.send_signal(signal.SIGTERM)
            line = _drain_line(server)
            match = re.search(rb" deadline_s=(\d+)", line)
            assert match and int(match.group(1)) > 86400 * 365, line
            assert server.process.wait(5) == 0
            client.send(b"later\n")
            assert client.read_until(b"\n") == b"later\n"


def test_n_the_wait_for_the_control_byte_is_bounded_by_w(tls_certs: Certificates) -> None:
    """UCSPI-TLS (README, sslserver, STARTTLS): a program that never says y, Y or EOF is not waited for past -w."""
    with start_sslserver(["-v", "-n", "-w", "1"], ["sleep", "30"], tls_certs.environment()) as server:
        with serverproc.connect(server.port) as sock:
            started = time.monotonic()
            assert serverproc.read_to_eof(sock, 8) == b""  # the program got TERM: nothing holds the socket
            assert time.monotonic() - started < 6
        server.wait_for_log(r"^sslserver: warning: dropping connection, unable to speak SSL: timeout$")
        server.wait_for_log(r"^sslserver: end \d+ status 15$")
        server.wait_for_log(r"^sslserver: status: 0/40$", count=2)  # the slot is given back


def test_n_a_program_that_asks_in_time_is_not_cut(tls_certs: Certificates, tmp_path: Path) -> None:
    """-w bounds the wait for the byte only: a session that starts TLS within it goes on past it."""
    with start_sslserver(["-n", "-w", "2"], fake_smtpd(tmp_path / "smtpd.log"), tls_certs.environment()) as server:
        with serverproc.connect(server.port, timeout=10) as sock:
            started = time.monotonic()
            assert serverproc.read_line(sock).startswith(b"220 ")
            time.sleep(1.0)
            sock.sendall(b"STARTTLS\r\n")
            assert serverproc.read_line(sock).startswith(b"220 ")
            with TlsClient(server.port, sock=sock, timeout=10) as client:
                client.handshake()
                for _ in range(8):  # past the -w of the wait, with the relay kept busy
                    client.send(b"NOOP\r\n")
                    assert client.read_until(b"\n").startswith(b"250 ")
                    if time.monotonic() - started > 3.5:
                        break
                    time.sleep(0.6)
                assert time.monotonic() - started > 3.5
                client.send(b"QUIT\r\n")
                assert client.read_until(b"\n").startswith(b"221 ")
        assert not any(b"timeout" in line for line in server.log())


@pytest.mark.parametrize(("options", "logged"), [(["-v"], True), ([], False)])
def test_a_truncation_is_logged_at_v_and_changes_nothing_else(
    tls_certs: Certificates, options: list[str], logged: bool
) -> None:
    """Closing (README, sslserver): a FIN without close_notify; the program still gets EOF, its reply goes out."""
    with start_sslserver(options, ["/bin/cat"], tls_certs.environment()) as server:
        with TlsClient(server.port, timeout=10) as client:
            client.handshake()
            client.send(b"last words\n")
            client.shutdown_write()
            ending = client.read_all()
        assert ending.data == b"last words\n" and ending.how == "close_notify"
        if logged:
            (line,) = server.wait_for_log(r"^sslserver: tls \d+ truncated$")
            (served,) = server.wait_for_log(r"^sslserver: pid \d+ from ")
            assert line.split()[2] == served.split()[2]  # the program's pid, as in its pid and end lines
            (ended,) = server.wait_for_log(r"^sslserver: end \d+ status 0$")
            assert server.log().index(line) < server.log().index(ended)  # told before the program's EOF
        else:
            time.sleep(0.3)
            assert not any(b"truncated" in line for line in server.log())
        assert not any(b"unable to speak" in line for line in server.log())


def test_a_clean_close_is_no_truncation(tls_certs: Certificates) -> None:
    with start_sslserver(["-v"], ["/bin/cat"], tls_certs.environment()) as server:
        with TlsClient(server.port, timeout=10) as client:
            client.handshake()
            client.send(b"bye\n")
            client.close_notify()
            client.shutdown_write()  # the FIN after the close_notify
            assert client.read_all().data == b"bye\n"
        server.wait_for_log(r"^sslserver: end \d+ status 0$")
        assert not any(b"truncated" in line for line in server.log())


def test_a_truncation_is_an_event_in_the_structured_modes(tls_certs: Certificates) -> None:
    with start_sslserver(["-v", "--log=logfmt"], ["/bin/cat"], tls_certs.environment()) as server:
        with TlsClient(server.port, timeout=10) as client:
            client.handshake()
            client.shutdown_write()
            client.read_all()
        (line,) = server.wait_for_log(r"ev=truncated ")
    assert re.search(rb" pid=\d+ ip=127\.0\.0\.1$", line), line


@pytest.mark.parametrize("clean", [True, False])
def test_a_close_notify_queued_behind_a_full_pipe_is_told_from_a_truncation(
    tls_certs: Certificates, clean: bool
) -> None:
    """The FIN comes while records (and the close_notify, if any) still wait for the program's pipe.

    160 KB: the pipe's 64 KiB, the relay's own 64 KiB, the rest in the incoming BIO; feeding the FIN
    to the BIO at once made the clean case a truncation (3 runs of 3 failed that way)."""
    program = ["sh", "-c", "sleep 1; wc -c"]
    with start_sslserver(["-v"], program, tls_certs.environment()) as server:
        with TlsClient(server.port, timeout=15) as client:
            client.handshake()
            client.send(b"x" * 160_000)  # the pipe, our buffer, and the rest in the BIO with the close_notify
            if clean:
                client.close_notify()
            client.shutdown_write()
            assert client.read_all().data.strip() == b"160000"
        server.wait_for_log(r"^sslserver: end \d+ status 0$")
        assert any(b"truncated" in line for line in server.log()) is not clean
