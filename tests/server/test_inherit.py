"""Listeners a supervisor hands over, readiness, and no descriptor of ours in a program (issue 13,
items 1, 2 and 6): Debian's systemd-socket-activate, an s6-style fd 0 launcher, and AF_UNIX
datagram receivers as NOTIFY_SOCKET, all against the installed entry point (.venv/bin/tcpserver
execs python without forking, so systemd's LISTEN_PID names the server).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_tool
from serverproc import OUR_SERVER, connect, plain_environment, read_line, read_to_eof, start_server

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_socket_activate = needs_tool("systemd-socket-activate", "systemd")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing ids needs root")
NOBODY = 65534
SUPERVISOR_NAMES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID", "NOTIFY_SOCKET")

# The program: the descriptors it holds and which supervisor variables it sees, one line each.
# /usr/bin/python3 -S, readable after -u 65534; the listdir's own descriptor is gone by readlink.
_REPORT = (
    "import os\n"
    "fds = []\n"
    "for name in sorted(os.listdir('/proc/self/fd'), key=int):\n"
    "    try:\n"
    "        os.readlink('/proc/self/fd/' + name)\n"
    "    except OSError:\n"
    "        continue\n"
    "    fds.append(name)\n"
    f"seen = [n for n in {SUPERVISOR_NAMES!r} if n in os.environ]\n"
    "os.write(1, ('fds ' + ' '.join(fds) + '\\nvars ' + ' '.join(seen) + '\\n').encode())\n"
)
REPORT_PROGRAM = ["/usr/bin/python3", "-S", "-c", _REPORT]

# Binds, listens, puts the socket where a supervisor would, sets the variables, execs the rest.
# argv: MODE (stdin | systemd | udp | notlistening | foreign) PORT COMMAND...
_LAUNCHER = r"""
import os, socket, sys
mode, port, command = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
kind = socket.SOCK_DGRAM if mode == "udp" else socket.SOCK_STREAM
sock = socket.socket(socket.AF_INET, kind)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
if mode not in ("udp", "notlistening"):
    sock.listen(20)
target = 0 if mode == "stdin" else 3
if sock.fileno() == target:
    os.set_inheritable(sock.detach(), True)
else:
    os.dup2(sock.fileno(), target)
    sock.close()
if mode != "stdin":
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_FDNAMES"] = "x"
    os.environ["LISTEN_PID"] = "1" if mode == "foreign" else str(os.getpid())
os.execv(command[0], command)
"""


def _free_port(host: str = "127.0.0.1", family: int = socket.AF_INET) -> int:
    """A port free now: systemd-socket-activate refuses port 0."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _parse_report(data: bytes) -> dict[str, list[str]]:
    report = {}
    for line in data.decode().splitlines():
        key, _, rest = line.partition(" ")
        report[key] = rest.split()
    return report


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _read_line_from(stream: object, timeout: float = 10.0) -> bytes:
    fd = stream.fileno()  # type: ignore[attr-defined]
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError(data)
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


# ---------------------------------------------------------------- systemd socket activation


