"""sslserver under hostile input and at every edge of a session's life (issue 14; README, sslserver).

Each case has a hard bound: the server runs with a short -T (handshake deadline) and -w (idle),
every client call has a timeout, and each test ends by checking the server for zombies and for
descriptors beyond the count it had after one warm-up session. The byte-exact close cases drive
Python's ssl over memory BIOs (tls.tlsclient) so that close_notify, a bare FIN and an RST each
come exactly when the case says; the QUIT-then-close_notify case also runs against stunnel4, the
comparison point that gets it right.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import needs_tool

from tls.certs import Certificates
from tls.tlsclient import (
    HTTP_REQUEST,
    PYTHON,
    SSLSERVER,
    TOP,
    Stunnel,
    TlsClient,
    children_of,
    client_hello,
    connect,
    fake_smtpd,
    open_descriptors,
    raw_answer,
    record_header,
    rss_kib,
    smtpd_log,
    sslv2_hello,
    start_sslserver,
    wait_until,
    zombies_of,
)

sys.path.insert(0, str(TOP / "tests" / "server"))
import serverproc

STUNNEL = needs_tool("stunnel4", "stunnel4")
HANDSHAKE_TIMEOUT = 2  # -T for the cases that wait for it
SETTLE = 10.0  # how long the server may take to clean up after a case

# The program of every case but the -n ones: notes its start in the marker file (so a test can
# tell whether a program was spawned at all), then is cat (fd 0 to fd 1 until EOF) for the first
# connection, the warm-up, and the case's own program (its arguments after the marker) for the rest.
MARKED = (
    "import os, sys\n"
    "with open(sys.argv[1], 'a+') as marker:\n"
    "    marker.seek(0)\n"
    "    first = not marker.read()\n"
    "    marker.write(f'{os.getpid()}\\n')\n"
    "program = sys.argv[2:] if sys.argv[2:] and not first else ['/bin/cat']\n"
    "os.execv(program[0], program)\n"
)


@dataclass
class Served:
    """A running sslserver of one test, with the descriptor count it settled at."""

    server: serverproc.ServerProcess
    marker: Path
    baseline_fds: int = 0
    spawned_before: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.server.pid

    @property
    def port(self) -> int:
        return self.server.port

    def spawned(self) -> int:
        """Programs started since the warm-up."""
        try:
            return len(self.marker.read_text().split()) - self.spawned_before
        except FileNotFoundError:
            return 0

    def assert_clean(self, programs_left: int = 0) -> None:
        """No zombie, programs_left programs at most, no descriptor beyond the warm-up's count,
        and the server still running."""
        assert self.server.alive(), f"sslserver died: {self.server.log()!r}"
        assert wait_until(lambda: not zombies_of(self.pid), SETTLE), f"zombies: {zombies_of(self.pid)}"
        assert wait_until(lambda: len(children_of(self.pid)) <= programs_left, SETTLE), (
            f"programs still running: {children_of(self.pid)}; log {self.server.log()!r}"
        )
        assert wait_until(lambda: open_descriptors(self.pid) <= self.baseline_fds, SETTLE), (
            f"descriptors: {open_descriptors(self.pid)} now, {self.baseline_fds} after the warm-up: "
            f"{sorted(os.listdir(f'/proc/{self.pid}/fd'), key=int)}"
        )


def echo_session(port: int, host: str = "127.0.0.1", line: bytes = b"warm-up\n") -> None:
    """A whole well-behaved session with a cat program: handshake, a line and its echo, close_notify."""
    with TlsClient(port, host) as client:
        client.handshake()
        client.send(line)
        assert client.read_until(b"\n") == line
        client.close_notify()
        ending = client.read_all()
        assert ending.data == b"" and ending.how == "close_notify", ending


@pytest.fixture
def sslserver(tls_certs: Certificates, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """start(options, program=(), kind="ec", warm=None, **variables): a started and warmed-up
    sslserver (see start); all are stopped at the end of the test."""
    started: list[serverproc.ServerProcess] = []

    def start(
        options: Sequence[str],
        program: Sequence[str | os.PathLike[str]] = (),
        *,
        kind: str = "ec",
        warm: Callable[[int], None] | None = None,
        **variables: str | os.PathLike[str],
    ) -> Served:
        """warm None: program runs under MARKED, after an echo_session with cat as the warm-up;
        else program runs as it is, and warm(port) is the warm-up."""
        marker = tmp_path / f"spawned-{len(started)}"
        command = [PYTHON, "-c", MARKED, marker, *program] if warm is None else program
        server = start_sslserver(list(options), command, tls_certs.environment(kind, **variables))
        started.append(server)
        served = Served(server, marker)
        (echo_session if warm is None else warm)(server.port)
        # Descriptors the server opens at its first session (the spawner's pipes and the like) stay.
        assert wait_until(lambda: not children_of(server.pid), SETTLE), "the warm-up's program did not end"
        served.baseline_fds = open_descriptors(server.pid)
        served.spawned_before = served.spawned()
        return served

    yield start
    for server in started:
        server.stop()


def closed_within(sock: socket.socket, timeout: float) -> tuple[float, bytes, str]:
    """Seconds until the server closes sock, what it sent meanwhile, and "eof" or "reset"."""
    started = time.monotonic()
    data, how = raw_answer(sock, timeout)
    return time.monotonic() - started, data, how


def socket_readable(sock: socket.socket, timeout: float) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


def dropped(served: Served, reason: str = "unable to accept SSL") -> bytes:
    """The server's warning for a dropped connection (issue 14, What to build 7)."""
    return served.server.wait_for_log(rf"^sslserver: warning: dropping connection, {reason}", timeout=SETTLE)[0]


