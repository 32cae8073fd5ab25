"""The accept loop: the -c slots, accepting, signals, and the faults no connection owns (docs/behaviour.md §6.5).

Everything runs on one uvloop loop, the spawns and the reaping too (children.py: the C
extension's clone never waits for the exec; the fallback's posix_spawn runs in threads under
load). Each accepted client becomes a Connection
(connection.py), which holds a slot from accept until it is denied, dropped or its program has
been reaped; at the limit the listener leaves the loop's poll set, so new clients wait in the
kernel's backlog as with the original. The live slots are the registry the status view reads (status.py).

Signals arrive as events (cli/tcpserver.py's sigwait thread hands them to on_signal): ALRM, and
TERM under --drain, drain (README, Signals); USR1 writes the status view. 0.88's TERM exits
from that thread itself, whatever the loop is doing.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

# Imported before -u/-g take effect: the installed package may not be readable afterwards.
import uvloop

from ucspi.errors import EXIT_TEMPORARY
from ucspi.rules.database import RulesFile
from ucspi.server.children import Children, EngineChildren, make_children
from ucspi.server.connection import Connection, accepted_ip
from ucspi.server.descriptors import DESCRIPTORS
from ucspi.server.limits import DEFAULT_LENGTHS, Limits
from ucspi.server.log import Draining, Exiting, Fatal, Log, SignalTaken, StatSummary, Warned, sanitize
from ucspi.server.notify import Notifier
from ucspi.server.options import ServerOptions
from ucspi.server.peer import PeerFacts
from ucspi.server.spawn import USE_EXTENSION, Environment, Spawner, _extension, first_values
from ucspi.server.status import StatusSocket, client_lines, json_lines

# Accepting several clients per wakeup saves a poll round trip each under load.
_ACCEPT_BATCH = 32
# Out of descriptors or memory: stop accepting for a moment instead of spinning.
_ACCEPT_BACKOFF_SECONDS = 0.1
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# ALRM's deadline for the programs when --drain is not given; then TERM+CONT, and KILL this much later.
DEFAULT_DRAIN_SECONDS = 30.0
KILL_AFTER_SECONDS = 2.0
# After the KILL: the reaper's moment to give each program its end line, should one linger.
_REAP_GRACE_SECONDS = 1.0


def _accept_batch(listener: socket.socket, most: int) -> tuple[list[tuple[int, tuple]], int]:
    """Up to most clients, each (descriptor, address); the errno that ended the batch, 0 for none
    waiting. The extension's takes them without raising for the empty queue."""
    if USE_EXTENSION:
        return _extension.accept_batch(listener.fileno(), most)
    accepted: list[tuple[int, tuple]] = []
    while len(accepted) < most:
        try:
            # The raw descriptor: a socket object would cost a getsockname (CPython checks the fd).
            accepted.append(listener._accept())
        except BlockingIOError:
            return accepted, 0
        except OSError as error:
            return accepted, error.errno or 0
    return accepted, 0


def _fixed_local(bound: tuple) -> tuple | None:
    """A listener's address when every connection's local end is it; None for a wildcard."""
    return None if bound[0] in ("0.0.0.0", "::") else bound


