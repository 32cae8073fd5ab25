"""Signals (issue 13 item 3, README Signals): ALRM drains, TERM stays 0.88's unless --drain, a
second signal hardens the drain, HUP/INT/QUIT keep their default actions. Real servers, real
programs (shell scripts that trap TERM), clients over loopback; every wait bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_tool
from serverproc import (
    ORIGINAL_SERVER,
    OUR_SERVER,
    Implementation,
    ServerProcess,
    connect,
    plain_environment,
    read_line,
    read_to_eof,
    start_server,
)

needs_original = needs_tool("/usr/bin/tcpserver", "ucspi-tcp")
# Says it started, then waits for a line from the client and answers it.
SESSION = ["/bin/sh", "-c", "echo started; read line; echo finished $line"]
# Says it started, and goes on until TERM (exit 3) or, with IGNORE=1, until KILL.
TRAPPING = [
    "/bin/sh",
    "-c",
    "trap 'echo got-term; [ \"$IGNORE\" = 1 ] || exit 3' TERM; echo started; i=0;"
    " while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; echo timed-out",
]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[socket.socket, bytes]]:
    """An AF_UNIX datagram receiver for NOTIFY_SOCKET, and its address."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    receiver.bind(os.fspath(path))
    receiver.settimeout(5)
    with receiver:
        yield receiver, os.fsencode(path)


def _until(receiver: socket.socket, wanted: bytes) -> None:
    """Datagrams until one is wanted (READY and STATUS come first); bounded by the socket's timeout."""
    for _ in range(50):
        if receiver.recv(4096) == wanted:
            return
    raise AssertionError(f"no {wanted!r}")


def _server(
    options: list[str],
    program: list[str],
    notify_address: bytes | None = None,
    variables: dict | None = None,
    cwd: Path | None = None,
) -> ServerProcess:
    entries = dict(variables or {})
    if notify_address is not None:
        entries[b"NOTIFY_SOCKET"] = notify_address
    return start_server(OUR_SERVER.command, ["-HR", *options], program, environment=plain_environment(entries), cwd=cwd)