# ---------------------------------------------------------------- before and during the handshake


def test_silent_client_cut_at_the_deadline(sslserver: Callable[..., Served]) -> None:
    """Connect and send nothing: the server closes at -T, logs it, and spawns nothing."""
    served = sslserver(["-v", "-T", str(HANDSHAKE_TIMEOUT)])
    with connect(served.port) as sock:
        elapsed, data, _ = closed_within(sock, HANDSHAKE_TIMEOUT + 8)
    assert HANDSHAKE_TIMEOUT - 0.5 <= elapsed <= HANDSHAKE_TIMEOUT + 5, elapsed
    assert data == b""  # nothing the client asked for: no alert either
    dropped(served)
    assert served.spawned() == 0
    served.assert_clean()


def test_dribbled_hello_cut_at_one_absolute_deadline(sslserver: Callable[..., Served]) -> None:
    """A ClientHello at one byte per 0.2 s: -T is a total deadline (not re-armed by each byte)."""
    served = sslserver(["-v", "-T", str(HANDSHAKE_TIMEOUT)])
    hello = client_hello()
    assert len(hello) * 0.2 > 3 * HANDSHAKE_TIMEOUT  # the whole hello would take far longer than -T
    with connect(served.port) as sock:
        started = time.monotonic()
        sent = 0
        for byte in hello:
            readable = socket_readable(sock, 0.2)
            if readable:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sent += 1
            if time.monotonic() - started > HANDSHAKE_TIMEOUT + 8:
                break
        closed_within(sock, HANDSHAKE_TIMEOUT + 8)
        elapsed = time.monotonic() - started
    assert sent < len(hello)
    assert elapsed <= HANDSHAKE_TIMEOUT + 5, elapsed
    dropped(served)
    assert served.spawned() == 0
    served.assert_clean()


def test_hello_in_one_byte_segments_is_served(sslserver: Callable[..., Served]) -> None:
    """A ClientHello split into 1-byte TCP segments (fast) is a valid handshake: served normally."""
    served = sslserver(["-v", "-T", "10"])
    with TlsClient(served.port) as client:
        client.handshake(interval=0.0005)
        client.send(b"split hello\n")
        assert client.read_until(b"\n") == b"split hello\n"
        client.close_notify()
        assert client.read_all().how == "close_notify"
    assert served.spawned() == 1
    served.assert_clean()


