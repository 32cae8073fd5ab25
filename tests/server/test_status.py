"""The live status view (issue 13 item 5, README Status view): SIGUSR1's `stat` lines and the
--status-socket's JSON lines, with clients held open from several loopback addresses, the
denied and refused counts, the socket's mode, owner and lifetime. Real servers, real clients.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import needs_tool
from serverproc import (
    OUR_SERVER,
    ServerProcess,
    connect,
    launch,
    read_line,
    read_to_eof,
    rules_cdb,
    start_server,
)
from serverstate import children

from ucspi.server.log import StatClient, StatSummary
from ucspi.server.logformats import JsonFormat
from ucspi.server.status import json_lines

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing ids needs root")
NOBODY = 65534
HOLD = ["/bin/sh", "-c", "echo started; read line"]
_SUMMARY = re.compile(rb"^tcpserver: stat conns (\d+)/(\d+) accepted (\d+) denied (\d+) refused (\d+) uptime (\d+)$")
_CLIENT = re.compile(rb"^tcpserver: stat ip (\S+) conns (\d+) oldest (\d+) net (\S+) netconns (\d+)$")


def _held(port: int, sources: list[str], stack: ExitStack) -> list[socket.socket]:
    """One client per source address, each with its program running."""
    clients = []
    for source in sources:
        if ":" in source:
            client = stack.enter_context(socket.create_connection(("::1", port), timeout=5))
        else:
            client = stack.enter_context(connect(port, source=source))
        assert read_line(client) == b"started\n"
        clients.append(client)
    return clients


def _stat_lines(server: ServerProcess, clients: int) -> tuple[tuple[int, ...], list[tuple]]:
    """After one USR1: the summary's numbers and each client line's fields."""
    before = len([line for line in server.log() if _SUMMARY.match(line)])
    server.signal(signal.SIGUSR1)
    server.wait_for_log(_SUMMARY.pattern, count=before + 1)
    if clients:
        server.wait_for_log(_CLIENT.pattern, count=clients)
    log = server.log()
    summary = [match for line in log if (match := _SUMMARY.match(line))][-1]
    lines = [match.groups() for line in log if (match := _CLIENT.match(line))]
    return tuple(int(number) for number in summary.groups()), [
        (ip, int(conns), int(oldest), net, int(netconns)) for ip, conns, oldest, net, netconns in lines[-clients:]
    ] if clients else []


def _connect_unix(client: socket.socket, path: Path) -> None:
    """A UNIX socket's full backlog is EAGAIN, not a wait: try again until the server accepts (bounded)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            client.connect(os.fspath(path))
            return
        except BlockingIOError:
            assert time.monotonic() < deadline, "the status socket accepted nobody for 5 s"
            time.sleep(0.01)


def _status(path: Path, timeout: float = 5.0) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        _connect_unix(client, path)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("ascii").splitlines()]


@pytest.fixture
def status_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "status.sock"


def test_the_view_lists_the_clients_held_open(status_path: Path) -> None:
    sources = ["127.0.0.2"] * 3 + ["127.0.0.3"] * 2 + ["127.0.1.4", "::1"]
    server = start_server(OUR_SERVER.command, ["-HR", "-c9", f"--status-socket={status_path}"], HOLD, host="::")
    with server, ExitStack() as stack:
        _held(server.port, sources, stack)
        time.sleep(1.1)  # the oldest are a second old
        summary, clients = _stat_lines(server, 4)
        connections, limit, accepted, denied, refused, uptime = summary
        assert (connections, limit, accepted, denied, refused) == (7, 9, 7, 0, 0)
        assert uptime >= 1
        assert [(ip, conns, net, netconns) for ip, conns, _, net, netconns in clients] == [
            (b"127.0.0.2", 3, b"127.0.0.0/24", 5),
            (b"127.0.0.3", 2, b"127.0.0.0/24", 5),
            (b"127.0.1.4", 1, b"127.0.1.0/24", 1),
            (b"::1", 1, b"::/64", 1),
        ]
        assert clients[0][2] >= 1
        view = _status(status_path)
        assert view[0] == {
            "prog": "tcpserver",
            "ev": "stat",
            "conns": 7,
            "max": 9,
            "accepted": 7,
            "denied": 0,
            "refused": 0,
            "uptime_s": view[0]["uptime_s"],
        }
        assert [(line["ip"], line["conns"], line["net"], line["netconns"]) for line in view[1:]] == [
            ("127.0.0.2", 3, "127.0.0.0/24", 5),
            ("127.0.0.3", 2, "127.0.0.0/24", 5),
            ("127.0.1.4", 1, "127.0.1.0/24", 1),
            ("::1", 1, "::/64", 1),
        ]
        assert all(line["ev"] == "stat" and line["oldest_s"] >= 1 for line in view[1:])


