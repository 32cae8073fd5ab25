"""TLS clients with exact control over what goes on the wire, for the sslserver tests.

TlsClient runs Python's ssl over a MemoryBIO pair on a plain blocking socket, so a test decides
every byte and its order: when the ClientHello leaves (and how: at once, or dribbled a byte at a
time), whether a close_notify is sent or only a TCP FIN (shutdown_write), or an RST (reset, via
SO_LINGER 0), and it can write raw bytes under the TLS layer (send_raw: oversize records). read_all
tells how the server ended: "close_notify", "eof" (a FIN with no close_notify: a truncation) or
"reset".

The module-level helpers make raw hostile input: a real ClientHello as bytes (client_hello), an
SSLv2-style hello, a record header of any length, and read what a server answers (raw_answer,
alerts_in).

Every wait is bounded: each call takes a timeout and raises TimeoutError when it runs out.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

TIMEOUT = 10.0
# Python's ssl reads at most this much plaintext per call.
CHUNK = 65536


def client_context(
    cafile: str | os.PathLike[str] | None = None,
    *,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    verify: bool = True,
    tls_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context: verifying against cafile (and the name) when verify, else trusting anything;
    with a client certificate when cert is given; pinned to one version when tls_version is."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify and cafile is not None:
        context.load_verify_locations(cafile=os.fspath(cafile))
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(os.fspath(cert), None if key is None else os.fspath(key))
    if tls_version is not None:
        context.minimum_version = context.maximum_version = tls_version
    return context


def connect(port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> socket.socket:
    """A connected TCP socket (IPv4 or IPv6 from the host's form), TCP_NODELAY on so that every
    send is its own segment (dribbling), blocking with a timeout."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, time 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already closed by the peer and gone: close() below is then all there is
    sock.close()


def dribble(sock: socket.socket, data: bytes, interval: float, size: int = 1) -> None:
    """data in segments of size bytes, interval seconds apart (TCP_NODELAY keeps them apart)."""
    for start in range(0, len(data), size):
        sock.sendall(data[start : start + size])
        if start + size < len(data):
            time.sleep(interval)


@dataclass(frozen=True)
class Ending:
    """What read_all got: the plaintext, then how the stream ended."""

    data: bytes
    how: str  # "close_notify", "eof" (FIN without close_notify), "reset"


class TlsClient:
    """One TLS connection over a MemoryBIO pair; see the module docstring."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        context: ssl.SSLContext | None = None,
        server_hostname: str | None = "localhost",
        sock: socket.socket | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.sock = sock if sock is not None else connect(port, host, timeout)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.context = context if context is not None else client_context(verify=False)
        self.obj = self.context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        self.timeout = timeout
        self.peer_closed = False  # the server's TCP FIN (or RST) has been seen
        self.reset_seen = False

    # ---------------------------------------------------------------- the wire

    def flush(self, *, interval: float | None = None, size: int = 1) -> int:
        """Send what the TLS layer has queued (records); dribbled size bytes at a time when
        interval is given. The number of bytes sent."""
        data = self.outgoing.read()
        if data:
            if interval is None:
                self.sock.sendall(data)
            else:
                dribble(self.sock, data, interval, size)
        return len(data)

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket, under the TLS layer (what was queued goes first)."""
        self.flush()
        self.sock.sendall(data)

    def _receive(self, deadline: float) -> bool:
        """One recv into the incoming BIO; False at the server's FIN or RST (EOF written to the BIO)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing from the server within {self.timeout} s")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(CHUNK)
        except ConnectionResetError:
            self.reset_seen = True
            chunk = b""
        if not chunk:
            self.peer_closed = True
            self.incoming.write_eof()
            return False
        self.incoming.write(chunk)
        return True

    # ---------------------------------------------------------------- TLS

    def handshake(self, timeout: float | None = None, *, interval: float | None = None, size: int = 1) -> None:
        """The whole handshake; with interval, every flight of ours (the ClientHello first) is
        dribbled size bytes at a time. ssl.SSLError (or ConnectionError) if the server refuses."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush(interval=interval, size=size)
                if self.peer_closed:
                    raise ConnectionResetError("the server closed during the handshake") from None
                self._receive(deadline)
        self.flush(interval=interval, size=size)  # our Finished

    def hello_only(self) -> bytes:
        """Send the ClientHello and nothing else (a client that never completes); the bytes sent."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        data = self.outgoing.read()
        self.sock.sendall(data)
        return data

    def send(self, data: bytes) -> None:
        """Application data, as records, at once."""
        self.obj.write(data)
        self.flush()

    def recv(self, timeout: float | None = None) -> bytes:
        """The next plaintext there is; b"" once the server's stream has ended (close_notify, FIN or
        RST: read_all tells them apart)."""
        return next(self._pieces(timeout), b"")

    def _pieces(self, timeout: float | None) -> Iterator[bytes]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                data = self.obj.read(CHUNK)
            except ssl.SSLWantReadError:
                self.flush()  # key updates, our replies to tickets: nothing is held back
                if self.peer_closed:
                    return
                self._receive(deadline)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return
            if not data:
                return  # close_notify
            yield data

    def read_until(self, marker: bytes, timeout: float | None = None) -> bytes:
        """Plaintext up to and including marker (more may follow it in the same read); ends early
        when the stream does."""
        data = bytearray()
        for piece in self._pieces(timeout):
            data += piece
            if marker in data:
                break
        return bytes(data)

    def read_all(self, timeout: float | None = None) -> Ending:
        """Plaintext to the end of the server's stream, and how it ended."""
        data = bytearray()
        ending = "eof"
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                piece = self.obj.read(CHUNK)
            except ssl.SSLWantReadError:
                self.flush()
                if self.peer_closed:
                    break
                self._receive(deadline)
                continue
            except ssl.SSLZeroReturnError:
                ending = "close_notify"
                break
            except ssl.SSLEOFError:
                break
            except ssl.SSLError:
                ending = "error"
                break
            if not piece:
                ending = "close_notify"
                break
            data += piece
        if self.reset_seen:
            ending = "reset"
        return Ending(bytes(data), ending)

    def close_notify(self) -> None:
        """Send our close_notify (TCP stays open both ways; reads go on)."""
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # it waits for the server's close_notify: we do not, here
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            pass
        self.flush()

    def shutdown_write(self) -> None:
        """A TCP FIN with no close_notify before it (a truncation, as the server sees it)."""
        self.flush()
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        reset(self.sock)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        """The socket's descriptor (select() takes a TlsClient)."""
        return self.sock.fileno()

    def version(self) -> str | None:
        return self.obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self.obj.cipher()

    def __enter__(self) -> TlsClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


