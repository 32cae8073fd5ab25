"""One gate for the descriptors the server opens for its clients: DNS and ident sockets, rules files.

The original's lookups run in each client's own child, with its own descriptor table: they never
find the table full. Ours share one table with every accepted connection, so a lookup that meets
EMFILE (or ENFILE, ENOBUFS, ENOMEM) waits here for a descriptor instead of failing. Waiters queue
in arrival order; only the head tries again, when someone calls released() or after a short retry
interval, and each waiter that gets its socket lets the next one try at once. While anyone waits,
`starved` is true and the accept loop takes no new client (it is told through `on_relieved` when
the wait is over). The rules file's open waits the same way (`opened`): the original opens it in
each child, whose table is never full.

Two things keep a full table from becoming a hang:
- One descriptor is kept in reserve (/dev/null), opened only while another is still free. When
  every descriptor is held by connections whose lookups have not started, nothing would ever be
  released: the head waiter takes the reserve's place, and the chain of releases starts.
- If nothing can come back (no lookup socket of ours is open, no release for STUCK_SECONDS), the
  waiters fail with their error, as every lookup failed before the gate: a lookup without its
  answer is better than a connection, and an accept loop, held for good.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
from collections.abc import Callable
from typing import TypeVar

_Opened = TypeVar("_Opened")

# Errors that say "no descriptor or buffer now", not "this socket cannot exist".
SHORTAGE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# How long the head waiter sleeps when no release wakes it (a descriptor closed outside our sight).
RETRY_SECONDS = 0.025
# Waiting with none of our sockets open and no release meanwhile: nothing will come back.
STUCK_SECONDS = 1.0


class DescriptorGate:
    """Sockets for lookups that never fail for lack of a descriptor while one can come back."""

    def __init__(self, retry_seconds: float = RETRY_SECONDS, stuck_seconds: float = STUCK_SECONDS) -> None:
        self.retry_seconds = retry_seconds
        self.stuck_seconds = stuck_seconds
        self.on_relieved: Callable[[], None] | None = None
        # One future per waiter, oldest first; the head's is resolved to let it try again. Read
        # by the accept loop for each client (empty: nobody waits), as `starved` says.
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._retry: asyncio.TimerHandle | None = None
        self._reserve: int | None = None
        self._open_sockets = 0  # handed out by socket(), not yet given to close()
        self._last_progress = 0.0  # loop time of the last release or socket handed out
        self._last_shortage: OSError | None = None
        self._used = False  # a lookup asked for a socket: the reserve is worth keeping

    @property
    def starved(self) -> bool:
        """A lookup is waiting for a descriptor."""
        return bool(self.waiters)

    async def socket(self, family: int, kind: int) -> socket.socket:
        """A new non-blocking socket; waits while descriptors are short (see the module's notes).

        Other errors (an unsupported family, say) are raised as socket.socket raises them.
        """
        sock = await self.opened(lambda: socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC))
        self._open_sockets += 1  # given back through close()
        return sock

    async def opened(self, open_: Callable[[], _Opened]) -> _Opened:
        """open_()'s result, called again while it fails for want of a descriptor (SHORTAGE_ERRORS).

        Its other errors are raised as it raises them; a shortage nothing can relieve is raised
        after stuck_seconds.
        """
        loop = asyncio.get_running_loop()
        self._used = True
        if not self.waiters:
            found, opened = self._try(open_, loop)
            if found:
                return opened  # type: ignore[return-value]
        turn: asyncio.Future[None] = loop.create_future()
        if not self.waiters:
            self._last_progress = max(self._last_progress, loop.time())  # the wait starts now
        self.waiters.append(turn)
        try:
            while True:
                if turn is self.waiters[0]:
                    self._arm_retry(loop)
                await turn
                found, opened = self._try(open_, loop)
                if found:
                    return opened  # type: ignore[return-value]
                # Still short: keep the head of the line and wait for the next release or retry.
                turn = loop.create_future()
                self.waiters[0] = turn
        finally:
            self._leave(turn, loop)

    def close(self, sock: socket.socket) -> None:
        """Close a socket this gate gave out, and let a waiter have its descriptor."""
        sock.close()
        self._open_sockets -= 1
        self.released()

    def released(self) -> None:
        """A descriptor was closed: the head waiter tries again; with nobody waiting, refill the reserve.

        Called on the loop's thread, for every connection closed: without lookups (the gate
        never used) it costs nothing.
        """
        if self.waiters:
            self._last_progress = asyncio.get_running_loop().time()
            self._wake_head()
        elif self._reserve is None and self._used:
            self._open_reserve()

    # -- internals --------------------------------------------------------------------------

    def _try(self, open_: Callable[[], _Opened], loop: asyncio.AbstractEventLoop) -> tuple[bool, _Opened | None]:
        """(True, what open_ gave), or (False, None) while descriptors are short."""
        for _ in range(2):
            try:
                opened = open_()
            except OSError as error:
                if error.errno not in SHORTAGE_ERRORS:
                    raise
                self._last_shortage = error
                if self._reserve is None:
                    return False, None
                # The reserve's descriptor becomes the new one's (the lowest free number).
                os.close(self._reserve)
                self._reserve = None
                continue
            self._last_progress = loop.time()
            if self._reserve is None and not self.waiters:
                self._open_reserve()
            return True, opened
        return False, None

    def _open_reserve(self) -> None:
        """Hold one descriptor back, but never the last free one: the accept loop needs it too."""
        try:
            reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            os.close(reserve)
            return
        self._reserve = reserve

    def _arm_retry(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._retry is None:
            self._retry = loop.call_later(self.retry_seconds, self._on_retry, loop)

    def _on_retry(self, loop: asyncio.AbstractEventLoop) -> None:
        self._retry = None
        if not self._open_sockets and loop.time() - self._last_progress >= self.stuck_seconds:
            self._fail_waiters()
        else:
            self._wake_head()

    def _fail_waiters(self) -> None:
        shortage = self._last_shortage or OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        for turn in self.waiters:
            if not turn.done():
                turn.set_exception(OSError(shortage.errno, shortage.strerror))

    def _wake_head(self) -> None:
        if self.waiters and not self.waiters[0].done():
            self.waiters[0].set_result(None)

    def _leave(self, turn: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        """A waiter leaves the line (with its socket, failed or cancelled): the next one tries at once."""
        was_head = bool(self.waiters) and self.waiters[0] is turn
        try:
            self.waiters.remove(turn)
        except ValueError:
            pass
        if not self.waiters:
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            loop.call_soon(self._relieved)
        elif was_head:
            # Another descriptor may be free already; if not, the new head re-arms the retry.
            self._wake_head()

    def _relieved(self) -> None:
        # Called later, on the loop: a waiter that came meanwhile keeps the gate starved.
        if not self.waiters and self.on_relieved is not None:
            self.on_relieved()


DESCRIPTORS = DescriptorGate()
