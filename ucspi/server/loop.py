"""The accept loop: the -c limit, each client's decision, spawning, reaping, signals (spec 6.5).

Everything runs on one uvloop loop, but for posix_spawn calls made from worker threads under
load. A connection takes a slot when it is accepted and gives it back when it is denied, dropped
or its program has been reaped; at the limit the listener leaves the loop's poll set, so new
clients wait in the kernel's backlog as with the original.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import signal
import socket
import threading
from collections.abc import Callable, Iterator

# Imported before -u/-g take effect: the installed package may not be readable afterwards.
import uvloop

from ucspi.errors import error_text
from ucspi.rules.database import RulesFile
from ucspi.rules.lookup import NO_RULE, Decision
from ucspi.server.log import Log, verdict_line
from ucspi.server.options import ServerOptions
from ucspi.server.peer import Peer, PeerFacts
from ucspi.server.spawn import Environment, Spawner, tcp_variables

# Accepting several clients per wakeup saves a poll round trip each under load.
_ACCEPT_BATCH = 32
# Out of descriptors or memory: stop accepting for a moment instead of spinning.
_ACCEPT_BACKOFF_SECONDS = 0.1
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
# Two spawning threads keep both cores busy with starting programs on this 2-core class of machine.
_SPAWN_THREADS = 2
_MAX_WAITING_SPAWNS = 16


@contextlib.contextmanager
def _socket_of(fd: int) -> Iterator[socket.socket]:
    """A socket object over a connection's descriptor for one use; the descriptor stays ours."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


