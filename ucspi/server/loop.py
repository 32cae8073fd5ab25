"""The accept loop: the -c slots, accepting, signals, and the faults no connection owns (docs/behaviour.md §6.5).

Everything runs on one uvloop loop, but for posix_spawn calls made from worker threads under
load (children.py). Each accepted client becomes a Connection (connection.py), which holds a
slot from accept until it is denied, dropped or its program has been reaped; at the limit the
listener leaves the loop's poll set, so new clients wait in the kernel's backlog as with the
original.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import threading
from collections.abc import Sequence

# Imported before -u/-g take effect: the installed package may not be readable afterwards.
import uvloop

from ucspi.errors import EXIT_TEMPORARY
from ucspi.rules.database import RulesFile
from ucspi.server.children import Children
from ucspi.server.connection import Connection, start_eagerly
from ucspi.server.descriptors import DESCRIPTORS
from ucspi.server.limits import Limits
from ucspi.server.log import Fatal, Log, Warned, sanitize
from ucspi.server.notify import Notifier
from ucspi.server.options import ServerOptions
from ucspi.server.peer import PeerFacts
from ucspi.server.spawn import Environment, Spawner, first_values

# Accepting several clients per wakeup saves a poll round trip each under load.
_ACCEPT_BATCH = 32
# Out of descriptors or memory: stop accepting for a moment instead of spinning.
_ACCEPT_BACKOFF_SECONDS = 0.1
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _fixed_local(bound: tuple) -> tuple | None:
    """A listener's address when every connection's local end is it; None for a wildcard."""
    return None if bound[0] in ("0.0.0.0", "::") else bound


def _endpoint_text(address: tuple) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


class Slot:
    """One of the -c slots, held by one connection; given back once, however often asked."""

    __slots__ = ("_server",)

    def __init__(self, server: Server) -> None:
        self._server: Server | None = server

    def give_back(self) -> None:
        server = self._server
        if server is not None:
            self._server = None
            server.slot_given_back()


class Server:
    def __init__(
        self,
        options: ServerOptions,
        listeners: Sequence[socket.socket],
        spawner: Spawner,
        environment: Environment,
        facts: PeerFacts,
        log: Log,
        notifier: Notifier | None = None,
        connection_class: type[Connection] = Connection,
    ) -> None:
        self.options = options
        self.limit = options.limit
        self.listeners = list(listeners)
        self.notifier = notifier
        self.connection_class = connection_class  # sslserver's adds the TLS steps to the path
        self.spawner = spawner
        self.environment = environment
        self.facts = facts
        self.log = log
        self.rules = RulesFile(options.rules_path) if options.rules_path is not None else None
        # The start-up environment as getenv sees it: MAXCONNIP, MAXCONIP, MAXCONNC, DIEMSG.
        self.limits = Limits.configured(options.max_per_ip, options.max_per_net, first_values(environment.initial))
        self.slots_taken = 0
        # Bound to one address, every connection's local end is its listener's: no getsockname.
        self._readers = [(listener, _fixed_local(listener.getsockname())) for listener in self.listeners]
        self.pid = os.getpid()
        self._accepting = False
        self._backing_off = False
        self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        self.children: Children
        self._tasks: set[asyncio.Task] = set()

    # -- the listener ---------------------------------------------------------------------

    def run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._on_loop_exception)
        threading.excepthook = lambda hook: self.internal_error(hook.exc_value)  # no traceback in the log
        self.children = Children(loop, self.spawner, self.die, self._resume, self.internal_error)
        # Reaping: uvloop refuses add_signal_handler(SIGCHLD), but a plain handler works; it
        # only schedules a waitpid(WNOHANG) round on the loop, so no descriptor per child.
        signal.signal(signal.SIGCHLD, self.children.on_sigchld)
        DESCRIPTORS.on_relieved = self._resume
        # Written once the loop holds its own descriptors, so nothing can fail after it but clients.
        self.log.status(0, self.limit)
        self._resume()
        if self.notifier is not None:
            # Listening, and -u/-g already applied (cli/tcpserver.py): what READY=1 promises.
            endpoints = [_endpoint_text(listener.getsockname()) for listener in self.listeners]
            self.notifier.ready(endpoints, self.slots_taken, self.limit, loop)
        loop.run_forever()

    def die(self, text: bytes) -> None:
        """A server that can no longer serve exits, so that its supervisor starts a new one."""
        self.log.emit(Fatal(text))
        os._exit(EXIT_TEMPORARY)

    def _can_accept(self) -> bool:
        return (
            self.slots_taken < self.limit
            and self.children.can_take_more
            and not DESCRIPTORS.starved  # lookups waiting for a descriptor come first
            and not self._backing_off
        )

    def _resume(self) -> None:
        if not self._accepting and self._can_accept():
            for listener, fixed_local in self._readers:
                self.loop.add_reader(listener.fileno(), self._accept_clients, listener, fixed_local)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting:
            for listener, _ in self._readers:
                self.loop.remove_reader(listener.fileno())
            self._accepting = False

    def _end_backoff(self) -> None:
        self._backing_off = False
        self._resume()

    def _accept_clients(self, listener: socket.socket, fixed_local: tuple | None) -> None:
        # Everything waiting is accepted first: a client found alone may be spawned inline.
        accepted = []
        for _ in range(_ACCEPT_BATCH):
            if not self._can_accept():
                self._pause()
                break
            try:
                # The raw descriptor: a socket object would cost a getsockname (CPython checks the fd).
                accepted.append(listener._accept())
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno in _RESOURCE_ERRORS:
                    self._pause()
                    self._backing_off = True
                    self.loop.call_later(_ACCEPT_BACKOFF_SECONDS, self._end_backoff)
                break
            self.slots_taken += 1
            self._slots_changed()
        self.children.alone = len(accepted) == 1
        for index, (fd, remote) in enumerate(accepted):
            # Each connection owns its slot from here on; a fault while starting one drops only it.
            connection = self.connection_class(self, fd, remote, Slot(self), fixed_local)
            try:
                start_eagerly(connection.run(), self.loop, self._tasks)
            except Exception as error:
                connection.internal_error(error)
            if index == 0:
                self.children.alone = False  # only the first of a batch may have come alone

    def slot_given_back(self) -> None:
        self.slots_taken -= 1
        self._resume()
        self._slots_changed()

    def _slots_changed(self) -> None:
        """The status line, and the supervisor's STATUS= (at most one a second)."""
        self.log.status(self.slots_taken, self.limit)
        if self.notifier is not None:
            self.notifier.status(self.slots_taken, self.limit)

    def internal_error(self, error: BaseException | None) -> None:
        """A fault no connection owns: said in one line, and the loop goes on."""
        name = type(error).__name__ if error is not None else "unknown"
        self.log.emit(Warned(b"internal error: " + sanitize(name.encode())))

    def _on_loop_exception(self, _loop: asyncio.AbstractEventLoop, context: dict) -> None:
        self.internal_error(context.get("exception"))