@needs_socket_activate
def test_systemd_socket_activation_serves_the_connection_that_started_it() -> None:
    """`systemd-socket-activate -l 127.0.0.1:P tcpserver -1 0 0 prog`: the first client is served
    on the passed socket, -1 prints P, and the program sees fds 0-2 only and no LISTEN_*."""
    port = _free_port()
    assert SOCKET_ACTIVATE is not None
    process = subprocess.Popen(
        [
            SOCKET_ACTIVATE,
            "-l",
            f"127.0.0.1:{port}",
            "--fdname=plain",
            str(OUR_SERVER.command),
            "-1",
            "0",
            "0",
            *REPORT_PROGRAM,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    try:
        assert b"Listening on" in _read_line_from(process.stderr)
        client = connect(port)
        report = _parse_report(read_to_eof(client))
        client.close()
        assert _read_line_from(process.stdout) == b"%d\n" % port
        assert report == {"fds": ["0", "1", "2"], "vars": []}
        # The server goes on serving on it.
        client = connect(port)
        assert _parse_report(read_to_eof(client))["fds"] == ["0", "1", "2"]
        client.close()
    finally:
        _stop(process)


@needs_socket_activate
def test_systemd_sockets_of_both_families_are_all_served_with_0_0() -> None:
    port4, port6 = _free_port(), _free_port("::1", socket.AF_INET6)
    assert SOCKET_ACTIVATE is not None
    process = subprocess.Popen(
        [
            *(SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port4}", "-l", f"[::1]:{port6}", "--fdname=plain:six"),
            *(str(OUR_SERVER.command), "0", "0", "/bin/sh", "-c", "echo $PROTO $TCPLOCALIP $TCPLOCALPORT"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    try:
        assert b"Listening on" in _read_line_from(process.stderr)
        client = connect(port4)
        assert read_to_eof(client) == b"TCP 127.0.0.1 %d\n" % port4
        client.close()
        with socket.create_connection(("::1", port6), timeout=5) as client6:
            assert read_to_eof(client6) == b"TCP6 ::1 %d\n" % port6
    finally:
        _stop(process)


@needs_socket_activate
def test_an_inherited_socket_the_arguments_do_not_name_is_fatal() -> None:
    port4, port6 = _free_port(), _free_port("::1", socket.AF_INET6)
    assert SOCKET_ACTIVATE is not None
    process = subprocess.Popen(
        [
            *(SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port4}", "-l", f"[::1]:{port6}"),
            *(str(OUR_SERVER.command), "127.0.0.1", str(port4), "/bin/true"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    try:
        assert b"Listening on" in _read_line_from(process.stderr)
        _read_line_from(process.stderr)  # the second socket's line
        client = connect(port4)
        assert process.wait(10) == 111
        client.close()
        assert f"tcpserver: fatal: inherited socket [::1]:{port6} does not match 127.0.0.1 {port4}".encode() in (
            process.stderr.read()  # type: ignore[union-attr]
        )
    finally:
        _stop(process)


def _launch(
    tmp_path: Path, mode: str, server_arguments: list[str], pass_fds: tuple[int, ...] = ()
) -> tuple[subprocess.Popen[bytes], int]:
    launcher = tmp_path / "launcher.py"
    launcher.write_text(_LAUNCHER)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-S", str(launcher), mode, str(port), str(OUR_SERVER.command), *server_arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        pass_fds=pass_fds,
    )
    return process, port


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("udp", b"tcpserver: fatal: fd 3 from LISTEN_FDS is not a listening TCP socket"),
        ("notlistening", b"tcpserver: fatal: fd 3 from LISTEN_FDS is not a listening TCP socket"),
    ],
)
def test_a_passed_descriptor_that_is_not_a_listening_tcp_socket_is_fatal(
    tmp_path: Path, mode: str, words: bytes
) -> None:
    process, _ = _launch(tmp_path, mode, ["0", "0", "/bin/true"])
    try:
        assert process.wait(10) == 111
        assert process.stderr is not None
        assert process.stderr.read() == words + b"\n"
    finally:
        _stop(process)


def test_listen_pid_of_another_process_is_ignored(tmp_path: Path) -> None:
    """LISTEN_PID=1: the variables were meant for someone else; the server binds as 0.88 does."""
    process, inherited_port = _launch(tmp_path, "foreign", ["-1", "127.0.0.1", "0", *REPORT_PROGRAM])
    try:
        assert process.stdout is not None
        port = int(_read_line_from(process.stdout))
        assert port != inherited_port
        client = connect(port)
        report = _parse_report(read_to_eof(client))
        client.close()
        # fd 3 was the server's own start-up descriptor, not a listener it took: it passes through,
        # as in 0.88; the variables never do.
        assert report == {"fds": ["0", "1", "2", "3"], "vars": []}
    finally:
        _stop(process)


# ---------------------------------------------------------------- s6: --inherit=stdin


@pytest.fixture
def extra_descriptor() -> Iterator[int]:
    """A pipe end the server is started with beyond 0-2: it passes through to programs, as in 0.88."""
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    yield read_end
    os.close(read_end)
    os.close(write_end)


def test_inherit_stdin_serves_the_socket_on_fd_0(tmp_path: Path, extra_descriptor: int) -> None:
    process, port = _launch(
        tmp_path, "stdin", ["--inherit=stdin", "-1", "0", "0", *REPORT_PROGRAM], pass_fds=(extra_descriptor,)
    )
    try:
        assert process.stdout is not None
        assert _read_line_from(process.stdout) == b"%d\n" % port
        for _ in range(2):
            client = connect(port)
            report = _parse_report(read_to_eof(client))
            client.close()
            assert report == {"fds": ["0", "1", "2", str(extra_descriptor)], "vars": []}
    finally:
        _stop(process)


@needs_root
def test_inherit_stdin_still_drops_privileges(tmp_path: Path) -> None:
    process, port = _launch(
        tmp_path, "stdin", ["--inherit=stdin", f"-u{NOBODY}", f"-g{NOBODY}", "0", "0", "/usr/bin/id", "-u"]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = connect(port)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert read_to_eof(client) == b"%d\n" % NOBODY
        client.close()
    finally:
        _stop(process)


def test_inherit_stdin_without_a_listening_socket_is_fatal() -> None:
    process = subprocess.run(
        [str(OUR_SERVER.command), "--inherit=stdin", "0", "0", "/bin/true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert (process.returncode, process.stderr) == (
        111,
        b"tcpserver: fatal: fd 0 from stdin is not a listening TCP socket\n",
    )


def test_inherit_takes_stdin_only() -> None:
    process = subprocess.run(
        [str(OUR_SERVER.command), "--inherit=fd3", "0", "0", "/bin/true"],
        capture_output=True,
        timeout=10,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert (process.returncode, process.stderr) == (100, b"tcpserver: fatal: bad value for --inherit: fd3\n")


# ---------------------------------------------------------------- readiness


def _receiver(tmp_path: Path, abstract: bool) -> tuple[socket.socket, bytes]:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = b"ucspi-test-notify-%d-%d" % (os.getpid(), time.monotonic_ns())
        receiver.bind(b"\0" + name)
        return receiver, b"@" + name
    path = tmp_path / "notify"
    receiver.bind(str(path))
    return receiver, os.fsencode(path)


def _datagram(receiver: socket.socket, timeout: float = 5.0) -> bytes:
    receiver.settimeout(timeout)
    return receiver.recv(4096)


@pytest.mark.parametrize(
    ("abstract", "options"),
    [
        (False, []),
        (True, []),
        pytest.param(False, [f"-u{NOBODY}", f"-g{NOBODY}"], marks=needs_root),
        pytest.param(True, [f"-u{NOBODY}"], marks=needs_root),
    ],
    ids=["path", "abstract", "path-nobody", "abstract-nobody"],
)
def test_readiness_status_and_stopping(tmp_path: Path, abstract: bool, options: list[str]) -> None:
    receiver, address = _receiver(tmp_path, abstract)
    if not abstract:
        # Writable by root alone: the server connects before it drops to nobody.
        os.chmod(tmp_path / "notify", 0o600)
    with receiver:
        server = start_server(
            OUR_SERVER.command,
            ["-c", "7", *options],
            ["/bin/sh", "-c", "echo $NOTIFY_SOCKET.; read line"],
            environment=plain_environment({b"NOTIFY_SOCKET": address}),
        )
        try:
            assert _datagram(receiver) == b"READY=1\nSTATUS=listening on 127.0.0.1:%d, 0/7" % server.port
            started = time.monotonic()
            client = connect(server.port)
            assert read_line(client) == b".\n"
            assert _datagram(receiver) == b"STATUS=listening on 127.0.0.1:%d, 1/7" % server.port
            # At most one a second: the first change after READY waits for the second to pass.
            assert time.monotonic() - started >= 0.5
            client.sendall(b"\n")
            client.close()
            assert _datagram(receiver) == b"STATUS=listening on 127.0.0.1:%d, 0/7" % server.port
            assert server.stop() == 0
            assert _datagram(receiver) == b"STOPPING=1"
        finally:
            if server.alive():
                server.stop()


def test_a_notify_socket_nobody_receives_never_stalls_the_server(tmp_path: Path) -> None:
    """A receiver that never reads: its queue fills, the datagrams are dropped, clients are served."""
    receiver, address = _receiver(tmp_path, False)
    with receiver, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        # Its queue full before the server starts: a blocking send would wait for good at READY=1.
        filler.setblocking(False)
        filler.connect(os.fsencode(address))
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                filler.send(b"X_FILLER=1")
        server = start_server(
            OUR_SERVER.command, [], ["/bin/echo", "hi"], environment=plain_environment({b"NOTIFY_SOCKET": address})
        )
        try:
            deadline = time.monotonic() + 20
            for _ in range(30):
                client = connect(server.port)
                assert read_to_eof(client) == b"hi\n"
                client.close()
                assert time.monotonic() < deadline
                time.sleep(0.04)
        finally:
            server.stop()


def test_an_unreachable_notify_socket_is_a_warning_and_the_server_serves(tmp_path: Path) -> None:
    server = start_server(
        OUR_SERVER.command,
        [],
        ["/bin/echo", "hi"],
        environment=plain_environment({b"NOTIFY_SOCKET": os.fsencode(tmp_path / "nobody-here")}),
    )
    try:
        client = connect(server.port)
        assert read_to_eof(client) == b"hi\n"
        client.close()
        assert server.wait_for_log(b"tcpserver: warning: unable to connect to NOTIFY_SOCKET: file does not exist")
    finally:
        server.stop()


def test_the_program_gets_neither_the_notify_socket_nor_its_variable(tmp_path: Path) -> None:
    receiver, address = _receiver(tmp_path, False)
    with receiver:
        server = start_server(
            OUR_SERVER.command, [], REPORT_PROGRAM, environment=plain_environment({b"NOTIFY_SOCKET": address})
        )
        try:
            assert _datagram(receiver).startswith(b"READY=1\n")
            client = connect(server.port)
            assert _parse_report(read_to_eof(client)) == {"fds": ["0", "1", "2"], "vars": []}
            client.close()
        finally:
            server.stop()


def test_a_program_gets_no_other_clients_descriptor() -> None:
    """Two clients held at once: the second's program sees fds 0-2 only, not the first's socket
    (a regression guard: accepted sockets are close-on-exec today)."""
    server = start_server(OUR_SERVER.command, [], ["/usr/bin/python3", "-S", "-c", _REPORT + "os.read(0, 1)\n"])
    try:
        first = connect(server.port)
        assert _parse_report(read_line(first) + read_line(first))["fds"] == ["0", "1", "2"]
        second = connect(server.port)
        assert _parse_report(read_line(second) + read_line(second)) == {"fds": ["0", "1", "2"], "vars": []}
        for client in (first, second):
            client.sendall(b"\n")
            read_to_eof(client)
            client.close()
    finally:
        server.stop()