def _timeless(line: bytes) -> bytes:
    """A JSON line with its ages zeroed: the log's and the socket's views are made a moment apart."""
    return re.sub(rb'"(uptime_s|oldest_s)":\d+', rb'"\1":0', line)


def test_the_socket_serves_the_lines_the_json_log_writes(status_path: Path) -> None:
    """The same bytes as --log=json's stat lines: `prog` first, then `ev`, the same keys."""
    server = start_server(
        OUR_SERVER.command, ["-HR", "--log=json", f"--status-socket={status_path}"], HOLD, host="::"
    )
    with server, ExitStack() as stack:
        _held(server.port, ["127.0.0.2", "127.0.0.2", "::1"], stack)
        server.signal(signal.SIGUSR1)
        logged = server.wait_for_log(rb'^\{"prog":"tcpserver","ev":"stat"', count=3)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            _connect_unix(client, status_path)
            served = read_to_eof(client)
        assert [_timeless(line) for line in served.splitlines()] == [_timeless(line) for line in logged]
        assert list(json.loads(served.splitlines()[0]))[:2] == ["prog", "ev"]


def test_bytes_that_are_not_utf8_are_escaped_as_the_json_log_does() -> None:
    """An address is ASCII in practice; should other bytes come, they read as the log's `\\xNN`, not `\\u00NN`."""
    summary = StatSummary(1, 40, 1, 0, 0, 5)
    client = StatClient(b"10.0.0.1\xff\"", 1, 2, b"10.0.0.0/24\xc3\xa9", 1)
    lines = json_lines(summary, [client], b"sslserver")
    assert lines == JsonFormat(b"sslserver").format(summary, 1) + JsonFormat(b"sslserver").format(client, 1)
    parsed = [json.loads(line) for line in lines.splitlines()]
    assert parsed[1]["ip"] == '10.0.0.1\\xff"' and parsed[1]["net"] == "10.0.0.0/24\u00e9"
    assert parsed[0]["prog"] == "sslserver"


def test_denied_and_refused_are_counted(tmp_path: Path) -> None:
    rules = rules_cdb(tmp_path, "127.0.0.5:deny\n:allow\n")
    server = start_server(OUR_SERVER.command, ["-HR", f"-x{rules}", "--max-per-ip=1:full"], HOLD)
    with server, ExitStack() as stack:
        assert read_to_eof(stack.enter_context(connect(server.port, source="127.0.0.5"))) == b""
        _held(server.port, ["127.0.0.6"], stack)
        assert read_to_eof(stack.enter_context(connect(server.port, source="127.0.0.6"))) == b"full"
        summary, clients = _stat_lines(server, 1)
        assert summary[:5] == (1, 40, 3, 1, 1)
        assert [client[:2] for client in clients] == [(b"127.0.0.6", 1)]


def test_the_network_is_the_max_per_net_prefix() -> None:
    server = start_server(OUR_SERVER.command, ["-HR", "--max-per-net=10/16/48"], HOLD)
    with server, ExitStack() as stack:
        _held(server.port, ["127.0.0.2", "127.0.9.2"], stack)
        _, clients = _stat_lines(server, 2)
        assert sorted((ip, net, netconns) for ip, _, _, net, netconns in clients) == [
            (b"127.0.0.2", b"127.0.0.0/16", 2),
            (b"127.0.9.2", b"127.0.0.0/16", 2),
        ]


def test_at_most_100_addresses_the_busiest_first() -> None:
    server = start_server(OUR_SERVER.command, ["-HR", "-c120", "-b128"], HOLD)
    with server, ExitStack() as stack:
        # 105 addresses; 127.0.2.1 holds three connections, 127.0.2.2 two.
        _held(server.port, ["127.0.2.1"] * 3 + ["127.0.2.2"] * 2 + [f"127.0.1.{n}" for n in range(1, 104)], stack)
        summary, clients = _stat_lines(server, 100)
        assert summary[0] == 108
        assert len(clients) == 100
        assert [client[:2] for client in clients[:2]] == [(b"127.0.2.1", 3), (b"127.0.2.2", 2)]
        time.sleep(0.2)
        assert len([line for line in server.log() if _CLIENT.match(line)]) == 100