def _endpoint_text(address: tuple) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


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
        status_socket: StatusSocket | None = None,
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
        # Whether a connection's path may wait before its rules (Connection.start).
        self.path_waits = bool(
            options.proxy_from is not None or options.no_delay or options.banner or facts.needs_lookups
        )
        # The start-up environment as getenv sees it: MAXCONNIP, MAXCONIP, MAXCONNC, DIEMSG.
        self.limits = Limits.configured(options.max_per_ip, options.max_per_net, first_values(environment.initial))
        self.slots_taken = 0
        # The status view's counters (USR1, --status-socket) and its registry of live connections.
        self.accepted = 0
        self.denied = 0  # by the rules
        self.refused = 0  # by -C, --max-per-ip, --max-per-net
        self.live: set[Connection] = set()  # each holds a slot, from accept until it gives it back
        self.started = time.monotonic()
        self.status_socket = status_socket
        # Every change of the slots taken is told only where someone listens: -v's status lines, the supervisor.
        self._slots_watched = log.verbose or notifier is not None
        self.draining = False
        self._drain_phase: asyncio.TimerHandle | None = None
        self._killing = False
        # Bound to one address, every connection's local end is its listener's: no getsockname.
        self._readers = [(listener, _fixed_local(listener.getsockname())) for listener in self.listeners]
        self.pid = os.getpid()
        self._accepting = False
        self._backing_off = False
        self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        self.children: Children | EngineChildren
        self.tasks: set[asyncio.Task] = set()  # connections' paths waiting on the loop

    # -- the listener ---------------------------------------------------------------------

    def run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._on_loop_exception)
        threading.excepthook = lambda hook: self.internal_error(hook.exc_value)  # no traceback in the log
        # Nor for what Python can only ignore (a client's non-ASCII SNI name, undecodable for its callback).
        sys.unraisablehook = lambda unraisable: self.internal_error(unraisable.exc_value)
        self.children = make_children(loop, self.spawner, self.die, self._resume, self.internal_error)
        DESCRIPTORS.on_relieved = self._resume
        # Written once the loop holds its own descriptors, so nothing can fail after it but clients.
        self.log.status(0, self.limit)
        self._resume()
        if self.notifier is not None:
            # Listening, and -u/-g already applied (cli/tcpserver.py): what READY=1 promises.
            endpoints = [_endpoint_text(listener.getsockname()) for listener in self.listeners]
            self.notifier.ready(endpoints, self.slots_taken, self.limit, loop)
        if self.status_socket is not None:
            self.status_socket.start(loop, self.status_json)
        # What start-up made lives as long as the server: a full collection need not walk it.
        gc.freeze()
        loop.run_forever()

    def die(self, text: bytes) -> None:
        """A server that can no longer serve exits, so that its supervisor starts a new one."""
        self.log.emit(Fatal(text))
        if self.status_socket is not None:
            self.status_socket.remove()
        os._exit(EXIT_TEMPORARY)

    # -- signals (on the loop) ----------------------------------------------------------------

    def on_signal(self, number: int) -> None:
        """ALRM, TERM under --drain, and USR1, handed over by the signal thread once the loop runs."""
        name = signal.Signals(number).name[3:].encode()
        if number == signal.SIGUSR1:
            self.log.emit(SignalTaken(name, b"stat"))
            self.write_status()
        elif self.draining:
            self.log.emit(SignalTaken(name, b"harden"))
            self._harden()
        else:
            self.log.emit(SignalTaken(name, b"drain"))
            self.drain(self._drain_seconds(number))

    def _drain_seconds(self, number: int) -> float:
        """--drain's deadline if given; else TERM's own (sslserver's child), else ALRM's 30 s."""
        if self.options.drain is not None:
            return self.options.drain
        if number == signal.SIGTERM and self.options.term_drain is not None:
            return self.options.term_drain
        return DEFAULT_DRAIN_SECONDS

    def drain(self, deadline_seconds: float) -> None:
        """No new client from now on; those accepted finish their path; the programs get deadline_seconds."""
        self.draining = True
        self._pause()
        for listener, _ in self._readers:
            listener.close()  # a new connect is refused from this instant
        self._readers = []
        if self.notifier is not None:
            self.notifier.stopping()
        self.log.emit(Draining(self.slots_taken, deadline_seconds))
        if not self.live:
            self.exit(0)
        self._drain_phase = self.loop.call_later(deadline_seconds, self._stop_programs)

    def _harden(self) -> None:
        """A second TERM or ALRM: the deadline is now."""
        if not self._killing:
            if self._drain_phase is not None:
                self._drain_phase.cancel()
            self._stop_programs()

    def _stop_programs(self) -> None:
        self._killing = True
        self.children.signal_all(signal.SIGTERM)
        self.children.signal_all(signal.SIGCONT)  # a stopped program must see its TERM
        self._drain_phase = self.loop.call_later(KILL_AFTER_SECONDS, self._kill_programs)

    def _kill_programs(self) -> None:
        self.children.signal_all(signal.SIGKILL)
        # Each KILLed program is reaped and logged, then the last slot given back exits; this bounds
        # it for connections still in their lookups, which have no program to end.
        self._drain_phase = self.loop.call_later(_REAP_GRACE_SECONDS, self.exit, 0)

    def exit(self, code: int) -> None:
        if self._killing:
            # A program started after the KILL (its lookups ended late) is not left behind either.
            self.children.signal_all(signal.SIGKILL)
        self.log.emit(Exiting(code))
        if self.status_socket is not None:
            self.status_socket.remove()
        os._exit(code)

    # -- the status view ----------------------------------------------------------------------

    def status_view(self) -> tuple[StatSummary, list]:
        now = time.monotonic()
        summary = StatSummary(
            self.slots_taken,
            self.limit,
            self.accepted,
            self.denied,
            self.refused,
            max(0, int(now - self.started)),
        )
        lengths = self.limits.lengths if self.limits is not None else DEFAULT_LENGTHS
        return summary, client_lines(self.live, now, lengths)

    def write_status(self) -> None:
        """USR1: the summary, then a line per client address (written at -Q and -v, never at -q)."""
        if not self.log.verbosity:
            return
        summary, clients = self.status_view()
        self.log.emit(summary)
        for client in clients:
            self.log.emit(client)

    def status_json(self) -> bytes:
        return json_lines(*self.status_view(), self.log.name)  # sslserver's view says sslserver

    def _can_accept(self) -> bool:
        return (
            self.slots_taken < self.limit
            and not DESCRIPTORS.waiters  # lookups waiting for a descriptor come first (its `starved`)
            and not self._backing_off
            and self.children.can_take_more
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
        if not self._can_accept():
            self._pause()
            return
        # The slots bound the batch; nothing else _can_accept asks changes while it is taken.
        most = min(_ACCEPT_BATCH, self.limit - self.slots_taken)
        children = self.children
        if children.starts_at_once:
            # The first client's program starts before the queue is looked at again: that look
            # (an accept that usually finds nobody) is no longer on its way to the program.
            accepted, error = _accept_batch(listener, 1)
            if accepted:
                self._start_clients(accepted, fixed_local)
                if most > 1 and self._can_accept():
                    accepted, error = _accept_batch(listener, min(most - 1, self.limit - self.slots_taken))
                    if accepted:
                        self._start_clients(accepted, fixed_local)
        else:
            # Everything waiting is accepted first: a client found alone may be spawned inline.
            accepted, error = _accept_batch(listener, most)
            children.alone = len(accepted) == 1
            self._start_clients(accepted, fixed_local)
        if error in _RESOURCE_ERRORS:
            self._pause()
            self._backing_off = True
            self.loop.call_later(_ACCEPT_BACKOFF_SECONDS, self._end_backoff)
        elif not self._can_accept():
            self._pause()

    def _start_clients(self, accepted: list[tuple[int, tuple]], fixed_local: tuple | None) -> None:
        """Each accepted client takes a slot and becomes a connection; a fault starting one drops only it."""
        taken = len(accepted)
        self.slots_taken += taken
        self.accepted += taken
        if self._slots_watched or self.log.accepts:  # nothing is built for nobody
            for taken_then, client in enumerate(accepted, start=self.slots_taken - taken + 1):
                if self.log.accepts:
                    self._log_accept(*client, fixed_local, taken_then)
                self._slots_changed(taken_then)
        connection_class = self.connection_class
        for index, (fd, remote) in enumerate(accepted):
            try:
                connection = connection_class(self, fd, remote, fixed_local)
            except Exception as error:  # not a connection: nothing else would close it
                self._not_started(fd, error)
                continue
            connection.start()
            if index == 0:
                self.children.alone = False  # only the first of a batch may have come alone

    def _not_started(self, fd: int, error: Exception) -> None:
        try:
            self.internal_error(error)
        finally:
            try:
                os.close(fd)
            finally:
                DESCRIPTORS.released()
                self.slot_given_back()

    def slot_given_back(self) -> None:
        self.slots_taken -= 1
        if not self._accepting:
            self._resume()
        if self._slots_watched:
            self._slots_changed(self.slots_taken)
        if self.draining and not self.live:
            # The last connection is over: its lines are written; exit once the caller's are done.
            self.loop.call_soon(self.exit, 0)

    def _slots_changed(self, taken: int) -> None:
        """The status line, and the supervisor's STATUS= (at most one a second)."""
        self.log.status(taken, self.limit)
        if self.notifier is not None:
            self.notifier.status(taken, self.limit)

    def _log_accept(self, fd: int, remote: tuple, fixed_local: tuple | None, taken: int) -> None:
        """The structured modes' `accept` event: the client's and the local address, the slots taken.

        Never raises: the clients of this batch are not connections yet, and nothing else would close them.
        """
        from ucspi.server.log import Accepted

        try:
            local = fixed_local
            if local is None:
                try:
                    sock = socket.socket(fileno=fd)
                    try:
                        local = sock.getsockname()
                    finally:
                        sock.detach()
                except OSError:
                    pass  # left out of the event; the connection's path says what is wrong
            ip = accepted_ip(remote, self.options.mapped_as_ipv6)
            lip = None if local is None else accepted_ip(local, self.options.mapped_as_ipv6)
            self.log.emit(Accepted(ip, remote[1], lip, None if local is None else local[1], taken))
        except Exception as error:
            self.internal_error(error)

    def internal_error(self, error: BaseException | None) -> None:
        """A fault no connection owns: said in one line, and the loop goes on."""
        name = type(error).__name__ if error is not None else "unknown"
        self.log.emit(Warned(b"internal error: " + sanitize(name.encode())))

    def _on_loop_exception(self, _loop: asyncio.AbstractEventLoop, context: dict) -> None:
        self.internal_error(context.get("exception"))