GARBAGE = {
    "http": HTTP_REQUEST,
    "random": bytes(range(256)) * 2 + os.urandom(88),
    "sslv2 hello": sslv2_hello(),
    "record of length 0xFFFF": record_header(0xFFFF) + bytes(64),
    "application data first": record_header(40, content_type=23, version=0x0303) + bytes(40),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_before_the_handshake(sslserver: Callable[..., Served], name: str) -> None:
    """Not TLS: dropped at once (well before -T), with the OpenSSL reason in the log; no program."""
    served = sslserver(["-v", "-T", "20"])
    with connect(served.port) as sock:
        sock.sendall(GARBAGE[name])
        elapsed, _, _ = closed_within(sock, 25)
    assert elapsed < 5, elapsed
    warning = dropped(served)
    assert warning.split(b"unable to accept SSL", 1)[1].strip(b": "), warning  # a reason follows
    assert served.spawned() == 0
    served.assert_clean()


def test_client_that_never_completes_the_handshake(sslserver: Callable[..., Served]) -> None:
    """ClientHello sent, the server's flight received, no Finished ever: cut at -T, no program."""
    served = sslserver(["-v", "-T", str(HANDSHAKE_TIMEOUT)])
    with TlsClient(served.port) as client:
        client.hello_only()
        elapsed, data, _ = closed_within(client.sock, HANDSHAKE_TIMEOUT + 8)
    assert data[:1] == b"\x16"  # the ServerHello came
    assert HANDSHAKE_TIMEOUT - 0.5 <= elapsed <= HANDSHAKE_TIMEOUT + 5, elapsed
    dropped(served)
    assert served.spawned() == 0
    served.assert_clean()


def test_oversize_record_after_the_handshake(sslserver: Callable[..., Served]) -> None:
    """A record header of length 0xFFFF (over 2^14+256) mid-session: that session ends with a log
    line, the program gets EOF, the server serves the next client."""
    served = sslserver(["-v"])
    with TlsClient(served.port) as client:
        client.handshake()
        client.send(b"before\n")
        assert client.read_until(b"\n") == b"before\n"
        client.send_raw(record_header(0xFFFF, content_type=23, version=0x0303) + bytes(1024))
        client.read_all(timeout=10)  # the end, however it comes
    served.server.wait_for_log(r"^sslserver: warning: dropping connection, unable to speak SSL", timeout=SETTLE)
    served.assert_clean()
    echo_session(served.port, line=b"next\n")
    served.assert_clean()


def test_ten_megabytes_to_a_program_that_never_reads(sslserver: Callable[..., Served]) -> None:
    """10 MB pushed at a program that never reads: the server's memory stays bounded (its buffers
    cap and it stops reading TLS). Unbounded, the server would hold most of the 10 MB."""
    served = sslserver(["-v"], ["/bin/sleep", "8"])
    # The serving process alone: the relay is in it, and its programs (here first a Python that
    # execs sleep) are not the server's memory.
    before = rss_kib(served.pid)
    client = TlsClient(served.port, timeout=15)
    client.handshake()
    stop = threading.Event()
    pushed = [0]

    def push() -> None:
        """Up to 10 MiB, never blocking for long, so that stop ends it at once."""
        pending = b""
        try:
            while not stop.is_set() and (pending or pushed[0] < 10 * 1024 * 1024):
                if not pending:
                    client.obj.write(bytes(65536))
                    pending = client.outgoing.read()
                    pushed[0] += 65536
                _, writable, _ = select.select([], [client.sock], [], 0.1)
                if writable:
                    pending = pending[client.sock.send(pending) :]
        except (OSError, ssl.SSLError):
            pass  # the session ended under it: what matters is what the server held meanwhile

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    peak = before
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(served.pid))
        time.sleep(0.05)
    stop.set()
    pusher.join(5)
    assert not pusher.is_alive()
    client.reset()
    assert peak - before < 4096, f"server RSS {before} -> {peak} KiB with {pushed[0]} bytes pushed"
    served.assert_clean(programs_left=1)  # sleep 8 goes on; the server holds nothing more for it


# ---------------------------------------------------------------- idle timeout (-w)

IDLE_PROGRAM = (
    "import os, sys, time\n"
    "started = time.monotonic()\n"
    "data = os.read(0, 100)\n"
    "with open(sys.argv[1], 'a') as note: note.write(f'{data!r} {time.monotonic() - started:.2f}\\n')\n"
    "time.sleep(4)\n"
)