def _refused(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _end_lines(server: ServerProcess) -> list[bytes]:
    return [line for line in server.log() if line.startswith(b"tcpserver: end ")]


# ---------------------------------------------------------------- ALRM drains


def test_alarm_refuses_new_clients_at_once_and_lets_sessions_finish(notify: tuple[socket.socket, bytes]) -> None:
    receiver, address = notify
    with _server(["-v"], SESSION, address) as server:
        clients = [connect(server.port) for _ in range(3)]
        for client in clients:
            assert read_line(client) == b"started\n"
        server.signal(signal.SIGALRM)
        _until(receiver, b"STOPPING=1")  # sent once the listener is closed
        assert _refused(server.port)
        time.sleep(0.3)
        assert server.alive()  # waiting for its programs
        for number, client in enumerate(clients):
            client.sendall(b"%d\n" % number)
            assert read_to_eof(client) == b"finished %d\n" % number
            client.close()
        # Gone as soon as the last program has ended, every one with its end line.
        assert server.wait(5) == 0
        assert len(_end_lines(server)) == 3
        assert all(line.endswith(b" status 0") for line in _end_lines(server))


def test_alarm_with_nothing_running_exits_at_once(notify: tuple[socket.socket, bytes]) -> None:
    receiver, address = notify
    with _server([], SESSION, address) as server:
        client = connect(server.port)  # one served and over: the loop is running
        assert read_line(client) == b"started\n"
        client.sendall(b"x\n")
        assert read_to_eof(client) == b"finished x\n"
        client.close()
        time.sleep(0.2)  # its end reaped
        sent = time.monotonic()
        server.signal(signal.SIGALRM)
        assert server.wait(5) == 0
        assert time.monotonic() - sent < 1.0
        _until(receiver, b"STOPPING=1")


def test_a_client_in_its_lookups_still_gets_its_program(tmp_path: Path) -> None:
    """Accepted before the ALRM, still reading its PROXY header at it: it finishes its path."""
    server = start_server(OUR_SERVER.command, ["-v", "-HR", "--proxy-from=127.0.0.0/8"], SESSION)
    with server:
        warm = connect(server.port)
        warm.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 25\r\n")
        assert read_line(warm) == b"started\n"  # the loop runs
        client = connect(server.port)
        client.sendall(b"PROXY TCP4 192.0.2.7 ")  # half a header: the path waits
        time.sleep(0.3)
        server.signal(signal.SIGALRM)
        time.sleep(0.3)
        assert _refused(server.port)
        client.sendall(b"127.0.0.1 1001 25\r\n")
        assert read_line(client) == b"started\n"
        for peer in (warm, client):
            peer.sendall(b"y\n")
            assert read_to_eof(peer) == b"finished y\n"
            peer.close()
        assert server.wait(5) == 0
        assert any(b" from 192.0.2.7" in line for line in server.log())


def test_after_the_deadline_term_then_kill() -> None:
    """--drain=1: TERM (and CONT) at 1 s to every program, KILL 2 s later to those left; exit 0."""
    with _server(["-v", "--drain=1"], TRAPPING, variables=None) as server:
        trapping = connect(server.port)
        assert read_line(trapping) == b"started\n"
        with _server(["-v", "--drain=1"], TRAPPING, variables={b"IGNORE": b"1"}) as stubborn_server:
            stubborn = connect(stubborn_server.port)
            assert read_line(stubborn) == b"started\n"
            sent = time.monotonic()
            server.signal(signal.SIGALRM)
            stubborn_server.signal(signal.SIGALRM)
            # The one that exits on TERM: at the deadline.
            assert read_line(trapping, timeout=5) == b"got-term\n"
            termed = time.monotonic() - sent
            assert server.wait(5) == 0
            assert 0.9 <= termed < 2.5
            assert _end_lines(server)[-1].endswith(b" status 768")  # exit 3
            # The one that ignores TERM: told at 1 s, KILLed at 3 s.
            assert read_line(stubborn, timeout=5) == b"got-term\n"
            assert stubborn_server.wait(6) == 0
            killed = time.monotonic() - sent
            assert 2.8 <= killed < 5.0
            assert read_to_eof(stubborn) == b""  # no timed-out: it never finished
            assert _end_lines(stubborn_server)[-1].endswith(b" status 9")
            stubborn.close()
        trapping.close()


def test_a_second_alarm_hardens_the_drain() -> None:
    with _server(["-v", "--drain=30"], TRAPPING) as server:
        client = connect(server.port)
        assert read_line(client) == b"started\n"
        server.signal(signal.SIGALRM)
        time.sleep(0.5)
        assert _refused(server.port)
        assert server.alive()
        sent = time.monotonic()
        server.signal(signal.SIGALRM)
        assert read_line(client, timeout=5) == b"got-term\n"
        assert server.wait(5) == 0
        assert time.monotonic() - sent < 2.0
        assert _end_lines(server)[-1].endswith(b" status 768")
        client.close()


def test_term_during_a_drain_hardens_it_too() -> None:
    with _server(["-v"], TRAPPING, variables={b"IGNORE": b"1"}) as server:
        client = connect(server.port)
        assert read_line(client) == b"started\n"
        server.signal(signal.SIGALRM)  # 30 s by default
        time.sleep(0.5)
        assert server.alive()
        sent = time.monotonic()
        server.signal(signal.SIGTERM)  # without --drain, but a drain is on: harden
        assert read_line(client, timeout=5) == b"got-term\n"
        assert server.wait(6) == 0
        assert 1.8 <= time.monotonic() - sent < 4.5  # TERM at once, KILL 2 s later
        assert _end_lines(server)[-1].endswith(b" status 9")
        client.close()


# ---------------------------------------------------------------- TERM


def _term_leaves_the_session(implementation: Implementation) -> tuple[int, bytes, list[bytes]]:
    server = start_server(implementation.command, ["-v", "-HR"], SESSION)
    with server:
        client = connect(server.port)
        assert read_line(client) == b"started\n"
        server.signal(signal.SIGTERM)
        code = server.process.wait(2)
        assert _refused(server.port)
        client.sendall(b"after\n")
        rest = read_to_eof(client)
        client.close()
        return code, rest, _end_lines(server)


def test_term_exits_at_once_and_leaves_programs_running() -> None:
    code, rest, ends = _term_leaves_the_session(OUR_SERVER)
    assert (code, rest, ends) == (0, b"finished after\n", [])


@needs_original
def test_term_as_the_original() -> None:
    assert _term_leaves_the_session(ORIGINAL_SERVER) == _term_leaves_the_session(OUR_SERVER)


def test_term_with_drain_drains(notify: tuple[socket.socket, bytes]) -> None:
    receiver, address = notify
    with _server(["-v", "--drain=5"], SESSION, address) as server:
        client = connect(server.port)
        assert read_line(client) == b"started\n"
        server.signal(signal.SIGTERM)
        _until(receiver, b"STOPPING=1")
        assert _refused(server.port)
        time.sleep(0.3)
        assert server.alive()
        client.sendall(b"z\n")
        assert read_to_eof(client) == b"finished z\n"
        client.close()
        assert server.wait(5) == 0
        assert len(_end_lines(server)) == 1


# ---------------------------------------------------------------- default actions


@pytest.mark.parametrize("number", [signal.SIGHUP, signal.SIGINT, signal.SIGQUIT])
def test_hup_int_quit_kill_the_server_and_leave_programs_alone(number: int, tmp_path: Path) -> None:
    # QUIT's default action may dump core (in the server's directory): a scratch one.
    with _server(["-v"], SESSION, cwd=tmp_path) as server:
        client = connect(server.port)
        assert read_line(client) == b"started\n"
        server.signal(number)
        assert server.process.wait(5) == -number
        client.sendall(b"w\n")
        assert read_to_eof(client) == b"finished w\n"
        client.close()
        assert _end_lines(server) == []


def test_alarm_and_usr1_inherited_as_ignored_stay_ignored() -> None:
    """As 0.88, which never catches them: a supervisor that ignores them keeps them ignored."""
    server = start_server(OUR_SERVER.command, ["-HR"], SESSION, ignore_signals=(signal.SIGALRM, signal.SIGUSR1))
    with server:
        client = connect(server.port)
        assert read_line(client) == b"started\n"
        server.signal(signal.SIGALRM)
        server.signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert server.alive()
        assert server.log() == []
        with connect(server.port) as second:  # still listening
            assert read_line(second) == b"started\n"
        client.sendall(b"v\n")
        assert read_to_eof(client) == b"finished v\n"
        client.close()


def test_a_stopped_program_gets_cont_with_its_term() -> None:
    """A program stopped at the deadline: CONT lets the TERM act at once (status 15, not KILL's 9 later)."""
    program = ["/bin/sh", "-c", "echo started; kill -STOP $$; echo resumed"]
    with _server(["-v", "--drain=1"], program) as server:
        client = connect(server.port)
        assert read_line(client) == b"started\n"
        time.sleep(0.2)  # stopped by now
        sent = time.monotonic()
        server.signal(signal.SIGALRM)
        assert server.wait(5) == 0
        assert time.monotonic() - sent < 2.5
        assert _end_lines(server)[-1].endswith(b" status 15")
        assert read_to_eof(client) == b""
        client.close()
