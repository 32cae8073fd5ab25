"""Stopping never cuts a session (ucspi/tls/detach.py): TERM, HUP or INT to the process the supervisor
started, or its KILL, closes the listeners at once and lets the sessions in progress finish."""

from __future__ import annotations

import signal
import time

import pytest

from tls.certs import Certificates
from tls.tlsclient import TlsClient, children_of, serverproc, start_sslserver, wait_until


def _echo(client: TlsClient, line: bytes) -> bytes:
    client.send(line)
    return client.read_until(b"\n")


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL])
def test_the_supervised_process_exits_and_the_session_goes_on(tls_certs: Certificates, number: int) -> None:
    first = start_sslserver(["-v"], ["/bin/cat"], tls_certs.environment())
    second = None
    try:
        supervised = first.process.pid
        (serving,) = children_of(supervised)
        client = TlsClient(first.port, timeout=10)
        client.handshake()
        assert _echo(client, b"before\n") == b"before\n"
        started = time.monotonic()
        first.process.send_signal(number)
        code = first.process.wait(5)
        assert code == (0 if number != signal.SIGKILL else -signal.SIGKILL)
        assert time.monotonic() - started < 3
        # The listener is closed: a new server binds the same port at once and serves.
        second = start_sslserver([], ["echo", "new"], tls_certs.environment(), port=first.port)
        with TlsClient(second.port) as other:
            other.handshake()
            assert other.read_all().data == b"new\n"
        assert _echo(client, b"after\n") == b"after\n"
        client.close_notify()
        assert client.read_all().how == "close_notify"
        client.close()
        # What carried the session exits once it is over.
        assert wait_until(lambda: not serverproc.os.path.exists(f"/proc/{serving}/status") or _zombie(serving), 5)
    finally:
        if second is not None:
            second.stop()
        if first.process.poll() is None:
            first.stop()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line for line in status)
    except OSError:
        return True


def test_a_start_up_error_is_the_supervised_process_exit_code(tls_certs: Certificates) -> None:
    process = serverproc.launch(serverproc.Path(start_sslserver.__globals__["SSLSERVER"]), ["127.0.0.1", "0", "true"])
    assert process.wait(10) == 111
    assert b"unable to load certificate" in process.stderr.read()
    usage = serverproc.launch(serverproc.Path(start_sslserver.__globals__["SSLSERVER"]), ["-a", "0", "0", "true"])
    assert usage.wait(10) == 100


def test_a_kill_of_the_serving_child_ends_the_supervised_process_111(tls_certs: Certificates) -> None:
    """README's promise: such a crash ends its sessions, and the supervisor sees a failure to restart."""
    server = start_sslserver([], ["/bin/cat"], tls_certs.environment())
    try:
        (serving,) = children_of(server.process.pid)
        client = TlsClient(server.port, timeout=10)
        client.handshake()
        assert _echo(client, b"live\n") == b"live\n"
        serverproc.os.kill(serving, signal.SIGKILL)
        assert server.process.wait(5) == 111
        assert client.read_all(timeout=5).how in ("eof", "reset")
        client.close()
    finally:
        if server.process.poll() is None:
            server.stop()
