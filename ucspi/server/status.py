"""The live status view: SIGUSR1's `stat` lines and --status-socket's JSON lines (README, Status view).

The view is made on the loop in one pass over the server's live connections (the slots of
loop.py), keeping the 100 busiest client addresses. The status socket is a UNIX stream socket
that writes the view to each client with one send that never waits (what does not fit in the
socket's buffer is dropped), then closes: it reads no commands, so no client can hold the loop.
Readers in a tight loop get the same view again for a moment that scales with its cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from ucspi.errors import EXIT_TEMPORARY, Fatal, error_text
from ucspi.server.limits import DEFAULT_LENGTHS
from ucspi.server.log import StatClient, StatSummary

MAX_CLIENTS = 100  # the busiest addresses shown; the rest are counted in the summary only
_ACCEPT_BATCH = 16  # status clients taken per wakeup: the accept loop of TCP clients comes first
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_V4_MAPPED = bytes(10) + b"\xff\xff"
# A view is served again, unchanged, for this many times what it cost to make: readers in a tight
# loop take at most about a tenth of the loop, however many connections the view goes through.
_REUSE_FACTOR = 10
_BACKOFF_SECONDS = 0.1  # out of descriptors: the socket waits that long, as the TCP listeners do


class LiveConnection(Protocol):
    """What the view needs of one live connection (connection.py's Connection)."""

    started: float  # time.monotonic() at accept

    def client_ip(self) -> bytes: ...


def _network_key(ip: bytes, lengths: tuple[int, int]) -> tuple[int, int] | bytes:
    """(bits, prefix) of the network an address is in; a v4-mapped address counts as IPv4.

    Text that is no address (never made by us) is its own network.
    """
    text = ip.split(b"%", 1)[0].decode("ascii", "replace")  # a link-local address's scope is no part of it
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text)
            if packed.startswith(_V4_MAPPED):
                packed = packed[12:]
        else:
            packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return ip
    bits = len(packed) * 8
    length = lengths[0] if bits == 32 else lengths[1]
    return bits, int.from_bytes(packed, "big") >> (bits - length) << (bits - length)