# ---------------------------------------------------------------- raw hostile input


def client_hello(server_hostname: str | None = "localhost", context: ssl.SSLContext | None = None) -> bytes:
    """A real ClientHello (one or more TLS records) as Python's ssl sends it, with no socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = (context or client_context(verify=False)).wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def sslv2_hello() -> bytes:
    """An SSLv2-style CLIENT-HELLO (RFC 6101 appendix E.2 form: 2-byte header with the top bit set,
    msg_type 1, version 3.1, three cipher specs, no session id, a 16-byte challenge)."""
    specs = bytes.fromhex("00002f0000350000ff")  # AES128-SHA, AES256-SHA, the renegotiation SCSV
    challenge = os.urandom(16)
    body = bytes([1]) + b"\x03\x01" + struct.pack("!HHH", len(specs), 0, len(challenge)) + specs + challenge
    return struct.pack("!H", 0x8000 | len(body)) + body


def record_header(length: int, content_type: int = 22, version: int = 0x0301) -> bytes:
    """A TLS record header alone: type (22 = handshake, 23 = application data), version, length."""
    return struct.pack("!BHH", content_type, version, length)


HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: scanner\r\n\r\n"


def raw_answer(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[bytes, str]:
    """Everything the server sends until it closes, and how: "eof" or "reset"; TimeoutError if it
    never closes within timeout."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the server did not close within {timeout} s; got {bytes(data)[:200]!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(CHUNK)
        except ConnectionResetError:
            return bytes(data), "reset"
        except TimeoutError:
            continue
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def records(data: bytes) -> list[tuple[int, bytes]]:
    """The plaintext-framed TLS records in data, as (content type, body); a torn last one is left out."""
    found = []
    position = 0
    while position + 5 <= len(data):
        content_type, _, length = struct.unpack("!BHH", data[position : position + 5])
        body = data[position + 5 : position + 5 + length]
        if len(body) < length:
            break
        found.append((content_type, body))
        position += 5 + length
    return found


def alerts_in(data: bytes) -> list[tuple[int, int]]:
    """The unencrypted alerts (level, description) among those records: what a server sends before
    any key is agreed (40 handshake_failure, 70 protocol_version, 22 record_overflow, 50 decode_error)."""
    return [(body[0], body[1]) for content_type, body in records(data) if content_type == 21 and len(body) == 2]


# ---------------------------------------------------------------- the server process, from /proc


