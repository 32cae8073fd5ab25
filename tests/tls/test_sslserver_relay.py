"""sslserver's relay: half-closes both ways, resets, -w and -T, backpressure, the -c slot, no leaks.

Each test starts the real command and talks TLS to it over loopback with tlsclient.TlsClient,
which decides every byte (close_notify or a bare FIN or an RST). Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
import time

import pytest

from tls.certs import Certificates
from tls.tlsclient import (
    TlsClient,
    client_hello,
    open_descriptors,
    records,
    rss_kib,
    serverproc,
    start_sslserver,
    wait_until,
    zombies_of,
)

PYTHON = sys.executable

# A program that answers each line with `echo LINE`, and `221 bye` at EOF on its input.
ECHO_THEN_BYE = (
    "import sys\n"
    "for line in sys.stdin:\n"
    "    sys.stdout.write('echo ' + line); sys.stdout.flush()\n"
    "sys.stdout.write('221 bye\\n'); sys.stdout.flush()\n"
)


def baseline(server: serverproc.ServerProcess) -> int:
    """The server's descriptors once its loop runs: after one client that closes at once (logged)."""
    with serverproc.connect(server.port):
        pass
    server.wait_for_log(r"unable to accept SSL: connection closed")
    return open_descriptors(server.pid)


def settled(server: serverproc.ServerProcess, descriptors: int) -> None:
    """No zombie children and the server's descriptors back to what they were."""
    assert wait_until(lambda: not zombies_of(server.pid), 5), zombies_of(server.pid)
    assert wait_until(lambda: open_descriptors(server.pid) <= descriptors, 5), (
        open_descriptors(server.pid),
        descriptors,
    )


def test_the_peers_close_notify_still_gets_the_programs_last_reply(tls_certs: Certificates) -> None:
    with start_sslserver(["-Q"], [PYTHON, "-c", ECHO_THEN_BYE], tls_certs.environment()) as server:
        before = baseline(server)
        with TlsClient(server.port) as client:
            client.handshake()
            client.send(b"QUIT\n")
            client.close_notify()  # TCP stays open: it keeps reading
            ending = client.read_all()
        assert ending.data == b"echo QUIT\n221 bye\n"
        assert ending.how == "close_notify"
        settled(server, before)


def test_a_bare_fin_is_an_end_too(tls_certs: Certificates) -> None:
    with start_sslserver(["-Q"], [PYTHON, "-c", ECHO_THEN_BYE], tls_certs.environment()) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            client.send(b"QUIT\n")
            client.shutdown_write()
            ending = client.read_all()
        assert ending.data == b"echo QUIT\n221 bye\n"


# The program closes its output first, then reports (in a file) what it still read.
CLOSE_FIRST = (
    "import os, sys\n"
    "os.write(1, b'first\\n'); os.close(1)\n"
    "data = b''\n"
    "while True:\n"
    "    chunk = os.read(0, 65536)\n"
    "    if not chunk: break\n"
    "    data += chunk\n"
    "open(sys.argv[1], 'wb').write(data)\n"
)


def test_the_program_closing_its_output_sends_close_notify_and_keeps_reading(
    tls_certs: Certificates, tmp_path: os.PathLike[str]
) -> None:
    report = os.path.join(tmp_path, "read")
    with start_sslserver(["-Q"], [PYTHON, "-c", CLOSE_FIRST, report], tls_certs.environment()) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            ending = client.read_all()
            assert ending == type(ending)(b"first\n", "close_notify")
            client.send(b"after the server's close_notify\n")
            client.close_notify()
            assert wait_until(lambda: os.path.exists(report), 5)
    assert open(report, "rb").read() == b"after the server's close_notify\n"


def test_a_reset_mid_relay_ends_both_sides(tls_certs: Certificates) -> None:
    program = "import sys, time\nsys.stdin.read()\ntime.sleep(0.2)\n"
    with start_sslserver(["-v"], [PYTHON, "-c", program], tls_certs.environment()) as server:
        before = baseline(server)
        with TlsClient(server.port) as client:
            client.handshake()
            client.send(b"some data\n")
            time.sleep(0.2)
            client.reset()
        server.wait_for_log(r"^sslserver: end ")
        settled(server, before)


def test_idle_first_closes_the_programs_input_then_the_connection(tls_certs: Certificates) -> None:
    # The program answers EOF with a line, then stays silent while holding its output open.
    program = "import sys, time\nsys.stdin.read()\nprint('input closed', flush=True)\ntime.sleep(30)\n"
    with start_sslserver(["-w", "1"], [PYTHON, "-c", program], tls_certs.environment()) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            started = time.monotonic()
            assert client.read_until(b"input closed\n", timeout=5).endswith(b"input closed\n")
            assert 0.8 < time.monotonic() - started < 3
            client.read_all(timeout=5)
            assert time.monotonic() - started < 4
        server.wait_for_log(r"unable to speak SSL: timeout")