def test_quiet_writes_no_stat_lines_and_the_socket_still_answers(status_path: Path) -> None:
    server = start_server(OUR_SERVER.command, ["-q", "-HR", f"--status-socket={status_path}"], HOLD)
    with server, ExitStack() as stack:
        _held(server.port, ["127.0.0.2"], stack)
        server.signal(signal.SIGUSR1)
        view = _status(status_path)  # after the USR1: the loop has dealt with it
        assert [line.get("ip") for line in view] == [None, "127.0.0.2"]
        time.sleep(0.3)
        assert server.log() == []
        assert server.alive()


# ---------------------------------------------------------------- the socket


@needs_root
def test_the_socket_is_0600_and_owned_by_the_server_user(status_path: Path) -> None:
    server = start_server(
        OUR_SERVER.command, ["-HR", f"-u{NOBODY}", f"-g{NOBODY}", f"--status-socket={status_path}"], HOLD
    )
    with server:
        facts = os.lstat(status_path)
        assert stat.S_ISSOCK(facts.st_mode)
        assert stat.S_IMODE(facts.st_mode) == 0o600
        assert (facts.st_uid, facts.st_gid) == (NOBODY, NOBODY)
        assert _status(status_path)[0]["conns"] == 0


@needs_root
@needs_tool("strace", "strace")
def test_a_symlink_put_in_the_socket_files_place_is_refused_not_followed(status_path: Path, tmp_path: Path) -> None:
    """Whoever may write the directory swaps the new socket file for a symlink to a file of root's
    before the server (still root) gives the socket to -u/-g: strace holds each bind's return
    for 0.5 s, so the swap comes between bind and chown every time. The file keeps its owner and
    mode; the server says the path is taken and exits 111."""
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    victim.chmod(0o644)
    held_binds = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", "trace=bind"]
    held_binds += ["-e", "inject=bind:delay_exit=500000"]
    options = ["-1", "-HR", f"-u{NOBODY}", f"-g{NOBODY}", f"--status-socket={status_path}", "127.0.0.1", "0", *HOLD]
    process = launch(OUR_SERVER.command, options, wrapper=held_binds)
    try:
        deadline = time.monotonic() + 10
        while not os.path.lexists(status_path) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert os.path.lexists(status_path), "the socket file never came"
        swap = tmp_path / "swap"
        swap.symlink_to(victim)
        swap.rename(status_path)
        try:
            _, stderr = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # it started, chowning what the link named
            stderr = b""
    finally:
        if process.poll() is None:
            # The server first: strace reaps it and ends (killed first, it would leave the server running).
            for pid, _state in children(process.pid):
                os.kill(pid, signal.SIGKILL)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
    facts = os.stat(victim)
    assert (facts.st_uid, facts.st_gid, stat.S_IMODE(facts.st_mode)) == (0, 0, 0o644)
    assert process.returncode == 111
    assert stderr == b"tcpserver: fatal: unable to bind status socket %s: address already used\n" % bytes(status_path)


def test_a_program_does_not_get_the_status_socket(status_path: Path) -> None:
    report = "import os; os.write(1, ' '.join(sorted(os.listdir('/proc/self/fd'), key=int)).encode())"
    server = start_server(
        OUR_SERVER.command, ["-HR", f"--status-socket={status_path}"], ["/usr/bin/python3", "-S", "-c", report]
    )
    with server:
        with connect(server.port) as client:
            # The listdir's own descriptor is the fourth.
            assert read_to_eof(client).split()[:3] == [b"0", b"1", b"2"]
            assert len(read_to_eof(client).split()) <= 1
        with connect(server.port) as client:
            fds = read_to_eof(client).split()
        assert fds[:3] == [b"0", b"1", b"2"] and len(fds) == 4


def test_the_socket_goes_at_term_and_at_the_end_of_a_drain(status_path: Path) -> None:
    server = start_server(OUR_SERVER.command, ["-HR", f"--status-socket={status_path}"], HOLD)
    with server:
        assert status_path.exists()
        assert server.stop() == 0
    assert not status_path.exists()
    server = start_server(OUR_SERVER.command, ["-HR", f"--status-socket={status_path}"], HOLD)
    with server:
        with connect(server.port) as client:
            assert read_line(client) == b"started\n"
            server.signal(signal.SIGALRM)
            time.sleep(0.3)
            assert status_path.exists()  # the view serves on while the drain waits
            assert _status(status_path)[0]["conns"] == 1
            client.sendall(b"\n")
            assert server.process.wait(5) == 0
    assert not status_path.exists()