def test_idle_timeout_closes_the_input_then_aborts(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """-w 1 with a silent client and a program that never writes: the first expiry gives the program
    EOF on fd 0, the second aborts the connection with `unable to speak SSL`."""
    note = tmp_path / "note"
    served = sslserver(["-v", "-w", "1"], [PYTHON, "-c", IDLE_PROGRAM, note])
    with TlsClient(served.port) as client:
        client.handshake()
        started = time.monotonic()
        client.read_all(timeout=15)
        elapsed = time.monotonic() - started
    assert wait_until(note.exists, 5), "the program never saw EOF on fd 0"
    data, after = note.read_text().split()
    assert data == "b''"
    assert 0.7 <= float(after) <= 4, after
    assert float(after) < elapsed <= 8, (after, elapsed)
    served.server.wait_for_log(r"^sslserver: warning: dropping connection, unable to speak SSL", timeout=SETTLE)
    served.assert_clean()


# ---------------------------------------------------------------- resets in every phase

WRITER = "import os, sys\nblock = b'x' * 65536\nwhile True:\n    os.write(1, block)\n"


@pytest.mark.parametrize("phase", ["connected", "hello sent", "mid-handshake", "mid-relay", "program writing"])
def test_reset(sslserver: Callable[..., Served], phase: str) -> None:
    """An RST closes both sides: the program ends (EOF or EPIPE), the server goes on."""
    program = [PYTHON, "-c", WRITER] if phase == "program writing" else []
    served = sslserver(["-v", "-T", "10"], program)
    client = TlsClient(served.port)
    if phase == "hello sent":
        client.hello_only()
    elif phase == "mid-handshake":
        client.hello_only()
        client.sock.recv(100)  # part of the server's flight
    elif phase == "mid-relay":
        client.handshake()
        client.send(b"half a line")
        time.sleep(0.2)
    elif phase == "program writing":
        client.handshake()
        assert client.recv(timeout=10)[:1] == b"x"
    client.reset()
    served.assert_clean()
    if not program:
        echo_session(served.port, line=b"after the reset\n")
        served.assert_clean()


def test_program_killed_by_a_signal(sslserver: Callable[..., Served]) -> None:
    """The program dies of SIGKILL mid-session: the client sees the end, nothing is left behind."""
    served = sslserver(["-v"], [PYTHON, "-c", "import os; os.write(1, b'bye\\n'); os.kill(os.getpid(), 9)"])
    with TlsClient(served.port) as client:
        client.handshake()
        ending = client.read_all(timeout=10)
    assert ending.data == b"bye\n" and ending.how == "close_notify", ending
    served.assert_clean()


def test_program_exits_while_the_client_still_sends(sslserver: Callable[..., Served]) -> None:
    served = sslserver(["-v"], ["/usr/bin/head", "-c", "10"])
    client = TlsClient(served.port, timeout=15)
    client.handshake()
    try:
        for _ in range(64):
            client.send(b"y" * 16384)
        ending = client.read_all(timeout=10)
        assert ending.data == b"y" * 10, ending
    except (OSError, ssl.SSLError):
        pass  # the server may close under the sender: the end is all this case asks for
    finally:
        client.close()
    served.assert_clean()


# ---------------------------------------------------------------- half-close, both ways, byte-exact


def quit_then_close_notify(port: int) -> None:
    """The SMTP `221` case: QUIT, then close_notify at once, TCP left open; the 221 must come."""
    with TlsClient(port) as client:
        client.handshake()
        assert client.read_until(b"\r\n").startswith(b"220 ")
        client.send(b"QUIT\r\n")
        client.close_notify()
        ending = client.read_all(timeout=10)
    assert ending.data == b"221 fake.example bye\r\n" and ending.how == "close_notify", ending


def test_quit_then_close_notify_gets_221(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    served = sslserver(["-v"], fake_smtpd(tmp_path / "smtpd.log"), warm=quit_then_close_notify)
    quit_then_close_notify(served.port)
    served.assert_clean()


@STUNNEL
def test_quit_then_close_notify_gets_221_from_stunnel(tls_certs: Certificates, tmp_path: Path) -> None:
    """The same client against stunnel4 (which gets it right): the case itself is sound."""
    with Stunnel(tmp_path, tls_certs.ec_cert, tls_certs.ec_key, fake_smtpd(tmp_path / "smtpd.log")) as stunnel:
        quit_then_close_notify(stunnel.port)


def test_quit_then_bare_fin_still_gets_221(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """QUIT then a TCP FIN with no close_notify (a truncation): the program gets EOF, and its 221 is
    still delivered, then the server's close_notify."""
    served = sslserver(["-v"], fake_smtpd(tmp_path / "smtpd.log"), warm=quit_then_close_notify)
    with TlsClient(served.port) as client:
        client.handshake()
        assert client.read_until(b"\r\n").startswith(b"220 ")
        client.send(b"QUIT\r\n")
        client.shutdown_write()
        ending = client.read_all(timeout=10)
    assert ending.data == b"221 fake.example bye\r\n" and ending.how == "close_notify", ending
    served.assert_clean()


KEEPS_READING = (
    "import os, sys\n"
    "os.write(1, b'first and last words\\n')\n"
    "os.close(1)\n"
    "got = b''\n"
    "while chunk := os.read(0, 65536):\n"
    "    got += chunk\n"
    "with open(sys.argv[1], 'wb') as note: note.write(got)\n"
)


def test_program_closes_stdout_first(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """The program closes fd 1 and keeps reading: the client gets its data, then close_notify, and
    what the client sends afterwards still reaches the program, to the client's own close_notify."""
    note = tmp_path / "note"
    served = sslserver(["-v"], [PYTHON, "-c", KEEPS_READING, note])
    with TlsClient(served.port) as client:
        client.handshake()
        ending = client.read_all(timeout=10)
        assert ending.data == b"first and last words\n" and ending.how == "close_notify", ending
        client.send(b"after your close_notify\n")
        client.send(b"and more\n")
        client.close_notify()
        assert wait_until(note.exists, 10), "the program never got EOF"
    assert note.read_bytes() == b"after your close_notify\nand more\n"
    served.assert_clean()


def test_output_of_a_program_that_exits_at_once_is_whole(sslserver: Callable[..., Served]) -> None:
    """1 MB written just before exit arrives in full, then close_notify (not a bare FIN)."""
    program = "import os\ndata = bytes(range(256)) * 4096\nwhile data:\n    data = data[os.write(1, data):]\n"
    served = sslserver(["-v"], [PYTHON, "-c", program])
    with TlsClient(served.port) as client:
        client.handshake()
        ending = client.read_all(timeout=20)
    assert ending.how == "close_notify"
    assert ending.data == bytes(range(256)) * 4096
    served.assert_clean()


def test_client_that_never_answers_close_notify(sslserver: Callable[..., Served]) -> None:
    """The program is done, the server sends close_notify, the client neither answers nor closes:
    the server waits a few seconds at most, then closes the TCP connection."""
    served = sslserver(["-v"], ["/bin/echo", "done"])
    with TlsClient(served.port, timeout=20) as client:
        client.handshake()
        ending = client.read_all(timeout=10)
        assert ending.data == b"done\n" and ending.how == "close_notify", ending
        elapsed, rest, _ = closed_within(client.sock, 20)
    assert rest == b"" and elapsed <= 10, (elapsed, rest)
    served.assert_clean()


# ---------------------------------------------------------------- UCSPI-TLS (-n)


def smtp_line(sock: socket.socket) -> bytes:
    return serverproc.read_line(sock, 10)


def plain_then_starttls(port: int, *, pipelined: bytes = b"") -> tuple[socket.socket, bytes]:
    """Plain EHLO and STARTTLS (plus pipelined bytes after it); the socket, at the `220` for STARTTLS."""
    sock = connect(port)
    assert smtp_line(sock).startswith(b"220 ")
    sock.sendall(b"EHLO client.example\r\n")
    while not (line := smtp_line(sock)).startswith(b"250 "):
        assert line.startswith(b"250-")
    sock.sendall(b"STARTTLS\r\n" + pipelined)
    return sock, smtp_line(sock)


def starttls_session(port: int, *, pipelined: bytes = b"") -> None:
    """A whole STARTTLS session: TLS, EHLO with AUTH, AUTH PLAIN, QUIT."""
    sock, reply = plain_then_starttls(port, pipelined=pipelined)
    assert reply.startswith(b"220 "), reply
    with TlsClient(port, sock=sock) as client:
        client.handshake()
        client.send(b"EHLO client.example\r\n")
        assert b"250 AUTH PLAIN\r\n" in client.read_until(b"250 AUTH PLAIN\r\n")
        client.send(b"AUTH PLAIN AHUAcA==\r\nQUIT\r\n")
        client.close_notify()
        ending = client.read_all(timeout=10)
    assert ending.data == b"235 ok, go ahead (#2.0.0)\r\n221 fake.example bye\r\n", ending
    assert ending.how == "close_notify"


def plain_quit(port: int) -> None:
    with connect(port) as sock:
        assert smtp_line(sock).startswith(b"220 ")
        sock.sendall(b"QUIT\r\n")
        assert serverproc.read_to_eof(sock, 10) == b"221 fake.example bye\r\n"


def events(log: Path, name: str) -> list[dict[str, object]]:
    return [entry for entry in smtpd_log(log) if entry["event"] == name]


@pytest.mark.parametrize("command", ["Y", "y"])
@pytest.mark.parametrize("order", ["reply first", "byte first"])
def test_ucspi_tls_y_and_Y(sslserver: Callable[..., Served], tmp_path: Path, command: str, order: str) -> None:
    """`y` starts TLS; `Y` also sends the blob (VAR=value\\0 entries only, then \\0) and closes the
    control socket. Either order of the 220 reply and the byte works."""
    log = tmp_path / "smtpd.log"
    options = [f"--command={command}"] + (["--byte-first"] if order == "byte first" else [])
    served = sslserver(["-n", "-v"], fake_smtpd(log, *options), warm=plain_quit)
    starttls_session(served.port)
    served.assert_clean()
    blobs = events(log, "blob")
    quits = events(log, "quit")
    if command == "Y":
        assert len(blobs) == 1
        raw = str(blobs[0]["raw"])
        assert raw.endswith("\0\0")
        entries = raw[:-2].split("\0")
        assert all("=" in entry and entry.index("=") > 0 for entry in entries), entries
        variables = blobs[0]["variables"]
        assert isinstance(variables, dict) and variables["SSL_PROTOCOL"] == "TLSv1.3"
        assert quits[-1]["control"] == "eof"  # closed after the blob: s6-style readers end too
    else:
        assert blobs == []
        assert quits[-1]["control"] in ("open", "eof")  # nothing was written to it


def test_ucspi_tls_Y_read_to_eof(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """An s6-style reader reads the blob until EOF: the server's close ends it."""
    log = tmp_path / "smtpd.log"
    served = sslserver(["-n", "-v"], fake_smtpd(log, "--blob=eof"), warm=plain_quit)
    starttls_session(served.port)
    served.assert_clean()
    raw = str(events(log, "blob")[-1]["raw"])
    assert raw.endswith("\0\0") and "SSL_PROTOCOL=TLSv1.3\0" in raw


def test_ucspi_tls_unknown_byte(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """A byte other than y and Y on the control socket is an error: logged, the connection closed,
    the program not left hanging."""
    log = tmp_path / "smtpd.log"
    served = sslserver(["-n", "-v"], fake_smtpd(log, "--command=x"), warm=plain_quit)
    sock, reply = plain_then_starttls(served.port)
    with sock:
        assert reply.startswith(b"220 ")
        closed_within(sock, 10)
    served.server.wait_for_log(r"^sslserver: warning: ", timeout=SETTLE)
    served.assert_clean()


def test_ucspi_tls_control_closed_without_a_command(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """The program closes SSLCTLFD without a byte (it declines TLS): the plain session goes on."""
    log = tmp_path / "smtpd.log"
    served = sslserver(["-n", "-v"], fake_smtpd(log, "--close-control"), warm=plain_quit)
    sock, reply = plain_then_starttls(served.port)
    with sock:
        assert reply.startswith(b"454 "), reply
        sock.sendall(b"NOOP\r\nQUIT\r\n")
        assert serverproc.read_to_eof(sock, 10) == b"250 ok\r\n221 fake.example bye\r\n"
    served.assert_clean()


def test_ucspi_tls_pipelined_plaintext_is_the_programs(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """Plaintext pipelined after STARTTLS reaches the program (which discards it, CVE-2011-0411),
    never the TLS layer: the handshake after it works."""
    log = tmp_path / "smtpd.log"
    served = sslserver(["-n", "-v"], fake_smtpd(log), warm=plain_quit)
    evil = b"MAIL FROM:<evil@example.test>\r\n"
    starttls_session(served.port, pipelined=evil)
    served.assert_clean()
    assert events(log, "discarded")[-1]["data"] == evil.decode()


def test_ucspi_tls_client_hello_before_the_program_asked(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """An SMTPS client at a -n port: its ClientHello is the program's (plaintext) input; the server
    starts no TLS, and the plain greeting is what the client gets."""
    log = tmp_path / "smtpd.log"
    served = sslserver(["-n", "-v"], fake_smtpd(log), warm=plain_quit)
    with connect(served.port) as sock:
        sock.sendall(client_hello() + b"\r\nQUIT\r\n")
        answer = serverproc.read_to_eof(sock, 10)
    assert answer.startswith(b"220 fake.example ESMTP fake_smtpd\r\n"), answer
    assert answer.endswith(b"221 fake.example bye\r\n")
    assert not [line for line in served.server.log() if b" accept" in line and b"tls" in line]
    served.assert_clean()


def test_ucspi_tls_handshake_failure_after_y(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """STARTTLS, then garbage instead of a ClientHello: logged, and the program does not hang."""
    log = tmp_path / "smtpd.log"
    served = sslserver(["-n", "-v", "-T", "10"], fake_smtpd(log, "--command=y"), warm=plain_quit)
    sock, reply = plain_then_starttls(served.port)
    with sock:
        assert reply.startswith(b"220 ")
        sock.sendall(HTTP_REQUEST)
        elapsed, _, _ = closed_within(sock, 10)
    assert elapsed < 5
    dropped(served)
    served.assert_clean()  # the program is gone too: SIGTERM or EOF, not a hang


# ---------------------------------------------------------------- limits and rules


def test_idle_handshakes_do_not_starve_established_sessions(sslserver: Callable[..., Served]) -> None:
    """-c 3 with one established session and two silent handshakes: the established one is served at
    once; a new client waits for a slot, which -T frees."""
    served = sslserver(["-v", "-c", "3", "-T", str(HANDSHAKE_TIMEOUT)])
    with TlsClient(served.port) as established:
        established.handshake()
        idle = [connect(served.port) for _ in range(2)]
        time.sleep(0.3)
        for round_number in range(5):
            started = time.monotonic()
            established.send(b"%d\n" % round_number)
            assert established.read_until(b"\n", timeout=5) == b"%d\n" % round_number
            assert time.monotonic() - started < 1
        started = time.monotonic()
        with TlsClient(served.port, timeout=HANDSHAKE_TIMEOUT + 10) as late:
            late.handshake()
            waited = time.monotonic() - started
            late.send(b"late\n")
            assert late.read_until(b"\n") == b"late\n"
            late.close_notify()
        assert 0.5 <= waited <= HANDSHAKE_TIMEOUT + 5, waited
        established.send(b"still here\n")
        assert established.read_until(b"\n") == b"still here\n"
        established.close_notify()
        for sock in idle:
            sock.close()
    served.assert_clean()


def test_rules_deny_before_any_tls(sslserver: Callable[..., Served], tmp_path: Path) -> None:
    """A denied client gets no ServerHello: the rules come before TLS."""
    rules = tmp_path / "rules.cdb"
    compiled = subprocess.run(
        [TOP / "bin" / "tcprules", rules, tmp_path / "rules.tmp"], input=b"127.0.0.1:deny\n", timeout=30, check=False
    )
    assert compiled.returncode == 0

    def denied(port: int) -> None:
        with connect(port) as sock:
            sock.sendall(client_hello())
            _, data, _ = closed_within(sock, 10)
        assert data == b""

    served = sslserver(["-v", "-x", str(rules)], ["/bin/cat"], warm=denied)
    denied(served.port)
    assert len(served.server.wait_for_log(r"^sslserver: deny ", count=2, timeout=SETTLE)) == 2
    assert not [line for line in served.server.log() if b"unable to accept" in line or b" accept" in line]
    served.assert_clean()


# ---------------------------------------------------------------- certificates at start-up


def start_failure(variables: dict[bytes, bytes], options: Sequence[str] = (), wrapper: Sequence[str] = ()) -> str:
    """sslserver that must not start: its exit code must be 111; its stderr."""
    result = subprocess.run(
        [*wrapper, SSLSERVER, "-1", *options, "127.0.0.1", "0", "/bin/true"],
        env={b"PATH": b"/usr/bin:/bin", **variables},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 111, result
    assert result.stdout == b"", result
    return result.stderr.decode(errors="replace")


@pytest.mark.parametrize(
    "case, text",
    [
        ("CERTFILE unset", "unable to load certificate"),
        ("CERTFILE missing", "unable to load certificate"),
        ("CERTFILE not a certificate", "unable to load certificate"),
        ("KEYFILE missing", "unable to load key"),
        ("KEYFILE empty, no key in CERTFILE", "unable to load key"),
        ("KEYFILE not a key", "unable to load key"),
        ("wrong key", "key does not match certificate"),
        ("encrypted key without -3", "unable to load key"),
    ],
)
def test_certificate_errors_at_start(tls_certs: Certificates, tmp_path: Path, case: str, text: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a PEM file\n")
    cert, key = os.fsencode(tls_certs.ec_cert), os.fsencode(tls_certs.ec_key)
    variables = {
        "CERTFILE unset": {b"KEYFILE": key},
        "CERTFILE missing": {b"CERTFILE": os.fsencode(tmp_path / "nowhere.pem"), b"KEYFILE": key},
        "CERTFILE not a certificate": {b"CERTFILE": os.fsencode(garbage), b"KEYFILE": key},
        "KEYFILE missing": {b"CERTFILE": cert, b"KEYFILE": os.fsencode(tmp_path / "nowhere.key")},
        "KEYFILE empty, no key in CERTFILE": {b"CERTFILE": cert, b"KEYFILE": b""},
        "KEYFILE not a key": {b"CERTFILE": cert, b"KEYFILE": os.fsencode(garbage)},
        "wrong key": {b"CERTFILE": cert, b"KEYFILE": os.fsencode(tls_certs.wrong_key)},
        "encrypted key without -3": {b"CERTFILE": cert, b"KEYFILE": os.fsencode(tls_certs.encrypted_key)},
    }[case]
    stderr = start_failure(variables)
    assert f"sslserver: fatal: {text}" in stderr, stderr


def test_combined_pem_with_empty_keyfile_serves(sslserver: Callable[..., Served], tls_certs: Certificates) -> None:
    served = sslserver(["-v"], CERTFILE=tls_certs.rsa_combined, KEYFILE="")
    echo_session(served.port)
    served.assert_clean()


def password_wrapper(tmp_path: Path, password: bytes) -> list[str]:
    """A command line that runs its arguments with fd 3 open on a file holding password + NUL."""
    secret = tmp_path / "password"
    secret.write_bytes(password + b"\0")
    return ["/bin/sh", "-c", f'exec "$@" 3< "{secret}"', "sh"]


def test_encrypted_key_with_password_on_fd3(tls_certs: Certificates, tmp_path: Path) -> None:
    variables = tls_certs.environment("ec")
    variables[b"KEYFILE"] = os.fsencode(tls_certs.encrypted_key)
    program = [PYTHON, "-c", MARKED, tmp_path / "marker"]
    wrapper = password_wrapper(tmp_path, tls_certs.password)
    with start_sslserver(["-3"], program, variables, wrapper=wrapper) as server:
        echo_session(server.port)
    wrong = password_wrapper(tmp_path, b"not the password")
    stderr = start_failure({b"CERTFILE": variables[b"CERTFILE"], b"KEYFILE": variables[b"KEYFILE"]}, ["-3"], wrong)
    assert "sslserver: fatal: unable to load key" in stderr, stderr


# ---------------------------------------------------------------- TERM during live sessions


def marked_processes(mark: bytes) -> list[int]:
    """pids whose environment holds the entry mark (the servers of this test and what they started)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if mark in environ.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_term_during_twenty_live_sessions(tls_certs: Certificates, tmp_path: Path) -> None:
    """TERM with 20 sessions open: the server exits at once, a new one binds the same port and serves
    at once, and all 20 sessions go on to their normal end; what carried them then exits."""
    mark = b"UCSPI_TLS_TEST_MARK=" + uuid.uuid4().hex.encode()
    variables = tls_certs.environment("ec") | dict([mark.split(b"=", 1)])
    first = start_sslserver(["-c", "40"], ["/bin/cat"], variables)
    second: serverproc.ServerProcess | None = None
    sessions: list[TlsClient] = []
    try:
        for number in range(20):
            client = TlsClient(first.port, timeout=20)
            client.handshake()
            client.send(b"before %d\n" % number)
            assert client.read_until(b"\n") == b"before %d\n" % number
            sessions.append(client)
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(3) == 0
        started = time.monotonic()
        second = start_sslserver([], ["/bin/cat"], tls_certs.environment("ec"), port=first.port)
        assert time.monotonic() - started < 3
        echo_session(second.port, line=b"new server\n")
        for number, client in enumerate(sessions):
            client.send(b"after %d\n" % number)
            assert client.read_until(b"\n") == b"after %d\n" % number
            client.close_notify()
            ending = client.read_all(timeout=10)
            assert ending.data == b"" and ending.how == "close_notify", (number, ending)
        assert wait_until(lambda: not marked_processes(mark), SETTLE), (
            f"left running after every session ended: {marked_processes(mark)}"
        )
    finally:
        for client in sessions:
            client.close()
        if second is not None:
            second.stop()
        first.stop()
        for pid in marked_processes(mark):  # only what this test's server started carries the mark
            os.kill(pid, signal.SIGKILL)
