"""One TLS session on the server's loop: handshake and relay over an SSLObject and two MemoryBIOs.

Not asyncio's SSL transport (README, sslserver): that one loses the program's last reply when the
client sends close_notify, cannot tell a truncation from a clean close, and fails handshakes
without a word. Here every byte goes through our hands, on the loop's callbacks:

    socket --read--> incoming BIO --SSLObject.read--> to_program --write--> program's fd 0 pipe
    socket <-write-- to_network <--outgoing BIO <--SSLObject.write-- program's fd 1 pipe <--read--

Both buffers are bounded (BUFFER bytes): the socket is not read while the program's pipe is full,
and the program's pipe is not read while the socket does not take what is pending. The close
semantics are ucspi-ssl's ssl_io (README, sslserver, Closing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import ssl
from collections.abc import Callable

from ucspi.tls.context import ssl_reason

BUFFER = 64 * 1024  # bytes per direction, at most, in our hands (the kernel's pipe and socket buffers aside)
_READ = 16 * 1024  # one TLS record's worth of plaintext per call
# After our close_notify, with nobody left to read the peer's data: how long its close_notify may take.
CLOSE_WAIT_SECONDS = 5.0


# The server's costly step (its signature over the ClientHello's answer) runs on these threads,
# not the loop's: OpenSSL releases the GIL, and 8 RSA handshakes on the loop raised another
# session's p99 by about 5 ms (bench/tls_latency.py). One thread per core, 2 at least.
HANDSHAKE_THREADS = max(2, min(len(os.sched_getaffinity(0)), 8))
_pool: concurrent.futures.ThreadPoolExecutor | None = None
# A step still running at its handshake's deadline (a FIFO or a hung mount in CADIR) holds its
# thread for as long as the file says: the pool is replaced, so that HANDSHAKE_THREADS such
# clients do not leave every later handshake waiting for a thread. Up to this many held threads;
# beyond, the pool is kept and handshakes wait for its threads (cut at -T), as before.
HELD_STEPS_REPLACED = 64
_held_steps: list[_StepProgress] = []


class _StepProgress:
    """Where a step in a handshake thread is: written by that thread, read on the loop."""

    __slots__ = ("finished", "pool", "started")

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.pool = pool  # the step's
        self.started = False
        self.finished = False


def _block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # SIGCHLD and the rest: the loop's


def _outcome_of(step: Callable[[], object], progress: _StepProgress) -> BaseException | None:
    """What step() raised, without the handshake thread's frames; None when it returned."""
    progress.started = True
    try:
        step()
    except BaseException as error:
        error.__traceback__ = None
        return error
    finally:
        progress.finished = True
    return None


def _replace_pool_held_by(progress: _StepProgress) -> None:
    """A step outlived its handshake in its thread: later steps go to a new pool, while few are held."""
    global _pool
    _held_steps[:] = [held for held in _held_steps if not held.finished]
    if len(_held_steps) >= HELD_STEPS_REPLACED:
        return
    _held_steps.append(progress)
    if progress.pool is _pool:  # not replaced already (by another step held in the same pool)
        _pool = None
        progress.pool.shutdown(wait=False)  # its other threads end once idle; the held one when its step does


def _handshake_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(
            HANDSHAKE_THREADS, thread_name_prefix="handshake", initializer=_block_signals
        )
    return _pool


class HandshakeFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Expired(Exception):
    pass