def test_a_stale_socket_is_replaced_and_a_live_one_is_fatal(status_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(status_path))
    stale.close()  # the file stays; nobody listens
    server = start_server(OUR_SERVER.command, ["-HR", f"--status-socket={status_path}"], HOLD)
    with server:
        assert _status(status_path)[0]["conns"] == 0
        second = launch(OUR_SERVER.command, ["-HR", f"--status-socket={status_path}", "127.0.0.1", "0", "true"])
        assert second.wait(10) == 111
        assert second.stderr is not None and second.stdout is not None
        assert second.stderr.read() == (
            f"tcpserver: fatal: unable to bind status socket {status_path}: address already used\n".encode()
        )
        second.stderr.close()
        second.stdout.close()
        assert _status(status_path)[0]["conns"] == 0  # the first server's, untouched


def test_a_reader_that_never_reads_holds_nothing_up(status_path: Path) -> None:
    server = start_server(OUR_SERVER.command, ["-HR", f"--status-socket={status_path}"], ["/bin/echo", "hi"])
    with server, ExitStack() as stack:
        for _ in range(50):
            sleeper = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sleeper.settimeout(5)
            _connect_unix(sleeper, status_path)
            sleeper.sendall(b"x" * 1000)  # and never reads
        for _ in range(20):
            with connect(server.port) as client:
                assert read_to_eof(client) == b"hi\n"
        assert _status(status_path)[0]["accepted"] == 20


_REPORT_FDS = (
    "import os\n"
    "fds = []\n"
    "for name in sorted(os.listdir('/proc/self/fd'), key=int):\n"
    "    try:\n"
    "        os.readlink('/proc/self/fd/' + name)\n"
    "    except OSError:\n"
    "        continue\n"
    "    fds.append(name)\n"
    "os.write(1, (' '.join(fds) + '\\n').encode())\n"
    "os.read(0, 1)\n"
)


@needs_tool("systemd-socket-activate", "systemd")
def test_a_program_gets_none_of_the_servers_descriptors_at_once(tmp_path: Path) -> None:
    """Issue 13 item 6 with everything open together: a socket systemd passed, the notify socket,
    the status socket and another client; the program has fds 0, 1 and 2 only."""
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(os.fspath(tmp_path / "notify"))
    receiver.settimeout(10)
    status_path = tmp_path / "status.sock"
    command = [tool, "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={tmp_path / 'notify'}"]
    command += [os.fspath(OUR_SERVER.command), f"--status-socket={status_path}", "0", "0"]
    command += ["/usr/bin/python3", "-S", "-c", _REPORT_FDS]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    try:
        assert process.stderr is not None
        ready, _, _ = select.select([process.stderr], [], [], 10)
        assert ready and b"Listening on" in process.stderr.readline()
        with receiver, ExitStack() as stack:
            first = stack.enter_context(connect(port, timeout=10))  # starts the server
            assert receiver.recv(4096).startswith(b"READY=1")
            second = stack.enter_context(connect(port, timeout=10))
            assert read_line(first, timeout=10) == b"0 1 2\n"
            assert read_line(second, timeout=10) == b"0 1 2\n"
            assert _status(status_path)[0]["conns"] == 2
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stderr is not None:
            process.stderr.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_the_socket_waits_without_spinning(status_path: Path) -> None:
    """Clients that hold descriptors (a PROXY header never sent) fill the server's table: the status
    client waits in the backlog, the loop does not spin on it, and is answered once they are gone."""
    server = start_server(
        OUR_SERVER.command,
        ["-HR", "-c100", "--proxy-from=127.0.0.0/8", "--proxy-timeout=2", f"--status-socket={status_path}"],
        HOLD,
    )
    with server, ExitStack() as stack:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (40, 40))
        for _ in range(60):
            stack.enter_context(connect(server.port))  # each holds a descriptor of the server's for 2 s
        time.sleep(0.3)
        waiting = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        waiting.settimeout(10)
        _connect_unix(waiting, status_path)
        before = _cpu_seconds(server.pid)
        time.sleep(1.0)
        assert _cpu_seconds(server.pid) - before < 0.5  # a loop spinning on the socket takes the whole second
        data = b""
        while chunk := waiting.recv(65536):
            data += chunk
        assert json.loads(data.splitlines()[0])["ev"] == "stat"
