"""The programs: started, known by pid, reaped. Two ways, one interface (make_children):

- EngineChildren, where the C extension is built: the loop spawns (a clone that does not wait
  for the program's exec) and reaps in C at each SIGCHLD, read from a signalfd; no thread and
  no hand-off per client (ucspi/server/_spawn.c says how);
- Children, the fallback: glibc's posix_spawn through ctypes (Spawner.spawn), inline or from
  Python worker threads, reaped on SIGCHLD.

Children's reaper reaps only what a spawn registered. glibc's posix_spawn reaps its own child
when the exec fails; a waitpid(-1) running meanwhile could take that child first, and the pid
would later name someone else's program. So the reaper looks at each ended child first (waitid
with WNOWAIT) and reaps it only when its pid was registered, under the same lock, by the spawn
that made it. A child nobody registered while a spawn is in flight stops the round: it belongs
to a spawn still in flight (its pid not registered yet, or a failed child its spawn reaps), and
that spawn, once over, runs the round again. Nothing ever waits: not the loop, not the spawns.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ucspi.server.spawn import USE_EXTENSION, Spawner, _extension

if TYPE_CHECKING:
    from ucspi.server.connection import Connection

# The fallback's: one spawning thread per core keeps every core busy starting programs (2
# measured best on 2 cores); past 8 they would only contend for the GIL and the loop's hand-offs.
SPAWN_THREADS = max(2, min(len(os.sched_getaffinity(0)), 8))
# Connections waiting for a spawning thread hold a descriptor each: keep them few, as the
# original, whose parent hands each one to its child at once, holds one at a time.
MAX_WAITING_SPAWNS = 16
_REAP_RETRY_SECONDS = 0.1


class _Programs:
    """What the loop sees of either way: start, signal_all, and whether to accept more now.
    Each way starts its spawning and its reaping in _start."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        spawner: Spawner,
        on_fatal: Callable[[bytes], None],
        on_change: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._loop = loop
        self._on_fatal = on_fatal  # the server cannot spawn any more: it exits
        self._on_error = on_error  # a fault no connection owns: said, and the server goes on
        self._on_change = on_change  # a spawn was answered: accepting may resume
        self.alone = False  # set by the loop: the last wakeup found one client only
        self._start(spawner)

    # A start never waits, so the loop starts each client before it looks for the next.
    starts_at_once = False

    def _start(self, spawner: Spawner) -> None:
        raise NotImplementedError

    @property
    def can_take_more(self) -> bool:
        return True


