"""A real tcpserver process (ours or the original) and clients talking to it over loopback.

start_server() runs `tcpserver -1 ... HOST 0 PROGRAM`, reads the port from its stdout and
collects its stderr lines in a thread; ServerProcess.stop() sends SIGTERM to that pid only.
talk() is one client: connect (from a chosen 127.0.0.N if asked), send, shut down the write
side, read to EOF, all within a time limit.

Test modules in tests/server import this file as `serverproc`; tests/compat puts tests/server
on sys.path first. Every wait here has a bound.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

TOP = Path(__file__).resolve().parents[2]
# bin/tcpserver finds python3 on PATH, and a pyenv shim there adds PYENV_* variables on its way;
# the installed entry point names its interpreter itself, so the program's environment is exactly
# what the test gave, with or without PATH.
OURS = TOP / "bin" / "tcpserver"
OURS_INSTALLED = TOP / ".venv" / "bin" / "tcpserver"
ORIGINAL = Path("/usr/bin/tcpserver")
ORIGINAL_TCPRULES = Path("/usr/bin/tcprules")
OUR_TCPRULES = TOP / "bin" / "tcprules"


def original_available() -> bool:
    return os.access(ORIGINAL, os.X_OK)


@dataclass(frozen=True)
class Implementation:
    """One tcpserver to test: `command` needs PATH in its environment, `bare_command` does not."""

    name: str
    command: Path
    bare_command: Path


OUR_SERVER = Implementation("ours", OURS_INSTALLED, OURS_INSTALLED)

# UCSPI_NO_EXTENSION=1 in the tests' own environment (.ci/run's second pass, README Tests): every
# tcpserver of ours that launch() starts gets it too, so it spawns through the ctypes fallback. The
# tests give the server exact environments, and the server hides the variable from its programs,
# so what a program sees is compared as usual.
FALLBACK_FORCED = os.environ.get("UCSPI_NO_EXTENSION") == "1"
_FORCE_FALLBACK = b"UCSPI_NO_EXTENSION=1"


def _is_our_tcpserver(command: Path) -> bool:
    """Ours from the checkout, installed, or wrapped (tests/server/test_spawn_paths.py): not a C one."""
    path = Path(command)
    return path.name == "tcpserver" and path != ORIGINAL and not path.is_relative_to("/opt/ucspi-tcp-ipv6")
ORIGINAL_SERVER = Implementation("original", ORIGINAL, ORIGINAL)


DEFAULT_PATH = b"/usr/local/bin:/usr/bin:/bin"
START_TIMEOUT = 10.0
LOG_TIMEOUT = 5.0

# Starts a program with exactly the environment entries given, duplicates and entries without
# `=` included: execve(argv[2], argv[2:], entries of the NUL-separated file argv[1]).
_RAW_EXEC = r"""
import ctypes, os, sys
with open(sys.argv[1], "rb") as source:
    block = source.read()
