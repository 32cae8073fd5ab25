"""Readiness for a supervisor: sd_notify's datagrams to $NOTIFY_SOCKET (README, Supervisors).

The socket is connected before -u/-g (the path may be writable by root only), is
non-blocking and close-on-exec: a full or absent receiver costs a dropped datagram, never a
wait, and no program gets the descriptor.
"""

from __future__ import annotations

import asyncio
import socket
import time

from ucspi.errors import error_text

# systemd shows STATUS= in `systemctl status`; one update a second is plenty and costs nothing.
STATUS_INTERVAL_SECONDS = 1.0


class Notifier:
    __slots__ = ("_last_sent", "_loop", "_pending", "_prefix", "_socket", "_status")

    def __init__(self, notify_socket: socket.socket) -> None:
        self._socket = notify_socket
        self._prefix = b""
        self._status = b""
        self._last_sent = 0.0
        self._pending = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def connect(cls, address: bytes) -> Notifier:
        """address as systemd writes it: a path, or `@name` for the abstract namespace. OSError if refused."""
        if address.startswith(b"@"):
            address = b"\0" + address[1:]
        notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            notify_socket.connect(address)
        except OSError:
            notify_socket.close()
            raise
        return cls(notify_socket)

    def _send(self, message: bytes) -> None:
        try:
            self._socket.send(message)
        except OSError:
            pass  # EAGAIN, or the receiver gone: readiness never stalls the server

    def ready(self, endpoints: list[str], connections: int, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._prefix = ("listening on " + ", ".join(endpoints) + ", ").encode()
        self._status = b"%d/%d" % (connections, limit)
        self._last_sent = time.monotonic()
        self._send(b"READY=1\nSTATUS=" + self._prefix + self._status)

    def status(self, connections: int, limit: int) -> None:
        """Called at every change of the count: sent now if a second has passed, else once at the second."""
        self._status = b"%d/%d" % (connections, limit)
        if self._pending or self._loop is None:
            return
        wait = self._last_sent + STATUS_INTERVAL_SECONDS - time.monotonic()
        if wait <= 0:
            self._send_status()
        else:
            self._pending = True
            self._loop.call_later(wait, self._send_status)

    def _send_status(self) -> None:
        self._pending = False
        self._last_sent = time.monotonic()
        self._send(b"STATUS=" + self._prefix + self._status)

    def stopping(self) -> None:
        """From the TERM thread just before the exit: one non-blocking send, safe beside the loop."""
        self._send(b"STOPPING=1")


def notifier_from(address: bytes | None) -> tuple[Notifier | None, str | None]:
    """The notifier for $NOTIFY_SOCKET, or None with the reason it could not connect."""
    if not address:
        return None, None
    try:
        return Notifier.connect(address), None
    except OSError as error:
        return None, error_text(error)