class TLSSession:
    """The TLS side of one connection: the socket fd is the connection's, non-blocking from here on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, context: ssl.SSLContext) -> None:
        self.loop = loop
        self.fd = fd
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.server_name: str | None = None  # set by the SNI callback
        os.set_blocking(fd, False)

    # -- the handshake ------------------------------------------------------------------------

    async def handshake(self, timeout: float) -> None:
        """Done within timeout seconds in all (0: no limit), or HandshakeFailed with OpenSSL's reason."""
        deadline = self.loop.time() + timeout if timeout > 0 else None
        sslobj = self.ssl
        offloaded = False
        try:
            while True:
                try:
                    # The ClientHello is in: its answer (key share, signature) off the loop's thread.
                    # So is every step of a handshake that checks a client's certificate: OpenSSL
                    # opens CADIR's files for it (a FIFO or a hung mount there held the loop).
                    # Nothing else touches this session meanwhile: its coroutine is waiting here.
                    if self.incoming.pending and (not offloaded or sslobj.context.verify_mode != ssl.CERT_NONE):
                        offloaded = True
                        await self._off_the_loop(sslobj.do_handshake, deadline)
                    else:
                        sslobj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as error:
                    self._send_alert()
                    raise HandshakeFailed(ssl_reason(error)) from None
                await self._send_all(deadline)
                await self._receive(deadline)
            await self._send_all(deadline)  # the server's Finished, the tickets
        except _Expired:
            raise HandshakeFailed("timeout") from None
        except ConnectionResetError:
            raise HandshakeFailed("connection reset") from None
        except OSError as error:
            raise HandshakeFailed(ssl_reason(error)) from None

    async def _off_the_loop(self, step: Callable[[], object], deadline: float | None) -> None:
        """step() in a handshake thread; what it raised (SSLWantReadError at most steps) raised here.

        The error comes back as the future's result, not its exception: a future holding the
        error whose traceback holds the frames that hold the future is a cycle, and every
        handshake would leave its connection (session, BIOs, buffers) to the cyclic collector.
        """
        pool = _handshake_pool()
        progress = _StepProgress(pool)
        future = self.loop.run_in_executor(pool, _outcome_of, step, progress)
        try:
            if deadline is None:
                error = await future
            else:  # a step stuck in its thread is left there; the connection ends at the deadline all the same
                error = await asyncio.wait_for(future, max(0.0, deadline - self.loop.time()))
        except TimeoutError:
            if progress.started and not progress.finished:
                _replace_pool_held_by(progress)
            raise _Expired() from None
        finally:
            del future  # it holds the error as its result: the raise below must not find it in this frame
        if error is not None:
            try:
                raise error
            finally:
                error = None  # its traceback holds this frame

    def _send_alert(self) -> None:
        """What OpenSSL queued (an alert), once, without waiting: the connection is over anyway."""
        data = self.outgoing.read()
        if data:
            try:
                os.write(self.fd, data)
            except OSError:
                pass

    async def _send_all(self, deadline: float | None) -> None:
        data = self.outgoing.read()
        while data:
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                await self._ready(True, deadline)
                continue
            data = data[sent:]

    async def _receive(self, deadline: float | None) -> None:
        while True:
            try:
                data = os.read(self.fd, BUFFER)
            except BlockingIOError:
                await self._ready(False, deadline)
                continue
            if not data:
                raise HandshakeFailed("connection closed")
            self.incoming.write(data)
            return

    async def _ready(self, writing: bool, deadline: float | None) -> None:
        loop = self.loop
        waiter = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        def expire() -> None:
            if not waiter.done():
                waiter.set_exception(_Expired())

        if writing:
            loop.add_writer(self.fd, wake)
        else:
            loop.add_reader(self.fd, wake)
        timer = loop.call_at(deadline, expire) if deadline is not None else None
        try:
            await waiter
        finally:
            if writing:
                loop.remove_writer(self.fd)
            else:
                loop.remove_reader(self.fd)
            if timer is not None:
                timer.cancel()