def test_T_is_one_deadline_for_a_dribbled_hello(tls_certs: Certificates) -> None:
    with start_sslserver(["-T", "1", "-v"], ["echo", "never"], tls_certs.environment()) as server:
        hello = client_hello()
        with serverproc.connect(server.port, timeout=10) as sock:
            started = time.monotonic()
            try:
                for byte in hello[:200]:
                    sock.send(bytes([byte]))
                    time.sleep(0.05)
            except OSError:
                pass
            serverproc.read_to_eof(sock, 5)
            assert time.monotonic() - started < 3
        line = server.wait_for_log(r"unable to accept SSL")[0]
        assert line.endswith(b"unable to accept SSL: timeout")
        assert not any(b" pid " in entry for entry in server.log())


def test_a_program_that_never_reads_keeps_memory_bounded(tls_certs: Certificates) -> None:
    with start_sslserver(["-Q"], ["sleep", "30"], tls_certs.environment()) as server:
        rss_before = rss_kib(server.pid)
        with TlsClient(server.port) as client:
            client.handshake()
            client.sock.settimeout(0.5)
            block = b"x" * 16384
            sent = 0
            deadline = time.monotonic() + 10
            while sent < 10 * 1024 * 1024 and time.monotonic() < deadline:
                client.obj.write(block)
                try:
                    client.flush()
                except TimeoutError:
                    break  # the server stopped reading: backpressure
                sent += len(block)
            assert sent < 10 * 1024 * 1024, "the server took 10 MB for a program that reads nothing"
            growth = rss_kib(server.pid) - rss_before
            assert growth < 8 * 1024, f"RSS grew {growth} KiB"
            client.reset()


def test_the_slot_is_held_through_the_handshake(tls_certs: Certificates) -> None:
    with start_sslserver(["-c", "1", "-T", "5", "-v"], ["echo", "served"], tls_certs.environment()) as server:
        idle = serverproc.connect(server.port)  # holds the only slot, sending nothing
        try:
            server.wait_for_log(r"status: 1/1")
            with TlsClient(server.port, timeout=10) as client:
                client.sock.sendall(b"")
                idle.close()  # the slot comes back; the waiting client is served
                client.handshake(timeout=8)
                assert client.read_all().data == b"served\n"
        finally:
            idle.close()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.0\r\n\r\n", os.urandom(600), b"\x16\x03\x01\xff\xff" + b"\0" * 100])
def test_garbage_is_refused_with_a_log_line(tls_certs: Certificates, garbage: bytes) -> None:
    with start_sslserver(["-Q"], ["echo", "never"], tls_certs.environment()) as server:
        before = baseline(server)
        with serverproc.connect(server.port) as sock:
            sock.sendall(garbage)
            serverproc.read_to_eof(sock, 5)
        server.wait_for_log(r"unable to accept SSL: ", count=2)
        settled(server, before)


def _unread_by_server(server_port: int, client_port: int) -> int | None:
    """What the server's end of this loopback connection holds unread (its rx_queue in /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for row in table.read().splitlines()[1:]:
            fields = row.split()
            local, remote = fields[1].rpartition(":")[2], fields[2].rpartition(":")[2]
            if int(local, 16) == server_port and int(remote, 16) == client_port:
                return int(fields[4].partition(":")[2], 16)
    return None


def test_records_behind_a_full_buffer_the_pipe_takes_at_once_are_still_read(tls_certs: Certificates) -> None:
    """Four full records make exactly BUFFER bytes of plaintext, which an empty pipe takes in one
    write: the close_notify left behind them in the BIO must still be read, though the socket
    brings nothing more (the client waits for the answer; it sends no FIN).

    A socket read is BUFFER bytes at most, less than four records: the first record but its last
    byte goes alone; the rest comes in one read, the server stopped until all of it is in its socket."""
    with start_sslserver(["-Q"], ["sh", "-c", "echo ready; exec wc -c"], tls_certs.environment()) as server:
        with TlsClient(server.port, timeout=10) as client:
            client.handshake()
            assert client.read_until(b"ready\n", timeout=5) == b"ready\n"  # the relay runs, wc waits on its pipe
            client.flush()
            client.obj.write(b"x" * 65536)
            try:
                client.obj.unwrap()
            except ssl.SSLWantReadError:
                pass  # the close_notify is queued
            wire = client.outgoing.read()
            lengths = [5 + len(body) for _, body in records(wire)]  # 4 full records, then the close_notify
            assert len(lengths) == 5 and len(set(lengths[:4])) == 1 and sum(lengths) == len(wire), lengths
            first_part = lengths[0] - 1
            server_port, client_port = server.port, client.sock.getsockname()[1]

            def unread() -> int | None:
                return _unread_by_server(server_port, client_port)

            client.sock.sendall(wire[:first_part])
            assert wait_until(lambda: unread() == 0, 5), unread()  # read into the BIO: no plaintext yet
            os.kill(server.pid, signal.SIGSTOP)
            try:
                client.sock.sendall(wire[first_part:])
                assert wait_until(lambda: unread() == len(wire) - first_part, 5), unread()
            finally:
                os.kill(server.pid, signal.SIGCONT)
            ending = client.read_all(timeout=5)
        assert ending == type(ending)(b"65536\n", "close_notify")