def _network_text(key: tuple[int, int] | bytes, lengths: tuple[int, int]) -> bytes:
    if isinstance(key, bytes):
        return key
    bits, prefix = key
    family, length = (socket.AF_INET, lengths[0]) if bits == 32 else (socket.AF_INET6, lengths[1])
    return b"%s/%d" % (socket.inet_ntop(family, prefix.to_bytes(bits // 8, "big")).encode(), length)


def network_of(ip: bytes, lengths: tuple[int, int] = DEFAULT_LENGTHS) -> bytes:
    """The prefix an address belongs to, `10.1.2.0/24` or `2001:db8::/64`."""
    return _network_text(_network_key(ip, lengths), lengths)


def client_lines(
    live: Iterable[LiveConnection], now: float, lengths: tuple[int, int] = DEFAULT_LENGTHS
) -> list[StatClient]:
    """One StatClient per client address with live connections, the busiest first (MAX_CLIENTS of them).

    One pass over the live connections, one network key per address; text only for those shown.
    """
    by_ip: dict[bytes, list] = {}  # ip -> [connections, oldest start]
    for connection in live:
        ip = connection.client_ip()
        entry = by_ip.get(ip)
        if entry is None:
            by_ip[ip] = [1, connection.started]
        else:
            entry[0] += 1
            if connection.started < entry[1]:
                entry[1] = connection.started
    networks = {ip: _network_key(ip, lengths) for ip in by_ip}
    by_network: dict[tuple[int, int] | bytes, int] = {}
    for ip, (count, _) in by_ip.items():
        key = networks[ip]
        by_network[key] = by_network.get(key, 0) + count
    busiest = heapq.nlargest(MAX_CLIENTS, by_ip.items(), key=lambda item: (item[1][0], -item[1][1]))
    return [
        StatClient(
            ip,
            count,
            max(0, int(now - oldest)),
            _network_text(networks[ip], lengths),
            by_network[networks[ip]],
        )
        for ip, (count, oldest) in busiest
    ]


def json_lines(summary: StatSummary, clients: list[StatClient], name: bytes = b"tcpserver") -> bytes:
    """The view as JSON lines, summary first: each line the one --log=json writes for the same event
    (logformats.JsonFormat: `prog` first, then `ev`, the same keys and escapes)."""
    from ucspi.server.logformats import JsonFormat  # as log.py does: only a server that is asked loads it

    formatter = JsonFormat(name)
    return b"".join([formatter.format(summary, 1), *(formatter.format(client, 1) for client in clients)])


def _fatal(text: bytes, error: OSError) -> Fatal:
    return Fatal(b"tcpserver: fatal: " + text + b": " + error_text(error).encode(), EXIT_TEMPORARY, error.errno)


class StatusSocket:
    """--status-socket: made before -u/-g and owned by the ids they give, served on the loop."""

    def __init__(self, listener: socket.socket, path: bytes) -> None:
        self.listener = listener
        self.path = path
        self._inode = os.stat(path).st_ino  # removed at exit only while the path is still ours
        self._view: Callable[[], bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = b""
        self._last_until = 0.0  # time.monotonic() up to which _last is served as it is

    @classmethod
    def bind(cls, path: bytes, uid: int = 0, gid: int = 0) -> StatusSocket:
        """Bound, listening, mode 0600, chowned to uid/gid (0 leaves each alone); Fatal (111) when it cannot be."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            _remove_stale(path)
            # Made 0600 by bind itself, so no moment in which the file is open to others (only the
            # server's thread runs yet), and no chmod by path, which would follow what the path
            # became meanwhile.
            umask = os.umask(0o177)
            try:
                listener.bind(path)
            finally:
                os.umask(umask)
            if uid or gid:
                _chown_socket_file(path, uid or -1, gid or -1)
            listener.listen(64)
        except OSError as error:
            listener.close()
            raise _fatal(b"unable to bind status socket " + path, error) from None
        return cls(listener, path)

    def start(self, loop: asyncio.AbstractEventLoop, view: Callable[[], bytes]) -> None:
        self._loop = loop
        self._view = view
        loop.add_reader(self.listener.fileno(), self._serve_clients)

    def _serve_clients(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                client, _ = self.listener.accept()  # close-on-exec: never a program's
            except BlockingIOError:
                return
            except OSError:
                # Out of descriptors: readable still, so a reader would wake the loop at once,
                # again and again; the client waits in the backlog instead.
                assert self._loop is not None
                self._loop.remove_reader(self.listener.fileno())
                self._loop.call_later(
                    _BACKOFF_SECONDS, self._loop.add_reader, self.listener.fileno(), self._serve_clients
                )
                return
            try:
                self._answer(client, self._current_view())
            finally:
                client.close()

    def _current_view(self) -> bytes:
        began = time.monotonic()
        if began < self._last_until:
            return self._last
        assert self._view is not None
        view = self._view()
        ended = time.monotonic()
        self._last, self._last_until = view, ended + _REUSE_FACTOR * (ended - began)
        return view

    @staticmethod
    def _answer(client: socket.socket, view: bytes) -> None:
        with contextlib.suppress(OSError):
            client.send(view, _SEND_FLAGS)  # a reader too slow for its buffer gets the view cut short
            client.shutdown(socket.SHUT_WR)
            # What the client wrote is read away: closing on unread data would reset the connection.
            for _ in range(4):
                if not client.recv(65536, socket.MSG_DONTWAIT):
                    break

    def remove(self) -> None:
        """At exit (from the loop or the TERM thread): the socket file goes, if it is still ours."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def _chown_socket_file(path: bytes, uid: int, gid: int) -> None:
    """chown the socket file at path, never what whoever may write its directory put there since
    bind (as root, a symlink followed would give any file to the -u user): not a socket, it is
    EADDRINUSE."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        try:
            os.chown(b"/proc/self/fd/%d" % fd, uid, gid)  # the file opened, whatever the path names now
        except FileNotFoundError:  # no /proc: a symlink's own owner changes, not its target's
            os.chown(path, uid, gid, follow_symlinks=False)
    finally:
        os.close(fd)


def _remove_stale(path: bytes) -> None:
    """A socket file nobody listens on (a server that was killed) makes way; a live one is EADDRINUSE."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return  # bind will say what is wrong
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