class SpawnThreads:
    """posix_spawn from a few worker threads, so the ~0.5 ms a vfork'd child takes to exec holds
    neither the loop nor (ctypes releases it) the GIL: accepting goes on while programs start.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        spawner: Spawner,
        on_spawned: Callable[[int, Peer, int, OSError | None], None],
        count: int,
    ) -> None:
        self._loop = loop
        self._spawner = spawner
        self._on_spawned = on_spawned
        self._jobs: queue.SimpleQueue[tuple[int, list[bytes], Peer]] = queue.SimpleQueue()
        for number in range(count):
            threading.Thread(target=self._work, name=f"spawn-{number}", daemon=True).start()

    def submit(self, connection: int, environment: list[bytes], peer: Peer) -> None:
        self._jobs.put((connection, environment, peer))

    def _work(self) -> None:
        # SIGCHLD goes to the loop's thread; the child's own mask is set by the spawn attributes.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        while True:
            connection, environment, peer = self._jobs.get()
            pid, failure = 0, None
            try:
                pid = self._spawner.spawn(connection, environment)
            except OSError as error:
                failure = error
            self._loop.call_soon_threadsafe(self._on_spawned, connection, peer, pid, failure)


class Server:
    def __init__(
        self,
        options: ServerOptions,
        listener: socket.socket,
        spawner: Spawner,
        environment: Environment,
        facts: PeerFacts,
        log: Log,
    ) -> None:
        self.options = options
        self.limit = options.limit
        self.listener = listener
        self.spawner = spawner
        self.environment = environment
        self.facts = facts
        self.log = log
        self.rules = RulesFile(options.rules_path) if options.rules_path is not None else None
        self.children = 0
        # Bound to one address, every connection's local end is the listener's: no getsockname.
        bound = listener.getsockname()
        self._fixed_local: tuple | None = None if bound[0] in ("0.0.0.0", "::") else bound
        self.pid = os.getpid()
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._spawn_threads: SpawnThreads | None = None
        self._spawns_in_flight = 0
        self._alone = False  # the last wakeup found one client only
        self._reap_scheduled = False
        # Children spawned and not yet reaped; ends reaped before their spawn was reported back.
        self._running: set[int] = set()
        self._early_ends: dict[int, int] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- the listener ---------------------------------------------------------------------

    def run(self) -> None:
        loop = self._loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        # SIGTERM: exit 0 at once, children left running, as the original.
        loop.add_signal_handler(signal.SIGTERM, os._exit, 0)
        # Reaping: uvloop refuses add_signal_handler(SIGCHLD), but a plain handler works; it
        # only schedules a waitpid(WNOHANG) round on the loop, so no descriptor per child.
        signal.signal(signal.SIGCHLD, self._on_sigchld)
        self._spawn_threads = SpawnThreads(loop, self.spawner, self._spawned, _SPAWN_THREADS)
        # Written once the loop holds its own descriptors, so nothing can fail after it but clients.
        self.log.status(0, self.limit)
        self._resume()
        loop.run_forever()

    def _can_accept(self) -> bool:
        # Connections waiting for a spawning thread hold a descriptor each: keep them few, as the
        # original, whose parent hands each one to its child at once, holds one at a time.
        return self.children < self.limit and self._spawns_in_flight < _MAX_WAITING_SPAWNS

    def _resume(self) -> None:
        if not self._accepting and self._can_accept():
            assert self._loop is not None
            self._loop.add_reader(self.listener.fileno(), self._accept_clients)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting:
            assert self._loop is not None
            self._loop.remove_reader(self.listener.fileno())
            self._accepting = False

    def _accept_clients(self) -> None:
        # Everything waiting is accepted first: a client found alone may be spawned inline.
        accepted = []
        for _ in range(_ACCEPT_BATCH):
            if not self._can_accept():
                self._pause()
                break
            try:
                # The raw descriptor: a socket object would cost a getsockname (CPython checks the fd).
                accepted.append(self.listener._accept())
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno in _RESOURCE_ERRORS:
                    self._pause()
                    assert self._loop is not None
                    self._loop.call_later(_ACCEPT_BACKOFF_SECONDS, self._resume)
                break
            self.children += 1
            self.log.status(self.children, self.limit)
        self._alone = len(accepted) == 1
        for connection, remote in accepted:
            self._begin(connection, remote)

    def _free_slot(self) -> None:
        if self.children:
            self.children -= 1
        self.log.status(self.children, self.limit)
        self._resume()

    def _drop(self, connection: int, text: bytes) -> None:
        self.log.drop(text)
        os.close(connection)
        self._free_slot()

    # -- one connection, in the original's order -------------------------------------------------

    def _begin(self, connection: int, remote: tuple[str, int]) -> None:
        options = self.options
        if options.no_delay or options.banner:
            sent = len(options.banner)
            failure: OSError | None = None
            with _socket_of(connection) as sock:
                if options.no_delay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if options.banner:
                    try:
                        sent = sock.send(options.banner, _SEND_FLAGS)
                    except OSError as error:
                        failure = error
            if failure is not None:
                self._drop(connection, b"unable to print banner: " + error_text(failure).encode())
                return
            if sent < len(options.banner):
                self._spawn_task(self._finish_banner_then_gather(connection, remote, sent))
                return
        self._gather(connection, remote)

    def _spawn_task(self, coroutine) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_banner_then_gather(self, connection: int, remote: tuple[str, int], sent: int) -> None:
        assert self._loop is not None
        with _socket_of(connection) as sock:
            sock.setblocking(False)
            try:
                await self._loop.sock_sendall(sock, self.options.banner[sent:])
                failure = None
            except OSError as error:
                failure = error
            sock.setblocking(True)  # the program gets a blocking socket, as from the original
        if failure is not None:
            self._drop(connection, b"unable to print banner: " + error_text(failure).encode())
            return
        self._gather(connection, remote)

    def _gather(self, connection: int, remote: tuple[str, int]) -> None:
        local = self._fixed_local
        if local is None:
            try:
                with _socket_of(connection) as sock:
                    local = sock.getsockname()
            except OSError as error:
                self._drop(connection, b"unable to get local address: " + error_text(error).encode())
                return
        if self.facts.needs_lookups:
            self._spawn_task(self._gather_then_decide(connection, local, remote))
        else:
            self._decide(connection, self.facts.known(local, remote))

    async def _gather_then_decide(
        self, connection: int, local: tuple[str, int], remote: tuple[str, int]
    ) -> None:
        try:
            peer = await self.facts.gather(local, remote)
        except Exception as error:  # the lookups catch what they expect; never leak a slot
            self._drop(connection, b"unable to look up the client: " + os.fsencode(repr(error)))
            return
        self._decide(connection, peer)

    def _decide(self, connection: int, peer: Peer) -> None:
        decision: Decision = NO_RULE
        if self.rules is not None:
            try:
                decision = self.rules.decide(peer.rules_ip, peer.remote_host, peer.remote_info)
            except FileNotFoundError as error:
                if not self.options.allow_missing_rules:
                    self._drop_rules(connection, error)
                    return
            except OSError as error:
                self._drop_rules(connection, error)
                return
        if decision.deny:
            # No child for a denied client (differences item 1): the server's pid in the line.
            if self.log.verbose:
                self.log.verdict(self._verdict(b"deny", self.pid, peer))
            os.close(connection)
            self._free_slot()
            return
        self._spawn(connection, peer, decision)

    def _drop_rules(self, connection: int, error: OSError) -> None:
        assert self.options.rules_path is not None
        self._drop(connection, b"unable to read " + self.options.rules_path + b": " + error_text(error).encode())

    @staticmethod
    def _verdict(verdict: bytes, pid: int, peer: Peer) -> bytes:
        return verdict_line(
            verdict,
            pid,
            peer.local_host,
            peer.local_ip,
            peer.local_port,
            peer.remote_host,
            peer.remote_ip,
            peer.remote_info,
            peer.remote_port,
        )

    def _spawn(self, connection: int, peer: Peer, decision: Decision) -> None:
        changes = tcp_variables(peer)
        if decision.data:
            changes.extend(decision.environment)
        environment = self.environment.build(changes)
        if self._alone and not self._spawns_in_flight:
            # A client that came alone: a thread would only add two wakeups to its latency.
            try:
                self._spawned(connection, peer, self.spawner.spawn(connection, environment), None, inline=True)
            except OSError as error:
                self._spawned(connection, peer, 0, error, inline=True)
            return
        assert self._spawn_threads is not None
        self._spawns_in_flight += 1
        self._spawn_threads.submit(connection, environment, peer)

    def _spawned(self, connection: int, peer: Peer, pid: int, failure: OSError | None, inline: bool = False) -> None:
        if not inline:
            self._spawns_in_flight -= 1
            self._resume()
        if failure is not None:
            # The original's child logged `ok` before its exec failed; no child here, so the
            # server's own pid stands in the line (differences item 1).
            if self.log.verbose:
                self.log.verdict(self._verdict(b"ok", self.pid, peer))
            self._drop(connection, b"unable to run " + self.spawner.program[0] + b": " + error_text(failure).encode())
            return
        if self.log.verbose:
            self.log.served(pid, peer.remote_ip, self._verdict(b"ok", pid, peer))
        os.close(connection)
        self._running.add(pid)
        early_status = self._early_ends.pop(pid, None)
        if early_status is not None:
            self._child_ended(pid, early_status)

    def _on_sigchld(self, _signal: int, _frame: object) -> None:
        if not self._reap_scheduled:
            self._reap_scheduled = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._reap)

    def _reap(self) -> None:
        self._reap_scheduled = False  # a SIGCHLD from now on schedules another round
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            self._child_ended(pid, wait_status)

    def _child_ended(self, pid: int, wait_status: int) -> None:
        if pid not in self._running:
            # Reaped before its spawn was reported back: logged once its pid and ok lines are out.
            self._early_ends[pid] = wait_status
            return
        self._running.discard(pid)
        self.log.end(pid, wait_status)
        self._free_slot()
