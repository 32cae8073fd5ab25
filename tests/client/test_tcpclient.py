"""tcpclient side by side with Debian's 0.88, against our tcpserver and Debian's, on loopback.

Every expectation is the original's outcome on the same scenario (ports masked); with -H -R -l 0
no DNS and no ident traffic happens. Where the original is not installed these tests skip.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clientproc import CLIENTS, OURS, SHOW_PROGRAM, masked_environment, original_available, run_client, shown
from serverproc import ORIGINAL_SERVER, OUR_SERVER, Implementation, plain_environment, start_server

pytestmark = pytest.mark.skipif(not original_available(), reason="Debian's tcpclient is not installed here")

# The server's program: one line to the client, then it waits for the client's EOF.
GREETER = ["sh", "-c", "echo hello; cat >/dev/null"]
SERVERS = {"our-server": OUR_SERVER, "original-server": ORIGINAL_SERVER}
NO_LOOKUPS = ["-H", "-R", "-l", "0"]
# Stale values the client must replace or remove, and ordinary ones around them.
STALE = [b"A=1", b"TCPREMOTEHOST=stale", b"PROTO=x", b"TCPREMOTEINFO=stale", b"Z=2", b"TCPLOCALIP=y"]


def both(result_of) -> tuple:
    return result_of(CLIENTS["ours"]), result_of(CLIENTS["original"])


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator:
    implementation: Implementation = SERVERS[request.param]
    with start_server(implementation.command, ["-H", "-R", "-l", "srv"], GREETER) as running:
        yield running


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((ip, 0))
        return probe.getsockname()[1]


def refused_port() -> int:
    """A port nothing listens on (bound, never listened: nobody else gets it meanwhile)."""
    return free_port()


def test_environment_descriptors_and_exit_code(server) -> None:
    environment = plain_environment() + STALE
    arguments = [*NO_LOOKUPS, "127.0.0.1", str(server.port), *SHOW_PROGRAM, "7", "from client\n"]
    ours, original = both(lambda command: run_client(command, arguments, environment=environment))
    assert (ours.returncode, ours.stderr) == (original.returncode, original.stderr) == (7, b"")
    ours_report, original_report = shown(ours), shown(original)
    assert masked_environment(ours_report, server.port) == masked_environment(original_report, server.port)
    for report in (ours_report, original_report):
        assert report["descriptors"] == [0, 1, 2, 6, 7]
        assert report["same_socket"] and report["blocking"]
        assert report["received"] == "hello\n"
        assert report["peer"] == ["127.0.0.1", server.port]


def test_environment_order_is_tcpclient_s(server) -> None:
    """PROTO, TCPLOCALPORT, TCPLOCALIP, TCPLOCALHOST, TCPREMOTEPORT, TCPREMOTEIP (not tcpserver's)."""
    arguments = [*NO_LOOKUPS, "127.0.0.1", str(server.port), *SHOW_PROGRAM]
    ours, original = both(lambda command: run_client(command, arguments, environment=[]))
    names = [entry.split("=")[0] for entry in shown(ours)["environment"]]
    assert names == [entry.split("=")[0] for entry in shown(original)["environment"]]
    assert names == ["PROTO", "TCPLOCALPORT", "TCPLOCALIP", "TCPLOCALHOST", "TCPREMOTEPORT", "TCPREMOTEIP"]


def test_raw_environment_duplicates_and_entries_without_equals(server) -> None:
    """pathexec's rules on a block os.environ cannot hold: the first of a name is the one replaced."""
    environment = [b"PROTO=first", b"NOEQUALS", b"PATH=" + os.environb[b"PATH"], b"PROTO=second", b"=empty", b"X=1"]
    arguments = [*NO_LOOKUPS, "127.0.0.1", str(server.port), *SHOW_PROGRAM]
    ours, original = both(lambda command: run_client(command, arguments, environment=environment))
    assert ours.returncode == original.returncode == 0
    assert masked_environment(shown(ours), server.port) == masked_environment(shown(original), server.port)


def test_local_name_empty_and_options_bundled(server) -> None:
    arguments = ["-HRDl", "", "-i", "127.0.0.1", "127.000.000.001", str(server.port), *SHOW_PROGRAM]
    ours, original = both(lambda command: run_client(command, arguments))
    assert ours.returncode == original.returncode == 0
    assert masked_environment(shown(ours), server.port) == masked_environment(shown(original), server.port)
    assert "TCPLOCALHOST=" in shown(ours)["environment"]


@pytest.mark.parametrize("host", ["0", "", "127.000.000.001", "[127.000.000.001]", "127.0.0.1"])
@pytest.mark.parametrize("quiet", [False, True])
def test_refused(host: str, quiet: bool) -> None:
    port = refused_port()
    arguments = [*(["-q"] if quiet else []), host, "0" + str(port), "echo", "wrong"]
    ours, original = both(lambda command: run_client(command, arguments))
    assert (ours.returncode, ours.stdout, ours.stderr) == (original.returncode, original.stdout, original.stderr)
    assert ours.returncode == 111
    expected = b"" if quiet else b"tcpclient: unable to connect to 127.0.0.1 port %d: connection refused\n" % port
    assert ours.stderr == expected


def test_each_address_is_tried_and_reported() -> None:
    port = refused_port()
    arguments = ["127.0.0.1.127.0.0.2", str(port), "echo", "wrong"]
    ours, original = both(lambda command: run_client(command, arguments))
    assert (ours.returncode, ours.stderr) == (original.returncode, original.stderr)
    assert ours.stderr.count(b"connection refused") == 2


def test_local_port_in_use(server) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen(1)
        used = holder.getsockname()[1]
        arguments = [*NO_LOOKUPS, "-p", str(used), "127.0.0.1", str(server.port), "echo", "wrong"]
        ours, original = both(lambda command: run_client(command, arguments))
    assert (ours.returncode, ours.stderr) == (original.returncode, original.stderr)
    assert ours.stderr == b"tcpclient: fatal: unable to bind socket: address already used\n"
    assert ours.returncode == 111


def test_local_port_and_ip_bound(server) -> None:
    port = free_port()
    arguments = [*NO_LOOKUPS, "-i", "127.0.0.1", "-p", str(port), "0", str(server.port), *SHOW_PROGRAM]
    ours = run_client(OURS, arguments)
    assert f"TCPLOCALPORT={port}" in shown(ours)["environment"]


@pytest.mark.parametrize(
    "arguments",
    [
        [],
        ["0"],
        ["0", "0"],
        ["-q", "0", "0"],
        ["0", "nonexistentport", "echo", "wrong"],
        ["0", "nonexistentport"],
        ["nonexistent.local.", "016", "echo", "wrong"],
        ["thislabelistoolongbecausednshasalimitof63charactersinasinglelabel.", "016", "echo", "wrong"],
        ["127.1", "16", "echo", "wrong"],
        ["-Z", "0", "16", "echo"],
        ["-p"],
        ["-q", "-i", "bad", "0", "16", "echo"],
        ["-i", "1.2.3", "0", "16", "echo"],
        ["-q", "0", "nonexistentport", "echo"],
    ],
    ids=repr,
)
def test_argument_errors(arguments: list[str]) -> None:
    ours, original = both(lambda command: run_client(command, arguments))
    assert (ours.returncode, ours.stdout, ours.stderr) == (original.returncode, original.stdout, original.stderr)


def test_program_that_cannot_run(server) -> None:
    arguments = [*NO_LOOKUPS, "127.0.0.1", str(server.port), "nonexistent-program-xyz"]
    ours, original = both(lambda command: run_client(command, arguments))
    assert (ours.returncode, ours.stderr) == (original.returncode, original.stderr)
    assert ours.stderr == b"tcpclient: fatal: unable to run nonexistent-program-xyz: file does not exist\n"


def test_verbose_line(server) -> None:
    arguments = ["-v", *NO_LOOKUPS, "0", str(server.port), "true"]
    ours, original = both(lambda command: run_client(command, arguments))
    assert (ours.returncode, ours.stderr) == (original.returncode, original.stderr)
    assert ours.stderr == b"tcpclient: connected to 127.0.0.1 port %d\n" % server.port


def test_descriptors_six_and_seven_replaced_and_nothing_leaks(server) -> None:
    """Inherited 6 and 7 are closed at start; with 3, 4 and 5 taken the socket lands on 6 itself."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
    try:
        fds = [fd for fd in held if fd in (3, 4, 5, 6, 7)]
        arguments = [*NO_LOOKUPS, "127.0.0.1", str(server.port), *SHOW_PROGRAM]
        ours, original = both(lambda command: run_client(command, arguments, pass_fds=fds))
    finally:
        for fd in held:
            os.close(fd)
    assert shown(ours)["descriptors"] == shown(original)["descriptors"]
    assert shown(ours)["same_socket"] and shown(ours)["received"] == "hello\n"


def test_signals_in_the_program(server) -> None:
    """PIPE and XFSZ at their default; what tcpclient inherited as ignored stays ignored."""
    arguments = [*NO_LOOKUPS, "127.0.0.1", str(server.port), "grep", "^Sig[IB]", "/proc/self/status"]
    ignored = [signal.SIGINT, signal.SIGHUP, signal.SIGPIPE]
    ours, original = both(lambda command: run_client(command, arguments, ignore_signals=ignored))
    assert ours.returncode == original.returncode == 0
    assert ours.stdout == original.stdout
    ignored_mask = int(ours.stdout.split(b"SigIgn:")[1].split()[0], 16)
    assert ignored_mask & (1 << (signal.SIGPIPE - 1)) == 0
    assert ignored_mask & (1 << (signal.SIGINT - 1))


def _unanswering_listener(ip: str) -> socket.socket:
    """A listener that never accepts, its backlog full: further SYNs go unanswered."""
    listener = socket.socket()
    listener.bind((ip, 0))
    listener.listen(0)
    return listener


@pytest.fixture
def black_hole() -> Iterator[tuple[str, int]]:
    listener = _unanswering_listener("127.0.0.1")
    port = listener.getsockname()[1]
    fillers = _fill_backlog("127.0.0.1", port)
    try:
        yield "127.0.0.1", port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def _timed(command, arguments):
    started = time.monotonic()
    result = run_client(command, arguments)
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("schedule", "host_count", "expected_seconds"),
    [("1+1", 1, 2), ("1+1", 2, 4), ("1", 2, 2), ("0+1", 1, 1)],
)
def test_connect_timeouts(black_hole, schedule: str, host_count: int, expected_seconds: float) -> None:
    """-T x+y: one address gets x+y at once; several get x each, then y each for those that timed out."""
    ip, port = black_hole
    host = ".".join([ip] * host_count)
    arguments = [*NO_LOOKUPS, "-T", schedule, host, str(port), "echo", "wrong"]
    (ours, ours_seconds), (original, original_seconds) = both(lambda command: _timed(command, arguments))
    assert (ours.returncode, ours.stderr) == (original.returncode, original.stderr)
    assert ours.returncode == 111
    assert ours.stderr.count(b": timed out\n") == host_count
    # Generous bounds: the time is the schedule's, not the machine's.
    assert expected_seconds - 0.1 <= ours_seconds < expected_seconds + 3
    assert expected_seconds - 0.1 <= original_seconds < expected_seconds + 3


def _fill_backlog(ip: str, port: int) -> list[socket.socket]:
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect((ip, port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.2)
    return fillers


def test_connect_timeout_moves_on_to_the_next_address() -> None:
    """A first address that does not answer costs x seconds, then the next one is served."""
    hole_ip, served_ip = "127.0.0.1", "127.0.0.2"
    with start_server(OUR_SERVER.command, NO_LOOKUPS, GREETER, host=served_ip) as server:
        # The same port on both addresses: the black hole takes the server's port on 127.0.0.1.
        hole = socket.socket()
        try:
            hole.bind((hole_ip, server.port))
        except OSError as error:
            hole.close()
            pytest.skip(f"port {server.port} is not free on {hole_ip}: {errno.errorcode.get(error.errno)}")
        hole.listen(0)
        fillers = _fill_backlog(hole_ip, server.port)
        try:
            arguments = [*NO_LOOKUPS, "-T", "1+5", f"{hole_ip}.{served_ip}", str(server.port), *SHOW_PROGRAM]
            (ours, ours_seconds), (original, original_seconds) = both(lambda command: _timed(command, arguments))
        finally:
            for filler in fillers:
                filler.close()
            hole.close()
    assert (ours.returncode, ours.stderr) == (original.returncode, original.stderr) == (0, b"")
    assert shown(ours)["peer"] == shown(original)["peer"] == [served_ip, server.port]
    assert shown(ours)["received"] == "hello\n"
    assert 0.9 <= ours_seconds < 4 and 0.9 <= original_seconds < 4