def open_descriptors(pid: int) -> int:
    """How many descriptors pid has open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def children_of(pid: int) -> list[int]:
    """pids whose parent is pid (every thread's children: /proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # that thread ended meanwhile
    return found


def zombies_of(pid: int) -> list[int]:
    """pid's children that are zombies (exited, not reaped)."""
    found = []
    for child in children_of(pid):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state == "Z":
            found.append(child)
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of pid in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid itself (not its children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Poll condition() until it is true or timeout passes; its last value as a bool."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# ---------------------------------------------------------------- the servers under test

TOP = Path(__file__).resolve().parents[2]
# The installed entry point names its interpreter itself: the program's environment is exactly
# what the test gives (tests/server/serverproc.py says why the launcher is not used).
# UCSPI_TEST_SSLSERVER runs the same tests against another build (a mutated copy, an install).
SSLSERVER = Path(os.environ.get("UCSPI_TEST_SSLSERVER") or TOP / ".venv" / "bin" / "sslserver")
FAKE_SMTPD = Path(__file__).with_name("fake_smtpd.py")
PYTHON = Path(sys.executable)

sys.path.insert(0, str(TOP / "tests" / "server"))
import serverproc  # noqa: E402  (tests/server/serverproc.py: start_server, ServerProcess)
import serverstate  # noqa: E402, F401  (tests/server/serverstate.py, for the tests here)


def start_sslserver(
    options: Sequence[str],
    program: Sequence[str | os.PathLike[str]],
    variables: Mapping[bytes, bytes] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    pass_fds: Sequence[int] = (),
    wrapper: Sequence[str | os.PathLike[str]] = (),
    command: Path = SSLSERVER,
    lookups: bool = False,
) -> serverproc.ServerProcess:
    """`sslserver -1 [-H -l localhost] OPTIONS HOST PORT PROGRAM` with PATH plus variables (CERTFILE, KEYFILE, ...) in
    its environment, listening; its port read from stdout (wrapper: a command line that runs it,
    as serverproc.launch says). A server that does not start raises RuntimeError with its stderr."""
    # No DNS unless asked for (lookups=True, with a DNSCACHEIP of the test's own): the resolver
    # of resolv.conf is not on loopback, and its timeouts would stall handshakes for seconds.
    # Options given after these win (-h).
    quiet = [] if lookups else ["-H", "-l", "localhost"]
    process = serverproc.launch(
        command,
        ["-1", *quiet, *options, host, str(port), *(os.fspath(part) for part in program)],
        environment=serverproc.plain_environment(variables),
        pass_fds=pass_fds,
        wrapper=wrapper,
    )
    assert process.stdout is not None and process.stderr is not None
    log = serverproc._LogLines()
    reader = threading.Thread(target=serverproc._collect, args=(process.stderr, log), daemon=True)
    reader.start()
    try:
        line = serverproc._read_line(process.stdout.fileno(), serverproc.START_TIMEOUT)
    except TimeoutError:
        process.kill()
        process.wait(5)
        raise
    if not line.endswith(b"\n") or not line[:-1].isdigit():
        process.wait(5)
        reader.join(1)
        raise RuntimeError(f"{command} did not start: stdout {line!r}, stderr {log.snapshot()!r}")
    return DetachedServer(process, int(line), reader, log)


class DetachedServer(serverproc.ServerProcess):
    """sslserver's supervised process serves nothing (ucspi/tls/detach.py): `pid` is its serving
    child's (fds, children, memory); stop() and signal() reach the supervised one, as a supervisor's do."""

    _serving = 0

    @property
    def pid(self) -> int:
        if not self._serving:
            try:
                children = children_of(self.process.pid)
            except OSError:
                children = []
            if len(children) != 1:
                return self.process.pid
            self._serving = children[0]
        return self._serving


def fake_smtpd(log: os.PathLike[str] | str, *options: str) -> list[str]:
    """The command line of tests/tls/fake_smtpd.py logging to log, with its options."""
    return [os.fspath(PYTHON), os.fspath(FAKE_SMTPD), f"--log={os.fspath(log)}", *options]


def smtpd_log(path: os.PathLike[str] | str) -> list[dict[str, object]]:
    """fake_smtpd's log: one dict per event (none yet: an empty list)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for servers that cannot take port 0 and say which (stunnel).
    Another process could take it before the server binds it: the server then fails to start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def listening_on(port: int) -> bool:
    """Some socket of this machine listens on TCP port (from /proc/net/tcp and tcp6: state 0A)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                return True
    return False


STUNNEL = Path("/usr/bin/stunnel4")


class Stunnel:
    """stunnel4 in daemon mode, in the foreground, one service `accept = HOST:PORT` with `exec =`
    program: the comparison point (README, Performance). stop() sends TERM to its pid only."""

    def __init__(
        self,
        directory: Path,
        cert: os.PathLike[str] | str,
        key: os.PathLike[str] | str,
        program: Sequence[str | os.PathLike[str]],
        *,
        host: str = "127.0.0.1",
        extra: Sequence[str] = (),
    ) -> None:
        self.port = free_port(host)
        config = directory / f"stunnel-{self.port}.conf"
        lines = [
            "foreground = yes",
            "pid =",
            "debug = 3",
            "[service]",
            f"accept = {host}:{self.port}",
            f"cert = {os.fspath(cert)}",
            f"key = {os.fspath(key)}",
            f"exec = {os.fspath(program[0])}",
            "execArgs = " + " ".join(os.fspath(part) for part in program),
            *extra,
        ]
        config.write_text("\n".join(lines) + "\n")
        self.log_path = directory / f"stunnel-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [os.fspath(STUNNEL), os.fspath(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

        def listening() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"stunnel did not start: {self.log_path.read_text(errors='replace')}")
            return listening_on(self.port)

        # Ready once the port listens (stunnel prints nothing useful on stdout); a probing
        # connection would cost a handshake failure and a program.
        if not wait_until(listening, 10):
            self.stop()
            raise RuntimeError(f"stunnel not listening on {self.port}: {self.log_path.read_text(errors='replace')}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> Stunnel:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