class Children(_Programs):
    """pid -> connection for every running program, the spawns in flight and the reaper."""

    def _start(self, spawner: Spawner) -> None:
        self._spawner = spawner
        self.waiting = 0  # connections handed to the threads and not answered yet
        self._running: dict[int, Connection] = {}
        self._table = threading.Lock()  # the pid table and the count of spawns in flight
        self._spawning = 0  # Spawner.spawn calls in flight, inline or in threads
        self._reap_wanted = False
        self._reap_scheduled = False
        self._jobs: queue.SimpleQueue[tuple[Connection, Sequence[bytes]]] = queue.SimpleQueue()
        # The threads' answers, taken on the loop in batches: one wake-up for all that are ready.
        self._answers: collections.deque[tuple[Connection, int, BaseException | None]] = collections.deque()
        self._answers_scheduled = False
        for _ in range(SPAWN_THREADS):
            self._start_worker()
        # uvloop refuses add_signal_handler(SIGCHLD), but a plain handler works; it only
        # schedules a waitpid(WNOHANG) round on the loop, so no descriptor per child.
        signal.signal(signal.SIGCHLD, self.on_sigchld)

    @property
    def can_take_more(self) -> bool:
        return self.waiting < MAX_WAITING_SPAWNS

    # -- starting ---------------------------------------------------------------------------

    def start(self, connection: Connection, environment: Sequence[bytes]) -> None:
        """Spawn the connection's program; the outcome comes back through connection.spawn_answered."""
        if self.alone and not self.waiting:
            # A client that came alone: a thread would only add two wakeups to its latency.
            pid, failure = self._spawn(connection, environment)
            connection.spawn_answered(pid, failure)
            return
        self.waiting += 1
        self._jobs.put((connection, environment))

    def _spawn(self, connection: Connection, environment: Sequence[bytes]) -> tuple[int, BaseException | None]:
        with self._table:
            self._spawning += 1
        pid, failure = 0, None
        try:
            pid = self._spawner.spawn(connection.stdin_fd, connection.stdout_fd, environment, connection.pass_fds)
        except BaseException as error:
            failure = error
        finally:
            with self._table:
                try:
                    if pid:
                        connection.pid = pid  # known before any reap can hand it its end
                        self._running[pid] = connection
                finally:
                    self._spawning -= 1
                # A reap stopped at a child nobody had registered: this spawn may have been the
                # one it waited for (its pid is registered now, or its failed child is reaped).
                take_over_reap = self._reap_wanted
        if take_over_reap:
            self._schedule_reap()
        return pid, failure

    def _start_worker(self) -> None:
        try:
            threading.Thread(target=self._work, name="spawn", daemon=True).start()
        except Exception as error:  # a server that cannot spawn cannot serve
            self._on_fatal(b"unable to start a spawning thread: " + type(error).__name__.encode())

    def _work(self) -> None:
        try:
            self._serve_jobs()
        finally:
            # Never a server alive but deaf: the loop replaces this thread, or exits.
            self._loop.call_soon_threadsafe(self._start_worker)

    def _serve_jobs(self) -> None:
        # SIGCHLD goes to the loop's thread; the child's own mask is set by the spawn attributes.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        while True:
            connection, environment = self._jobs.get()
            try:
                pid, failure = self._spawn(connection, environment)
            except BaseException as error:  # the connection must hear back, whatever happened
                pid, failure = connection.pid, error
            self._answers.append((connection, pid, failure))
            # Set before the loop clears it, the flag means a round that has not begun: it will
            # see this answer (append and test each hold the GIL, so that order is kept).
            if not self._answers_scheduled:
                self._answers_scheduled = True
                self._loop.call_soon_threadsafe(self._take_answers)

    def _take_answers(self) -> None:
        self._answers_scheduled = False  # an answer appended from now on schedules another round
        answers = self._answers
        try:
            while answers:
                connection, pid, failure = answers.popleft()
                self.waiting -= 1
                try:
                    connection.spawn_answered(pid, failure)
                except Exception as error:  # spawn_answered accounts for its slot: the others still hear
                    self._on_error(error)
        finally:
            if answers and not self._answers_scheduled:  # left by a BaseException: heard next round
                self._answers_scheduled = True
                self._loop.call_soon(self._take_answers)
            self._on_change()

    def signal_all(self, number: int) -> None:
        """number to every running program (a drain's end). Under the table's lock: a pid listed
        there is alive or a zombie not yet reaped, so it names no one else's process."""
        with self._table:
            for pid in self._running:
                try:
                    os.kill(pid, number)
                except OSError:
                    pass  # not ours to signal any more: nothing to do

    # -- reaping ----------------------------------------------------------------------------

    def on_sigchld(self, _signal: int, _frame: object) -> None:
        # Python runs handlers on the main thread, the loop's: no wake-up write is needed.
        if not self._reap_scheduled:
            self._reap_scheduled = True
            self._loop.call_soon(self.reap)

    def _schedule_reap(self) -> None:
        if not self._reap_scheduled:
            self._reap_scheduled = True
            self._loop.call_soon_threadsafe(self.reap)

    def reap(self) -> None:
        """Every program that has ended, each handed to its connection (on the loop).

        With no spawn in flight, waitpid(-1). Otherwise each ended child is looked at first
        (WNOWAIT) and reaped only if a spawn registered it; one nobody registered stops the
        round, and the spawn it belongs to runs the round again when it is over.
        """
        self._reap_scheduled = False  # a SIGCHLD from now on schedules another round
        ended: list[tuple[Connection, int]] = []
        with self._table:
            self._reap_wanted = False
            while True:
                try:
                    if not self._spawning:
                        # No spawn in flight, so no failed child of a spawn's to take: one call per child.
                        pid, wait_status = os.waitpid(-1, os.WNOHANG)
                        if not pid:
                            break
                        connection = self._running.pop(pid, None)
                        if connection is not None:
                            ended.append((connection, wait_status))
                        continue  # an unregistered pid: a child the process had before it was tcpserver
                    found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                    if found is None:
                        break
                    connection = self._running.get(found.si_pid)
                    if connection is None:
                        self._reap_wanted = True
                        break
                    _, wait_status = os.waitpid(found.si_pid, 0)  # a zombie now: at once
                    self._running.pop(found.si_pid, None)
                except ChildProcessError:
                    break
                except Exception as error:
                    # Programs that ended still hold their slots: try again shortly, never give up.
                    self._loop.call_later(_REAP_RETRY_SECONDS, self._schedule_reap)
                    self._on_error(error)
                    break
                if connection is not None:
                    ended.append((connection, wait_status))
        for connection, wait_status in ended:
            connection.reaped(wait_status)