class Relay:
    """Plaintext between the session and the program's two pipes, until both sides have ended.

    to_program_fd: our (write) end of the program's fd 0 pipe; from_program_fd: our (read) end of
    its fd 1 pipe; both ours to close. on_end(reason): called once, with None for a clean end and
    OpenSSL's words (or `timeout`, `connection reset`) for a failure.
    """

    def __init__(
        self,
        session: TLSSession,
        to_program_fd: int,
        from_program_fd: int,
        idle_timeout: float,
        on_end: Callable[[str | None], None],
        first_output: bytes = b"",
    ) -> None:
        self.session = session
        self.loop = session.loop
        self.fd = session.fd
        self.to_program_fd: int | None = to_program_fd
        self.from_program_fd: int | None = from_program_fd
        self.idle_timeout = idle_timeout
        self.on_end = on_end
        self.to_program = bytearray()
        self.to_network = bytearray()
        self.peer_ended = False  # its close_notify or FIN came
        # Its FIN came (read() gave b""); fed to the incoming BIO only once the records before it are
        # read: an empty read before that is its close_notify, one after it a truncation (OP_IGNORE_
        # UNEXPECTED_EOF makes both look alike to SSLObject).
        self._peer_fin = False
        self._fin_fed = False
        self.on_truncation: Callable[[], None] | None = None  # called then, before the program sees its EOF
        self.program_ended = False  # EOF on its fd 1
        self.close_notify_sent = False
        self.over = False
        self._watching: set[tuple[int, bool]] = set()
        self._last_activity = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        for fd in (to_program_fd, from_program_fd):
            os.set_blocking(fd, False)
        if first_output:  # -B, through TLS
            self.session.ssl.write(first_output)
        self.to_network += self.session.outgoing.read()

    def start(self) -> None:
        if self.idle_timeout > 0:
            self._idle_timer = self.loop.call_later(self.idle_timeout, self._idle_check)
        # What came with the handshake's last flight is already in the incoming BIO.
        self._pull_plaintext()
        self._after()

    # -- events -------------------------------------------------------------------------------

    def _on_socket_readable(self) -> None:
        try:
            data = os.read(self.fd, BUFFER)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail("connection reset" if isinstance(error, ConnectionResetError) else ssl_reason(error))
            return
        self._last_activity = self.loop.time()
        if data:
            self.session.incoming.write(data)
        else:
            self._peer_fin = True
        self._pull_plaintext()
        self._after()

    def _on_socket_writable(self) -> None:
        self._flush_network()
        self._after()

    def _on_program_writable(self) -> None:
        self._flush_program()
        if not self.over and not self.to_program:
            self._pull_plaintext()  # records left in the incoming BIO while the pipe was full
        self._after()

    def _on_program_readable(self) -> None:
        assert self.from_program_fd is not None
        try:
            data = os.read(self.from_program_fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._last_activity = self.loop.time()
        if data:
            try:
                self.session.ssl.write(data)
            except ssl.SSLError as error:
                self._fail(ssl_reason(error))
                return
        else:
            self._program_output_over()
        self.to_network += self.session.outgoing.read()
        self._flush_network()
        self._after()

    # -- steps --------------------------------------------------------------------------------

    def _pull_plaintext(self) -> None:
        sslobj = self.session.ssl
        while not self.peer_ended:
            if len(self.to_program) >= BUFFER:
                # An empty pipe takes all BUFFER bytes at once; stopping then would leave the records
                # still in the BIO with no callback armed for them (no pipe writer; the socket may
                # bring nothing more). Read on unless the pipe left some behind: its writer pulls.
                self._flush_program()
                if self.to_program:
                    break
            try:
                chunk = sslobj.read(_READ)
            except ssl.SSLWantReadError:
                if self._peer_fin and not self._fin_fed:
                    self._fin_fed = True  # every record before the FIN read, and no close_notify among them
                    self.session.incoming.write_eof()
                    continue
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or a FIN without one (a truncation ssl_io takes as an end too).
                self._peer_over()
                break
            except ssl.SSLError as error:
                self._fail(ssl_reason(error))
                return
            if not chunk:
                self._peer_over()
                break
            if self.to_program_fd is not None:
                self.to_program += chunk
            # else: the program's input is closed; the peer's data goes nowhere.
        self.to_network += self.session.outgoing.read()  # a key update, an alert
        self._flush_program()
        self._flush_network()

    def _peer_over(self) -> None:
        self.peer_ended = True
        if self._fin_fed and self.on_truncation is not None:  # a FIN and no close_notify: truncated
            self.on_truncation()

    def _flush_program(self) -> None:
        fd = self.to_program_fd
        if fd is None:
            self.to_program.clear()
            return
        while self.to_program:
            try:
                written = os.write(fd, self.to_program)
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the program closed its input; it will not read more
                self._close_program_input()
                return
            del self.to_program[:written]
        if self.peer_ended:
            self._close_program_input()  # the program's EOF: the `221 bye` still goes out

    def _flush_network(self) -> None:
        while self.to_network and not self.over:
            try:
                sent = os.write(self.fd, self.to_network)
            except BlockingIOError:
                return
            except OSError as error:
                self._fail("connection reset" if isinstance(error, ConnectionResetError) else ssl_reason(error))
                return
            del self.to_network[:sent]

    def _program_output_over(self) -> None:
        """EOF on the program's fd 1: close_notify; the peer's data still reaches the program."""
        self.program_ended = True
        self._close_fd("from_program_fd")
        self._send_close_notify()
        if self.to_program_fd is None:
            self._arm_close_wait()

    def _send_close_notify(self) -> None:
        if self.close_notify_sent:
            return
        self.close_notify_sent = True
        try:
            self.session.ssl.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # sent; the peer's close_notify is read like any other record
        except (ssl.SSLError, ValueError):
            pass
        self.to_network += self.session.outgoing.read()

    def _close_program_input(self) -> None:
        self.to_program.clear()
        self._close_fd("to_program_fd")
        if self.program_ended:
            self._arm_close_wait()

    def program_gone(self) -> None:
        """The program was reaped: whatever the peer still says has no reader; wait a little only."""
        if not self.over:
            self._close_program_input()
            self._arm_close_wait()
            self._after()

    def _arm_close_wait(self) -> None:
        if self._close_timer is None and not self.over:
            self._close_timer = self.loop.call_later(CLOSE_WAIT_SECONDS, self._close_wait_over)

    def _close_wait_over(self) -> None:
        self._close_timer = None
        if not self.over:
            self._end(None)

    def _idle_check(self) -> None:
        """-w: the first expiry closes the program's input (it may still answer); the next one aborts."""
        self._idle_timer = None
        if self.over:
            return
        now = self.loop.time()
        left = self._last_activity + self.idle_timeout - now
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_check)
            return
        if self.to_program_fd is not None:
            self._close_program_input()
            self._last_activity = now
            self._idle_timer = self.loop.call_later(self.idle_timeout, self._idle_check)
            self._after()
            return
        self._send_close_notify()
        self._fail("timeout")

    # -- registrations and the end ------------------------------------------------------------

    def _after(self) -> None:
        """Watch what can move now; end once both sides have ended and the last bytes are out."""
        if self.over:
            return
        if self.peer_ended and self.program_ended and not self.to_network:
            self._end(None)
            return
        want = set()
        # Nor while OpenSSL's own answers pile up: each KeyUpdate(update_requested) makes one,
        # read or not. The program's output alone stops at BUFFER (below) and never reaches this
        # bound, so a client that reads only once its upload is done still gets all of it.
        if (
            not self.peer_ended
            and not self._peer_fin  # its EOF stays readable: nothing more to read
            and len(self.to_program) < BUFFER
            and self.session.incoming.pending < BUFFER
            and len(self.to_network) < 2 * BUFFER
        ):
            want.add((self.fd, False))
        if self.to_network:
            want.add((self.fd, True))
        if self.from_program_fd is not None and len(self.to_network) < BUFFER:
            want.add((self.from_program_fd, False))
        if self.to_program_fd is not None and self.to_program:
            want.add((self.to_program_fd, True))
        self._watch(want)

    def _watch(self, want: set[tuple[int, bool]]) -> None:
        loop = self.loop
        for fd, writing in self._watching - want:
            (loop.remove_writer if writing else loop.remove_reader)(fd)
        for fd, writing in want - self._watching:
            if fd == self.fd:
                callback = self._on_socket_writable if writing else self._on_socket_readable
            elif writing:
                callback = self._on_program_writable
            else:
                callback = self._on_program_readable
            (loop.add_writer if writing else loop.add_reader)(fd, callback)
        self._watching = want

    def _close_fd(self, attribute: str) -> None:
        fd = getattr(self, attribute)
        if fd is None:
            return
        setattr(self, attribute, None)
        self._watch({entry for entry in self._watching if entry[0] != fd})
        try:
            os.close(fd)
        except OSError:
            pass

    def _fail(self, reason: str) -> None:
        self._end(reason)

    def _end(self, reason: str | None) -> None:
        if self.over:
            return
        if reason is None and not self.close_notify_sent:
            self._send_close_notify()
        if self.to_network:
            try:  # the last bytes and our close_notify, if the socket takes them now
                os.write(self.fd, self.to_network)
            except OSError:
                pass
            self.to_network.clear()
        self.over = True
        self.stop()
        try:
            with _socket_of(self.fd) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.on_end(reason)

    def stop(self) -> None:
        """Every registration and timer gone, our pipe ends closed (the socket is the connection's)."""
        self.over = True
        self._watch(set())
        for timer in (self._idle_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._close_timer = None
        self._close_fd("to_program_fd")
        self._close_fd("from_program_fd")

    def let_go(self) -> None:
        """Stopped for good: the callbacks go, so that the connection they belong to (which holds
        this relay) is freed with its last reference, not left to the cyclic collector."""
        self.stop()
        self.on_end = _ended_already
        self.on_truncation = None


def _ended_already(_reason: str | None) -> None:
    """on_end once the relay was let go: nobody is left to tell."""


class _socket_of:
    __slots__ = ("sock",)

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *_exc: object) -> None:
        self.sock.detach()
