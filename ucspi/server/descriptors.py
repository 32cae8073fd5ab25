"""One gate for the descriptors the server's lookups open (DNS and ident sockets).

The original's lookups run in each client's own child, with its own descriptor table: they never
find the table full. Ours share one table with every accepted connection, so a lookup that meets
EMFILE (or ENFILE, ENOBUFS, ENOMEM) waits here for a descriptor instead of failing. Waiters queue
in arrival order; only the head tries again, when someone calls released() or after a short retry
interval, and each waiter that gets its socket lets the next one try at once. While anyone waits,
`starved` is true and the accept loop takes no new client (it is told through `on_relieved` when
the wait is over).

One descriptor is kept in reserve (a /dev/null opened once there is room): when every descriptor is
held by connections whose lookups have not started, nothing would ever be released, so the head
waiter takes the reserve's place. The reserve is opened again on the next release with nobody
waiting.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
from collections.abc import Callable

# Errors that say "no descriptor or buffer now", not "this socket cannot exist".
_SHORTAGE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# How long the head waiter sleeps when no release wakes it (a descriptor closed outside our sight).
RETRY_SECONDS = 0.025


class DescriptorGate:
    """Sockets for lookups that never fail for lack of a descriptor: they wait their turn."""

    def __init__(self, retry_seconds: float = RETRY_SECONDS) -> None:
        self.retry_seconds = retry_seconds
        self.on_relieved: Callable[[], None] | None = None
        # One future per waiter, oldest first; the head's is resolved to let it try again.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._retry: asyncio.TimerHandle | None = None
        self._reserve: int | None = None

    @property
    def starved(self) -> bool:
        """A lookup is waiting for a descriptor."""
        return bool(self._waiters)

    async def socket(self, family: int, kind: int) -> socket.socket:
        """A new non-blocking socket; waits (never fails) while descriptors are short.

        Other errors (an unsupported family, say) are raised as socket.socket raises them.
        """
        if not self._waiters:
            sock = self._try_socket(family, kind)
            if sock is not None:
                return sock
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiters.append(turn)
        try:
            while True:
                if turn is self._waiters[0]:
                    self._arm_retry(loop)
                await turn
                sock = self._try_socket(family, kind)
                if sock is not None:
                    return sock
                # Still short: keep the head of the line and wait for the next release or retry.
                turn = loop.create_future()
                self._waiters[0] = turn
        finally:
            self._leave(turn, loop)

    def released(self) -> None:
        """A descriptor was closed: the head waiter tries again; with nobody waiting, refill the reserve."""
        if self._waiters:
            self._wake_head()
        elif self._reserve is None:
            self._open_reserve()

    # -- internals --------------------------------------------------------------------------

    def _try_socket(self, family: int, kind: int) -> socket.socket | None:
        for _ in range(2):
            try:
                sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            except OSError as error:
                if error.errno not in _SHORTAGE_ERRORS:
                    raise
                if self._reserve is None:
                    return None
                # The reserve's descriptor becomes this socket's (the lowest free number).
                os.close(self._reserve)
                self._reserve = None
                continue
            if self._reserve is None and not self._waiters:
                self._open_reserve()
            return sock
        return None

    def _open_reserve(self) -> None:
        try:
            self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._reserve = None

    def _arm_retry(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._retry is None:
            self._retry = loop.call_later(self.retry_seconds, self._on_retry)

    def _on_retry(self) -> None:
        self._retry = None
        self._wake_head()

    def _wake_head(self) -> None:
        if self._waiters and not self._waiters[0].done():
            self._waiters[0].set_result(None)

    def _leave(self, turn: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        """A waiter leaves the line (with its socket, or cancelled): the next one tries at once."""
        was_head = bool(self._waiters) and self._waiters[0] is turn
        try:
            self._waiters.remove(turn)
        except ValueError:
            pass
        if not self._waiters:
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            loop.call_soon(self._relieved)
        elif was_head:
            # Another descriptor may be free already; if not, the new head re-arms the retry.
            self._wake_head()

    def _relieved(self) -> None:
        # Called later, on the loop: a waiter that came meanwhile keeps the gate starved.
        if not self._waiters and self.on_relieved is not None:
            self.on_relieved()


DESCRIPTORS = DescriptorGate()