os.unlink(sys.argv[1])
entries = [entry for entry in block.split(b"\0") if entry] if block else []
args = [os.fsencode(arg) for arg in sys.argv[2:]]
libc = ctypes.CDLL(None, use_errno=True)
argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
envp = (ctypes.c_char_p * (len(entries) + 1))(*entries, None)
libc.execve(args[0], argv, envp)
os.write(2, b"raw exec failed: %d\n" % ctypes.get_errno())
os._exit(127)
"""


def plain_environment(variables: Mapping[bytes, bytes] | None = None) -> list[bytes]:
    """PATH (the launcher finds python3 through it) plus variables, as raw entries."""
    entries = [b"PATH=" + os.environb.get(b"PATH", DEFAULT_PATH)]
    entries += [name + b"=" + value for name, value in (variables or {}).items()]
    return entries


class ServerProcess:
    """A running tcpserver: its pid, port, stdout after the port line, and stderr lines."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, reader: threading.Thread, log: _LogLines) -> None:
        self.process = process
        self.port = port
        self._reader = reader
        self._log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> list[bytes]:
        """The stderr lines so far (without their newlines)."""
        return self._log.snapshot()

    def wait_for_log(self, pattern: str | bytes, count: int = 1, timeout: float = LOG_TIMEOUT) -> list[bytes]:
        """The first `count` lines matching the regex, waiting for them; AssertionError when too slow."""
        regex = re.compile(os.fsencode(pattern))
        lines = self._log.wait(lambda lines: len([line for line in lines if regex.search(line)]) >= count, timeout)
        matching = [line for line in lines if regex.search(line)]
        assert len(matching) >= count, f"no {count} lines like {pattern!r} in {lines!r}"
        return matching[:count]

    def rest_of_stdout(self, timeout: float = 2.0) -> bytes:
        """What comes on stdout after the port line, up to EOF; TimeoutError if EOF never comes."""
        assert self.process.stdout is not None
        return _read_to_eof(self.process.stdout.fileno(), timeout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, number: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, number)

    def wait(self, timeout: float = 5.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM to the server's pid (the original and ours exit 0 at once); its exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
            raise
        finally:
            self._reader.join(0.5)
            if self.process.stdout is not None:
                self.process.stdout.close()
            # Programs still running hold the log pipe: closing it under the reader thread would
            # wait for them (a buffered read holds the stream's lock). The thread ends at EOF.
            if self.process.stderr is not None and not self._reader.is_alive():
                self.process.stderr.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.process.poll() is None:
            self.stop()
        else:
            self._reader.join(0.5)


class _LogLines:
    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._changed = threading.Condition()

    def add(self, line: bytes) -> None:
        with self._changed:
            self._lines.append(line)
            self._changed.notify_all()

    def snapshot(self) -> list[bytes]:
        with self._changed:
            return list(self._lines)

    def wait(self, enough: Callable[[list[bytes]], bool], timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not enough(self._lines):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return list(self._lines)


def _collect(stream: object, log: _LogLines) -> None:
    # Ends at EOF: when the server and every child holding its stderr have gone.
    for line in stream:  # type: ignore[attr-defined]
        log.add(line.rstrip(b"\n"))


def _read_fd(fd: int, timeout: float, *, one_line: bool) -> bytes:
    """fd to EOF, or one line read byte by byte (nothing after it is consumed); TimeoutError if slow."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while not (one_line and data.endswith(b"\n")):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {'line' if one_line else 'EOF'} within {timeout} s; got {bytes(data)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 if one_line else 65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _read_to_eof(fd: int, timeout: float) -> bytes:
    return _read_fd(fd, timeout, one_line=False)


def _read_line(fd: int, timeout: float) -> bytes:
    """One line from fd; b'' (or the partial line) on EOF before a newline."""
    return _read_fd(fd, timeout, one_line=True)


def launch(
    command: Path,
    arguments: Sequence[str | bytes],
    *,
    environment: Sequence[bytes] | None = None,
    pass_fds: Sequence[int] = (),
    cwd: str | os.PathLike[str] | None = None,
    ignore_signals: Sequence[int] = (),
    wrapper: Sequence[str | os.PathLike[str]] = (),
) -> subprocess.Popen[bytes]:
    """tcpserver with these arguments and exactly these environment entries (default: PATH only);
    wrapper: a command line that runs it (its arguments follow), as `env`, `unshare` or `nice`."""
    entries = plain_environment() if environment is None else list(environment)
    if FALLBACK_FORCED and _is_our_tcpserver(command) and _FORCE_FALLBACK not in entries:
        # Not twice: a duplicate entry takes the raw exec, whose Python leaves XFSZ ignored.
        entries.append(_FORCE_FALLBACK)

    def ignore() -> None:
        for number in ignore_signals:
            signal.signal(number, signal.SIG_IGN)

    preexec = ignore if ignore_signals else None
    argv = [*(os.fsencode(part) for part in wrapper), os.fsencode(command)]
    argv += [os.fsencode(argument) for argument in arguments]
    simple = all(b"=" in entry[1:] for entry in entries)
    names = [entry.split(b"=", 1)[0] for entry in entries]
    if simple and len(set(names)) == len(names):
        env = dict(entry.split(b"=", 1) for entry in entries)
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            pass_fds=tuple(pass_fds),
            cwd=cwd,
            preexec_fn=preexec,
        )
    # Duplicates, entries without `=`, the empty name: only a raw execve can express them.
    block_fd, block_path = tempfile.mkstemp(prefix="tcpserver-env-")
    with os.fdopen(block_fd, "wb") as block:
        block.write(b"".join(entry + b"\0" for entry in entries))
    return subprocess.Popen(
        [sys.executable, "-S", "-c", _RAW_EXEC, os.fsencode(block_path), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={},
        pass_fds=tuple(pass_fds),
        cwd=cwd,
        preexec_fn=preexec,
    )


def start_server(
    command: Path,
    options: Sequence[str | bytes],
    program: Sequence[str | bytes],
    *,
    host: str = "127.0.0.1",
    environment: Sequence[bytes] | None = None,
    pass_fds: Sequence[int] = (),
    cwd: str | os.PathLike[str] | None = None,
    ignore_signals: Sequence[int] = (),
    wrapper: Sequence[str | os.PathLike[str]] = (),
) -> ServerProcess:
    """`COMMAND -1 OPTIONS HOST 0 PROGRAM`, started and listening, its port read from stdout."""
    process = launch(
        command,
        ["-1", *options, host, "0", *program],
        environment=environment,
        pass_fds=pass_fds,
        cwd=cwd,
        ignore_signals=ignore_signals,
        wrapper=wrapper,
    )
    assert process.stdout is not None and process.stderr is not None
    log = _LogLines()
    reader = threading.Thread(target=_collect, args=(process.stderr, log), name="tcpserver-stderr", daemon=True)
    reader.start()
    try:
        line = _read_line(process.stdout.fileno(), START_TIMEOUT)
    except TimeoutError:
        process.kill()
        process.wait(5)
        raise
    if not line.endswith(b"\n") or not line[:-1].isdigit():
        process.wait(5)
        reader.join(1)
        raise RuntimeError(f"{command} did not start: stdout {line!r}, stderr {log.snapshot()!r}")
    return ServerProcess(process, int(line), reader, log)


# ---------------------------------------------------------------- clients


def connect(port: int, *, host: str = "127.0.0.1", source: str | None = None, timeout: float = 5.0) -> socket.socket:
    """A connected client socket, bound first to (source, 0) when a source address is given."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.settimeout(timeout)
        if source is not None:
            client.bind((source, 0))
        client.connect((host, port))
    except BaseException:
        client.close()
        raise
    return client


def _receive(client: socket.socket, timeout: float, *, one_line: bool) -> bytes:
    """From the server to EOF (a reset counts as the end), or one line byte by byte (nothing after
    it is lost; a reset raises); TimeoutError if it does not come within timeout."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while not (one_line and data.endswith(b"\n")):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {'line' if one_line else 'EOF'} within {timeout} s; got {bytes(data)!r}")
        client.settimeout(left)
        try:
            chunk = client.recv(1 if one_line else 65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            if one_line:
                raise
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_to_eof(client: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes; TimeoutError if it does not within timeout."""
    return _receive(client, timeout, one_line=False)


def read_line(client: socket.socket, timeout: float = 5.0) -> bytes:
    """One line from the server (byte by byte, so nothing after it is lost)."""
    return _receive(client, timeout, one_line=True)


def talk(
    port: int,
    send: bytes = b"",
    *,
    host: str = "127.0.0.1",
    source: str | None = None,
    timeout: float = 5.0,
) -> bytes:
    """One whole client: connect, send, shut down the write side, read to EOF."""
    with connect(port, host=host, source=source, timeout=timeout) as client:
        if send:
            client.sendall(send)
        try:
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may have closed already (deny)
        return read_to_eof(client, timeout)


# ---------------------------------------------------------------- what to expect


def environment_entries(block: bytes) -> list[bytes]:
    """/proc/PID/environ (NUL-terminated entries) as a list."""
    return block.split(b"\0")[:-1] if block else []


def pathexec_environment(initial: Sequence[bytes], changes: Sequence[tuple[bytes, bytes | None]]) -> list[bytes]:
    """The original's pathexec_env_run, retold: what the program's environment must be.

    For each change the first entry NAME=... is removed (the last entry takes its place), then
    NAME=VALUE is appended unless the change is a removal.
    """
    entries = list(initial)
    for name, value in changes:
        for position, entry in enumerate(entries):
            if entry.startswith(name + b"="):
                last = entries.pop()
                if position < len(entries):
                    entries[position] = last
                break
        if value is not None:
            entries.append(name + b"=" + value)
    return entries


def tcp_changes(
    local_ip: str,
    local_port: int | str,
    remote_ip: str,
    remote_port: int | str,
    *,
    local_host: bytes | None = None,
    remote_host: bytes | None = None,
    remote_info: bytes | None = None,
) -> list[tuple[bytes, bytes | None]]:
    """tcpserver's own changes, in the original's order (docs/behaviour.md §6.7); None removes the variable."""
    return [
        (b"PROTO", b"TCP"),
        (b"TCPLOCALIP", local_ip.encode()),
        (b"TCPLOCALPORT", str(local_port).encode()),
        (b"TCPLOCALHOST", local_host),
        (b"TCPREMOTEIP", remote_ip.encode()),
        (b"TCPREMOTEPORT", str(remote_port).encode()),
        (b"TCPREMOTEHOST", remote_host),
        (b"TCPREMOTEINFO", remote_info),
    ]


_PORT_VARIABLE = re.compile(rb"^(TCPLOCALPORT|TCPREMOTEPORT)=\d+$")


def mask_ports(entries: Sequence[bytes]) -> list[bytes]:
    """TCPLOCALPORT and TCPREMOTEPORT values replaced by PORT, for comparing two servers."""
    return [_PORT_VARIABLE.sub(rb"\1=PORT", entry) for entry in entries]


_VERDICT = re.compile(rb"^tcpserver: (ok|deny) \d+ ([^ ]*):(\d+) ([^ ]*):(\d+)$")
_PID_LINE = re.compile(rb"^tcpserver: (pid|end) \d+ ")


def mask_log_line(line: bytes) -> bytes:
    """A log line with pids and ports replaced by PID and PORT (docs/behaviour.md §6.10 layout)."""
    verdict = _VERDICT.match(line)
    if verdict:
        kind, local, _, remote, _ = verdict.groups()
        return b"tcpserver: %s PID %s:PORT %s:PORT" % (kind, local, remote)
    return _PID_LINE.sub(rb"tcpserver: \1 PID ", line)


def rules_cdb(directory: Path, text: str | bytes, name: str = "rules.cdb", tcprules: Path | None = None) -> Path:
    """TEXT compiled to DIRECTORY/NAME by tcprules (the original when installed, else ours)."""
    if tcprules is None:
        tcprules = ORIGINAL_TCPRULES if os.access(ORIGINAL_TCPRULES, os.X_OK) else OUR_TCPRULES
    cdb = directory / name
    data = text.encode() if isinstance(text, str) else text
    result = subprocess.run(
        [os.fspath(tcprules), os.fspath(cdb), os.fspath(directory / (name + ".tmp"))],
        input=data,
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return cdb