# The engine's events (ucspi/server/_spawn.c, reap()).
_EXEC_FAILED, _ENDED = 1, 3


class EngineChildren(_Programs):
    """The extension's engine: the same interface as Children, without a thread, a hand-off or
    a signal handler per client. The loop spawns (a clone that does not wait for the exec) and
    reaps; a failed exec is told at the reap, as the original's child tells it before its end."""

    starts_at_once = True
    can_take_more = True  # type: ignore[assignment]  # no spawn ever waits for a thread

    def _start(self, spawner: Spawner) -> None:
        # token -> connection, from its spawn to its program's end.
        self._connections: dict[int, Connection] = {}
        self._last_token = 0
        self._events: collections.deque[tuple[int, int, int]] = collections.deque()
        self._reap_scheduled = False
        try:
            _extension.start_engine(spawner.candidates, spawner.argv)
        except Exception as error:  # a server that cannot spawn cannot serve
            self._on_fatal(b"unable to start the spawn engine: " + type(error).__name__.encode())
            return
        # Reaping is a round on the loop at each SIGCHLD (an inherited SIG_IGN is replaced: the
        # kernel would reap every program unseen). Blocked here, it comes as a readable signalfd:
        # one read per batch of ends, no signal frame, no Python handler. The handler stays for
        # a thread that has it unblocked (started before this; every thread of ours blocks it).
        signal.signal(signal.SIGCHLD, self._on_sigchld)
        try:
            child_signal_fd = _extension.child_signal_fd()
        except OSError:  # no signalfd: the handler does it all
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        self._loop.add_reader(child_signal_fd, self.reap)

    def _on_sigchld(self, _signal: int, _frame: object) -> None:
        # Python runs handlers on the main thread, the loop's: no wake-up write is needed.
        if not self._reap_scheduled:
            self._reap_scheduled = True
            self._loop.call_soon(self.reap)

    def start(self, connection: Connection, environment: Sequence[bytes]) -> None:
        """Spawn the connection's program; the outcome comes back through connection.spawn_answered."""
        self._last_token = token = self._last_token + 1
        try:
            pid = _extension.spawn(token, environment, connection.stdin_fd, connection.stdout_fd, connection.pass_fds)
        except BaseException as error:
            connection.spawn_answered(0, error)  # no child
            return
        # Registered before anything can fail: a fault in telling the spawn leaves the slot to
        # the program, whose end still comes.
        self._connections[token] = connection
        connection.pid = pid
        connection.spawn_answered(pid, None)

    def reap(self) -> None:
        """Every program that has ended, each handed to its connection (on the loop)."""
        self._reap_scheduled = False  # a SIGCHLD from now on schedules another round
        events = self._events
        try:
            ended, complete = _extension.reap()  # never waits
            events.extend(ended)
        except Exception as error:
            complete = False
            self._on_error(error)
        if not complete:
            # A child whose end could not be told is left unreaped: tried again shortly.
            self._loop.call_later(_REAP_RETRY_SECONDS, self.reap)
        try:
            while events:
                kind, token, value = events.popleft()
                try:
                    if kind == _ENDED:
                        self._connections.pop(token).reaped(value)
                    else:
                        self._connections[token].exec_failed(OSError(value, os.strerror(value)))
                except Exception as error:  # each connection accounts for its own slot
                    self._on_error(error)
        finally:
            if events:  # left by a BaseException: heard next round
                self._loop.call_soon(self.reap)
            self._on_change()

    def signal_all(self, number: int) -> None:
        """number to every running program (a drain's end)."""
        _extension.signal_all(number)


def make_children(
    loop: asyncio.AbstractEventLoop,
    spawner: Spawner,
    on_fatal: Callable[[bytes], None],
    on_change: Callable[[], None],
    on_error: Callable[[BaseException], None],
) -> Children | EngineChildren:
    """The engine where the extension is in use, else the fallback's threads and SIGCHLD reaper."""
    way = EngineChildren if USE_EXTENSION else Children
    return way(loop, spawner, on_fatal, on_change, on_error)
